"""Tiny end-to-end runs of the shared training loop for each modality (seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from twinstream.learn.bundle import run_encoder
from twinstream.learn.data import PairSampler
from twinstream.learn.modalities import DataSizes, ModelOptions, get_modality
from twinstream.learn.train import TrainConfig, run_training, train

TINY = DataSizes.tiny()
IMAGE = TrainConfig(modality="image", loss="infonce", temperature=0.1, epochs=3, batch_entities=16,
                    sizes=TINY, options=ModelOptions(image_size=32), device="cpu")


@pytest.mark.parametrize("name", ["record", "text", "image"])
def test_splits_are_entity_disjoint_and_sampled_in_pairs(name: str) -> None:
    modality = get_modality(name, ModelOptions(image_size=32))
    splits = modality.load_splits(TINY, seed=3)
    splits.check_disjoint()
    assert len(splits.val) > 0 and len(splits.test) > 0
    assert min(len(v) for v in splits.train.by_entity().values()) >= 2
    indices, labels = PairSampler(splits.train, seed=0).batch(8)
    assert len(indices) == 16 and len(set(indices)) == 16
    assert all(splits.train.entities[indices[2 * k]] == splits.train.entities[indices[2 * k + 1]]
               for k in range(8))
    assert labels.tolist() == [k // 2 for k in range(16)]
    again = modality.load_splits(TINY, seed=3)  # seeded: same data twice
    assert again.test.entities == splits.test.entities


def test_image_training_is_reproducible_and_learns(tmp_path: Path) -> None:
    first, second = train(IMAGE, progress=False), train(IMAGE, progress=False)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    losses = [e["train_loss"] for e in first.history.epochs]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("name", "loss"), [("record", "triplet"), ("text", "contrastive"), ("image", "infonce")])
def test_run_training_writes_a_bundle(name: str, loss: str, tmp_path: Path) -> None:
    config = TrainConfig(modality=name, loss=loss, epochs=2, batch_entities=16, sizes=TINY,
                         options=ModelOptions(image_size=32), device="auto")
    manifest = run_training(config, tmp_path / "bundle", "7", progress=False)
    bundle = tmp_path / "bundle"
    assert json.loads((bundle / "manifest.json").read_text()) == manifest
    assert manifest["version"] == "7" and manifest["trained"] is True
    assert manifest["name"] == ("twinstream_image" if name == "image" else "twinstream_text")
    assert (bundle / "training_curve.png").stat().st_size > 1000
    thresholds = manifest["thresholds"]
    assert set(thresholds) == {"duplicate", "match", "ood", "by_modality"}
    # every kind the bundle serves is calibrated on its own; the trained one comes first (top level)
    assert list(thresholds["by_modality"]) == ([name] if name == "image" else [name, {"record": "text",
                                                                                     "text": "record"}[name]])
    assert thresholds["duplicate"] == thresholds["by_modality"][name]["duplicate"]
    modality = get_modality(name, ModelOptions(image_size=32))
    views = modality.load_splits(TINY, seed=0).test.views[:5]
    module = torch.jit.load(str(bundle / "encoder.pt"))
    embedding, ood = run_encoder(module, modality, views)
    assert embedding.shape == (5, manifest["dim"]) and ood.shape == (5,)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_traced_text_encoder_generalises_over_batch_shapes(base_bundle: Path) -> None:
    """The trace saw one batch shape; other batch sizes and lengths must match eager MiniLM."""
    modality = get_modality("record")
    model = modality.build_model(seed=0).eval()
    traced = torch.jit.load(str(base_bundle / "encoder.pt"))
    texts = ["one", "two words", "a considerably longer third input with many more tokens in it", "4"]
    for batch in (texts[:1], texts, texts[1:3]):
        ids, mask = modality.collate(batch)
        with torch.inference_mode():
            expected = model(ids, mask)
            got, _ = traced(ids, mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
