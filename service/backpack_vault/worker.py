"""The documented import path for bots: ``from backpack_vault.worker import BrokerClient``.

A thin re-export of :mod:`backpack_vault.client`, kept so that existing bots go on working.
"""

from backpack_vault.client.broker import (
    AccessDenied,
    BrokerAuth,
    BrokerClient,
    BrokerUnavailable,
    Copy,
    CopyUnavailable,
    KeyPending,
    KeyRetired,
    KeyRevoked,
    Watch,
    WatchEvent,
    is_rejection,
)

__all__ = [
    "AccessDenied",
    "BrokerAuth",
    "BrokerClient",
    "BrokerUnavailable",
    "Copy",
    "CopyUnavailable",
    "KeyPending",
    "KeyRetired",
    "KeyRevoked",
    "Watch",
    "WatchEvent",
    "is_rejection",
]
