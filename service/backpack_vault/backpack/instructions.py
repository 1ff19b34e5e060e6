"""Backpack's signed REST operations: method + path -> instruction, and whether it changes state.

Built from Backpack's OpenAPI spec (one "Instruction" line per operation); a test
checks this table against the spec's machine-readable copy in ``tests/data``.
Instructions that no REST route carries (WebSocket ``subscribe``) are listed in
:data:`EXTRA_INSTRUCTIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from backpack_vault.errors import InvalidInput

__all__ = [
    "ENDPOINTS",
    "EXTRA_INSTRUCTIONS",
    "Endpoint",
    "is_known",
    "is_state_changing",
    "lookup",
]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    instruction: str
    state_changing: bool
    batch: bool = False


ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    Endpoint("GET", "/api/v1/account", "accountQuery", state_changing=False, batch=False),
    Endpoint("PATCH", "/api/v1/account", "accountUpdate", state_changing=True, batch=False),
    Endpoint(
        "POST", "/api/v1/account/convertDust", "convertDust", state_changing=True, batch=False
    ),
    Endpoint(
        "GET",
        "/api/v1/account/limits/borrow",
        "maxBorrowQuantity",
        state_changing=False,
        batch=False,
    ),
    Endpoint(
        "GET", "/api/v1/account/limits/order", "maxOrderQuantity", state_changing=False, batch=False
    ),
    Endpoint(
        "GET",
        "/api/v1/account/limits/withdrawal",
        "maxWithdrawalQuantity",
        state_changing=False,
        batch=False,
    ),
    Endpoint("POST", "/api/v1/borrowLend", "borrowLendExecute", state_changing=True, batch=False),
    Endpoint(
        "GET",
        "/api/v1/borrowLend/positions",
        "borrowLendPositionQuery",
        state_changing=False,
        batch=False,
    ),
    Endpoint("GET", "/api/v1/capital", "balanceQuery", state_changing=False, batch=False),
    Endpoint(
        "GET", "/api/v1/capital/collateral", "collateralQuery", state_changing=False, batch=False
    ),
    Endpoint("DELETE", "/api/v1/order", "orderCancel", state_changing=True, batch=False),
    Endpoint("GET", "/api/v1/order", "orderQuery", state_changing=False, batch=False),
    Endpoint("POST", "/api/v1/order", "orderExecute", state_changing=True, batch=False),
    Endpoint("DELETE", "/api/v1/orders", "orderCancelAll", state_changing=True, batch=False),
    Endpoint("GET", "/api/v1/orders", "orderQueryAll", state_changing=False, batch=False),
    Endpoint("POST", "/api/v1/orders", "orderExecute", state_changing=True, batch=True),
    Endpoint("GET", "/api/v1/position", "positionQuery", state_changing=False, batch=False),
    Endpoint("POST", "/api/v1/rfq", "rfqSubmit", state_changing=True, batch=False),
    Endpoint("POST", "/api/v1/rfq/accept", "quoteAccept", state_changing=True, batch=False),
    Endpoint("POST", "/api/v1/rfq/cancel", "rfqCancel", state_changing=True, batch=False),
    Endpoint("POST", "/api/v1/rfq/quote", "quoteSubmit", state_changing=True, batch=False),
    Endpoint("POST", "/api/v1/rfq/refresh", "rfqRefresh", state_changing=True, batch=False),
    Endpoint("DELETE", "/api/v1/strategies", "strategyCancelAll", state_changing=True, batch=False),
    Endpoint("GET", "/api/v1/strategies", "strategyQueryAll", state_changing=False, batch=False),
    Endpoint("DELETE", "/api/v1/strategy", "strategyCancel", state_changing=True, batch=False),
    Endpoint("GET", "/api/v1/strategy", "strategyQuery", state_changing=False, batch=False),
    Endpoint("POST", "/api/v1/strategy", "strategyCreate", state_changing=True, batch=False),
    Endpoint(
        "GET",
        "/wapi/v1/capital/deposit/address",
        "depositAddressQuery",
        state_changing=False,
        batch=False,
    ),
    Endpoint(
        "GET", "/wapi/v1/capital/deposits", "depositQueryAll", state_changing=False, batch=False
    ),
    Endpoint(
        "GET",
        "/wapi/v1/capital/withdrawals",
        "withdrawalQueryAll",
        state_changing=False,
        batch=False,
    ),
    Endpoint("POST", "/wapi/v1/capital/withdrawals", "withdraw", state_changing=True, batch=False),
    Endpoint(
        "GET",
        "/wapi/v1/history/borrowLend",
        "borrowHistoryQueryAll",
        state_changing=False,
        batch=False,
    ),
    Endpoint(
        "GET",
        "/wapi/v1/history/borrowLend/positions",
        "borrowPositionHistoryQueryAll",
        state_changing=False,
        batch=False,
    ),
    Endpoint(
        "GET", "/wapi/v1/history/dust", "dustHistoryQueryAll", state_changing=False, batch=False
    ),
    Endpoint(
        "GET", "/wapi/v1/history/fills", "fillHistoryQueryAll", state_changing=False, batch=False
    ),
    Endpoint(
        "GET",
        "/wapi/v1/history/funding",
        "fundingHistoryQueryAll",
        state_changing=False,
        batch=False,
    ),
    Endpoint(
        "GET",
        "/wapi/v1/history/interest",
        "interestHistoryQueryAll",
        state_changing=False,
        batch=False,
    ),
    Endpoint(
        "GET", "/wapi/v1/history/orders", "orderHistoryQueryAll", state_changing=False, batch=False
    ),
    Endpoint(
        "GET",
        "/wapi/v1/history/position",
        "positionHistoryQueryAll",
        state_changing=False,
        batch=False,
    ),
    Endpoint(
        "GET", "/wapi/v1/history/quote", "quoteHistoryQueryAll", state_changing=False, batch=False
    ),
    Endpoint(
        "GET",
        "/wapi/v1/history/quote/fill",
        "quoteFillHistoryQueryAll",
        state_changing=False,
        batch=False,
    ),
    Endpoint(
        "GET", "/wapi/v1/history/rfq", "rfqHistoryQueryAll", state_changing=False, batch=False
    ),
    Endpoint(
        "GET",
        "/wapi/v1/history/rfq/fill",
        "rfqFillHistoryQueryAll",
        state_changing=False,
        batch=False,
    ),
    Endpoint(
        "GET",
        "/wapi/v1/history/settlement",
        "settlementHistoryQueryAll",
        state_changing=False,
        batch=False,
    ),
    Endpoint(
        "GET",
        "/wapi/v1/history/strategies",
        "strategyHistoryQueryAll",
        state_changing=False,
        batch=False,
    ),
)

# Signed, but not by a REST route: private WebSocket streams sign ``subscribe``.
EXTRA_INSTRUCTIONS: Final[frozenset[str]] = frozenset({"subscribe"})

_BY_ROUTE: Final[dict[tuple[str, str], Endpoint]] = {(e.method, e.path): e for e in ENDPOINTS}
_STATE_CHANGING: Final[dict[str, bool]] = {
    e.instruction: e.state_changing for e in ENDPOINTS
} | dict.fromkeys(EXTRA_INSTRUCTIONS, False)


def lookup(method: str, path: str) -> Endpoint:
    """Return the endpoint for an HTTP method and URL path (query string ignored)."""
    route = (method.upper(), path.split("?", 1)[0].rstrip("/") or "/")
    try:
        return _BY_ROUTE[route]
    except KeyError:
        raise InvalidInput(
            f"{route[0]} {route[1]} is not a signed Backpack endpoint this version knows"
        ) from None


def is_known(instruction: str) -> bool:
    return instruction in _STATE_CHANGING


def is_state_changing(instruction: str) -> bool:
    """Whether an instruction changes account state; unknown instructions count as changing."""
    return _STATE_CHANGING.get(instruction, True)
