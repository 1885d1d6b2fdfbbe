"""``twinstream status``: one terminal screen of how the pipeline is doing, read from Prometheus
(rates, lag, decisions, dead letters, scrape health, firing alerts) and each service's gRPC health.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twinstream.common.security import ClientCredentials

STAGES = ("ingestion", "embedding", "indexing", "matching")
DEFAULT_HEALTH_TARGETS = {s: f"127.0.0.1:{50051 + i}" for i, s in enumerate(STAGES)}
# Instant queries; the window is short so the screen shows what happens now.
QUERIES = {
    "rate": "sum by (service) (rate(twinstream_items_processed_total[1m]))",
    # matching processes no stream: its rate is the gRPC calls it serves
    "calls": 'sum by (service) (rate(twinstream_grpc_server_handled_total{service="matching"}[1m]))',
    "lag": "sum by (service) (max by (service, topic, partition) (twinstream_stream_consumer_lag_records))",
    "up": "min by (service) (up)",
    "decisions": "sum by (kind) (twinstream_indexing_decisions_total)",
    "decision_rate": "sum by (kind) (rate(twinstream_indexing_decisions_total[1m]))",
    "dead_letters": "sum by (reason) (twinstream_dead_letters_total)",
    "p99": "histogram_quantile(0.99, sum by (le) (rate(twinstream_indexing_ingest_to_decision_seconds_bucket[1m])))",
    "alerts": 'ALERTS{alertstate="firing"}',
}


class PrometheusUnavailable(RuntimeError):
    """Prometheus did not answer; the status screen cannot be built."""


@dataclass
class Status:
    prometheus_url: str
    rate: dict[str, float] = field(default_factory=dict)        # items/s (matching: calls/s)
    lag: dict[str, float] = field(default_factory=dict)         # records behind per stage
    up: dict[str, bool] = field(default_factory=dict)           # scraped by Prometheus
    health: dict[str, str] = field(default_factory=dict)        # gRPC health per stage
    decisions: dict[str, float] = field(default_factory=dict)   # totals by kind
    decision_rate: dict[str, float] = field(default_factory=dict)
    dead_letters: dict[str, float] = field(default_factory=dict)
    p99_s: float = math.nan
    alerts: list[str] = field(default_factory=list)


def query(prometheus_url: str, expr: str, timeout_s: float = 5.0) -> list[dict[str, object]]:
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            body = json.load(reply)
    except OSError as exc:
        raise PrometheusUnavailable(f"Prometheus at {prometheus_url} did not answer: {exc}") from exc
    if body.get("status") != "success":
        raise PrometheusUnavailable(f"Prometheus refused {expr!r}: {body.get('error')}")
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def _by(result: list[dict[str, object]], label: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for series in result:
        metric = series["metric"]
        value = series["value"]
        assert isinstance(metric, dict) and isinstance(value, list)
        values[str(metric.get(label, ""))] = float(value[1])
    return values


def grpc_health(target: str, credentials: ClientCredentials, timeout_s: float = 2.0) -> str:
    """SERVING / NOT_SERVING / ... as the service says, or UNREACHABLE."""
    with credentials.channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def collect(prometheus_url: str, health_targets: dict[str, str],
            credentials: ClientCredentials) -> Status:
    results = {name: query(prometheus_url, expr) for name, expr in QUERIES.items()}
    status = Status(prometheus_url.rstrip("/"))
    status.rate = {**_by(results["rate"], "service"), **_by(results["calls"], "service")}
    status.lag = _by(results["lag"], "service")
    status.up = {k: v >= 1 for k, v in _by(results["up"], "service").items()}
    status.decisions = _by(results["decisions"], "kind")
    status.decision_rate = _by(results["decision_rate"], "kind")
    status.dead_letters = _by(results["dead_letters"], "reason")
    p99 = list(_by(results["p99"], "").values())
    status.p99_s = p99[0] if p99 else math.nan
    for series in results["alerts"]:
        metric = series["metric"]
        assert isinstance(metric, dict)
        where = metric.get("service") or metric.get("job") or ""
        status.alerts.append(f"{metric.get('alertname')} ({where})" if where else str(metric.get("alertname")))
    status.health = {stage: grpc_health(target, credentials) for stage, target in health_targets.items()}
    return status


def render(status: Status) -> str:
    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"

    lines = [f"twinstream status  (Prometheus {status.prometheus_url})", "",
             f"{'stage':<11} {'health':<12} {'scraped':<8} {'per s':>9} {'lag':>9}"]
    for stage in STAGES:
        scraped = {True: "up", False: "DOWN"}.get(status.up[stage], "") if stage in status.up else "-"
        lines.append(f"{stage:<11} {status.health.get(stage, '-'):<12} {scraped:<8} "
                     f"{number(status.rate.get(stage)):>9} "
                     f"{number(status.lag.get(stage), 0) if stage != 'matching' else '':>9}")
    total = sum(status.decisions.values())
    lines += ["(per s: items a stage finished; for matching, gRPC calls it answered)"]
    lines += ["", f"decisions   {total:,.0f} total, {sum(status.decision_rate.values()):,.1f}/s now, "
                  f"p99 ingest->decision {number(status.p99_s * 1000, 0)} ms"]
    for kind, count in sorted(status.decisions.items(), key=lambda kv: -kv[1]):
        share = count / total if total else 0.0
        lines.append(f"  {kind:<20} {count:>9,.0f}  {share:6.1%}  "
                     f"{status.decision_rate.get(kind, 0.0):6.1f}/s")
    dead = sum(status.dead_letters.values())
    lines += ["", f"dead letters {dead:,.0f}" + (": " + ", ".join(
        f"{reason} {count:,.0f}" for reason, count in sorted(status.dead_letters.items())) if dead else "")]
    lines.append("alerts firing: " + (", ".join(status.alerts) if status.alerts else "none"))
    return "\n".join(lines) + "\n"
