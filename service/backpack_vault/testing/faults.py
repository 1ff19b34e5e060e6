"""What the sandbox does wrong on purpose: the fault set the admin routes replace."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

__all__ = ["Faults"]

_HTTP_CLIENT_ERROR: Final = 400
_HTTP_MAX: Final = 599


@dataclass(frozen=True, slots=True)
class Faults:
    """What the sandbox does wrong. Each POST to ``/_sandbox/faults`` replaces the whole set.

    ``status`` and ``latency_ms`` hit a fraction ``rate`` of requests to the
    public and signed routes, drawn from the state's seeded RNG.
    ``maintenance`` and ``clock_offset_ms`` hit every request.
    ``time_skew_ms`` makes ``/api/v1/time`` lie by that much relative to the
    clock that checks timestamps (a drifting node behind a load balancer).
    """

    status: int | None = None
    rate: float = 1.0
    latency_ms: int = 0
    maintenance: bool = False
    clock_offset_ms: int = 0
    time_skew_ms: int = 0

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Parse an admin request body; ValueError says which field is wrong."""
        if not isinstance(data, dict):
            raise ValueError("body must be a JSON object")  # noqa: TRY004 - one error type for callers
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        _require(not unknown, f"unknown field(s): {', '.join(unknown)}")
        status = data.get("status")
        _require(
            status is None or (_is_int(status) and _HTTP_CLIENT_ERROR <= status <= _HTTP_MAX),
            "status must be an HTTP error status, 400-599",
        )
        rate = data.get("rate", 1.0)
        _require(
            not isinstance(rate, bool) and isinstance(rate, int | float) and 0 <= rate <= 1,
            "rate must be a number from 0 to 1",
        )
        latency = data.get("latency_ms", 0)
        _require(_is_int(latency) and latency >= 0, "latency_ms must be a non-negative integer")
        maintenance = data.get("maintenance", False)
        _require(isinstance(maintenance, bool), "maintenance must be true or false")
        for name in ("clock_offset_ms", "time_skew_ms"):
            _require(_is_int(data.get(name, 0)), f"{name} must be an integer")
        return cls(
            status=status,
            rate=float(rate),
            latency_ms=latency,
            maintenance=maintenance,
            clock_offset_ms=data.get("clock_offset_ms", 0),
            time_skew_ms=data.get("time_skew_ms", 0),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
