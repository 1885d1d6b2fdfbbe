"""The benchmark harness produces well-formed reports on tiny inputs. Nothing here is timed:
benchmarks are run with ``python -m bench``, never as tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from bench import metrics, report
from bench.metrics import Link
from bench.run import main
from twinstream.devstack import LocalStack

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
    points = data["speed"]["queries"]  # type: ignore[index]
    assert [p["vectors"] for p in points] == [500, 1500]
    assert all(p["recall_at_10"] > 0.5 and p["p99_ms"] >= p["p50_ms"] > 0 for p in points)
    text = (out / "report.md").read_text()
    for heading in ("### records", "### text", "### images", "### Match queries at scale"):
        assert heading in text
    assert "| method | decision | threshold | precision | recall | F1 | µAP | OOD refusals |" in text
    assert "| vectors | insert s |" in text


@pytest.mark.stack
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
