"""Idle CPU per second and busy CPU per item of every process of the production-shape stack:
``python -m bench.stack_cpu --idle-s 60 --rate 50 --items 1500 --out /tmp/stack_cpu.json``.

Starts the demo's stack (tansu on SeaweedFS, Milvus server, Triton, the services), samples each
process tree's CPU (``bench.speed.stack_cpu_seconds``: utime+stime from ``/proc``, Triton's
python-backend stubs included) over ``--idle-s`` seconds with no traffic, then streams the
demo's FEBRL records at ``--rate`` and samples again. Busy CPU per item is reported both as
measured and net of the idle burn over the same wall time, so a component's per-second work
(time ticks, polling) is told apart from its per-item cost.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

from bench.speed import stack_cpu_seconds
from twinstream.demo import DEFAULT_BUNDLE, _stream_and_report, febrl_items, prepare_bundles
from twinstream.devstack.stack import LocalStack, StackConfig


def batch_totals(stack: LocalStack) -> dict[str, dict[str, float]]:
    """Per stream stage: batches, records and seconds so far (its /metrics histograms' counts
    and sums), so a phase's mean batch size and time per batch are differences of two reads."""
    totals: dict[str, dict[str, float]] = {}
    for service in ("ingestion", "embedding", "indexing"):
        url = f"http://127.0.0.1:{stack.metrics_ports[service]}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            continue
        sums = {"batches": 0.0, "records": 0.0, "seconds": 0.0}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("twinstream_stream_batch_seconds_count"):
                sums["batches"] += float(value)
            elif name.startswith("twinstream_stream_batch_seconds_sum"):
                sums["seconds"] += float(value)
            elif name.startswith("twinstream_stream_batch_records_sum"):
                sums["records"] += float(value)
        totals[service] = sums
    return totals


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=50.0, help="items/s offered (0: a burst)")
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    bundle = args.bundle.resolve()
    records = febrl_items(args.items, args.seed)
    prepare_bundles([bundle], default=bundle)
    stack = LocalStack(StackConfig(bundles=[bundle]))
    stack.start()
    try:
        time.sleep(10)  # start-up work (index loads, first compactions) settles
        before, t0, load0 = stack_cpu_seconds(stack), time.monotonic(), loadavg()
        groups = list(before)  # the stack's processes at the first sample
        time.sleep(args.idle_s)
        after, idle_wall = stack_cpu_seconds(stack), time.monotonic() - t0
        idle = {n: (after.get(n, 0.0) - before[n]) / idle_wall for n in groups}
        load_idle = (load0 + loadavg()) / 2
        before, t0, batches0 = stack_cpu_seconds(stack), time.monotonic(), batch_totals(stack)
        report = _stream_and_report(stack, records, 0.2, args.rate, 120.0)
        after, busy_wall, batches1 = stack_cpu_seconds(stack), time.monotonic() - t0, batch_totals(stack)
    finally:
        stack.stop()
    busy = {n: after.get(n, 0.0) - before.get(n, 0.0) for n in groups}
    stages = {}
    for service, end in batches1.items():
        start = batches0.get(service, {"batches": 0.0, "records": 0.0, "seconds": 0.0})
        count = max(end["batches"] - start["batches"], 1.0)
        stages[service] = {"batches": end["batches"] - start["batches"],
                           "records_per_batch": (end["records"] - start["records"]) / count,
                           "ms_per_batch": 1000 * (end["seconds"] - start["seconds"]) / count}
    per_item_ms = {n: 1000 * busy[n] / max(report.decided, 1) for n in groups}
    net_ms = {n: 1000 * (busy[n] - idle[n] * busy_wall) / max(report.decided, 1) for n in groups}
    result = {
        "rate": args.rate, "items": args.items, "decided": report.decided,
        "items_per_second": report.items_per_second, "p50_ms": report.latency_p50_ms,
        "p99_ms": report.latency_p99_ms, "f1": report.f1, "busy_wall_s": busy_wall,
        "load_idle": load_idle, "load_end": loadavg(),
        "idle_cpu_per_s": idle, "busy_cpu_ms_per_item": per_item_ms,
        "busy_net_of_idle_ms_per_item": net_ms, "stream_batches": stages,
        "idle_total": sum(idle.values()), "per_item_total_ms": sum(per_item_ms.values()),
        "report": {k: v for k, v in asdict(report).items() if k != "example_query"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'process':<12}{'idle CPU/s':>12}{'busy ms/item':>14}{'net ms/item':>13}")
    for name in sorted(groups, key=lambda n: -per_item_ms[n]):
        print(f"{name:<12}{idle[name]:>12.3f}{per_item_ms[name]:>14.1f}{net_ms[name]:>13.1f}")
    print(f"{'all':<12}{sum(idle.values()):>12.3f}{sum(per_item_ms.values()):>14.1f}"
          f"{sum(net_ms.values()):>13.1f}")
    for service, stage in stages.items():
        print(f"{service}: {stage['batches']:.0f} batches, {stage['records_per_batch']:.1f} "
              f"records and {stage['ms_per_batch']:.0f} ms per batch")
    print(f"items/s {report.items_per_second:.1f}  p50 {report.latency_p50_ms:.0f} ms  "
          f"p99 {report.latency_p99_ms:.0f} ms  F1 {report.f1:.3f}  load {load_idle:.1f} idle, "
          f"{loadavg():.1f} end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
