"""The operator-facing files without a stack: the dashboard page is generated from the Grafana
dashboard (one source of PromQL), and the dev stack's Prometheus/Alertmanager configuration loads."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from twinstream import dashboard
from twinstream.devstack import LocalStack, ManagedProcess, StackConfig

REPO = Path(__file__).resolve().parents[1]
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
# The panels: items/s per stage, lag per group, decision mix, ingest->decision quantiles,
# DLQ rate by reason, Triton queue and compute time, Milvus search latency, errors by gRPC code.
REQUIRED_PANELS = {
    "Throughput per service": "twinstream_items_processed_total",
    "Consumer lag per group": "twinstream_stream_consumer_lag_records",
    "Decisions by kind": "twinstream_indexing_decisions_total",
    "Ingest → decision latency": "twinstream_indexing_ingest_to_decision_seconds_bucket",
    "Dead-letter rate": "twinstream_dead_letters_total",
    "Triton queue time per request": "nv_inference_queue_duration_us",
    "Triton compute time per request": "nv_inference_compute_infer_duration_us",
    "Milvus search latency": "twinstream_milvus_search_seconds_bucket",
    "gRPC errors by code": "twinstream_grpc_server_handled_total",
}


def grafana() -> dict[str, object]:
    loaded: dict[str, object] = json.loads(dashboard.GRAFANA_DASHBOARD.read_text())
    return loaded


def test_console_page_is_current() -> None:
    """`python -m twinstream.dashboard` has been run after the last Grafana dashboard edit."""
    assert dashboard.current_page() == dashboard.CONSOLE_PAGE.read_text()
    assert dashboard.main(["--check"]) == 0


def test_a_grafana_edit_makes_the_page_stale() -> None:
    edited = grafana()
    panels = edited["panels"]
    assert isinstance(panels, list)
    lag = next(p for p in panels if p["title"] == "Consumer lag per group")
    lag["targets"][0]["expr"] = "sum(twinstream_stream_consumer_lag_records)"
    page = dashboard.CONSOLE_PAGE.read_text()
    assert dashboard.render_page(page, edited) != page
    assert "sum(twinstream_stream_consumer_lag_records)" in dashboard.render_page(page, edited)


def test_console_panels_carry_the_grafana_promql() -> None:
    panels = grafana()["panels"]
    assert isinstance(panels, list)
    by_title = {p["title"]: p for p in panels}
    for panel in dashboard.console_panels(grafana()):
        source = by_title[panel["title"]]["targets"]
        assert [q["expr"] for q in panel["queries"]] == [dashboard.concrete(t["expr"]) for t in source]
        assert not any("$" in q["expr"] for q in panel["queries"]), panel["title"]


def test_console_shows_the_panels_an_operator_needs() -> None:
    panels = {p["title"]: " ".join(q["expr"] for q in p["queries"])
              for p in dashboard.console_panels(grafana())}
    for title, metric in REQUIRED_PANELS.items():
        assert metric in panels[title], title


def test_console_page_is_a_valid_go_template() -> None:
    """Prometheus renders consoles with Go's text/template: two opening braces start an action."""
    assert "{{" not in dashboard.CONSOLE_PAGE.read_text()


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_stack_prometheus_config_with_alertmanager_and_short_alerts_loads(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(root=tmp_path, bundles=[tmp_path], alert_for="5s"))
    stack.processes["alertmanager"] = ManagedProcess("alertmanager", [], {}, tmp_path / "am.log")
    config = tmp_path / "prometheus.yml"
    config.write_text(stack.prometheus_config())
    done = subprocess.run([str(PROMTOOL), "check", "config", str(config)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    loaded = yaml.safe_load(config.read_text())
    assert loaded["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        f"127.0.0.1:{stack.alertmanager_port}"]
    (rules_path,) = loaded["rule_files"]
    copy = yaml.safe_load(Path(rules_path).read_text())
    original = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    alerts = [r for g in copy["groups"] for r in g["rules"] if "alert" in r]
    assert alerts and {r["for"] for r in alerts} == {"5s"}
    # only `for:` changes; the real rules keep their values
    for group in original["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    for group in copy["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    assert copy == original


@pytest.mark.skipif(AMTOOL is None, reason="amtool (prometheus-alertmanager) is not installed")
def test_alertmanager_config_is_valid() -> None:
    done = subprocess.run([str(AMTOOL), "check-config", str(REPO / "deploy" / "alertmanager" / "alertmanager.yml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
