"""ccxt's Backpack exchange signed through the daemon (the ``backpack-vault[ccxt]`` extra).

``backpack(config, broker=..., key=..., mode="sign")`` and ``async_backpack(...)``;
see :mod:`backpack_vault.integrations.ccxt`.
"""

from backpack_vault.integrations.ccxt import (
    AsyncBackpack,
    Backpack,
    async_backpack,
    backpack,
    ccxt_error,
)

__all__ = ["AsyncBackpack", "Backpack", "async_backpack", "backpack", "ccxt_error"]
