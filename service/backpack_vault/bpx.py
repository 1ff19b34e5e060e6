"""bpx-py's ``Account`` signed through the daemon (the ``backpack-vault[bpx]`` extra).

``Account(broker=..., key=..., mode="sign")``; see :mod:`backpack_vault.integrations.bpx`.
"""

from backpack_vault.integrations.bpx import Account

__all__ = ["Account"]
