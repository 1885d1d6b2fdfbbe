"""Siamese losses over a batch of L2-normalised embeddings [N, dim] with entity labels [N].

* ``contrastive``: Hadsell et al. 2006, d^2 for positives, max(0, margin - d)^2 for negatives,
  positive and negative terms averaged separately (negatives outnumber positives ~N:1);
* ``triplet``: FaceNet (Schroff et al. 2015) with semi-hard negative mining on squared distances;
* ``infonce``: supervised InfoNCE / NT-Xent (Khosla et al. 2020) with a temperature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    return (2.0 - 2.0 * embeddings @ embeddings.T).clamp(min=0.0)


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    positive, negative = _masks(labels)
    squared = _squared_distances(embeddings)
    distance = (squared + 1e-12).sqrt()
    pull = squared[positive].mean()
    push = (margin - distance[negative]).clamp(min=0.0).pow(2).mean()
    return pull + push


def triplet_semihard_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """For each anchor-positive pair, the closest negative farther than the positive (semi-hard);
    where none lies within the margin band, the farthest negative, as in FaceNet's TF reference."""
    positive, negative = _masks(labels)
    squared = _squared_distances(embeddings)
    anchors, positives = positive.nonzero(as_tuple=True)
    ap = squared[anchors, positives]                       # [P]
    an = squared[anchors]                                  # [P, N]
    is_negative = negative[anchors]
    semihard = is_negative & (an > ap[:, None])
    inf = torch.tensor(float("inf"), device=embeddings.device)
    closest_semihard = torch.where(semihard, an, inf).min(dim=1).values
    farthest = torch.where(is_negative, an, -inf).max(dim=1).values
    chosen = torch.where(semihard.any(dim=1), closest_semihard, farthest)
    return (ap - chosen + margin).clamp(min=0.0).mean()


def infonce_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    positive, _ = _masks(labels)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = (embeddings @ embeddings.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    has_positive = positive.any(dim=1)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp(min=1))
    return per_anchor[has_positive].mean()


def make_loss(name: str, temperature: float, margin: float | None = None) -> LossFn:
    """The loss named on the command line, with its hyper-parameter bound."""
    if name == "contrastive":
        m = 1.0 if margin is None else margin
        return lambda e, y: contrastive_loss(e, y, m)
    if name == "triplet":
        m = 0.2 if margin is None else margin
        return lambda e, y: triplet_semihard_loss(e, y, m)
    if name == "infonce":
        return lambda e, y: infonce_loss(e, y, temperature)
    raise ValueError(f"unknown loss {name!r}: use contrastive, triplet or infonce")
