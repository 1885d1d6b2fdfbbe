"""Entity-labelled views, group-disjoint splits and the Siamese batch sampler."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

View = TypeVar("View")


@dataclass
class ViewSet(Generic[View]):
    """Model inputs (before collation) and the entity each shows; same entity = duplicates."""

    views: list[View] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)

    def add(self, view: View, entity: str) -> None:
        self.views.append(view)
        self.entities.append(entity)

    def __len__(self) -> int:
        return len(self.views)

    def shuffled(self, seed: int) -> ViewSet[View]:
        """The same views in a seeded arrival order (what a stream would see)."""
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        return ViewSet([self.views[i] for i in order], [self.entities[i] for i in order])

    def by_entity(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for index, entity in enumerate(self.entities):
            groups[entity].append(index)
        return dict(groups)


@dataclass
class Splits(Generic[View]):
    """Entity-disjoint train / validation (calibration) / test views of one modality."""

    train: ViewSet[View]
    val: ViewSet[View]
    test: ViewSet[View]

    def check_disjoint(self) -> None:
        train, val, test = (set(s.entities) for s in (self.train, self.val, self.test))
        if train & val or train & test or val & test:
            raise AssertionError("splits share entities")


def split_groups(groups: Sequence[str], seed: int,
                 fractions: tuple[float, float] = (0.6, 0.2)) -> tuple[set[str], set[str], set[str]]:
    """Assign whole groups (entities, topics, source photos) to train / val / test."""
    unique = sorted(set(groups))
    random.Random(seed).shuffle(unique)
    n_train = round(len(unique) * fractions[0])
    n_val = max(1, round(len(unique) * fractions[1]))
    return set(unique[:n_train]), set(unique[n_train:n_train + n_val]), set(unique[n_train + n_val:])


class PairSampler:
    """Batches of ``batch_entities`` distinct entities with two distinct views each.

    Every training loss here consumes such a batch: embeddings [2B, dim] and entity labels [2B].
    """

    def __init__(self, views: ViewSet[object], seed: int) -> None:
        self.groups = [idx for idx in views.by_entity().values() if len(idx) >= 2]
        self.paired_views = sum(len(g) for g in self.groups)
        if not self.groups:
            raise ValueError("no entity has two views: nothing to learn duplicates from")
        self.rng = random.Random(seed)

    def steps_per_epoch(self, batch_entities: int) -> int:
        """An epoch draws about as many views as there are (entities with several views)."""
        return max(1, self.paired_views // (2 * batch_entities))

    def batch(self, batch_entities: int) -> tuple[list[int], np.ndarray]:
        chosen = self.rng.sample(self.groups, min(batch_entities, len(self.groups)))
        indices, labels = [], []
        for label, group in enumerate(chosen):
            first, second = self.rng.sample(group, 2)
            indices += [first, second]
            labels += [label, label]
        return indices, np.asarray(labels, dtype=np.int64)
