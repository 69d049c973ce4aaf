"""The metrics endpoint serves Prometheus text that parses, with the documented names, and its
counters move with observations. The HTTP server binds 127.0.0.1:0; each test owns a registry."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from server.observability.metrics import Metrics, split_address, start_metrics_server, stop_metrics_server


@pytest.fixture
def endpoint():
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    server, thread, port = start_metrics_server("127.0.0.1:0", registry=metrics.exposed_registry)
    yield metrics, f"http://127.0.0.1:{port}/metrics"
    stop_metrics_server(server, thread)


def scrape(url: str) -> dict[str, float]:
    """{sample name + sorted labels: value} from one scrape, parsed as Prometheus text."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def families(url: str) -> dict[str, str]:
    """{family name: type} from one scrape (families appear even before their first sample)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        parsed = text_string_to_metric_families(response.read().decode())
        return {family.name: family.type for family in parsed}


def test_names_follow_prometheus_conventions(endpoint):
    metrics, url = endpoint
    samples = scrape(url)
    exposed = families(url)
    # The parser drops counters' _total; the exposition carries it (checked on samples below).
    assert exposed == {
        "retroserve_request_duration_seconds": "histogram",
        "retroserve_requests": "counter",
        "retroserve_errors": "counter",
        "retroserve_time_to_first_token_seconds": "histogram",
        "retroserve_inter_token_latency_seconds": "histogram",
        "retroserve_prompt_tokens": "counter",
        "retroserve_generated_tokens": "counter",
        "retroserve_requests_running": "gauge",
        "retroserve_requests_waiting": "gauge",
        "retroserve_retrieval_duration_seconds": "histogram",
        "retroserve_retrieval_phase_duration_seconds": "histogram",
        "retroserve_retrieval_batch_queries": "histogram",
        "retroserve_retrievals_per_request": "histogram",
        "retroserve_retrieval_cache_hits": "counter",
        "retroserve_retrieval_cache_misses": "counter",
        "retroserve_shard_search_duration_seconds": "histogram",
        "retroserve_shard_failures": "counter",
        "retroserve_engine_prompt_tokens": "counter",
        "retroserve_prefix_cache_cached_tokens": "counter",
        "retroserve_computed_prompt_tokens": "counter",
        "retroserve_chunk_segments": "counter",
        "retroserve_datastore_swaps": "counter",
        "retroserve_retired_datastores_open": "gauge",
    }
    names = {name.split("{")[0] for name in samples}
    for counter in ("retroserve_prompt_tokens_total", "retroserve_retrieval_cache_misses_total",
                    "retroserve_prefix_cache_cached_tokens_total", "retroserve_engine_prompt_tokens_total"):
        assert counter in names
    families_with_samples = names
    assert all(name.startswith("retroserve_") for name in families_with_samples)
    # Fixed label sets exist before the first event.
    for phase in ("embed", "search", "payload"):
        assert samples[f"retroserve_retrieval_phase_duration_seconds_count{{phase={phase}}}"] == 0
    assert samples["retroserve_retrieval_cache_hits_total{kind=approximate}"] == 0
    for outcome in ("ok", "refused", "error"):
        assert samples[f"retroserve_datastore_swaps_total{{outcome={outcome}}}"] == 0


def test_counters_move_with_observations(endpoint):
    metrics, url = endpoint
    before = scrape(url)
    metrics.observe_rpc("Generate", "chunk", "OK", 0.5)
    metrics.observe_rpc("Generate", "none", "INVALID_ARGUMENT", 0.001)
    metrics.observe_generation(prompt_tokens=12, generated_tokens=64, retrievals=4, cached_tokens=100,
                               engine_prompt_tokens=300, mode="chunk", continued_segments=1)
    metrics.observe_first_token(0.2, mode="chunk")
    metrics.observe_token_gap(0.09, tokens=3, mode="chunk")
    metrics.observe_retrieval(0.004)
    metrics.observe_retrieval_phases(embed=0.002, search=0.001, payload=0.0005, queries=5)
    metrics.observe_cache(hits=2, misses=5, approximate_hits=1)
    metrics.requests_running.inc(2)
    metrics.requests_waiting.set(3)
    after = scrape(url)

    assert "retroserve_requests_total{code=OK,rpc=Generate}" not in before
    assert after["retroserve_requests_total{code=OK,rpc=Generate}"] == 1
    assert after["retroserve_requests_total{code=INVALID_ARGUMENT,rpc=Generate}"] == 1
    assert after["retroserve_errors_total{code=INVALID_ARGUMENT,rpc=Generate}"] == 1
    assert "retroserve_errors_total{code=OK,rpc=Generate}" not in after
    assert after["retroserve_request_duration_seconds_count{mode=chunk,rpc=Generate}"] == 1
    assert after["retroserve_request_duration_seconds_sum{mode=chunk,rpc=Generate}"] == pytest.approx(0.5)
    assert after["retroserve_prompt_tokens_total{}"] == before["retroserve_prompt_tokens_total{}"] + 12
    assert after["retroserve_generated_tokens_total{mode=chunk}"] == 64
    assert after["retroserve_generated_tokens_total{mode=none}"] == 0
    assert after["retroserve_computed_prompt_tokens_total{mode=chunk}"] == 300 - 100
    # 4 retrievals: the first builds the context, one continued it, two rebuilt it.
    assert after["retroserve_chunk_segments_total{context=continued}"] == 1
    assert after["retroserve_chunk_segments_total{context=rebuilt}"] == 2
    assert after["retroserve_retrievals_per_request_sum{}"] == 4
    assert after["retroserve_prefix_cache_cached_tokens_total{}"] == 100
    assert after["retroserve_engine_prompt_tokens_total{}"] == 300
    assert after["retroserve_time_to_first_token_seconds_count{mode=chunk}"] == 1
    # A delta of 3 tokens after 90 ms is three gaps of 30 ms, not one slow token.
    assert after["retroserve_inter_token_latency_seconds_count{mode=chunk}"] == 3
    assert after["retroserve_inter_token_latency_seconds_sum{mode=chunk}"] == pytest.approx(0.09)
    assert after["retroserve_inter_token_latency_seconds_bucket{le=0.04,mode=chunk}"] == 3
    assert after["retroserve_retrieval_duration_seconds_count{}"] == 1
    assert after["retroserve_retrieval_phase_duration_seconds_sum{phase=embed}"] == pytest.approx(0.002)
    assert after["retroserve_retrieval_batch_queries_sum{}"] == 5
    assert after["retroserve_retrieval_cache_hits_total{kind=exact}"] == 2
    assert after["retroserve_retrieval_cache_hits_total{kind=approximate}"] == 1
    assert after["retroserve_retrieval_cache_misses_total{}"] == 5
    assert after["retroserve_requests_running{}"] == 2
    assert after["retroserve_requests_waiting{}"] == 3


def test_shard_series_exist_per_shard_and_reason_and_move(endpoint):
    metrics, url = endpoint
    metrics.init_shards(2)
    before = scrape(url)
    for shard in ("0", "1"):
        assert before[f"retroserve_shard_search_duration_seconds_count{{shard={shard}}}"] == 0
        for reason in ("timeout", "unavailable", "error"):
            assert before[f"retroserve_shard_failures_total{{reason={reason},shard={shard}}}"] == 0
    metrics.observe_shard_search(1, 0.003)
    metrics.observe_shard_failure(0, "timeout")
    after = scrape(url)
    assert after["retroserve_shard_search_duration_seconds_sum{shard=1}"] == pytest.approx(0.003)
    assert after["retroserve_shard_failures_total{reason=timeout,shard=0}"] == 1


def test_knn_series_come_from_the_engine_processes_stats_at_scrape_time(endpoint):
    """Engine-process KnnStats (server/knn/model.py as_dict) become counters; search time per step is
    rate(retroserve_knn_seconds_total{phase="search"}) / rate(retroserve_knn_steps_total)."""
    metrics, url = endpoint
    stats = {"steps": 4, "searches": 3, "searched_rows": 40, "pointer_rows": 20, "skipped_rows": 4,
             "search_s": 0.25, "mix_s": 0.05}
    metrics.watch_knn(lambda: stats)
    first = scrape(url)
    assert first["retroserve_knn_steps_total{}"] == 4
    assert first["retroserve_knn_searches_total{}"] == 3
    assert first["retroserve_knn_rows_total{how=pointer}"] == 20
    assert first["retroserve_knn_seconds_total{phase=search}"] == pytest.approx(0.25)
    assert first["retroserve_knn_seconds_total{phase=mix}"] == pytest.approx(0.05)
    stats.update(steps=6, search_s=0.75)
    assert scrape(url)["retroserve_knn_seconds_total{phase=search}"] == pytest.approx(0.75)


def test_retriever_metrics_follow_the_same_conventions():
    from server.observability.metrics import RetrieverMetrics

    registry = CollectorRegistry()
    metrics = RetrieverMetrics(registry=registry)
    metrics.observe_rpc("Search", "none", "OK", 0.01)

    class Timing:
        embed, search, payload, queries = 0.0, 0.002, 0.001, 32

    metrics.observe_timing(Timing())
    assert registry.get_sample_value("retroserve_retriever_requests_total", {"rpc": "Search", "code": "OK"}) == 1
    search = registry.get_sample_value("retroserve_retriever_phase_duration_seconds_sum", {"phase": "search"})
    assert search == pytest.approx(0.002)
    assert registry.get_sample_value("retroserve_retriever_batch_queries_sum") == 32
    metrics.close()
    assert list(registry.collect()) == []


def test_observe_timing_accepts_the_retrievers_timing():
    from dataclasses import dataclass

    @dataclass
    class Timing:  # the shape of retriever.datastore.Timing, without importing FAISS
        embed: float = 0.001
        search: float = 0.002
        payload: float = 0.003
        queries: int = 2

    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    metrics.observe_timing(Timing())
    assert registry.get_sample_value("retroserve_retrieval_phase_duration_seconds_sum", {"phase": "payload"}) == pytest.approx(0.003)


def test_one_endpoint_serves_other_collectors_of_the_same_registry():
    """In production the default registry holds vLLM's metrics beside ours; one scrape gets both."""
    registry = CollectorRegistry()
    Metrics(registry=registry)
    engine_counter = Counter("vllm:prompt_tokens", "stand-in for a vLLM engine metric", registry=registry)
    engine_counter.inc(7)
    server, thread, port = start_metrics_server("127.0.0.1:0", registry=registry)
    try:
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        stop_metrics_server(server, thread)
    assert samples["vllm:prompt_tokens_total{}"] == 7
    assert "retroserve_generated_tokens_total{mode=none}" in samples


def test_two_metrics_on_one_registry_are_refused():
    registry = CollectorRegistry()
    Metrics(registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry=registry)


@pytest.mark.parametrize(
    "address, expected",
    [("127.0.0.1:0", ("127.0.0.1", 0)), (":9400", ("0.0.0.0", 9400)), ("[::1]:9400", ("::1", 9400))],
)
def test_split_address(address, expected):
    assert split_address(address) == expected


def test_split_address_refuses_a_missing_port():
    with pytest.raises(ValueError, match="host:port"):
        split_address("localhost")
