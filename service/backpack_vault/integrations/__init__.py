"""Third-party Backpack clients signed through the daemon: ccxt and bpx-py (optional extras).

::

    ccxt / bpx-py builds a request --> KeyHandle
        sign mode: --POST /v1/keys/SUB/NAME/sign {instruction, params, timestamp, window}--> daemon
                   <-- X-API-Key / X-Signature / X-Timestamp / X-Window (the secret never arrives)
        copy mode: --copy (wrapped, unwrapped at Vault)--> kept until 2/3 of its life, watched;
                   dropped on retired / revoked / rotated, or when Backpack rejects the key

The documented import paths are :mod:`backpack_vault.ccxt` and :mod:`backpack_vault.bpx`.
Only the modules named after a client import it; ``import backpack_vault`` imports neither.
"""
