"""Structured logs: one JSON object per line with ts, level, logger, msg and the request id.

Library modules only call `logging.getLogger(__name__)`; the entry point (server/cli/main.py) calls
`configure_logging()` once. Nothing here runs at import time.

The request id comes from server.core.request_context (bound per RPC by the error interceptor), so a
log call deep in the generation loop is attributed to its request without passing ids around.
Fields passed with `extra={...}` appear as top-level keys (e.g. rpc, code, duration_ms).

vLLM configures its "vllm" logger in each of its processes (server, EngineCore, workers);
`route_vllm_logs` hands it a dictConfig file through VLLM_LOGGING_CONFIG_PATH so that those
processes write the same JSON lines, and demotes the warnings listed in KNOWN_VLLM_NOTICES to INFO.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
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


KNOWN_VLLM_NOTICES: tuple[tuple[str, str], ...] = (
    ("Enforce eager set", "the CPU engine runs eagerly on purpose (EngineConfig.enforce_eager)"),
    ("Inductor compilation was disabled", "follows from enforce_eager"),
    ("Model Runner V2 requires Triton", "Triton has no CPU backend; V1 is vLLM's CPU model runner"),
    ("Triton is not installed. triton-cpu is expected", "triton-cpu is not published on PyPI"),
    ("Triton is installed, but doesn't include CPU backend",
     "triton is installed for the CUDA kNN kernel and xgrammar; it has no CPU backend"),
    ("is not found in LD_PRELOAD", "preloading tcmalloc / Intel OpenMP is a deployment choice, not a fault"),
)
"""(text found in a vLLM warning, why it is no operator's to-do here): logged at INFO, not WARNING."""


class KnownVllmNotices(logging.Filter):
    """Demote the warnings of KNOWN_VLLM_NOTICES to INFO, so that WARNING means act on it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.name.startswith("vllm"):
            message = record.getMessage()
            if any(notice in message for notice, _ in KNOWN_VLLM_NOTICES):
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


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
    handler.addFilter(KnownVllmNotices())
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level)
    _installed_handler = handler
    return handler


_CONFIG_PREFIX = "retroserve-vllm-logging-"


def configure_spawned_process() -> None:
    """In a process that vLLM spawned from this server (EngineCore, a worker), apply the logging
    config `route_vllm_logs` wrote, before vLLM's own imports log anything: multiprocessing imports
    the entry module (server/cli/main.py, which calls this) in each child first. A no-op elsewhere."""
    import multiprocessing

    path = os.environ.get("VLLM_LOGGING_CONFIG_PATH", "")
    # While a spawned child imports the entry module, parent_process() is not set yet; its name is.
    if multiprocessing.current_process().name == "MainProcess" or not Path(path).name.startswith(_CONFIG_PREFIX):
        return
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return  # vLLM reports an unreadable config itself when it applies it
    import logging.config

    logging.config.dictConfig(config)


def route_vllm_logs(level: str | int = "INFO") -> Path | None:
    """Make every vLLM process of this server (and its children) log JSON lines at `level` with the
    known notices demoted: writes a dictConfig file and names it in VLLM_LOGGING_CONFIG_PATH before
    vLLM starts. A config the operator set already is left alone (returns None)."""
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH"):
        return None
    level_name = logging.getLevelName(level) if isinstance(level, int) else str(level).upper()
    here = __name__
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{here}.JsonFormatter"}},
        "filters": {"request_id": {"()": f"{here}.RequestIdFilter"},
                    "known_notices": {"()": f"{here}.KnownVllmNotices"}},
        "handlers": {"json": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                              "formatter": "json", "filters": ["request_id", "known_notices"]}},
        "loggers": {"vllm": {"handlers": ["json"], "level": level_name, "propagate": False}},
    }
    handle, name = tempfile.mkstemp(prefix=_CONFIG_PREFIX, suffix=".json")
    with os.fdopen(handle, "w") as out:
        json.dump(config, out)
    path = Path(name)
    atexit.register(path.unlink, missing_ok=True)
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)
    return path


SERVER_PROCESS_ENVIRONMENT: tuple[tuple[str, str, str], ...] = (
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1", "loading bars are terminal output, not log lines"),
    ("PYTHONWARNINGS", "ignore::FutureWarning:vllm.triton_utils.dispatcher",
     "vLLM 0.32 touches torch.distributed.reduce_op while scanning modules (not our call to change)"),
    ("TORCH_CPP_LOG_LEVEL", "ERROR",
     "C++ notices such as vLLM's NUMA memory binding bypass logging; errors still print"),
)
"""(variable, value, why): set for `retroserve serve` and inherited by its engine processes,
unless the operator set the variable already."""


def set_server_process_environment() -> None:
    """A server's stderr is log lines: apply SERVER_PROCESS_ENVIRONMENT before vLLM starts."""
    for name, value, _ in SERVER_PROCESS_ENVIRONMENT:
        os.environ.setdefault(name, value)
