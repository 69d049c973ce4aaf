"""Soak and fault runs on a `retroserve serve` subprocess (opt-in: RETROSERVE_SLOW=1).

The scenarios live in bench/soak.py, which also produces the README's Reliability figures with
bigger bounds; here each runs small enough to take under three minutes on a 2-core machine
(most of it is the engine loading). Each test starts its own server process, because SIGTERM and
a killed engine end it; every process it starts is gone when it returns.
"""

from __future__ import annotations

import pytest

from bench import soak

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest.fixture
def serve(prepared_model_dir, server_datastore, tmp_path):
    """Start `retroserve serve` with the flags given; stopped (and its engine reaped) afterwards."""
    started = []

    def start(*flags: str) -> soak.ServeProcess:
        process = soak.ServeProcess(["--model-dir", str(prepared_model_dir), "--datastore-dir", str(server_datastore),
                                     "--kv-cache-gib", "1", "--max-num-seqs", "8", *flags],
                                    tmp_path / f"server-{len(started)}.log")
        started.append(process)
        process.wait_serving()
        return process

    yield start
    for process in started:
        process.close()
        assert not process.leftovers, f"processes outlived the server: {process.leftovers}"


def test_sustained_streams_with_cancellations_leave_nothing_behind(serve):
    server = serve("--max-queue", "4")
    result = soak.soak(server, streams=4, duration_s=30, max_new_tokens=24, warmup_s=10)
    assert result.requests >= 8 and result.outcomes.get("OK", 0) >= 4, result
    assert not result.unexpected, result.unexpected
    assert not any(result.open_after.values()), result.open_after
    growth = result.rss_after_mib["total"] - result.rss_before_mib["total"]
    assert growth < 200, f"RSS grew {growth:.0f} MiB over {result.requests} requests"

    refused = soak.overload(server, max_queue=4, calls=20)
    assert refused.ok, refused
    assert refused.sequential_ms["p99"] < 500, refused.sequential_ms

    assert soak.duplicate_ids(server).ok


def test_sigterm_during_load_completes_every_admitted_request(serve):
    server = serve("--max-queue", "6", "--grace-period-s", "120")
    result = soak.sigterm_during_load(server, streams=6, late=6, max_new_tokens=32)
    assert not result.lost, result.lost
    assert result.before_signal == {"OK": 6}, result
    assert result.exit_code == 0 and not result.leftovers, result


def test_a_killed_engine_makes_the_server_unavailable_and_exit_non_zero(serve):
    server = serve("--max-queue", "4")
    result = soak.engine_kill(server, streams=3)
    assert result.exit_code == 3, result
    assert set(result.in_flight) == {"UNAVAILABLE"}, result
    statuses = [status for _, status in result.health_seen]
    assert "NOT_SERVING" in statuses, result.health_seen  # probes are answered while it cleans up
    assert "SERVING" not in statuses[statuses.index("NOT_SERVING"):], result.health_seen
    assert not result.leftovers, f"engine processes outlived the server: {result.leftovers}"
