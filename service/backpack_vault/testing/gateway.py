"""What every public and signed route shares: faults on the way in, counts on the way out."""

from __future__ import annotations

from collections.abc import Callable

import anyio
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backpack_vault.core.verdicts import SANDBOX_HEADER
from backpack_vault.testing.answers import fault_answer
from backpack_vault.testing.faults import Faults
from backpack_vault.testing.state import SandboxState

__all__ = ["SANDBOX_HEADER", "Gateway", "SandboxHeader"]

# The header every sandbox answer carries (Backpack's own answers never do).


class Gateway:
    def __init__(self, state: SandboxState, clock: Callable[[], float]) -> None:
        self.state = state
        self.clock = clock

    def server_ms(self, faults: Faults) -> int:
        return int(self.clock() * 1000) + faults.clock_offset_ms

    async def enter(self, request: Request, api_key: str | None) -> tuple[Faults, Response | None]:
        """Count the request; sleep and answer a fault if one hits it."""
        route = f"{request.method} {request.url.path}"
        faults, hit = self.state.arrive(route, api_key)
        if hit and faults.latency_ms:
            await anyio.sleep(faults.latency_ms / 1000)
        if hit and faults.status:
            return faults, fault_answer(faults.status).response()
        return faults, None

    def done(self, request: Request, response: Response) -> Response:
        self.state.answered(f"{request.method} {request.url.path}", response.status_code)
        return response


class SandboxHeader:
    """ASGI middleware: every answer says it comes from a sandbox (unknown routes and errors
    too), so that a verdict reached here is never written for a key of the real exchange."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[SANDBOX_HEADER] = "true"
            await send(message)

        await self.app(scope, receive, stamped)
