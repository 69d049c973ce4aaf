"""A plain serve -> request -> SIGTERM cycle, as a new user runs it: `retroserve serve` as its own
process (with its vLLM engine processes), one Generate with chunk retrieval, SIGTERM. Its stderr
must be log lines an operator can act on: JSON records, none at WARNING or above, no Python or C++
warning, no traceback, and the server exits 0 leaving no process behind.
"""

from __future__ import annotations

import json

import pytest

from bench import soak
from server.client import RetroserveClient

pytestmark = pytest.mark.engine

def test_serve_request_sigterm_logs_no_warning_and_no_traceback(prepared_model_dir, server_datastore, tmp_path):
    log_path = tmp_path / "serve.log"
    server = soak.ServeProcess(["--model-dir", str(prepared_model_dir), "--datastore-dir", str(server_datastore),
                                "--kv-cache-gib", "1", "--max-num-seqs", "4"], log_path)
    try:
        server.wait_serving()
        with RetroserveClient(server.address, timeout=120) as client:
            reply = client.generate("The with statement in Python", max_new_tokens=16, mode="chunk",
                                    return_provenance=True)
        assert reply.text and reply.retrievals, reply
    finally:
        exit_code = server.close()
    assert exit_code == 0, log_path.read_text()[-3000:]
    assert not server.leftovers, server.leftovers

    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    loud = [record for record in records if record["level"] not in ("DEBUG", "INFO")]
    assert not loud, "\n".join(json.dumps(record)[:300] for record in loud)
    plain = [line for line in lines if not line.startswith("{")]
    assert not plain, "\n".join(plain[:20])
    engine_processes = {record.get("vllm_process_name") for record in records}
    assert {"EngineCore"} <= engine_processes, engine_processes  # vLLM's processes log JSON lines too
    messages = [record["msg"] for record in records]
    assert "SERVING" in messages and any(message.startswith("signal received") for message in messages)
    assert any(message.startswith("Generate ok") for message in messages)
