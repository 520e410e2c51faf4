"""Request ids in every log line: `serving.*` logs go through Ray Serve's logger in replicas, a filter elsewhere.

In a Serve replica, `serving.*` records are handed to Ray Serve's own `ray.serve` logger, so
they land in the replica's log file (/tmp/ray/session_latest/logs/serve/replica_*.log) in the
application's `logging_config` encoding (TEXT or JSON) with Serve's request context on them:
`request_id` (the caller's X-Request-ID / gRPC `request_id` metadata, or Serve's fresh one),
`route`, `application`, `deployment`, `replica`. Outside a replica (the CLI, unit tests) they
go to stderr with `request_id=` from this module's context variable.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("vtfuse_request_id", default="-")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
FORMAT = "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s: %(message)s"


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


def clean_request_id(value: str | None) -> str:
    """The caller's id when it is short and printable (it goes into logs and to Triton), else a fresh one."""
    if value and _SAFE_ID.match(value):
        return value
    return new_request_id()


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` from the current request's context (or `-` outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


SERVE_LOGGER = "ray.serve"
ENCODINGS = ("TEXT", "JSON")


def serve_logging_config(encoding: str = "TEXT", log_level: str = "INFO") -> dict[str, object]:
    """Ray Serve's `logging_config` for the application: the encoding, and the logger name on every line."""
    enc = encoding.upper()
    if enc not in ENCODINGS:
        raise ValueError(f"log encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    return {"encoding": enc, "log_level": log_level, "additional_log_standard_attrs": ["name"]}


class ToServeLogger(logging.Handler):
    """Hands records to Ray Serve's `ray.serve` logger, whose current handlers format and write them."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(SERVE_LOGGER).handle(record)


def _in_serve_replica() -> bool:
    try:
        from ray import serve

        serve.get_replica_context()
        return True
    except Exception:  # not in a replica (CLI, tests, Ray's proxy)
        return False


def configure_logging(level: str = "INFO", logger_name: str = "serving") -> None:
    """Route `serving.*` logs: through Ray Serve's logger in a replica, else to stderr (idempotent per process)."""
    logger = logging.getLogger(logger_name)
    logger.setLevel(level)
    if any(getattr(h, "_vtfuse", False) for h in logger.handlers):
        return
    handler: logging.Handler
    if _in_serve_replica():
        handler = ToServeLogger()
    else:
        handler = logging.StreamHandler()
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter(FORMAT))
    handler._vtfuse = True  # type: ignore[attr-defined,union-attr]
    logger.addHandler(handler)
    logger.propagate = False
