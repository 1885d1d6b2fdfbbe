"""Each service's /metrics counts what actually went through, and Prometheus scrapes them all."""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stack_helpers import read_decisions, record
from twinstream.devstack import SERVICES, LocalStack

pytestmark = pytest.mark.stack

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(stack: LocalStack, service: str) -> Sample:
    with urllib.request.urlopen(stack.metrics_url(service), timeout=10) as response:
        text = response.read().decode()
    samples: Sample = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Sample, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def test_counts_match_what_was_sent(stack: LocalStack, tenant: str) -> None:
    before = {s: scrape(stack, s) for s in SERVICES}
    good = [record(f"m{i}", {"given_name": f"name{i}", "surname": "metrics", "postcode": str(2000 + i)},
                   tenant) for i in range(12)]
    bad = [record("", {"a": "b"}, tenant), record("m-empty", {}, tenant),
           record("m-bad", {"a": "b"}, tenant)]
    bad[2].content = b"\xff\xfe"
    with stack.client() as client:
        summary = client.ingest_many([*good[:6], *bad, *good[6:]])
        assert (summary.accepted, summary.rejected) == (12, 3)
        read_decisions(stack, [g.item_id for g in good], tenant)
        client.match(tenant, item_id="m0", k=3)
        client.match(tenant, item_id="m1", k=3)
        with pytest.raises(grpc.RpcError):
            client.match(tenant, item_id="m0", k=-1)
    time.sleep(0.5)
    after = {s: scrape(stack, s) for s in SERVICES}

    def delta(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    assert delta("ingestion", "twinstream_items_processed_total", outcome="accepted") == 12
    assert delta("ingestion", "twinstream_items_processed_total", outcome="rejected") == 3
    assert delta("ingestion", "twinstream_errors_total", reason="missing_id") == 1
    assert delta("ingestion", "twinstream_errors_total", reason="invalid_record") == 1
    assert delta("ingestion", "twinstream_errors_total", reason="invalid_utf8") == 1
    assert delta("ingestion", "twinstream_grpc_server_handled_total", grpc_method="IngestStream", grpc_code="OK") == 1
    assert delta("embedding", "twinstream_items_processed_total", outcome="ok") == 12
    assert delta("embedding", "twinstream_encoder_batch_seconds_count", backend="triton") >= 1
    assert delta("indexing", "twinstream_items_processed_total", outcome="ok") == 12
    assert delta("indexing", "twinstream_indexing_decisions_total") == 12
    assert delta("indexing", "twinstream_indexing_ingest_to_decision_seconds_count") == 12
    for service in ("embedding", "indexing"):
        assert delta(service, "twinstream_stream_batch_records_count") >= 1
        assert delta(service, "twinstream_stream_batch_records_sum") == 12
        assert delta(service, "twinstream_stream_batch_seconds_count") >= 1
        assert any(n == "twinstream_stream_consumer_lag_records" for n, _ in after[service])
    for service in SERVICES:  # the scrape target adds job/service; the services never do
        assert not [n for n, labels in after[service] if n.startswith("twinstream_") and "service" in dict(labels)]
    assert delta("matching", "twinstream_grpc_server_handled_total", grpc_method="Match", grpc_code="OK") == 2
    assert delta("matching", "twinstream_grpc_server_handled_total", grpc_method="Match",
                 grpc_code="INVALID_ARGUMENT") == 1
    assert delta("matching", "twinstream_grpc_server_handling_seconds_count", grpc_method="Match") == 3


def test_prometheus_scrapes_every_service(stack: LocalStack) -> None:
    if "prometheus" not in stack.processes:
        pytest.skip("Debian's prometheus is not installed (scripts/setup.sh installs it)")
    deadline = time.monotonic() + 60
    health: dict[str, str] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/targets", timeout=10) as r:
            targets = json.load(r)["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if health and all(h == "up" for h in health.values()):
            break
        time.sleep(1)
    assert {"twinstream-ingestion", "twinstream-embedding", "twinstream-indexing",
            "twinstream-matching", "triton"} <= set(health)
    assert all(h == "up" for h in health.values()), health
