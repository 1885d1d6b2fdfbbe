"""Where each stream loop's wall time goes, sampled with py-spy (dev extra) from the running
services of this checkout: ``python -m bench.loop_profile --seconds 30``.

Every sample of a loop's thread (idle ones too: waiting for the broker or Milvus is the point)
is charged to the innermost twinstream frame and the library call under it, e.g.
``publish (common/kafka.py) -> KafkaProducer.flush``; the table is the share of the loop's time.
Needs ptrace rights over the services (same user; root in a container).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SERVICES = ("ingestion", "embedding", "indexing")
LOOP_FRAME = "ConsumeLoop.run"


def service_pids(python: str) -> dict[str, int]:
    """The newest process of each service started with ``python -m twinstream.<service>``."""
    found: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        for service in SERVICES:
            if words[:3] == [python, "-m", f"twinstream.{service}"]:
                found[service] = max(found.get(service, 0), int(proc.name))
    return found


def breakdown(raw: Path, anchor: str = LOOP_FRAME) -> tuple[int, collections.Counter[str]]:
    """(samples under ``anchor``, samples per 'twinstream frame -> library call')."""
    shares: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if anchor not in stack:
            continue
        frames = stack.split(";")
        ours = [i for i, frame in enumerate(frames) if "twinstream/" in frame]
        if not ours:
            continue
        inner = ours[-1]
        below = frames[inner + 1].split(" (")[0] if inner + 1 < len(frames) else "-"
        frame = re.sub(r"\(.*?twinstream/", "(", frames[inner])
        shares[f"{re.sub(r':[0-9]+[)]', ')', frame)} -> {below}"] += int(count)
        total += int(count)
    return total, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    pids = service_pids(sys.executable)
    if not pids:
        raise SystemExit(f"no twinstream service runs under {sys.executable}")
    spy = str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory() as tmp:
        runs = {service: subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate",
             str(args.rate), "--idle", "--format", "raw", "--output", f"{tmp}/{service}.txt"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for service, pid in pids.items()}
        for service, run in runs.items():
            run.wait()
            total, shares = breakdown(Path(tmp) / f"{service}.txt")
            print(f"{service}: {total / args.rate:.1f} s of loop time sampled")
            for key, count in shares.most_common(args.top):
                print(f"  {100 * count / max(total, 1):5.1f}%  {key}")


if __name__ == "__main__":
    main()
