"""bastionmq: an MQTT 3.1 / 3.1.1 / 5.0 broker with native TLS.

Public API: ``Broker`` (embed a broker in an asyncio application),
``load_config`` / ``Config`` and ``__version__``.
"""

from bastionmq.app import Broker
from bastionmq.config import Config, ConfigError, load_config
from bastionmq.version import __version__

__all__ = ["Broker", "Config", "ConfigError", "load_config", "__version__"]
