"""structlog setup: JSON lines (or console on a terminal), redaction before rendering.

Events are dotted names with key/value context: ``log.info("broker.copy_issued",
key="main/bot-a", ttl_s=60)``. :func:`redact` masks any field whose name says it
holds secret material, and any ``Secret`` value, before a renderer sees it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

import orjson
import structlog

from backpack_vault.config import Secret

__all__ = ["REDACTED", "SENSITIVE_FIELDS", "configure", "get_logger", "redact"]

REDACTED: Final = "***"
SENSITIVE_FIELDS: Final = frozenset(
    {
        "api_secret",
        "secret",
        "token",
        "vault_token",
        "wrap_token",
        "client_token",
        "secret_id",
        "signature",
        "x-signature",
        "seed",
        "headers",
        "authorization",
        "x-vault-token",
        "jwt",
        "password",
    }
)


def _scrub(value: Any) -> Any:
    if isinstance(value, Secret):
        return REDACTED
    if isinstance(value, dict):
        return {
            k: REDACTED if str(k).lower() in SENSITIVE_FIELDS else _scrub(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask sensitive fields and Secret values, recursively."""
    for key in list(event_dict):
        if key.lower() in SENSITIVE_FIELDS:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the stdlib handler this module installs, so configure() replaces only it."""


def _json(obj: Any, **_options: Any) -> str:
    """orjson for every log line: a few times faster than json.dumps on the request path."""
    return orjson.dumps(obj, default=str).decode()


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once, at the edge (cli); stdlib loggers (uvicorn, apscheduler,
    httpx) are rendered the same way, through the same redaction."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_json)
    )
    handler = _OurHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO (a webhook URL can carry a token); apscheduler
    # logs every job run at INFO, which drowned the daemon's own events.
    for noisy in ("httpx", "httpcore", "hpack", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()
