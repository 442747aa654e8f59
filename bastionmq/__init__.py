"""bastionmq: an MQTT 3.1 / 3.1.1 / 5.0 broker with native TLS.

Public API: ``Broker`` (embed a broker in an asyncio application),
``load_config`` / ``Config`` and ``__version__``.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("bastionmq")
except PackageNotFoundError:  # pragma: no cover - running from an unusual layout
    __version__ = "0.0.0"

from bastionmq.app import Broker  # noqa: E402
from bastionmq.config import Config, ConfigError, load_config  # noqa: E402

__all__ = ["Broker", "Config", "ConfigError", "load_config", "__version__"]
