"""Idle CPU per second and busy CPU per item of every process of the production-shape stack:
``python -m bench.stack_cpu --idle-s 60 --rate 50 --items 1500 --out /tmp/stack_cpu.json``.

Starts the demo's stack (tansu on SeaweedFS, Milvus server, Triton, the services), samples each
process group's CPU (``/proc/<pid>/stat`` utime+stime of every process in the group: Triton's
python-backend stubs included) over ``--idle-s`` seconds with no traffic, then streams the
demo's FEBRL records at ``--rate`` and samples again. Busy CPU per item is reported both as
measured and net of the idle burn over the same wall time, so a component's per-second work
(time ticks, polling) is told apart from its per-item cost.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from twinstream.demo import DEFAULT_BUNDLE, _stream_and_report, febrl_items, prepare_bundles
from twinstream.devstack.stack import LocalStack, StackConfig

TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system, live processes) per process group."""
    totals: dict[int, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pgrp = int(fields[2])
        totals[pgrp] = totals.get(pgrp, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return totals


def stack_groups(stack: LocalStack) -> dict[str, int]:
    """Process name -> its process group (each ManagedProcess leads a session of its own)."""
    groups = {name: p.popen.pid for name, p in stack.processes.items() if p.popen is not None}
    if stack.triton is not None and stack.triton.process is not None and stack.triton.process.popen:
        groups["triton"] = stack.triton.process.popen.pid
    return groups


def sample(groups: dict[str, int]) -> dict[str, float]:
    cpu = group_cpu_s()
    return {name: cpu.get(pgrp, 0.0) for name, pgrp in groups.items()}


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
        groups = stack_groups(stack)
        time.sleep(10)  # start-up work (index loads, first compactions) settles
        before, t0, load0 = sample(groups), time.monotonic(), loadavg()
        time.sleep(args.idle_s)
        after, idle_wall = sample(groups), time.monotonic() - t0
        idle = {n: (after[n] - before[n]) / idle_wall for n in groups}
        load_idle = (load0 + loadavg()) / 2
        before, t0 = sample(groups), time.monotonic()
        report = _stream_and_report(stack, records, 0.2, args.rate, 120.0)
        after, busy_wall = sample(groups), time.monotonic() - t0
    finally:
        stack.stop()
    busy = {n: after[n] - before[n] for n in groups}
    per_item_ms = {n: 1000 * busy[n] / max(report.decided, 1) for n in groups}
    net_ms = {n: 1000 * (busy[n] - idle[n] * busy_wall) / max(report.decided, 1) for n in groups}
    result = {
        "rate": args.rate, "items": args.items, "decided": report.decided,
        "items_per_second": report.items_per_second, "p50_ms": report.latency_p50_ms,
        "p99_ms": report.latency_p99_ms, "f1": report.f1, "busy_wall_s": busy_wall,
        "load_idle": load_idle, "load_end": loadavg(),
        "idle_cpu_per_s": idle, "busy_cpu_ms_per_item": per_item_ms,
        "busy_net_of_idle_ms_per_item": net_ms,
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
    print(f"items/s {report.items_per_second:.1f}  p50 {report.latency_p50_ms:.0f} ms  "
          f"p99 {report.latency_p99_ms:.0f} ms  F1 {report.f1:.3f}  load {load_idle:.1f} idle, "
          f"{loadavg():.1f} end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
