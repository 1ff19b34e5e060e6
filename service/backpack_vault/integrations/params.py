"""Request parameters as third-party clients hold them -> what is both sent and signed.

ccxt and bpx-py take numbers as floats where Backpack's schema has decimal strings,
and may carry ``None`` for an option left out. A float's text is not signable
(``backpack/signing.py`` refuses it), so it becomes its shortest decimal string
(``180.5`` -> ``"180.5"``, ``1e-05`` -> ``"0.00001"``) before the client encodes the
body or query: the wire and the signature then hold the same text. ``None`` is left
out of both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from backpack_vault.errors import InvalidInput

__all__ = ["signable", "signable_batch"]


def _text(key: str, value: float | Decimal) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"parameter {key!r} is {value}: not a number Backpack accepts")
    number = Decimal(repr(value)) if isinstance(value, float) else value
    if not number.is_finite():
        raise InvalidInput(f"parameter {key!r} is {value}: not a number Backpack accepts")
    return format(number.normalize(), "f")


def _plain(key: str, value: Any) -> Any:
    # bool is not a float; ints and strings stay as they are.
    return _text(key, value) if isinstance(value, float | Decimal) else value


def signable(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with floats and Decimals as decimal strings and ``None`` values left out."""
    return {key: _plain(key, value) for key, value in params.items() if value is not None}


def signable_batch(orders: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The same for each order of a batch (``POST /api/v1/orders``)."""
    return [signable(order) for order in orders]
