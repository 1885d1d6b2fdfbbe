"""The benchmark harness produces well-formed reports on tiny inputs. Nothing here is timed:
benchmarks are run with ``python -m bench``, never as tests."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from bench import metrics, ood, report, unseen, unseen_data
from bench.methods import Stream, load_encoder
from bench.metrics import Link
from bench.run import main
from twinstream.devstack import LocalStack
from twinstream.v1 import items_pb2

pytestmark = pytest.mark.stack

QUICK_QUERIES = ["--vectors", "500", "1500", "--dims", "8"]


def _load(out: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((out / "report.json").read_text())
    assert report.problems(data) == []
    for png in ("quality.png", "speed.png"):
        with Image.open(out / png) as image:
            image.verify()
            assert image.format == "PNG"
        with Image.open(out / png) as image:
            assert image.width > 400 and image.height > 300
    return data


def test_metrics_score_a_stream_like_the_demo() -> None:
    # a1 a2 b1 a3 c1: a2 and a3 have an earlier duplicate; a3 is linked to the wrong entity
    links = [Link("a", None, -math.inf, False), Link("a", "a", 0.9, True), Link("b", "a", 0.2, False),
             Link("a", "b", 0.8, True), Link("c", "b", 0.1, False)]
    quality = metrics.quality(links)
    assert (quality.precision, quality.recall, quality.true_duplicates) == (0.5, 0.5, 2)
    assert quality.micro_ap == pytest.approx(0.5)  # 1 right at rank 1 of 2 true duplicates
    assert metrics.calibrate_threshold(links, 0.95) == pytest.approx(0.9)
    assert [link.duplicate for link in metrics.at_threshold(links, 0.5)] == [False, True, False, True, False]


def test_clusters_are_scored_by_pairs() -> None:
    # clusters {a1 a2 b1} {a3}: 3 pairs said, 1 right (a1 a2); entity a has 3 pairs
    scored = metrics.cluster_quality(["x", "x", "x", "y"], ["a", "a", "b", "a"])
    assert (scored.precision, scored.recall) == pytest.approx((1 / 3, 1 / 3))
    assert (scored.largest_cluster, scored.largest_entity) == (3, 3)


def test_quick_quality_and_queries_write_a_well_formed_report(tmp_path: Path, base_bundle: Path) -> None:
    out = tmp_path / "report"
    code = main(["--quick", "--skip", "pipeline", "--no-discover", "--base-bundle", str(base_bundle),
                 "--out", str(out), *QUICK_QUERIES])
    assert code == 0
    data = _load(out)
    quality = data["quality"]
    assert isinstance(quality, dict) and set(quality) == {"records", "text", "images"}
    methods = {name: [r["method"] for r in result["rows"]] for name, result in quality.items()}
    assert any("recordlinkage" in m for m in methods["records"])
    assert any("MinHash" in m for m in methods["text"]) and any("twinstream" in m for m in methods["text"])
    assert any("pHash" in m for m in methods["images"])
    sets = data["unseen"]
    assert isinstance(sets, dict) and list(sets) == list(unseen.DEFAULT_SETS)
    for name, result in sets.items():
        kinds = {r["kind"] for r in result["rows"]}
        assert "baseline" in kinds and result["test_items"] > 0, name
        assert ("twinstream" in kinds) == (result["modality"] != "IMAGE"), name  # no image bundle given
    assert any("ECM" in r["method"] for r in sets["books"]["rows"])
    measured = data["ood"]  # no image bundle given: no image collection
    assert isinstance(measured, dict) and set(measured) == {"FEBRL3 records", "docstring text", *(
        f"unseen {n}" for n in unseen.DEFAULT_SETS if n != "icons")}
    points = data["speed"]["queries"]  # type: ignore[index]
    assert [p["vectors"] for p in points] == [500, 1500]
    assert all(p["recall_at_10"] > 0.5 and p["p99_ms"] >= p["p50_ms"] > 0 for p in points)
    text = (out / "report.md").read_text()
    for heading in ("### records", "### text", "### images", "## Unseen data, no labels", "### unseen: books",
                    "## OOD relative to the collection", "### Match queries at scale"):
        assert heading in text
    assert "| method | decision | threshold | precision | recall | F1 | µAP | OOD refusals |" in text
    assert "| vectors | insert s |" in text


def test_quick_pipeline_on_the_shared_stack(tmp_path: Path, stack: LocalStack, base_bundle: Path) -> None:
    out = tmp_path / "report"
    code = main(["--quick", "--items", "24", "--skip", "text", "images", "queries", "--no-discover",
                 "--base-bundle", str(base_bundle), "--out", str(out)], stack=stack)
    assert code == 0
    data = _load(out)
    speed = data["speed"]
    assert isinstance(speed, dict)
    pipeline = speed["pipeline"]
    assert pipeline["decided"] == pipeline["items"] == 24
    assert pipeline["efficiency"] > 0 and speed["encoder"]["best"]["items_per_s"] > 0
    assert speed["freshness"]["probes"] == 3
    assert {"ingestion", "embedding", "indexing", "matching", "milvus", "triton"} <= set(speed["memory_mib"])
    records = data["quality"]["records"]  # type: ignore[index]
    assert any("running stack" in r["method"] for r in records["rows"])
    text = (out / "report.md").read_text()
    for heading in ("### Pipeline efficiency", "### Freshness", "### Match API", "### Memory"):
        assert heading in text


@pytest.mark.parametrize("name", unseen_data.LOADERS)
def test_an_unseen_set_streams_whole_entities_in_a_fixed_order(name: str) -> None:
    first, again = unseen_data.load(name, 30, seed=3), unseen_data.load(name, 30, seed=3)
    stream = first.stream
    assert (stream.ids, stream.entities, stream.contents) == (again.stream.ids, again.stream.entities,
                                                             again.stream.contents)
    assert len(set(stream.ids)) == len(stream) >= 30 or (name == "companies" and len(stream) >= 20)
    assert len(set(stream.entities)) < len(stream)  # some items have a duplicate
    bigger = unseen_data.load(name, 60, seed=3).stream
    kept = set(stream.entities)
    assert sorted(e for e in bigger.entities if e in kept) == sorted(stream.entities)  # entities stay whole
    assert stream.ids != sorted(stream.ids)  # shuffled arrival, not generation order
    assert first.source and first.domain


def test_unseen_records_drop_the_generator_keys_and_keep_every_other_field() -> None:
    stream = unseen_data.load("books", 40, seed=1).stream
    frame = unseen.record_frame(stream)
    assert "title" in frame.columns and not any(c.endswith("_id") for c in frame.columns)
    assert frame.notna().any().all()


def test_a_report_with_a_malformed_unseen_row_is_flagged() -> None:
    row = {k: 0.5 for k in report.ROW_KEYS} | {"f1": 1.5}
    data = {"unseen": {"books": {"description": "", "test_items": 1, "test_entities": 1, "val_items": 0,
                                 "rows": [row], "notes": [], "seconds": 0.0}}}
    found = report.problems(data)
    assert "unseen.books: missing domain" in found
    assert "unseen.books.rows[0].f1 = 1.5 is not in [0, 1]" in found


def test_foreign_items_are_interleaved_after_the_warm_up_and_keep_the_stream_whole() -> None:
    stream = Stream([f"t{i}" for i in range(70)], [f"e{i // 2}" for i in range(70)],
                    [b'{"a": "%d"}' % i for i in range(70)], items_pb2.RECORD)
    foreign, kind = ood.foreign_contents(items_pb2.RECORD, 6, seed=2)
    mixed, is_foreign = ood.interleave(stream, foreign, seed=2, warmup=50)
    assert "records" in kind and len(mixed) == 76 and int(is_foreign.sum()) == 6
    assert [mixed.ids[i] for i in range(76) if not is_foreign[i]] == stream.ids  # the clean order, whole
    assert all(i > 50 for i in range(76) if is_foreign[i]) and not is_foreign[:51].any()
    assert all(b"def " in mixed.contents[i] for i in range(76) if is_foreign[i])  # code, as records


def test_foreign_pages_are_text_rendered_on_a_white_page() -> None:
    pages, kind = ood.foreign_contents(items_pb2.IMAGE, 3, seed=0)
    assert "pages" in kind and len(pages) == 3
    for content in pages:
        with Image.open(io.BytesIO(content)) as page:
            assert page.format == "PNG" and page.size in ood.PAGE_SIZES
            pixels = page.convert("L").getdata()
            assert max(pixels) == 255 and min(pixels) < 64  # black text on white


def test_auroc_counts_foreign_items_scoring_below_the_collection() -> None:
    assert ood.auroc([0.5, 0.6], [0.1, 0.2]) == 1.0
    assert ood.auroc([0.5, 0.6], [0.55]) == 0.5
    assert ood.auroc([0.3], [0.3, 0.9]) == 0.25
    assert math.isnan(ood.auroc([], [0.1]))


def test_code_into_a_records_collection_is_measured_through_the_replay(base_bundle: Path) -> None:
    stream = unseen_data.load("books", 80, seed=1).stream
    result = ood.measure("base", load_encoder(base_bundle), stream, seed=1, share=0.1)
    assert (result.items, result.foreign) == (len(stream), 8)
    assert result.inside_refused_share <= 0.02  # the collection's own items are kept
    assert result.auroc_alone > 0.9  # code is far from every book record
    lines = "\n".join(report._ood_md({"unseen books": dataclasses.asdict(result)}))
    assert "## OOD relative to the collection" in lines and "| unseen books | base | 8 Python" in lines
    found = report.problems({"ood": {"books": {**dataclasses.asdict(result), "foreign_refused_share": 2.0}}})
    assert "ood.books.foreign_refused_share = 2.0 is not in [0, 1]" in found


def test_pooled_ood_results_sum_counts_and_weigh_shares_by_items() -> None:
    small = ood.OodResult("img", "pages", items=40, foreign=2, inside_refused=0, inside_refused_share=0.0,
                          foreign_refused_share=0.0, auroc=0.5, foreign_refused_alone_share=0.0, auroc_alone=0.5,
                          foreign_refused=0, foreign_profiled=0)  # both pages came during the warm-up
    large = ood.OodResult("img", "pages", items=60, foreign=4, inside_refused=1, inside_refused_share=1 / 60,
                          foreign_refused_share=0.75, auroc=0.9, foreign_refused_alone_share=0.75, auroc_alone=0.9,
                          auroc_profile=1.0, foreign_refused_by_profile_share=0.75, foreign_refused=3,
                          foreign_profiled=4)
    both = ood.pooled([small, large])
    assert (both.items, both.foreign, both.inside_refused, both.foreign_refused) == (100, 6, 1, 3)
    assert (both.foreign_profiled, both.collections) == (4, 2)
    assert both.inside_refused_share == 0.01 and both.foreign_refused_share == 0.5
    assert both.foreign_refused_by_profile_share == 0.5 and both.foreign_refused_alone_share == 0.5
    assert math.isnan(both.auroc) and math.isnan(both.auroc_profile)  # references differ: no pooled AUROC
    lines = "\n".join(report._ood_md({"photos pooled": dataclasses.asdict(both)}))
    assert "50.0% (3 of 6; 4 met a profile reference)" in lines
