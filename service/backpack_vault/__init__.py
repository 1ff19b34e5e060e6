"""backpack-vault: Backpack Exchange API keys kept in Vault, handed to bots under Vault policy.

Data flow::

    operator --CLI--> intake (validate the Ed25519 pair) --> Vault KV v2 (CAS + custom_metadata)

    worker --HTTP + its own Vault token--> api --> broker
        broker --sys/capabilities-self (worker's token, grant path)--> allow / deny
        broker --sys/wrapping/wrap {copy}--> single-use wrapping token --> worker unwraps at Vault
        broker --sign in memory--> X-API-Key / X-Signature / X-Timestamp / X-Window

    scheduler --> checks --signed GET /api/v1/account--> Backpack
        REJECTED twice --> status=revoked in Vault --> revoke unclaimed wrapping tokens,
        refuse copies and signatures, alert

The pure core (``signing``, ``keys``, ``instructions``) does no I/O; ``vault``
is the only module that imports hvac; ``daemon`` is the only one that schedules.
"""

from importlib.metadata import PackageNotFoundError, version

from backpack_vault.backpack.signing import sign_request

__all__ = ["__version__", "sign_request"]

try:
    __version__ = version("backpack-vault")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
