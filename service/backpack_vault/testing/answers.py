"""The sandbox's error answers: Backpack's ``{"code", "message"}`` bodies and their statuses.

Where Backpack's real answer is undocumented, the sandbox picks one and says so
next to the constant; ``docs/sandbox.md`` lists the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from starlette.responses import JSONResponse

__all__ = [
    "EXPIRED_ANSWER",
    "INVALID_SIGNATURE_ANSWER",
    "MAINTENANCE_ANSWER",
    "READ_ONLY_ANSWER",
    "UNKNOWN_KEY_ANSWER",
    "Answer",
    "Refused",
    "bad_order",
    "bad_request",
    "fault_answer",
    "not_found",
]


@dataclass(frozen=True, slots=True)
class Answer:
    """An error answer: HTTP status and Backpack's ``{"code", "message"}`` body."""

    status: int
    code: str
    message: str

    def response(self) -> JSONResponse:
        return JSONResponse({"code": self.code, "message": self.message}, status_code=self.status)


# Documented message and code (docs/backpack-api.md section 6); the status of both is
# undocumented and 400 is what Backpack answered most recently.
EXPIRED_ANSWER: Final = Answer(400, "INVALID_CLIENT_REQUEST", "Request has expired")
INVALID_SIGNATURE_ANSWER: Final = Answer(400, "INVALID_CLIENT_REQUEST", "Invalid signature")

# OUR CHOICE for an unknown, deleted or revoked API key. Backpack does not
# document this answer (docs/backpack-api.md sections 6, 8 and 11.1). The sandbox answers
# 401 UNAUTHORIZED, which is row 7 of the verdict table (a REJECTED candidate).
# Change it here, and in docs/sandbox.md, once the live answer is known.
UNKNOWN_KEY_ANSWER: Final = Answer(401, "UNAUTHORIZED", "API key is not registered or was revoked")

# OUR CHOICE for a read-only key on a state-changing instruction (docs/backpack-api.md 11.3).
READ_ONLY_ANSWER: Final = Answer(403, "FORBIDDEN", "API key is read-only")

MAINTENANCE_ANSWER: Final = Answer(503, "MAINTENANCE", "Exchange is under maintenance")

# The body sent with an injected fault status.
_FAULT_CODES: Final[dict[int, str]] = {
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "RESOURCE_NOT_FOUND",
    429: "TOO_MANY_REQUESTS",
    503: "MAINTENANCE",
    504: "TIMEOUT",
}
_HTTP_SERVER_ERROR: Final = 500


def fault_answer(status: int) -> Answer:
    default = "SERVER_ERROR" if status >= _HTTP_SERVER_ERROR else "INVALID_CLIENT_REQUEST"
    return Answer(status, _FAULT_CODES.get(status, default), f"Injected fault ({status})")


class Refused(Exception):
    """Raised anywhere below a route; the route answers ``answer``."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.message)
        self.answer = answer


def bad_order(code: str, message: str) -> Refused:
    return Refused(Answer(400, code, message))


def bad_request(message: str) -> Refused:
    return Refused(Answer(400, "INVALID_CLIENT_REQUEST", message))


def not_found(message: str) -> Refused:
    return Refused(Answer(404, "RESOURCE_NOT_FOUND", message))
