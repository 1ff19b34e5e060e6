"""What users' tests and ours import: the sandbox exchange and small test helpers.

``from backpack_vault.testing import FakeClock, wait_until, store_key`` as one
would ``from structlog.testing import capture_logs``; the sandbox exchange is
:mod:`backpack_vault.testing.sandbox`.
"""

from backpack_vault.testing.helpers import (
    NOW,
    FakeClock,
    make_record,
    now_iso,
    rotate_now,
    store_key,
    wait_until,
)

__all__ = [
    "NOW",
    "FakeClock",
    "make_record",
    "now_iso",
    "rotate_now",
    "store_key",
    "wait_until",
]
