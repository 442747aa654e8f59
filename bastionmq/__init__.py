"""bastionmq: an MQTT 3.1 / 3.1.1 / 5.0 broker with native TLS.

Public API: ``Broker`` (embed a broker in an asyncio application; its
``Hooks``, the ``LocalMessage`` an in-process subscriber or observer gets,
the ``ConnectedClient`` of ``Broker.clients``), ``load_config`` /
``Config`` and ``__version__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bastionmq.app import Broker
    from bastionmq.broker.local import LocalMessage, SubscriptionClosed
    from bastionmq.config import Config, ConfigError, load_config
    from bastionmq.hooks import ConnectedClient, Hooks
    from bastionmq.version import __version__

__all__ = ["Broker", "Config", "ConfigError", "ConnectedClient", "Hooks", "LocalMessage",
           "SubscriptionClosed", "load_config", "__version__"]

# Loaded on first use: pytest imports bastionmq.testing (and with it this
# package) in every project that has bastionmq installed, and the broker's
# modules take a second or more to import (and the version a look-up).
_LAZY = {"Broker": "bastionmq.app", "Config": "bastionmq.config",
         "ConfigError": "bastionmq.config", "load_config": "bastionmq.config",
         "__version__": "bastionmq.version",
         "Hooks": "bastionmq.hooks", "ConnectedClient": "bastionmq.hooks",
         "LocalMessage": "bastionmq.broker.local",
         "SubscriptionClosed": "bastionmq.broker.local"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bastionmq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
