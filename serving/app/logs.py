"""Request ids in every log line: a context variable, a logging filter, and the handler set-up for replicas."""

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


def configure_logging(level: str = "INFO", logger_name: str = "serving") -> None:
    """Send `serving.*` logs to stderr with the request id on every line (idempotent per process).

    Ray Serve only formats its own `ray.serve` logger; replica stderr ends up in the
    replica's log file under /tmp/ray/session_*/logs/serve/ and, by default, on the driver.
    """
    logger = logging.getLogger(logger_name)
    logger.setLevel(level)
    if any(getattr(h, "_vtfuse", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler._vtfuse = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.propagate = False
