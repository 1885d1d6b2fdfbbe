"""The command line end to end on a tiny image run: train -> bundle -> evaluate report."""

from __future__ import annotations

import json
from pathlib import Path

from twinstream.learn.cli import main
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import items_pb2

TINY_FLAGS = ["--train-entities", "48", "--eval-views", "160", "--reference-views", "80", "--ood-views", "40"]


def test_train_then_evaluate(tmp_path: Path, capsys: object) -> None:
    bundle = tmp_path / "twinstream_image" / "3"
    # `twinstream train` hands over the options without the sub-command name.
    assert main(["--modality", "image", "--loss", "triplet", "--epochs", "2", "--image-size", "32",
                 "--device", "auto", "--no-progress", "--out", str(bundle), *TINY_FLAGS]) == 0
    loaded = ModelBundle.load(bundle)  # the services' reader accepts it
    assert (loaded.name, loaded.version, loaded.modalities, loaded.image_size) == (
        "twinstream_image", "3", ("image",), 32)
    assert loaded.match_threshold <= loaded.duplicate_threshold
    assert set(loaded.by_modality) == {"image"}
    assert loaded.for_modality(items_pb2.IMAGE).ood_threshold == loaded.ood_threshold
    assert 0.0 <= loaded.duplicate_probability(loaded.duplicate_threshold) <= 1.0
    assert (bundle / "training_curve.png").is_file() and (bundle / "history.json").is_file()

    reports = tmp_path / "reports"
    assert main(["evaluate", "--modality", "image", "--bundle", str(bundle), "--out", str(reports),
                 *TINY_FLAGS]) == 0
    report = json.loads((reports / "evaluation-image.json").read_text())
    assert [s["label"] for s in report["scores"]] == ["base", "trained"]
    for row in report["scores"]:
        assert 0.0 <= row["pair_roc_auc"] <= 1.0 and 0.0 <= row["f1"] <= 1.0
    assert "| F1 |" in (reports / "evaluation-image.md").read_text()
