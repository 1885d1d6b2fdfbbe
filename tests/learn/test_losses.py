from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from twinstream.learn.losses import contrastive_loss, infonce_loss, make_loss, triplet_semihard_loss


def _unit(*rows: list[float]) -> torch.Tensor:
    return functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


LABELS = torch.tensor([0, 0, 1, 1])
ALIGNED = _unit([1, 0], [1, 0.05], [-1, 0], [-1, -0.05])   # duplicates together, entities apart
MIXED = _unit([1, 0], [-1, 0], [1, 0.05], [-1, -0.05])     # duplicates on opposite sides


@pytest.mark.parametrize("name", ["contrastive", "triplet", "infonce"])
def test_loss_prefers_duplicates_together(name: str) -> None:
    loss = make_loss(name, temperature=0.1)
    assert loss(ALIGNED, LABELS) < loss(MIXED, LABELS)


@pytest.mark.parametrize("name", ["contrastive", "triplet", "infonce"])
def test_gradient_flows(name: str) -> None:
    embeddings = torch.randn(8, 5, requires_grad=True)
    make_loss(name, temperature=0.1)(functional.normalize(embeddings, dim=1),
                                     torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_infonce_matches_cross_entropy_with_one_positive() -> None:
    torch.manual_seed(0)
    embeddings = functional.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = embeddings @ embeddings.T / 0.2
    logits.fill_diagonal_(float("-inf"))
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    expected = functional.cross_entropy(logits, partner)
    assert torch.allclose(infonce_loss(embeddings, labels, 0.2), expected, atol=1e-6)


def test_triplet_picks_the_semi_hard_negative() -> None:
    # Anchor a at angle 0, positive p at 60 deg (d^2 = 1), negatives at 70 and 150 deg, and one
    # closer than the positive (30 deg, a hard negative that semi-hard mining must skip).
    def at(deg: float) -> list[float]:
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

    embeddings = torch.tensor([at(0), at(60), at(70), at(150), at(30)])
    labels = torch.tensor([0, 0, 1, 2, 3])
    d2 = lambda a, b: float(((embeddings[a] - embeddings[b]) ** 2).sum())  # noqa: E731
    margin = 0.5
    # anchor 0 / positive 1: semi-hard = closest negative farther than the positive: index 2.
    # anchor 1 / positive 0: distances from 1: idx2 (10 deg), idx4 (30 deg), idx3 (90 deg);
    # farther than d(1,0) (60 deg): idx3 only -> semi-hard negative 3.
    expected = (max(0.0, d2(0, 1) - d2(0, 2) + margin) + max(0.0, d2(1, 0) - d2(1, 3) + margin)) / 2
    assert triplet_semihard_loss(embeddings, labels, margin).item() == pytest.approx(expected, abs=1e-6)


def test_contrastive_is_zero_when_negatives_beyond_margin_and_positives_equal() -> None:
    embeddings = _unit([1, 0], [1, 0], [-1, 0], [-1, 0])
    assert contrastive_loss(embeddings, LABELS, margin=1.0).item() == pytest.approx(0.0, abs=1e-5)


def test_unknown_loss_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge", 0.1)
