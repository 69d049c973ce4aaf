"""Structured logs: one JSON object per line with ts, level, logger, msg and the request id.

Library modules only call `logging.getLogger(__name__)`; the entry point (server/cli/main.py) calls
`configure_logging()` once. Nothing here runs at import time.

The request id comes from server.core.request_context (bound per RPC by the error interceptor), so a
log call deep in the generation loop is attributed to its request without passing ids around.
Fields passed with `extra={...}` appear as top-level keys (e.g. rpc, code, duration_ms).

vLLM installs its own handler on the "vllm" logger unless VLLM_CONFIGURE_LOGGING=0 is set before
vllm is imported; set it in the entry point to get vLLM's lines as JSON too.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TextIO

from server.core.request_context import current_request_id

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", (), None)).keys()
) | {"message", "asctime", "request_id", "taskName"}


class RequestIdFilter(logging.Filter):
    """Stamp the current request id on each record as it is emitted (before any queueing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """{"ts": "2026-11-22T10:00:00.123Z", "level": "INFO", "logger": ..., "msg": ..., ...}"""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


_installed_handler: logging.Handler | None = None


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None, json_lines: bool = True) -> logging.Handler:
    """Send the root logger's records to `stream` (stderr) as JSON lines (or plain text for a
    terminal with json_lines=False). Calling it again replaces the handler it installed before."""
    global _installed_handler
    root = logging.getLogger()
    if _installed_handler is not None:
        root.removeHandler(_installed_handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level)
    _installed_handler = handler
    return handler
