"""The report: JSON (everything), Markdown tables and PNG plots, both rendered from the JSON."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMA = "twinstream-bench/1"
ROW_KEYS = ("method", "kind", "decision", "threshold", "precision", "recall", "f1", "micro_ap",
            "duplicates_said", "true_duplicates", "items", "refused_ood", "curve")
QUERY_KEYS = ("vectors", "dims", "insert_s", "index_build_s", "latency_queries", "qps", "p50_ms", "p99_ms",
              "batch_qps", "recall_at_10", "milvus_rss_mib")
EFFICIENCY_TARGET = 0.8
RECALL_TARGET = 0.98


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def markdown(data: dict[str, Any]) -> str:
    """The human-readable report."""
    config = data["config"]
    lines = [f"# twinstream benchmark{' (quick)' if data['quick'] else ''}", "",
             f"`{data['command']}` — {data['created_at']}, {data['machine']['cpus']} CPU cores, load average "
             f"{data['machine']['load_start']} at start; {data['seconds']['total']:.0f} s in all. Every speed "
             "figure is a ratio to, or shown next to, a baseline measured in the same run.", ""]
    lines += ["Bundles: " + "; ".join(f"**{role}** `{b['path']}` ({b['name']} v{b['version']}, "
                                      f"{'trained on ' + b['trained_on'] if b['trained_on'] else 'untrained'})"
                                      for role, b in data["bundles"].items()), ""]
    lines += _quality_md(data.get("quality", {}))
    lines += _unseen_md(data.get("unseen", {}))
    lines += _ood_md(data.get("ood", {}))
    speed = data.get("speed", {})
    lines += ["## Speed", ""]
    if "pipeline" in speed:
        lines += _pipeline_md(speed)
    if "queries" in speed:
        lines += _queries_md(speed["queries"], config)
    if data["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in data["notes"]), ""]
    lines += ["![quality](quality.png)", "", "![speed](speed.png)", ""]
    return "\n".join(lines)


CLUSTER_HEADER = "clusters: pair P / R, largest (entity)"


def _cluster(row: dict[str, Any]) -> str:
    """twinstream's final dedup clusters, scored by pairs; the largest next to the largest entity."""
    c = row.get("cluster")
    if not c:
        return "-"
    return f"{_num(c['precision'])} / {_num(c['recall'])}, {c['largest_cluster']} ({c['largest_entity']})"


def _quality_md(quality: dict[str, Any]) -> list[str]:
    if not quality:
        return []
    lines = ["## Quality of duplicate decisions", "",
             "Each item of a stream, in arrival order, is linked to its best earlier item; a duplicate call "
             "is right when that item is the same entity. Recall is over the items with an earlier "
             "duplicate; µAP (micro-average precision, DISC21-style) ranks every item's best link by score "
             "and needs no threshold.", ""]
    for name, result in quality.items():
        rows = result["rows"]
        truth = rows[0]["true_duplicates"] if rows else 0
        lines += [f"### {name}", "", f"{result['description']}. Test stream: {result['test_items']} items, "
                  f"{result['test_entities']} entities, {truth} with an earlier duplicate"
                  + (f"; validation stream: {result['val_items']} items." if result["val_items"] else "."), ""]
        lines += _table(["method", "decision", "threshold", "precision", "recall", "F1", "µAP", "OOD refusals",
                         CLUSTER_HEADER],
                        [[r["method"], r["decision"], _num(r["threshold"]), _num(r["precision"]),
                          _num(r["recall"]), _num(r["f1"]), _num(r["micro_ap"]), _num(r["refused_ood"]),
                          _cluster(r)] for r in rows])
        lines += [f"- {n}" for n in result["notes"]] + ([""] if result["notes"] else [])
    return lines


def _unseen_md(unseen: dict[str, Any]) -> list[str]:
    """Out-of-the-box quality on the unseen sets: a summary, then every set's table."""
    if not unseen:
        return []
    lines = ["## Unseen data, no labels", "",
             "Data no twinstream training or calibration step has seen (`bench/unseen_data.py`); one stream per "
             "set, the same for every method, and no labels for any: twinstream decides with the thresholds its "
             "bundle ships with, the baselines with their default rules (`bench/unseen.py`). µAP needs no "
             "threshold: it shows what a method could reach if labels picked its threshold.", ""]
    summary = []
    for name, result in unseen.items():
        baselines = [r for r in result["rows"] if r["kind"] == "baseline"]
        best = max(baselines, key=lambda r: r["f1"]) if baselines else None
        ours = [r for r in result["rows"] if r["kind"] == "twinstream"]
        summary.append([name, result["domain"], str(result["test_items"]),
                        f"{best['method']}: {_num(best['f1'])}" if best else "-",
                        "; ".join(f"{r['method']} ({r['decision']}): {_num(r['f1'])}" for r in ours)
                        or "not measured"])
    lines += _table(["set", "domain", "items", "best baseline: F1", "twinstream: F1"], summary)
    for name, result in unseen.items():
        rows = result["rows"]
        truth = rows[0]["true_duplicates"] if rows else 0
        lines += [f"### unseen: {name} ({result['domain']})", "",
                  f"{result['description']}. Stream: {result['test_items']} items, {result['test_entities']} "
                  f"entities, {truth} with an earlier duplicate.", ""]
        lines += _table(["method", "decision", "precision", "recall", "F1", "µAP", "OOD refusals", CLUSTER_HEADER],
                        [[r["method"], r["decision"], _num(r["precision"]), _num(r["recall"]), _num(r["f1"]),
                          _num(r["micro_ap"]), _num(r["refused_ood"]), _cluster(r)] for r in rows])
        lines += [f"- {n}" for n in result["notes"]] + ([""] if result["notes"] else [])
    return lines


def _pct(share: float | None) -> str:
    return "-" if share is None or math.isnan(share) else f"{100 * share:.1f}%"


def _ood_md(ood: dict[str, Any]) -> list[str]:
    """OOD relative to the collection: in-distribution items kept, foreign ones refused."""
    if not ood:
        return []
    lines = ["## OOD relative to the collection", "",
             "Each collection's stream with 5% foreign items interleaved after the warm-up, replayed fitted on "
             "the collection (`bench/ood.py`; the quality tables stay on the clean stream). Refused when the best "
             "accepted neighbour's cosine is below the collection's floor, or (text, images) the item's "
             "content-profile distance to the collection's reference is above its limit (records sharing none "
             "of the collection's fields are refused too). AUROC: of the cosine; *profile AUROC*: of the profile "
             "distance (after the warm-up). *Alone*: each foreign item's cosine against the earlier "
             "in-distribution items only (as if it were the first of its kind) and the floor in force, or its "
             "profile distance above the limit. *Pooled*: one collection's stream per seed (from `--seed`), "
             "each measured alone and the counts summed (AUROCs, of different references, are not pooled); "
             "foreign items before a reference's first fit (the warm-up) are not refused by design.", ""]
    lines += _table(["collection", "bundle", "foreign items", "in-distribution refused", "foreign refused",
                     "AUROC", "profile AUROC", "refused by the profile", "foreign refused alone",
                     "AUROC alone"],
                    [[name, r["bundle"], f"{r['foreign']} {r['foreign_kind']}",
                      f"{r['inside_refused']} of {r['items']} ({_pct(r['inside_refused_share'])})",
                      _foreign_refused(r), _num(r["auroc"]), _num(r.get("auroc_profile")),
                      _pct(r.get("foreign_refused_by_profile_share")), _pct(r["foreign_refused_alone_share"]),
                      _num(r["auroc_alone"])] for name, r in ood.items()])
    return lines


def _foreign_refused(r: dict[str, Any]) -> str:
    """The share of foreign items refused, with its counts where the result has them and how many
    met a profile reference (text, images: the others came during the collection's warm-up)."""
    share = _pct(r["foreign_refused_share"])
    if "foreign_profiled" not in r:
        return share
    met = f"; {r['foreign_profiled']} met a profile reference" if r["foreign_profiled"] else ""
    return f"{share} ({r['foreign_refused']} of {r['foreign']}{met})"


def _runtimes_md(runtimes: dict[str, Any] | None) -> list[str]:
    if not runtimes or not runtimes.get("runs"):
        return []
    runs, ratios = runtimes["runs"], runtimes["ratios"]
    lines = ["### Encoder runtime", "",
             f"The bare encoder in this process, 64-item batches of the stream, preprocessing included; the "
             f"configurations take turns in {len(runs[0]['items_per_s'])} rounds. Ratios are against today's "
             f"({runs[0]['name']}) in the same round: median [min-max].", ""]
    rows = []
    for run in runs:
        ratio = ratios.get(run["name"])
        rows.append([run["name"], _num(statistics.median(run["items_per_s"]), 1),
                     _num(statistics.median(run["items_per_cpu_s"]), 1),
                     f"{_num(ratio['median'])} [{_num(ratio['min'])}-{_num(ratio['max'])}]" if ratio else "1",
                     f"{_num(ratio['cpu_median'])} [{_num(ratio['cpu_min'])}-{_num(ratio['cpu_max'])}]"
                     if ratio else "1"])
    return lines + _table(["encoder", "items/s (median)", "items per CPU-s", "x today, wall", "x today, per CPU-s"],
                          rows)


def _pipeline_md(speed: dict[str, Any]) -> list[str]:
    pipeline, encoder = speed["pipeline"], speed["encoder"]
    best = encoder["best"]
    lines = ["### Pipeline efficiency", "",
             f"FEBRL3 records through the running stack (bundle `{encoder['bundle']}`), one gRPC IngestStream, "
             "until the last decision is read off `items.decisions`; against the same bundle's bare encoder "
             "called in-process (preprocessing included) at its best batch size.", ""]
    lines += _table(["measure", "value"], [
        ["bare encoder, best batch", f"{_num(best['items_per_s'], 1)} items/s (batch {best['batch']})"],
        ["end to end through the stack", f"{_num(pipeline['items_per_s'], 1)} items/s "
                                         f"({pipeline['decided']}/{pipeline['items']} items in "
                                         f"{_num(pipeline['seconds'], 1)} s)"],
        ["**efficiency** (end to end / bare)", f"**{_num(pipeline['efficiency'])}** (target ≥ {EFFICIENCY_TARGET})"],
        ["ingest → decision latency p50 / p99", f"{_num(pipeline['latency_p50_ms'], 0)} / "
                                                f"{_num(pipeline['latency_p99_ms'], 0)} ms (under the burst)"],
        ["decisions", ", ".join(f"{k} {v}" for k, v in pipeline["decisions"].items())],
    ])
    lines += ["Bare encoder by batch size (before the stack started; the best batch measured again with the "
              "stack idle afterwards):", ""]
    lines += _table(["batch", "items/s"], [[str(p["batch"]), _num(p["items_per_s"], 1)] for p in encoder["batches"]]
                    + [[f"{encoder['after']['batch']} (after)", _num(encoder["after"]["items_per_s"], 1)]])
    lines += _runtimes_md(speed.get("runtimes"))
    fresh = speed["freshness"]
    lines += ["### Freshness (ingest → searchable)", "",
              "One record at a time: unary gRPC Ingest, then Match by its id (itself included) every 5 ms "
              "until it comes back.", ""]
    lines += _table(["probes", "p50 ms", "p99 ms", "max ms"],
                    [[str(fresh["probes"]), _num(fresh["p50_ms"], 0), _num(fresh["p99_ms"], 0),
                      _num(fresh["max_ms"], 0)]])
    matching = speed["matching"]
    lines += ["### Match API vs the Milvus calls it wraps", "",
              f"Sequential queries (k=10) on the stack's collection ({matching['collection_rows']} rows of the "
              "tenant), each shape next to the bare pymilvus calls it wraps with the same filter, limit, output "
              "fields and consistency, alternating per query. By vector wraps one Bounded search; by item id "
              "wraps a Strong lookup of the item's row (so an item whose decision was published is always "
              "found) and the search.", ""]
    rows = [("gRPC Match by item id", matching["grpc_match"]),
            ("bare lookup + search", matching["milvus_search"])]
    if matching.get("grpc_match_vector"):
        rows += [("gRPC Match by vector", matching["grpc_match_vector"]),
                 ("bare search", matching["milvus_search_vector"])]
    lines += _table(["call", "calls", "QPS", "p50 ms", "p99 ms"],
                    [[label, str(m["calls"]), _num(m["qps"], 1), _num(m["p50_ms"], 1), _num(m["p99_ms"], 1)]
                     for label, m in rows])
    ratios = [f"{label}: p50 {_num(api['p50_ms'] / bare['p50_ms'], 2)}x the bare calls"
              for label, api, bare in (("by item id", matching["grpc_match"], matching["milvus_search"]),
                                       ("by vector", matching.get("grpc_match_vector"),
                                        matching.get("milvus_search_vector")))
              if api and bare and bare["p50_ms"]]
    lines += ["Overhead (target 1.3x): " + "; ".join(ratios) + ".", ""] if ratios else []
    cpu = speed.get("cpu_seconds_during_stream") or {}
    if cpu:
        seconds = pipeline["seconds"]
        lines += ["### Where the CPU went during the stream", "",
                  f"CPU seconds per process tree over the {_num(seconds, 1)} s stream (cores busy = CPU s / wall "
                  "s); the encoder's own share is inside `triton`.", ""]
        lines += _table(["process", "CPU s", "cores busy"],
                        [[k, _num(v, 1), _num(v / seconds if seconds else 0.0, 2)] for k, v in cpu.items()]
                        + [["**all**", _num(sum(cpu.values()), 1),
                            _num(sum(cpu.values()) / seconds if seconds else 0.0, 2)]])
    lines += ["### Memory (peak RSS per process tree)", ""]
    lines += _table(["process", "peak RSS MiB"], [[k, _num(v, 0)] for k, v in speed["memory_mib"].items()])
    return lines


def _queries_md(points: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    lines = ["### Match queries at scale", "",
             f"Synthetic clustered unit vectors ({config['dims']} dims) in a Milvus 2.3 server through "
             "twinstream's VectorStore (HNSW M=16, efConstruction=200, ef=64, the Match scope filter, k+1=11, "
             "Bounded); "
             "recall@10 against exact numpy search.", ""]
    lines += _table(["vectors", "insert s", "index build s", "queries", "QPS", "p50 ms", "p99 ms",
                     "QPS, 100/request", "recall@10", "Milvus RSS MiB"],
                    [[_num(p["vectors"]), _num(p["insert_s"], 1), _num(p["index_build_s"], 1),
                      str(p["latency_queries"]), _num(p["qps"], 1), _num(p["p50_ms"], 1), _num(p["p99_ms"], 1),
                      _num(p["batch_qps"], 1), _num(p["recall_at_10"]), _num(p["milvus_rss_mib"], 0)]
                     for p in points])
    return lines


# -- plots -----------------------------------------------------------------------------------------
def plots(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """quality.png (precision-recall per dataset) and speed.png (four panels)."""
    import matplotlib

    matplotlib.use("Agg")
    return [_quality_png(data.get("quality", {}), out_dir / "quality.png"),
            _speed_png(data.get("speed", {}), out_dir / "speed.png")]


def _quality_png(quality: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    names = list(quality) or ["quality"]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 6.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ax.set_title(name)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if name not in quality:
            ax.text(0.5, 0.5, "not run", ha="center")
            continue
        colors: dict[str, str] = {}
        for r in quality[name]["rows"]:
            same_curve = r["kind"] == "twinstream" and r["method"] in colors  # recalibrated: same scores
            if r["curve"]["recall"] and not same_curve:
                (line,) = ax.plot(r["curve"]["recall"], r["curve"]["precision"], lw=1.2, alpha=0.8)
                colors[r["method"]] = line.get_color()
            ax.plot([r["recall"]], [r["precision"]], "o" if r["kind"] == "twinstream" else "s",
                    color=colors.get(r["method"]), label=f"{r['method']} [{r['decision']}]", ms=6)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.suptitle("precision-recall of duplicate calls (curves: threshold sweep; markers: operating points)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _speed_png(speed: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (enc, fresh), (query, memory) = axes
    if "encoder" in speed:
        batches = speed["encoder"]["batches"]
        enc.plot([p["batch"] for p in batches], [p["items_per_s"] for p in batches], "o-", label="bare encoder")
        enc.axhline(speed["pipeline"]["items_per_s"], color="C3", ls="--",
                    label=f"end to end (efficiency {speed['pipeline']['efficiency']:.2f})")
        enc.set_xscale("log", base=2)
        enc.legend(fontsize=8)
    enc.set(title="items/s: bare encoder by batch vs the stack", xlabel="batch size", ylabel="items/s")
    if "freshness" in speed and speed["freshness"]["samples_ms"]:
        samples = sorted(speed["freshness"]["samples_ms"])
        fresh.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], drawstyle="steps-post")
    fresh.set(title="freshness: ingest → searchable (CDF)", xlabel="ms", ylabel="share of probes")
    if speed.get("queries"):
        points = speed["queries"]
        sizes = [p["vectors"] for p in points]
        query.plot(sizes, [p["p50_ms"] for p in points], "o-", label="p50")
        query.plot(sizes, [p["p99_ms"] for p in points], "s--", label="p99")
        query.set_xscale("log")
        query.set_yscale("log")
        for p in points:
            query.annotate(f"recall@10 {p['recall_at_10']:.3f}", (p["vectors"], p["p50_ms"]), fontsize=7)
        query.legend(fontsize=8)
    query.set(title="match query latency vs collection size", xlabel="vectors", ylabel="ms")
    if speed.get("memory_mib"):
        names = list(speed["memory_mib"])
        memory.barh(names, [speed["memory_mib"][n] for n in names])
    memory.set(title="peak RSS per process tree", xlabel="MiB")
    for ax in (enc, fresh, query, memory):
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- files and schema ---------------------------------------------------------------------------------
def write(data: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """report.json, report.md, quality.png, speed.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(data, indent=1, default=_plain) + "\n")
    md_path = out_dir / "report.md"
    md_path.write_text(markdown(data))
    quality_png, speed_png = plots(data, out_dir)
    return {"json": json_path, "markdown": md_path, "quality_png": quality_png, "speed_png": speed_png}


def _plain(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()  # numpy scalars
    return str(value)


def problems(data: dict[str, Any]) -> list[str]:
    """What is missing or malformed in a report (empty when it is well-formed)."""
    found = []
    for key in ("schema", "created_at", "command", "quick", "machine", "config", "bundles", "quality", "speed",
                "notes", "seconds", "sections"):
        if key not in data:
            found.append(f"missing {key}")
    if data.get("schema") != SCHEMA:
        found.append(f"schema is {data.get('schema')!r}, not {SCHEMA!r}")
    for section, extra in (("quality", ()), ("unseen", ("domain", "modality"))):
        for name, result in data.get(section, {}).items():
            for key in ("description", "test_items", "test_entities", "val_items", "rows", "notes", "seconds",
                        *extra):
                if key not in result:
                    found.append(f"{section}.{name}: missing {key}")
            for i, r in enumerate(result.get("rows", [])):
                found += [f"{section}.{name}.rows[{i}]: missing {k}" for k in ROW_KEYS if k not in r]
                for k in ("precision", "recall", "f1", "micro_ap"):
                    if k in r and not 0.0 <= r[k] <= 1.0:
                        found.append(f"{section}.{name}.rows[{i}].{k} = {r[k]} is not in [0, 1]")
    for name, r in data.get("ood", {}).items():
        for key in ("inside_refused_share", "foreign_refused_share", "foreign_refused_alone_share"):
            if not 0.0 <= r.get(key, -1.0) <= 1.0:
                found.append(f"ood.{name}.{key} = {r.get(key)} is not in [0, 1]")
    speed = data.get("speed", {})
    if "pipeline" in speed:
        for key in ("encoder", "freshness", "matching", "memory_mib"):
            if key not in speed:
                found.append(f"speed: missing {key}")
        for key in ("items", "decided", "items_per_s", "efficiency", "latency_p50_ms", "latency_p99_ms"):
            if key not in speed["pipeline"]:
                found.append(f"speed.pipeline: missing {key}")
    for i, point in enumerate(speed.get("queries", [])):
        found += [f"speed.queries[{i}]: missing {k}" for k in QUERY_KEYS if k not in point]
        if "recall_at_10" in point and not 0.0 <= point["recall_at_10"] <= 1.0:
            found.append(f"speed.queries[{i}].recall_at_10 out of range")
    return found
