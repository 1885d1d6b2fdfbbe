"""The manifest schema lives once (model/bundle.py): what training writes is what serving reads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from twinstream.model.bundle import Manifest, ModelBundle, preprocessing_digest

BASE = Path(__file__).resolve().parents[3] / "var" / "models" / "twinstream_text" / "1"
IMAGE: dict[str, Any] = {
    "name": "twinstream_image", "version": "3", "modalities": ["image"], "dim": 128, "inputs": ["pixels"],
    "image_size": 64, "base": "compact CNN", "max_batch_size": 64, "trained": True,
    "thresholds": {"duplicate": 0.9, "match": 0.8, "ood": 0.3, "by_modality": {"image": {"duplicate": 0.9}}},
    "calibration": {"platt_a": 30.0, "platt_b": -25.0, "ood_reference": {"prototypes": 32}},
    "training": {"epochs": 2}, "preprocessing_digest": "ab" * 32, "created_at": "2026-11-29T10:00:00+00:00",
}


def test_the_base_bundle_manifest_round_trips_exactly() -> None:
    # Checked when the test runs, not at collection: on a fresh clone the stack tests, which run
    # first, build the base bundle.
    if not (BASE / "manifest.json").is_file():
        pytest.skip("base bundle not built")
    written = json.loads((BASE / "manifest.json").read_text())
    assert Manifest.read(BASE).to_dict() == written


def test_an_image_manifest_round_trips_through_a_file(tmp_path: Path) -> None:
    manifest = Manifest.from_dict(IMAGE)
    assert manifest.extra == {"base": "compact CNN", "trained": True, "training": {"epochs": 2}}
    manifest.write(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text()) == IMAGE  # no max_length invented
    assert Manifest.read(tmp_path) == manifest
    bundle = ModelBundle.load(tmp_path)
    assert (bundle.image_size, bundle.ood_threshold, bundle.platt_a) == (64, 0.3, 30.0)


def test_no_ood_threshold_reads_as_no_gate(tmp_path: Path) -> None:
    Manifest.from_dict({**IMAGE, "thresholds": {"duplicate": 0.9, "match": 0.8}}).write(tmp_path)
    assert ModelBundle.load(tmp_path).ood_threshold == math.inf


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "../x"}, "model name"), ({"version": "0"}, "model version"), ({"version": "v2"}, "model version"),
    ({"dim": None}, "lacks dim"), ({"modalities": ["audio"]}, "unknown modalities"),
])
def test_a_bad_manifest_is_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    data = {k: v for k, v in {**IMAGE, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        Manifest.from_dict(data, "bundle/x")


def test_a_missing_or_broken_manifest_says_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        Manifest.read(tmp_path)


def test_the_digest_is_the_same_from_the_dict_and_the_manifest() -> None:
    assert preprocessing_digest(IMAGE, None) == preprocessing_digest(Manifest.from_dict(IMAGE), None)
