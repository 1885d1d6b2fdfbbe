"""``python -m bench [--quick] [--items N] [--dims D] [--out DIR]``: measure twinstream and its
baselines in one run on the same data, and write report.json, report.md, quality.png and
speed.png (default ``bench/results/``). See docs/bench.md.

Sections (``--skip`` any): ``pipeline`` (the stack: efficiency, freshness, Match API, memory),
``records``, ``text``, ``images`` (quality), ``unseen`` (out-of-the-box quality on data nothing
was trained or calibrated on, no labels for any method: ``bench.unseen``) and ``queries`` (Milvus
at 100k/1M vectors). Each quality and unseen collection also gets an OOD measurement with its
first bundle (``bench.ood``: foreign items interleaved, a separate replay), report section "ood".
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import config, datasets, ood, quality, queries, report, speed, unseen
from bench.methods import Stream
from bench.metrics import percentiles
from twinstream.devstack import REPO_ROOT, LocalStack, StackConfig
from twinstream.learn.adapt import AdaptConfig
from twinstream.model.encoder_runtime import default_parallelism
from twinstream.v1 import decisions_pb2, items_pb2

SECTIONS = ("pipeline", "records", "text", "images", "unseen", "queries")
PHOTO_OOD_SEEDS = 8  # photo streams (seeds from --seed) whose OOD measurements are pooled
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, not speed (CI)")
    parser.add_argument("--items", type=int, help="FEBRL3 records streamed (default 2000); text and image "
                                                  "streams scale with it (N/4 and N/8 per split)")
    parser.add_argument("--dims", type=int, help="dimensions of the synthetic vectors (default 16)")
    parser.add_argument("--vectors", type=int, nargs="+", help="collection sizes for the query part "
                                                               "(default 100000 1000000)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (default bench/results)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="sections to leave out")
    parser.add_argument("--base-bundle", type=Path, default=config.BASE_BUNDLE,
                        help="untrained text+record bundle (built if missing)")
    parser.add_argument("--record-bundle", type=Path, help="trained record bundle")
    parser.add_argument("--text-bundle", type=Path, help="trained text bundle")
    parser.add_argument("--image-bundle", type=Path, help="trained image bundle")
    parser.add_argument("--no-discover", action="store_true",
                        help=f"do not look for trained bundles under {config.MODELS}")
    parser.add_argument("--unseen-sets", nargs="+", choices=list(unseen.DEFAULT_SETS),
                        default=list(unseen.DEFAULT_SETS),
                        help="the unseen-data sets to measure (default all)")
    parser.add_argument("--unseen-items", type=int, help="items per unseen set (default 400, --quick 40)")
    parser.add_argument("--unseen-adapt", action="store_true",
                        help="also run `twinstream adapt` on each unseen record/text set's own items and "
                             "measure the adapted bundle (minutes per set)")
    parser.add_argument("--adapt-tuning", choices=["head", "finetune"], default="head",
                        help="adapt's text tuning for --unseen-adapt")
    parser.add_argument("--adapt-epochs", type=int, default=3)
    parser.add_argument("--retsim-python", type=Path, help="an interpreter with unisim installed "
                                                           "(default var/retsim-venv/bin/python)")
    return parser.parse_args(argv)


def resolve_bundles(args: argparse.Namespace, notes: list[str]) -> config.Bundles:
    if not (args.base_bundle / "manifest.json").exists():
        from twinstream.learn.base import build_base_bundle

        log.info("building the base bundle at %s (about a minute)", args.base_bundle)
        build_base_bundle(args.base_bundle)
    found = {} if args.no_discover else config.discover()
    chosen = {m: getattr(args, f"{m}_bundle") or found.get(m) for m in ("record", "text", "image")}
    for modality, path in chosen.items():
        if path is None:
            notes.append(f"no trained {modality} bundle given or found under var/models: {modality} results "
                         "show the base only" if modality != "image" else
                         "no trained image bundle given or found under var/models: images compare the "
                         "perceptual hashes only")
    return config.Bundles(args.base_bundle, chosen["record"], chosen["text"], chosen["image"])


def _rows_json(result: quality.DatasetResult) -> dict[str, Any]:
    rows = [{"method": r.method, "kind": r.kind, "decision": r.decision, "threshold": r.threshold,
             **asdict(r.quality), "refused_ood": r.refused,
             "cluster": asdict(r.cluster) if r.cluster is not None else None,
             "curve": {"recall": r.curve[0], "precision": r.curve[1]}} for r in result.rows]
    return {"description": result.description, "test_items": result.test_items, "test_entities":
            result.test_entities, "val_items": result.val_items, "rows": rows, "notes": result.notes,
            "seconds": result.seconds}


def run_pipeline(bundle: Path, stream: Stream, sizes: config.Sizes, seed: int, encoders: quality.Encoders,
                 running: LocalStack | None = None) -> speed.PipelineResult:
    """The stack section: bare encoder, a stream through the stack, freshness, Match, memory.
    Starts a stack of its own with ``bundle`` unless given a ``running`` one (serving ``bundle``)."""
    served_root = REPO_ROOT / "var" / "bench-runtime"
    log.info("encoder runtimes: today's TorchScript vs OpenVINO, %d interleaved rounds", sizes.runtime_rounds)
    runtimes = speed.runtime_comparison(bundle, served_root, stream.contents, stream.modality,
                                        sizes.runtime_rounds, sizes.encoder_seconds)
    # The efficiency baseline runs what Triton runs: the same runtime, precision and threads.
    encoder = speed.served_encoder(bundle, served_root, threads=default_parallelism(speed.cpu_count())[1])
    batches = speed.default_batch_sizes(sizes.items < 500)
    log.info("bare encoder sweep (batches %s)", batches)
    before = speed.encoder_sweep(encoder, stream.contents, stream.modality, batches, sizes.encoder_seconds)
    stack = running
    if stack is None:
        log.info("starting the stack with %s", bundle)
        stack = LocalStack(StackConfig(root=REPO_ROOT / "var" / "bench-stack", bundles=[bundle], prometheus=False))
        stack.start()
    try:
        tenant = f"bench{uuid.uuid4().hex[:8]}"
        log.info("streaming %d records through the stack", len(stream))
        cpu_before = speed.stack_cpu_seconds(stack)
        run = speed.stream_through(stack, stream, tenant)
        cpu_after = speed.stack_cpu_seconds(stack)
        cpu_s = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 1) for name in cpu_after}
        best = max(before, key=lambda p: p.items_per_s)
        after = speed.encoder_sweep(encoder, stream.contents, stream.modality, [best.batch],
                                    sizes.encoder_seconds)[0]
        log.info("freshness probes")
        fresh = speed.freshness(stack, stream, f"{tenant}f", sizes.freshness_probes)
        log.info("Match API latency")
        matching = speed.matching_latency(stack, encoder.bundle.name, tenant, [d.item_id for d in run.decisions],
                                          sizes.match_queries, seed)
        memory = speed.peak_rss_mib(stack)
    finally:
        if running is None:
            stack.stop()
    return speed.PipelineResult(str(bundle), run, before, after, fresh, matching, memory, cpu_s, runtimes=runtimes)


def _pipeline_json(result: speed.PipelineResult) -> dict[str, Any]:
    run = result.run
    p50, p99 = percentiles(run.latencies_ms)
    counts: dict[str, int] = {}
    for decision in run.decisions:
        kind = decisions_pb2.DecisionKind.Name(decision.kind)
        counts[kind] = counts.get(kind, 0) + 1
    fresh_ms = [s * 1000 for s in result.freshness_s]
    f50, f99 = percentiles(fresh_ms)
    return {
        "encoder": {"bundle": result.bundle, "batches": [asdict(p) for p in result.encoder_before],
                    "after": asdict(result.encoder_after), "best": asdict(result.best_bare)},
        "pipeline": {"items": run.items, "decided": len(run.decisions), "seconds": run.seconds,
                     "items_per_s": run.items_per_s, "efficiency": result.efficiency,
                     "target": report.EFFICIENCY_TARGET, "latency_p50_ms": p50, "latency_p99_ms": p99,
                     "decisions": dict(sorted(counts.items()))},
        "freshness": {"probes": len(fresh_ms), "p50_ms": f50, "p99_ms": f99,
                      "max_ms": max(fresh_ms) if fresh_ms else None, "samples_ms": fresh_ms},
        "matching": asdict(result.matching),
        "memory_mib": result.memory_mib,
        "cpu_seconds_during_stream": result.cpu_s,
        "runtimes": {"runs": [asdict(r) for r in result.runtimes], "ratios": speed.runtime_ratios(result.runtimes)},
    }


def main(argv: list[str] | None = None, stack: LocalStack | None = None) -> int:
    """Run the benchmark; with ``stack`` (tests), the pipeline section uses that running stack and
    its first bundle instead of starting one."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("pymilvus", "kafka", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    sizes = config.Sizes.quick() if args.quick else config.Sizes()
    if args.items:
        sizes = sizes.scaled(args.items)
    from dataclasses import replace

    sizes = replace(sizes, dims=args.dims or sizes.dims, vectors=tuple(args.vectors or sizes.vectors),
                    unseen_items=args.unseen_items or sizes.unseen_items)
    started = time.perf_counter()
    notes: list[str] = []
    bundles = resolve_bundles(args, notes)
    data: dict[str, Any] = {
        "schema": report.SCHEMA, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "machine": {"cpus": speed.cpu_count(), "load_start": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "platform": platform.platform()},
        "config": {**asdict(sizes), "seed": args.seed},
        "bundles": {role: config.describe(path) for role, path in
                    (("base", bundles.base), ("record", bundles.record), ("text", bundles.text),
                     ("image", bundles.image)) if path is not None},
        "quality": {}, "unseen": {}, "ood": {}, "speed": {}, "notes": notes, "seconds": {}, "sections": [],
    }
    encoders = quality.Encoders()
    records_stream = datasets.febrl3_stream(sizes.items, args.seed)
    pipeline: speed.PipelineResult | None = None

    def measure_ood(collection: str | None, labelled: Sequence[tuple[str, Path]], stream: Stream,
                    seed: int | None = None) -> ood.OodResult | None:
        """OOD relative to the collection, with the first bundle measured on it (a separate replay);
        recorded under ``collection`` unless that is None."""
        if not labelled:
            return None
        label, bundle = labelled[0]
        result = ood.measure(label, encoders.get(bundle), stream, args.seed if seed is None else seed)
        if collection is not None:
            data["ood"][collection] = asdict(result)
        return result

    def section(name: str, body: Callable[[], None]) -> None:
        if name in args.skip:
            return
        log.info("== %s", name)
        began = time.perf_counter()
        body()
        data["seconds"][name] = round(time.perf_counter() - began, 1)
        data["sections"].append(name)

    def do_pipeline() -> None:
        nonlocal pipeline
        bundle = stack.config.bundles[0] if stack is not None else bundles.stack
        pipeline = run_pipeline(bundle, records_stream, sizes, args.seed, encoders, stack)
        data["speed"].update(_pipeline_json(pipeline))

    def do_records() -> None:
        labelled = [("twinstream base (untrained MiniLM)", bundles.base)]
        if bundles.record is not None:
            labelled.append(("twinstream trained (record bundle)", bundles.record))
        result = quality.records_quality(records_stream, labelled, encoders)
        if pipeline is not None:
            entity_of = dict(zip(records_stream.ids, records_stream.entities, strict=True))
            served = encoders.get(Path(pipeline.bundle)).bundle
            stack_label = f"twinstream via the running stack ({served.name} v{served.version})"
            # The stack fits each collection as the replay does: its row is the fitted decision,
            # with the duplicate threshold the last decision was made with.
            last = pipeline.run.decisions[-1].thresholds.duplicate if pipeline.run.decisions else math.nan
            result.rows.append(quality.twinstream_row(stack_label, quality.COLLECTION, pipeline.run.decisions,
                                                      entity_of, last))
        data["quality"]["records"] = _rows_json(result)
        measure_ood("FEBRL3 records", labelled, records_stream)

    def do_text() -> None:
        streams = datasets.text_streams(sizes.text_items, args.seed, REPO_ROOT / "var" / "bench-cache")
        labelled = [("twinstream base (untrained MiniLM cosine)", bundles.base)]
        if bundles.text is not None:
            labelled.append(("twinstream trained (text bundle)", bundles.text))
        data["quality"]["text"] = _rows_json(quality.text_quality(streams, labelled, encoders, args.retsim_python))
        measure_ood("docstring text", labelled, streams.test)

    def do_images() -> None:
        exclude = None
        if bundles.image is not None:
            training = config.manifest(bundles.image).get("training", {})
            if "seed" in training:
                exclude = (int(training["seed"]), f"the image bundle (seed {training['seed']})")
        streams = datasets.image_streams(sizes.image_items, args.seed, exclude)
        labelled = [("twinstream trained (image bundle)", bundles.image)] if bundles.image else []
        data["quality"]["images"] = _rows_json(quality.image_quality(streams, labelled, encoders))
        first = measure_ood("photo copies", labelled, streams.test)
        if first is None:
            return
        # one photo stream holds 40-75 items and 2-4 pages: pooled over more seeds too
        more = (measure_ood(None, labelled, datasets.image_streams(sizes.image_items, seed, exclude).test, seed)
                for seed in range(args.seed + 1, args.seed + PHOTO_OOD_SEEDS))
        results = [first, *(r for r in more if r is not None)]
        data["ood"][f"photo copies, {len(results)} seeds pooled"] = asdict(ood.pooled(results))

    def do_unseen() -> None:
        base = [("twinstream base (untrained MiniLM)", bundles.base)]
        chosen = unseen.Bundles(
            records=base + ([("twinstream trained (record bundle)", bundles.record)] if bundles.record else []),
            text=base + ([("twinstream trained (text bundle)", bundles.text)] if bundles.text else []),
            images=[("twinstream trained (image bundle)", bundles.image)] if bundles.image else [])
        adapt_config = AdaptConfig(epochs=args.adapt_epochs, text_tuning=args.adapt_tuning, seed=args.seed,
                                   copies=2, calibration_views=100)
        adapt_dir = REPO_ROOT / "var" / "bench-adapt" if args.unseen_adapt else None
        for unseen_set, result in unseen.run(args.unseen_sets, sizes.unseen_items, args.seed, chosen, encoders,
                                             args.retsim_python, adapt_dir, adapt_config):
            if unseen_set.stream.modality == items_pb2.IMAGE and not bundles.image:
                result.notes.append("no image bundle given or found: twinstream is not measured on images")
            data["unseen"][unseen_set.name] = {**_rows_json(result), "domain": unseen_set.domain,
                                               "modality": items_pb2.Modality.Name(unseen_set.stream.modality)}
            measure_ood(f"unseen {unseen_set.name}", chosen.for_modality(unseen_set.stream.modality),
                        unseen_set.stream)

    def do_queries() -> None:
        points = queries.run(sizes.vectors, sizes.dims, REPO_ROOT / "var" / "bench-milvus", args.seed,
                             sizes.latency_queries, sizes.recall_queries, sizes.max_latency_s)
        data["speed"]["queries"] = [asdict(p) for p in points]

    for name, body in (("pipeline", do_pipeline), ("records", do_records), ("text", do_text),
                       ("images", do_images), ("unseen", do_unseen), ("queries", do_queries)):
        section(name, body)
    data["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    data["seconds"]["total"] = round(time.perf_counter() - started, 1)
    paths = report.write(data, args.out)
    bad = report.problems(data)
    for problem in bad:
        log.error("report problem: %s", problem)
    print(f"report written: {', '.join(str(p) for p in paths.values())}")
    return 1 if bad else 0
