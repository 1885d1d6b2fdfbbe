"""promtool checks of deploy/prometheus (config, rules and the rules' unit tests), the PromQL of the
Grafana dashboard, and the metric names both use against what the services actually export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from twinstream.common.metrics import Metrics
from twinstream.devstack import DEFAULT_METRICS_PORTS, LocalStack, StackConfig

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "twinstream-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not on PATH (Debian package 'prometheus'; scripts/setup.sh installs it)")
# What Triton's /metrics exposes that the rules and the dashboard use, plus Prometheus' own `up`.
TRITON_METRICS = {"nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                  "nv_inference_request_success", "nv_inference_count",
                  "nv_inference_exec_count"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan", "e"}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def exported_metrics() -> set[str]:
    """Sample names the services' prometheus-client metrics produce (``Metrics.create``)."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count")}
    registry = CollectorRegistry()
    Metrics.create(registry)
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}


def recorded_metrics() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left after removing strings, label
    matchers, grouping clauses, ranges, function calls, keywords and numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"[A-Za-z_][A-Za-z0-9_]*\s*\(", "(", text)  # function names
    text = re.sub(r"\b[0-9][0-9.eE+-]*\b", " ", text)
    return {t for t in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text) if t.lower() not in PROMQL_WORDS}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    """A Grafana expression with its variables replaced by values Prometheus accepts."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def alert_and_record_exprs() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


# -- promtool ---------------------------------------------------------------------------------


@needs_promtool
def test_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


@needs_promtool
def test_rules_are_valid() -> None:
    result = promtool("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_rule_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    rules = (PROMETHEUS / "rules.yml").read_text()
    assert "> 10000" in rules
    (tmp_path / "rules.yml").write_text(rules.replace("> 10000", "> 20000"))
    shutil.copy(PROMETHEUS / "rules_test.yml", tmp_path)
    result = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "TwinstreamConsumerLagHigh" in result.stdout + result.stderr


@needs_promtool
def test_local_stack_rewrite_stays_valid(tmp_path: Path) -> None:
    """twinstream.devstack rewrites the default ports and the rule path; the result must load."""
    stack = LocalStack(StackConfig(root=tmp_path, bundles=[tmp_path]))
    config = tmp_path / "prometheus.yml"
    config.write_text(stack.prometheus_config())
    result = promtool("check", "config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {j["job_name"]: j for j in yaml.safe_load(config.read_text())["scrape_configs"]}
    for service, port in stack.metrics_ports.items():
        assert jobs[f"twinstream-{service}"]["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"]


@needs_promtool
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool has no PromQL-only check, so each expression becomes a recording rule."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": concrete(e)} for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# -- content ----------------------------------------------------------------------------------


def test_config_scrapes_the_services_and_triton() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml"]
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    expected = {f"twinstream-{s}": [f"127.0.0.1:{p}"] for s, p in DEFAULT_METRICS_PORTS.items()}
    assert targets == {**expected, "triton": ["127.0.0.1:8002"]}
    # the services label their own series with service=...; that label must win over the target's
    assert all(j["honor_labels"] is True for j in config["scrape_configs"])


def test_metric_name_extraction() -> None:
    expr = ('sum by (service, le) (rate(twinstream_stream_batch_seconds_bucket{service=~"a|b"}[5m])) / 1e6'
            ' / clamp_min(sum(rate(nv_inference_count[$__rate_interval])), 1e-9) > bool 0.5')
    assert metric_names(expr) == {"twinstream_stream_batch_seconds_bucket", "nv_inference_count"}


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_expressions_use_exported_metrics(source: str) -> None:
    known = exported_metrics() | TRITON_METRICS | recorded_metrics() | {"up"}
    assert {"twinstream_items_processed_total", "twinstream_stream_consumer_lag_records",
            "twinstream_indexing_ingest_to_decision_seconds_bucket"} <= known
    exprs = dashboard_exprs() if source == "dashboard" else alert_and_record_exprs()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= known, (names - known, expr)


def test_dashboard_covers_the_pipeline() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert {
        "twinstream_items_processed_total", "twinstream_indexing_decisions_total",
        "twinstream_dead_letters_total", "twinstream_stream_consumer_lag_records",
        "twinstream_indexing_ingest_to_decision_seconds_bucket", "twinstream_errors_total",
        "twinstream_grpc_server_handled_total", "twinstream_grpc_server_handling_seconds_bucket",
        "twinstream_encoder_batch_seconds_bucket",
        "nv_inference_queue_duration_us", "nv_inference_count", "nv_inference_exec_count",
    } <= used
    quantiles = {m.group(1) for e in dashboard_exprs() if "ingest_to_decision" in e
                 for m in [re.search(r"histogram_quantile\(([0-9.]+)", e)] if m}
    assert quantiles == {"0.5", "0.99"}


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
