"""JSON log lines carry the request id of the RPC they were logged in, and importing server modules
configures nothing (only the entry point calls configure_logging)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

from server.core import request_context
from server.observability.logging_setup import configure_logging


def test_json_lines_with_request_id_and_extras():
    stream = io.StringIO()
    handler = configure_logging("INFO", stream=stream)
    try:
        log = logging.getLogger("retroserve.test")
        token = request_context.bind(request_context.RequestContext("req-42", "Generate"))
        try:
            log.info("segment %d done", 3, extra={"tokens": 16})
        finally:
            request_context.unbind(token)
        log.warning("outside any request")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "segment 3 done" and first["request_id"] == "req-42" and first["tokens"] == 16
    assert first["level"] == "INFO" and first["logger"] == "retroserve.test" and first["ts"].endswith("Z")
    assert "request_id" not in second
    assert "ValueError: boom" in third["exc"]


def test_importing_server_modules_configures_no_logging():
    code = (
        "import logging\n"
        "import server.api.errors, server.observability.metrics, server.api.validation, server.client\n"
        "import server.cli.generate, server.observability.logging_setup\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parent.parent))
