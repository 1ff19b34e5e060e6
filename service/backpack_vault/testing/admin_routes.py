"""Admin routes under ``/_sandbox/``: keys, faults, counts, balances, reset. Never faulted."""

from __future__ import annotations

import json
from typing import Any, Final

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from backpack_vault.errors import InvalidInput
from backpack_vault.testing.faults import Faults
from backpack_vault.testing.state import SandboxState

__all__ = ["AdminRoutes"]

log = structlog.get_logger()

_MAX_ADMIN_BODY: Final = 64 * 1024


def _admin_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _admin_body(request: Request) -> tuple[dict[str, Any], Response | None]:
    raw = await request.body()
    if len(raw) > _MAX_ADMIN_BODY:
        return {}, _admin_error(413, f"body is larger than {_MAX_ADMIN_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        return {}, _admin_error(400, "body is not JSON")
    if not isinstance(data, dict):
        return {}, _admin_error(400, "body must be a JSON object")
    return data, None


class AdminRoutes:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    async def keys(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(self.state.keys())
        data, problem = await _admin_body(request)
        if problem is not None:
            return problem
        api_key, read_only = data.get("api_key"), data.get("read_only", False)
        if not isinstance(api_key, str) or not isinstance(read_only, bool):
            return _admin_error(400, "api_key (string) and read_only (boolean) are expected")
        try:
            created = self.state.register(api_key, read_only=read_only)
        except InvalidInput as exc:
            return _admin_error(400, exc.message)
        log.info("sandbox.key_registered", api_key=api_key.strip(), read_only=read_only)
        return JSONResponse(
            {"api_key": api_key.strip(), "read_only": read_only, "revoked": False},
            status_code=201 if created else 200,
        )

    async def revoke(self, request: Request) -> Response:
        data, problem = await _admin_body(request)
        if problem is not None:
            return problem
        api_key = data.get("api_key")
        if not isinstance(api_key, str):
            return _admin_error(400, "api_key (string) is expected")
        if not self.state.revoke(api_key):
            return _admin_error(404, "no such key is registered")
        log.info("sandbox.key_revoked", api_key=api_key.strip())
        return JSONResponse({"api_key": api_key.strip(), "revoked": True})

    async def faults(self, request: Request) -> Response:
        if request.method == "POST":
            data, problem = await _admin_body(request)
            if problem is not None:
                return problem
            try:
                self.state.set_faults(Faults.from_json(data))
            except ValueError as exc:
                return _admin_error(400, str(exc))
            log.info("sandbox.faults_set", **self.state.faults.as_dict())
        elif request.method == "DELETE":
            self.state.clear_faults()
            log.info("sandbox.faults_cleared")
        return JSONResponse(self.state.faults.as_dict())

    async def stats(self, _request: Request) -> Response:
        return JSONResponse(self.state.stats())

    async def balances(self, request: Request) -> Response:
        """GET ``?api_key=``: the key's capital. POST ``{"api_key", "balances": {asset: amount}}``:
        set available amounts."""
        if request.method == "GET":
            capital = self.state.balances(request.query_params.get("api_key", "").strip())
        else:
            data, problem = await _admin_body(request)
            if problem is not None:
                return problem
            api_key, balances = data.get("api_key"), data.get("balances")
            if not isinstance(api_key, str) or not isinstance(balances, dict):
                return _admin_error(400, "api_key (string) and balances (object) are expected")
            try:
                capital = self.state.set_balances(api_key.strip(), balances)
            except ValueError as exc:
                return _admin_error(400, str(exc))
            log.info("sandbox.balances_set", api_key=api_key.strip(), assets=sorted(balances))
        if capital is None:
            return _admin_error(404, "no such key is registered")
        return JSONResponse(capital)

    async def reset(self, _request: Request) -> Response:
        self.state.reset()
        log.info("sandbox.reset")
        return JSONResponse({"reset": True})

    def routes(self) -> list[Route]:
        return [
            Route("/_sandbox/keys", self.keys, methods=["GET", "POST"]),
            Route("/_sandbox/keys/revoke", self.revoke, methods=["POST"]),
            Route("/_sandbox/faults", self.faults, methods=["GET", "POST", "DELETE"]),
            Route("/_sandbox/stats", self.stats, methods=["GET"]),
            Route("/_sandbox/balances", self.balances, methods=["GET", "POST"]),
            Route("/_sandbox/reset", self.reset, methods=["POST"]),
        ]
