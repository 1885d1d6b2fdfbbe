"""The fault matrix: stream FEBRL records through a running stack and, one fault per run, crash
(SIGKILL) or freeze (SIGSTOP past the consumer session timeout) one piece, then bring it back.

A run counts what the guarantees promise: every accepted item has exactly one Milvus row (lost,
duplicate rows), every repeated decision is byte-identical (contradicting), the stream finishes
within a bound (recovery seconds), and health shows the outage while it lasts (a service that
can see the fault answers NOT_SERVING, or does not answer because it is the one that is down).

``tests/stack/test_faults.py`` runs each fault on a few hundred items; ``python -m bench.faults``
runs the matrix at 5000 items (all of FEBRL3) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twinstream.common.kafka import Producer, TopicReader, make_producer
from twinstream.common.vectorstore import VectorStore
from twinstream.demo import febrl_items
from twinstream.devstack import REPO_ROOT, SERVICES, LocalStack, StackConfig
from twinstream.v1 import decisions_pb2, items_pb2

# fault -> the services whose health can see it (a crashed or frozen service is its own witness)
FAULTS: dict[str, tuple[str, ...]] = {
    "ingestion": ("ingestion",),
    "embedding": ("embedding",),
    "indexing": ("indexing",),
    "matching": ("matching",),
    "triton": ("embedding",),
    "milvus": ("indexing", "matching"),
    "sigstop-indexing": ("indexing",),
    # last: while producers and consumers do not recover from a broker restart, a failure here
    # would leave the shared stack broken for the faults after it
    "broker": ("ingestion", "embedding", "indexing"),
    "storage": ("ingestion", "embedding", "indexing"),
}
MODEL = "twinstream_text"
COLLECTION = "faults"


@dataclass
class FaultResult:
    fault: str
    items: int
    accepted: int = 0
    lost: int = 0                 # accepted items without a Milvus row
    duplicate_rows: int = 0       # Milvus rows beyond one per accepted item (or of unknown items)
    contradicting: int = 0        # items whose decision copies differ
    undecided: int = 0            # accepted items without any decision when the bound ran out
    outage_s: float = 0.0         # how long the piece was down (or frozen)
    recovery_s: float = 0.0       # fault over and last item accepted -> every item decided
    health_saw_outage: bool = False
    match_after: bool = False     # a Match by id answered after the fault
    notes: list[str] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        return not (self.lost or self.duplicate_rows or self.contradicting or self.undecided)


def health(stack: LocalStack, service: str) -> str:
    """SERVING, NOT_SERVING, or the gRPC code when the service does not answer."""
    with stack.channel(service) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class Streamer(threading.Thread):
    """A client producing records onto items.raw at a steady rate; an item counts as accepted
    once the broker acknowledged it. Failed sends are retried with a fresh producer (kafka-python's
    idempotent producer can stay stuck after a broker restart)."""

    def __init__(self, stack: LocalStack, tenant: str, records: Sequence[tuple[str, dict[str, str]]],
                 rate: float, deadline_s: float = 600.0) -> None:
        super().__init__(daemon=True)
        self.stack, self.tenant, self.records, self.rate = stack, tenant, records, rate
        self.accepted: set[str] = set()
        self.done_at = 0.0
        self.deadline = time.monotonic() + deadline_s
        self.errors = 0

    def _value(self, rec_id: str, fields: dict[str, str]) -> bytes:
        item = items_pb2.Item(item_id=rec_id, tenant=self.tenant, collection=COLLECTION,
                              modality=items_pb2.RECORD, content=json.dumps(fields).encode())
        return item.SerializeToString()

    def run(self) -> None:
        settings = self.stack.settings()
        producer: Producer | None = None
        pending = list(self.records)
        chunk = max(1, int(self.rate / 5))
        while pending and time.monotonic() < self.deadline:
            batch, pending = pending[:chunk], pending[chunk:]
            started = time.monotonic()
            try:
                producer = producer or make_producer(settings)
                futures = [(rec_id, producer.send(settings.topics.raw, key=f"{self.tenant}/{COLLECTION}".encode(),
                                                   value=self._value(rec_id, fields)))
                           for rec_id, fields in batch]
                producer.flush(timeout=10)
                failed = []
                for (rec_id, future), record in zip(futures, batch, strict=True):
                    try:
                        future.get(timeout=0)
                        self.accepted.add(rec_id)
                    except Exception:  # not acknowledged: the client sends it again
                        failed.append(record)
            except Exception:  # the broker is unreachable: start over with a fresh producer
                failed = batch
            if failed:
                self.errors += 1
                pending = failed + pending
                if producer is not None:
                    with contextlib.suppress(Exception):
                        producer.close(timeout=0)
                producer = None
                time.sleep(0.5)
            time.sleep(max(0.0, len(batch) / self.rate - (time.monotonic() - started)))
        if producer is not None:
            producer.close(timeout=5)
        self.done_at = time.monotonic()


class DecisionWatcher(threading.Thread):
    """Collects every decision copy for one tenant, with the time the newest item was decided."""

    def __init__(self, stack: LocalStack, tenant: str) -> None:
        super().__init__(daemon=True)
        self.stack, self.tenant = stack, tenant
        self.copies: dict[str, set[bytes]] = {}
        self.last_new_at = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        settings = self.stack.settings()
        reader = TopicReader(settings, settings.topics.decisions)
        try:
            while not self.stopping.is_set():
                try:
                    records = reader.poll(300)
                except Exception:  # the broker is down: the reader reconnects on the next poll
                    time.sleep(0.5)
                    continue
                for record in records:
                    decision = decisions_pb2.Decision.FromString(record.value)
                    if decision.tenant != self.tenant:
                        continue
                    if decision.item_id not in self.copies:
                        self.last_new_at = time.monotonic()
                    self.copies.setdefault(decision.item_id, set()).add(bytes(record.value))
        finally:
            reader.close()


def _crash(stack: LocalStack, fault: str) -> None:
    if fault == "sigstop-indexing":
        stack.freeze("indexing")
    else:
        stack.crash(fault)


def _restore(stack: LocalStack, fault: str) -> None:
    if fault == "sigstop-indexing":
        stack.thaw("indexing")
    else:
        stack.restart(fault)


def run_fault(stack: LocalStack, fault: str, records: Sequence[tuple[str, dict[str, str]]], *,
              rate: float = 60.0, min_outage_s: float = 2.0, max_outage_s: float = 12.0,
              bound_s: float = 240.0, tenant: str = "") -> FaultResult:
    """Stream ``records`` as a fresh tenant, inject ``fault`` a fifth of the way in, restore it,
    and count what the guarantees promise."""
    observers = FAULTS[fault]
    # Each fault starts from a healthy stack: the one before may still be recovering (a Milvus
    # restart reloads its collections; a consumer backs off up to its maximum), and that
    # recovery is the previous fault's to measure, not this one's.
    for service in SERVICES:
        stack.wait_serving(service, timeout_s=bound_s)
    tenant = tenant or f"fault-{fault}-{int(time.time())}"
    result = FaultResult(fault, len(records))
    watcher = DecisionWatcher(stack, tenant)
    watcher.start()
    streamer = Streamer(stack, tenant, records, rate)
    streamer.start()
    try:
        _wait(lambda: len(watcher.copies) >= max(1, len(records) // 5), 2 * bound_s,
              "decisions before the fault")
        started = time.monotonic()
        _crash(stack, fault)
        # A frozen consumer must stay frozen past its session timeout so the group moves on.
        hold_s = stack.settings().kafka.session_timeout_ms / 1000 + 3 if fault.startswith("sigstop") else 0.0
        while True:
            elapsed = time.monotonic() - started
            if not result.health_saw_outage:
                result.health_saw_outage = any(health(stack, s) != "SERVING" for s in observers)
            if elapsed >= max(min_outage_s, hold_s) and (result.health_saw_outage or elapsed >= max_outage_s):
                break
            time.sleep(0.3)
        _restore(stack, fault)
        restored = time.monotonic()
        result.outage_s = round(restored - started, 1)
        streamer.join(bound_s)
        result.accepted = len(streamer.accepted)
        if streamer.is_alive() or result.accepted < len(records):
            result.notes.append(f"only {result.accepted}/{len(records)} items accepted "
                                f"({streamer.errors} failed sends)")
        caught_up_from = max(restored, streamer.done_at)
        _wait(lambda: streamer.accepted <= set(watcher.copies), bound_s - (time.monotonic() - restored),
              "", raise_on_timeout=False)
        done = streamer.accepted <= set(watcher.copies)
        result.recovery_s = round(max(0.0, watcher.last_new_at - caught_up_from), 1) if done else -1.0
        time.sleep(1.0)  # late repeated copies still in flight
    finally:
        watcher.stopping.set()
        watcher.join(10)
    accepted = streamer.accepted
    result.undecided = len(accepted - set(watcher.copies))
    result.contradicting = sum(1 for item_id in accepted if len(watcher.copies.get(item_id, ())) > 1)
    store = VectorStore(stack.milvus_uri)
    try:
        rows = store.query(store.alias_name(MODEL), f'tenant == "{tenant}"', ["pk"])
    finally:
        store.client.close()
    ids = [str(r["pk"]).rsplit("/", 1)[1] for r in rows]
    result.lost = len(accepted - set(ids))
    result.duplicate_rows = len(ids) - len(set(ids) & accepted)
    result.match_after = _match_answers(stack, tenant, sorted(accepted)[:1])
    return result


def _match_answers(stack: LocalStack, tenant: str, item_ids: list[str]) -> bool:
    if not item_ids:
        return False
    with stack.client(timeout_s=10) as client:
        try:
            client.match(tenant, item_id=item_ids[0], collection=COLLECTION, k=3)
        except grpc.RpcError:
            return False
    return True


def _wait(done: object, timeout_s: float, what: str, raise_on_timeout: bool = True) -> None:
    assert callable(done)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.2)
    if raise_on_timeout:
        raise TimeoutError(f"timed out waiting for {what}")


def table(results: Sequence[FaultResult]) -> str:
    lines = ["| fault | accepted | lost | duplicate rows | contradicting decisions | undecided | outage s | "
             "recovery s | health saw it | Match after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.fault} | {r.accepted}/{r.items} | {r.lost} | {r.duplicate_rows} | {r.contradicting} | "
                     f"{r.undecided} | {r.outage_s} | {r.recovery_s} | {'yes' if r.health_saw_outage else 'NO'} | "
                     f"{'yes' if r.match_after else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=5000, help="FEBRL3 records per fault (at most 5000)")
    parser.add_argument("--rate", type=float, default=150.0, help="items per second the client sends")
    parser.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    parser.add_argument("--bound", type=float, default=600.0, help="seconds a run may take to finish after the fault")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "var" / "models" / "twinstream_text" / "1")
    args = parser.parse_args(argv)
    records = febrl_items(args.items, seed=11)
    results = []
    config = StackConfig(root=REPO_ROOT / "var" / "bench-faults", bundles=[args.bundle], prometheus=False)
    with LocalStack(config) as stack:
        for fault in args.faults:
            result = run_fault(stack, fault, records, rate=args.rate, bound_s=args.bound)
            print(f"{fault}: {asdict(result)}", file=sys.stderr, flush=True)
            results.append(result)
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.md").write_text(f"{len(records)} FEBRL3 records per fault at {args.rate:.0f}/s\n\n{text}\n")
    (args.out / "faults.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(r.whole for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
