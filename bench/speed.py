"""Speed through the running stack, each figure next to its baseline from the same run.

* the bare encoder: the bundle's encoder called in this process with the runtime, precision and
  threads Triton serves it with, preprocessing included, at several batch sizes (the best is the
  pipeline's ceiling);
* encoder runtimes: today's TorchScript (2 threads) against OpenVINO, interleaved rounds;
* the pipeline: items/s from the first gRPC ingest to the last decision on ``items.decisions``;
* freshness: ingest one item over gRPC, poll Matching until a Match finds it;
* the Match API over gRPC, next to the bare Milvus search it wraps;
* peak RSS (VmHWM) of every process tree of the stack.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import grpc
import numpy as np

from bench.methods import Stream
from bench.metrics import percentiles
from twinstream.common.encoding import InProcessEncoder, ItemEncoder
from twinstream.common.kafka import TopicReader
from twinstream.common.vectorstore import MATCH_CONSISTENCY, VectorStore, quote, row_key, scope_filter
from twinstream.devstack import LocalStack
from twinstream.matching.service import LOOKUP_FIELDS, RESULT_FIELDS
from twinstream.model.bundle import ModelBundle
from twinstream.model.encoder_runtime import SUB_BATCH, load_runtime
from twinstream.v1 import decisions_pb2, matching_pb2

COLLECTION = "bench"


# -- the bare encoder ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderPoint:
    batch: int
    items_per_s: float


def encoder_sweep(encoder: ItemEncoder, contents: Sequence[bytes], modality: int, batch_sizes: Sequence[int],
                  min_seconds: float) -> list[EncoderPoint]:
    """Items/s of preprocessing + encoding at each batch size, each run for ``min_seconds``."""
    points = []
    for batch in batch_sizes:
        sized = ItemEncoder(replace(encoder.bundle, max_batch_size=batch), encoder.encoder)
        sized.encode([sized.model_input(modality, c) for c in contents[:batch]])  # warm-up
        done, position, started = 0, 0, time.perf_counter()
        while done < 2 * batch or time.perf_counter() - started < min_seconds:
            chunk = [contents[(position + k) % len(contents)] for k in range(batch)]
            sized.encode([sized.model_input(modality, c) for c in chunk])
            position, done = position + batch, done + batch
        points.append(EncoderPoint(batch, done / (time.perf_counter() - started)))
    return points


# -- encoder runtimes ------------------------------------------------------------------------------
TODAY = "torchscript f32, 2 threads, one 64-row batch (before issue 13)"


def served_folder(bundle_dir: Path, root: Path) -> Path:
    """The version folder of a Triton repository written for ``bundle_dir`` under ``root``: the
    very files (encoder.onnx, encoder_runtime.py) Triton serves, for in-process baselines."""
    from twinstream.model.triton_repo import write_repository

    write_repository([bundle_dir], root)
    bundle = ModelBundle.load(bundle_dir)
    return root / bundle.name / bundle.version


def served_encoder(bundle_dir: Path, root: Path, threads: int = 1) -> ItemEncoder:
    """The bundle's encoder in this process with the runtime and precision Triton serves it with."""
    bundle = ModelBundle.load(bundle_dir)
    runtime = load_runtime(served_folder(bundle_dir, root), "openvino", "auto", threads, SUB_BATCH, bundle.inputs)
    return ItemEncoder(bundle, InProcessEncoder(bundle, runtime))


@dataclass
class RuntimeRun:
    """One encoder configuration over the repeated rounds."""

    name: str
    runtime: str
    precision: str
    threads: int
    items_per_s: list[float] = field(default_factory=list)       # wall clock, one per round
    items_per_cpu_s: list[float] = field(default_factory=list)   # items per CPU-second of this process


def runtime_comparison(bundle_dir: Path, root: Path, contents: Sequence[bytes], modality: int, rounds: int,
                       seconds: float) -> list[RuntimeRun]:
    """Items/s of today's encoder (TorchScript, 2 intra-op threads, one 64-row batch) against
    OpenVINO (the precision Triton picks, length buckets) with 1 and 2 threads, preprocessing
    included, on the same 64-item batches; the configurations take turns in every round (the
    order rotating) so load from elsewhere falls on all of them alike."""
    import torch

    bundle = ModelBundle.load(bundle_dir)
    folder = served_folder(bundle_dir, root)
    today = ItemEncoder(bundle, InProcessEncoder(bundle))
    entries: list[tuple[RuntimeRun, ItemEncoder, int]] = [(RuntimeRun(TODAY, "torchscript", "f32", 2), today, 2)]
    for threads in (1, 2):
        runtime = load_runtime(folder, "openvino", "auto", threads, SUB_BATCH, bundle.inputs)
        name = f"openvino {runtime.precision}, {threads} thread{'s' if threads > 1 else ''}, buckets of {SUB_BATCH}"
        entries.append((RuntimeRun(name, "openvino", runtime.precision, threads),
                        ItemEncoder(bundle, InProcessEncoder(bundle, runtime)), threads))
    batch = 64
    prepared = [today.model_input(modality, c) for c in contents]
    for encoder in {id(e): e for _, e, _ in entries}.values():
        encoder.encode(prepared[:batch])  # warm-up: compile, allocate
    for round_ in range(rounds):
        for k in range(len(entries)):
            run, encoder, threads = entries[(round_ + k) % len(entries)]
            torch.set_num_threads(threads)
            done, position = 0, 0
            wall, cpu = time.perf_counter(), time.process_time()
            while done < 2 * batch or time.perf_counter() - wall < seconds:
                chunk = [contents[(position + j) % len(contents)] for j in range(batch)]
                encoder.encode([encoder.model_input(modality, c) for c in chunk])
                position, done = position + batch, done + batch
            run.items_per_s.append(done / (time.perf_counter() - wall))
            run.items_per_cpu_s.append(done / max(1e-9, time.process_time() - cpu))
    torch.set_num_threads(2)
    return [run for run, _, _ in entries]


def runtime_ratios(runs: list[RuntimeRun]) -> dict[str, dict[str, float]]:
    """Per configuration: items/s over today's, round by round (median, min, max), wall and CPU."""
    today = runs[0]
    out = {}
    for run in runs[1:]:
        wall = [a / b for a, b in zip(run.items_per_s, today.items_per_s, strict=True)]
        cpu = [a / b for a, b in zip(run.items_per_cpu_s, today.items_per_cpu_s, strict=True)]
        out[run.name] = {"median": float(np.median(wall)), "min": min(wall), "max": max(wall),
                         "cpu_median": float(np.median(cpu)), "cpu_min": min(cpu), "cpu_max": max(cpu)}
    return out


# -- the pipeline --------------------------------------------------------------------------------
@dataclass
class StreamRun:
    """What the stack decided for a stream and how fast."""

    items: int
    decisions: list[decisions_pb2.Decision]  # in the stream's order
    seconds: float
    latencies_ms: list[float]

    @property
    def items_per_s(self) -> float:
        return len(self.decisions) / self.seconds if self.seconds > 0 else 0.0


def stream_through(stack: LocalStack, stream: Stream, tenant: str, timeout_s: float = 900) -> StreamRun:
    """Ingest the stream over one gRPC IngestStream call and read its decisions back."""
    settings = stack.settings()
    reader = TopicReader(settings, settings.topics.decisions)
    items = []
    for i in range(len(stream)):
        item = stream.item(i)
        item.tenant, item.collection = tenant, COLLECTION
        items.append(item)
    wanted = set(stream.ids)
    found: dict[str, decisions_pb2.Decision] = {}
    received: dict[str, float] = {}
    errors: list[BaseException] = []
    with stack.client() as client:
        def ingest() -> None:
            try:
                summary = client.ingest_many(iter(items))
                if summary.rejected:
                    errors.append(RuntimeError(f"ingestion rejected {summary.rejected} items"))
            except grpc.RpcError as exc:
                errors.append(exc)

        started = time.time()
        sender = threading.Thread(target=ingest, daemon=True)
        sender.start()
        deadline = time.monotonic() + timeout_s
        try:
            while len(found) < len(wanted) and time.monotonic() < deadline and not errors:
                for record in reader.poll(200):
                    decision = decisions_pb2.Decision.FromString(record.value)
                    if decision.tenant == tenant and decision.item_id in wanted and decision.item_id not in found:
                        found[decision.item_id] = decision
                        received[decision.item_id] = time.time()
        finally:
            reader.close()
            sender.join(timeout=60)
    if errors:
        raise RuntimeError(f"streaming failed: {errors[0]}")
    ordered = [found[i] for i in stream.ids if i in found]
    elapsed = max(received.values()) - started if received else 0.0
    latencies = [received[d.item_id] * 1000 - d.ingest_time_ms for d in ordered]
    return StreamRun(len(stream), ordered, elapsed, latencies)


@dataclass
class Latency:
    """Per-request latencies of one kind of call, made one after another."""

    calls: int
    qps: float
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        p50, p99 = percentiles([s * 1000 for s in seconds])
        total = float(sum(seconds))
        return cls(len(seconds), len(seconds) / total if total else 0.0, p50, p99)


def freshness(stack: LocalStack, stream: Stream, tenant: str, probes: int,
              timeout_s: float = 60) -> list[float]:
    """Seconds from a unary gRPC Ingest until Match (by the item's id, itself included) returns
    the item; one probe at a time, each a record the tenant has not seen."""
    waits = []
    with stack.client() as client:
        for k in range(min(probes, len(stream))):
            item = stream.item(k)
            item.tenant, item.collection, item.item_id = tenant, COLLECTION, f"fresh-{k}"
            request = matching_pb2.MatchRequest(tenant=tenant, collection=COLLECTION, item_id=item.item_id,
                                                k=3, include_self=True)
            started = time.perf_counter()
            client.ingest(item)
            while time.perf_counter() - started < timeout_s:
                try:
                    response = client.matching.Match(request, timeout=10)
                    if any(r.item_id == item.item_id for r in response.results):
                        waits.append(time.perf_counter() - started)
                        break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                time.sleep(0.005)
    return waits


@dataclass
class MatchingLatency:
    """Each Match shape next to the bare Milvus calls it wraps, made in alternation per query
    (so load changes hit both alike): by vector vs the search alone; by item id vs the Strong
    lookup of the item's row plus the search (what Match by id must do: ``docs/design.md``)."""

    grpc_match: Latency  # by item id
    milvus_search: Latency  # the bare lookup + search a Match by id wraps
    collection_rows: int
    grpc_match_vector: Latency | None = None
    milvus_search_vector: Latency | None = None


def matching_latency(stack: LocalStack, bundle_name: str, tenant: str, item_ids: Sequence[str],
                     queries: int, seed: int) -> MatchingLatency:
    """Match over gRPC (k=10) vs the Milvus calls it wraps, on the same items, alternating:
    the same filter, limit (k+1), output fields and consistency levels as the servicer."""
    rng = np.random.default_rng(seed)
    chosen = [str(x) for x in rng.choice(list(item_ids), size=min(queries, len(item_ids)), replace=False)]
    store = VectorStore(stack.milvus_uri)
    alias = store.alias_name(bundle_name)
    scope = scope_filter(tenant, COLLECTION)
    fields = list(RESULT_FIELDS)
    vectors = {str(row["pk"]): row["vector"]
               for row in store.get(alias, [row_key(tenant, COLLECTION, i) for i in chosen], ["pk", "vector"]).values()}
    timings: dict[str, list[float]] = {"id": [], "bare_id": [], "vector": [], "bare_vector": []}

    def timed(key: str, call: Callable[[], object]) -> None:
        started = time.perf_counter()
        call()
        timings[key].append(time.perf_counter() - started)

    def bare_by_id(item_id: str) -> None:
        row = store.get(alias, [row_key(tenant, COLLECTION, item_id)], LOOKUP_FIELDS)
        vector = next(iter(row.values()))["vector"]
        store.search(alias, [vector], 11, f"{scope} and (item_id != {quote(item_id)})", fields,
                     consistency=MATCH_CONSISTENCY)

    with stack.client() as client:
        for n, item_id in enumerate(chosen):
            vector = vectors[row_key(tenant, COLLECTION, item_id)]
            by_vector = matching_pb2.MatchRequest(tenant=tenant, collection=COLLECTION, k=10,
                                                  vector=matching_pb2.QueryVector(values=vector))
            calls: list[tuple[str, Callable[[], object]]] = [
                ("id", partial(client.match, tenant, item_id=item_id, collection=COLLECTION, k=10)),
                ("bare_id", partial(bare_by_id, item_id)),
                ("vector", partial(client.matching.Match, by_vector, timeout=10)),
                ("bare_vector", partial(store.search, alias, [vector], 11, scope, fields,
                                        consistency=MATCH_CONSISTENCY)),
            ]
            for key, call in (calls if n % 2 == 0 else calls[::-1]):  # alternate which goes first
                timed(key, call)
    count = store.count(alias, scope)
    store.client.close()
    return MatchingLatency(Latency.of(timings["id"]), Latency.of(timings["bare_id"]), count,
                           Latency.of(timings["vector"]), Latency.of(timings["bare_vector"]))


# -- memory ----------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _stack_roots(stack: LocalStack) -> dict[str, int]:
    roots = {name: p.popen.pid for name, p in stack.processes.items() if p.popen is not None and p.alive}
    triton = stack.triton.process if stack.triton is not None else None  # a ManagedProcess
    if triton is not None and triton.popen is not None and triton.alive:
        roots["triton"] = triton.popen.pid
    return roots


def _tree_total(pid: int, tree: dict[int, list[int]], measure: Callable[[int], float]) -> float:
    pending, total = [pid], 0.0
    while pending:
        current = pending.pop()
        total += measure(current)
        pending += tree.get(current, [])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stack_cpu_seconds(stack: LocalStack) -> dict[str, float]:
    """CPU seconds used so far by each stack process tree (Triton's stubs included)."""
    tree = _children()
    return {name: _tree_total(pid, tree, cpu_seconds) for name, pid in _stack_roots(stack).items()}


def peak_rss_mib(stack: LocalStack) -> dict[str, float]:
    """Peak RSS (VmHWM) of each stack process with its children (Triton's python-backend stubs
    included), summed over the tree: an upper bound if they peaked at different times."""
    tree = _children()
    return {name: round(_tree_total(pid, tree, hwm_kib) / 1024, 1) for name, pid in _stack_roots(stack).items()}


@dataclass
class PipelineResult:
    bundle: str
    run: StreamRun
    encoder_before: list[EncoderPoint]
    encoder_after: EncoderPoint
    freshness_s: list[float]
    matching: MatchingLatency
    memory_mib: dict[str, float]
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process tree during the stream
    runtimes: list[RuntimeRun] = field(default_factory=list)  # today's encoder vs OpenVINO, interleaved
    notes: list[str] = field(default_factory=list)

    @property
    def best_bare(self) -> EncoderPoint:
        best = max(self.encoder_before, key=lambda p: p.items_per_s)
        return self.encoder_after if self.encoder_after.items_per_s > best.items_per_s else best

    @property
    def efficiency(self) -> float:
        return self.run.items_per_s / self.best_bare.items_per_s


def default_batch_sizes(quick: bool) -> list[int]:
    return [1, 16, 64] if quick else [1, 8, 32, 64, 128]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
