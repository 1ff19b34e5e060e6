"""The documented import path for bots: ``from backpack_vault.worker import BrokerClient``.

A thin re-export of :mod:`backpack_vault.client`, kept so that existing bots go on working.
"""

from backpack_vault.client.aio import AsyncBrokerAuth, AsyncBrokerClient
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
from backpack_vault.client.vault_auth import VaultAuth

__all__ = [
    "AccessDenied",
    "AsyncBrokerAuth",
    "AsyncBrokerClient",
    "BrokerAuth",
    "BrokerClient",
    "BrokerUnavailable",
    "Copy",
    "CopyUnavailable",
    "KeyPending",
    "KeyRetired",
    "KeyRevoked",
    "VaultAuth",
    "Watch",
    "WatchEvent",
    "is_rejection",
]
