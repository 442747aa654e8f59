"""Starting a broker that must refuse to start."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bastionmq import Broker, ConfigError


def startup_error(config: Any) -> tuple[str, str]:
    """The one (key path, message) a broker with ``config`` (or a Broker)
    stops start-up with; the test fails if it starts or reports several."""
    broker = config if isinstance(config, Broker) else Broker(config)
    try:
        with pytest.raises(ConfigError) as info:
            asyncio.run(broker.start())
    finally:
        if broker.core is not None:
            asyncio.run(broker.stop())
    (error,) = info.value.errors
    return error
