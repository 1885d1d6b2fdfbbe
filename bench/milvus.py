"""Match at scale on the Milvus 2.3 server (the stack's engine): p50/p99 latency and recall@10
against exact search for an ef sweep, idle and while another tenant streams writes into the same
collection (the streaming case), written and searched through twinstream's ``VectorStore``.

``python -m bench.milvus --vectors 1000000 --dims 384`` (the target: p99 < 10 ms at recall@10
>= 0.98); the size is a parameter because building 1M x 384 HNSW takes long on 2 shared cores.
Writes milvus.json, milvus.md and milvus.png to ``--out`` (default bench/results/).

Queries are timed the way Match sends them: one vector, k+1 = 11, the scope filter, Match's
output fields and its consistency level (Bounded). The backfill uses insert, not upsert (an upsert
writes a delete per row and churns compaction); the concurrent writer upserts like the indexer.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.metrics import percentiles
from bench.queries import Synthetic, _rows, _rss_mib, exact_top_k, wait_indexed
from twinstream.common.vectorstore import MATCH_CONSISTENCY, VectorStore, scope_filter
from twinstream.devstack import REPO_ROOT, running_milvus
from twinstream.matching.service import RESULT_FIELDS as MATCH_FIELDS
from twinstream.v1 import items_pb2

TENANT, COLLECTION = "bench", "synthetic"
K = 10
INSERT_BATCH = 10_000


@dataclass(frozen=True)
class EfPoint:
    ef: int
    load: str               # "idle" or "ingest"
    queries: int
    p50_ms: float
    p99_ms: float
    qps: float
    recall_at_10: float
    ingest_rows_per_s: float


@dataclass(frozen=True)
class MilvusBench:
    vectors: int
    dims: int
    insert_s: float
    index_build_s: float
    load_s: float
    segments: int
    milvus_rss_mib: float
    points: list[EfPoint]
    # Rows the HNSW index covered when searching began: below ``vectors`` when the build ran
    # past ``--build-timeout`` (the rest is searched by brute force, and the table says so).
    indexed_rows: int = 0


class Writer(threading.Thread):
    """Another tenant's items arriving while Match is timed: upserts of ``batch`` rows at ``rate``
    rows/s (the indexer's write path), so the scope filter keeps them out of the results."""

    def __init__(self, store: VectorStore, name: str, generator: Synthetic, rate: float, batch: int = 200) -> None:
        super().__init__(daemon=True)
        self.store, self.name, self.generator, self.rate, self.batch = store, name, generator, rate, batch
        self.stopping = threading.Event()
        self.rows = 0
        self.started_at = time.perf_counter()

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(1e-9, time.perf_counter() - self.started_at)

    def run(self) -> None:
        self.started_at = time.perf_counter()
        stream = 100
        while not self.stopping.is_set():
            began = time.perf_counter()
            rows = _rows(self.generator.draw(self.batch, stream), 10_000_000 + self.rows)
            for row in rows:
                row["tenant"] = "ingest"
                row["pk"] = f"ingest/{COLLECTION}/{row['item_id']}"
            self.store.upsert(self.name, rows)
            self.rows += len(rows)
            stream += 1
            time.sleep(max(0.0, self.batch / self.rate - (time.perf_counter() - began)))


def _segments(store: VectorStore, name: str) -> int:
    """Loaded segments (-1 when this pymilvus cannot say): many small ones slow every search."""
    try:
        return len(store.client._get_connection().get_query_segment_info(name))
    except Exception:  # a private pymilvus API: informative only
        return -1


def _measure(store: VectorStore, name: str, expr: str, queries: np.ndarray, truth: np.ndarray, ef: int,
             latency_queries: int, load: str, writer: Writer | None) -> EfPoint:
    latencies = []
    for vector in queries[:latency_queries]:
        began = time.perf_counter()
        store.search(name, [vector], K + 1, expr, MATCH_FIELDS, consistency=MATCH_CONSISTENCY, ef=ef)
        latencies.append(time.perf_counter() - began)
    found: list[list[int]] = []
    for start in range(0, len(truth), 100):
        hits = store.search(name, queries[start:start + 100], K, expr, ("item_id",),
                            consistency=MATCH_CONSISTENCY, ef=ef)
        found += [[int(h.fields["item_id"]) for h in row] for row in hits]
    recall = float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))
    p50, p99 = percentiles([s * 1000 for s in latencies])
    rate = writer.rows_per_s if writer is not None else 0.0
    return EfPoint(ef, load, len(latencies), round(p50, 2), round(p99, 2), round(len(latencies) / sum(latencies), 1),
                   round(recall, 4), round(rate, 1))


def run(vectors: int, dims: int, efs: Sequence[int], root: Path, seed: int = 7, latency_queries: int = 500,
        recall_queries: int = 300, ingest_rate: float = 1000.0, build_timeout_s: float = 3600.0,
        progress: Callable[[MilvusBench], None] = lambda partial: None) -> MilvusBench:
    """Build, index, load and measure; ``progress`` gets the result so far after every phase and
    every measured point, so a run stopped early still leaves what it reached."""
    generator = Synthetic(dims, clusters=max(16, vectors // 2000), seed=seed)
    data = generator.draw(vectors, stream=0)
    queries = generator.draw(max(latency_queries, recall_queries), stream=1)
    truth = exact_top_k(data, queries[:recall_queries], K)
    expr = scope_filter(TENANT, COLLECTION)
    with running_milvus(root) as (uri, process):
        store = VectorStore(uri)
        name = store.ensure_collection(items_pb2.ModelRef(name=f"bench_d{dims}", version="1"), dims,
                                       make_live=False)
        store.client.release_collection(name)  # written unloaded, then loaded indexed (the load is timed)
        started = time.perf_counter()
        batches = [(s, min(vectors, s + INSERT_BATCH)) for s in range(0, vectors, INSERT_BATCH)]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda b: store.client.insert(name, _rows(data[b[0]:b[1]], b[0])), batches))
        store.flush(name)
        insert_s = time.perf_counter() - started
        print(f"inserted {vectors} rows in {insert_s:.0f} s", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            wait_indexed(store, name, vectors, build_timeout_s)
        except TimeoutError as exc:
            print(f"searching a partly built index: {exc}", file=sys.stderr, flush=True)
        indexed = int(store.client.describe_index(name, "vector").get("indexed_rows", 0))
        build_s = time.perf_counter() - started
        print(f"index covers {indexed} rows after {build_s:.0f} s", file=sys.stderr, flush=True)
        started = time.perf_counter()
        store.client.load_collection(name)
        load_s = time.perf_counter() - started
        segments = _segments(store, name)
        store.search(name, queries[:2], K + 1, expr, consistency=MATCH_CONSISTENCY)  # warm-up
        points: list[EfPoint] = []

        def result() -> MilvusBench:
            return MilvusBench(vectors, dims, round(insert_s, 1), round(build_s, 1), round(load_s, 1), segments,
                               _rss_mib(process), list(points), indexed)

        progress(result())
        for ef in efs:
            points.append(_measure(store, name, expr, queries, truth, ef, latency_queries, "idle", None))
            progress(result())
        writer = Writer(store, name, generator, ingest_rate)
        writer.start()
        try:
            time.sleep(2.0)
            for ef in efs:
                points.append(_measure(store, name, expr, queries, truth, ef, latency_queries, "ingest", writer))
                progress(result())
        finally:
            writer.stopping.set()
            writer.join(30)
        final = result()
        store.client.close()
    return final


def markdown(result: MilvusBench, target_p99_ms: float = 10.0, target_recall: float = 0.98) -> str:
    lines = [f"Milvus 2.3.5 standalone server, {result.vectors:,} x {result.dims}-dim clustered unit vectors, "
             f"HNSW M16/efConstruction 200, COSINE; Match-shaped queries (k+1=11, scope filter, "
             f"{MATCH_CONSISTENCY} consistency); recall@10 against exact numpy search.",
             f"Insert {result.insert_s} s, index build {result.index_build_s} s, load {result.load_s} s, "
             f"{result.segments} segments, Milvus peak RSS {result.milvus_rss_mib:.0f} MiB."
             + ("" if result.indexed_rows >= result.vectors else
                f" **The HNSW index covered only {result.indexed_rows:,} of {result.vectors:,} rows** when "
                "searching began (the build ran past its time limit; the rest was searched by brute force)."),
             "",
             "| ef | load | queries | p50 ms | p99 ms | QPS, 1 client | recall@10 | ingest rows/s | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in result.points:
        met = "met" if p.p99_ms < target_p99_ms and p.recall_at_10 >= target_recall else "not met"
        lines.append(f"| {p.ef} | {p.load} | {p.queries} | {p.p50_ms} | {p.p99_ms} | {p.qps} | {p.recall_at_10} | "
                     f"{p.ingest_rows_per_s} | {met} |")
    return "\n".join(lines) + "\n"


def plot(result: MilvusBench, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, recall) = plt.subplots(1, 2, figsize=(11, 4))
    for load, style in (("idle", "-"), ("ingest", "--")):
        points = [p for p in result.points if p.load == load]
        efs = [p.ef for p in points]
        latency.plot(efs, [p.p50_ms for p in points], "o" + style, label=f"p50 {load}")
        latency.plot(efs, [p.p99_ms for p in points], "s" + style, label=f"p99 {load}")
        recall.plot(efs, [p.recall_at_10 for p in points], "o" + style, label=load)
    latency.axhline(10, color="grey", lw=0.8, ls=":", label="p99 target 10 ms")
    recall.axhline(0.98, color="grey", lw=0.8, ls=":", label="target 0.98")
    for axis in (latency, recall):
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=8)
    latency.set(title=f"Match latency, {result.vectors:,} x {result.dims}", xlabel="ef", ylabel="ms")
    recall.set(title="recall@10 vs exact", xlabel="ef", ylabel="recall@10")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.milvus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--latency-queries", type=int, default=500)
    parser.add_argument("--recall-queries", type=int, default=300)
    parser.add_argument("--ingest-rate", type=float, default=1000.0, help="rows/s the concurrent writer upserts")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--build-timeout", type=float, default=3600.0,
                        help="seconds to wait for the HNSW build before measuring what is built")
    parser.add_argument("--name", default="milvus", help="file stem of the outputs")
    parser.add_argument("--root", type=Path, default=REPO_ROOT / "var" / "bench-milvus-server",
                        help="the Milvus server's data directory (wiped first)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    def write(result: MilvusBench, stem: str) -> None:
        (args.out / f"{stem}.json").write_text(json.dumps(asdict(result), indent=2))
        (args.out / f"{stem}.md").write_text(markdown(result))

    result = run(args.vectors, args.dims, args.ef, args.root, args.seed,
                 args.latency_queries, args.recall_queries, args.ingest_rate, args.build_timeout,
                 progress=lambda partial: write(partial, f"{args.name}.partial"))
    write(result, args.name)
    (args.out / f"{args.name}.partial.json").unlink(missing_ok=True)
    (args.out / f"{args.name}.partial.md").unlink(missing_ok=True)
    plot(result, args.out / f"{args.name}.png")
    text = markdown(result)
    print(text, file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
