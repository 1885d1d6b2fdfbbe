"""``Metrics.create(registry)``: every metric on the registry it is given, named with its
subsystem and unit, without a ``service`` label."""

from __future__ import annotations

import dataclasses
import re

import pytest
from prometheus_client import CollectorRegistry

from twinstream.common.metrics import Metrics

NAME = re.compile(r"^twinstream_(items|errors|dead_letters|stream|indexing|grpc_server|milvus|encoder"
                  r"|dependency|producer)(_[a-z]+)*$")


def test_every_metric_is_registered_on_the_given_registry_and_nowhere_else() -> None:
    registry = CollectorRegistry()
    metrics = Metrics.create(registry)
    names = {m.name for m in registry.collect()}
    assert len(names) == len(dataclasses.fields(Metrics)) - 1  # every field but the registry
    assert all(NAME.match(name) for name in names), sorted(names)
    metrics.items_processed.labels("ok").inc(3)
    assert registry.get_sample_value("twinstream_items_processed_total", {"outcome": "ok"}) == 3
    other = CollectorRegistry()
    Metrics.create(other)
    assert other.get_sample_value("twinstream_items_processed_total", {"outcome": "ok"}) is None


def test_no_metric_has_a_service_label() -> None:
    registry = CollectorRegistry()
    Metrics.create(registry)
    assert {"service", "method", "code"}.isdisjoint(
        label for m in registry.collect() for s in m.samples for label in s.labels)
    labels = {m.name: m for m in registry.collect()}
    assert "twinstream_grpc_server_handled" in labels


def test_timings_and_sizes_carry_their_unit_in_the_name() -> None:
    registry = CollectorRegistry()
    Metrics.create(registry)
    gauges_and_histograms = [m.name for m in registry.collect() if m.type in ("gauge", "histogram")]
    assert gauges_and_histograms
    # ``_up``: a 0/1 gauge, Prometheus' own convention (``up``)
    assert all(name.endswith(("_seconds", "_records", "_partitions", "_up"))
               for name in gauges_and_histograms), gauges_and_histograms


def test_one_registry_takes_one_set_of_metrics() -> None:
    registry = CollectorRegistry()
    Metrics.create(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics.create(registry)
