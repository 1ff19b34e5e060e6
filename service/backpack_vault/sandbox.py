"""The documented import path of the sandbox: ``from backpack_vault.sandbox import SandboxAdmin``.

A thin re-export of :mod:`backpack_vault.testing.sandbox`; besides ``cli``, the one module
outside ``testing`` that may import it.
"""

from backpack_vault.testing.sandbox import (
    EXPIRED_ANSWER,
    INVALID_SIGNATURE_ANSWER,
    MAINTENANCE_ANSWER,
    READ_ONLY_ANSWER,
    SANDBOX_HEADER,
    UNKNOWN_KEY_ANSWER,
    Answer,
    Faults,
    Fixture,
    SandboxAdmin,
    SandboxState,
    create_app,
    load_fixture,
    serve,
)

__all__ = [
    "EXPIRED_ANSWER",
    "INVALID_SIGNATURE_ANSWER",
    "MAINTENANCE_ANSWER",
    "READ_ONLY_ANSWER",
    "SANDBOX_HEADER",
    "UNKNOWN_KEY_ANSWER",
    "Answer",
    "Faults",
    "Fixture",
    "SandboxAdmin",
    "SandboxState",
    "create_app",
    "load_fixture",
    "serve",
]
