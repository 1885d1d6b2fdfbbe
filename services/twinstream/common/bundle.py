"""Reads model bundles (see docs/model-bundle.md): manifest, thresholds, calibration."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twinstream.v1 import decisions_pb2, items_pb2

MODALITY_NAMES: dict[int, str] = {
    items_pb2.TEXT: "text", items_pb2.IMAGE: "image", items_pb2.RECORD: "record"
}


@dataclass(frozen=True)
class ModelBundle:
    """One encoder version: what it serves, its preprocessing and its calibrated thresholds."""

    path: Path
    name: str
    version: str
    modalities: tuple[str, ...]
    dim: int
    inputs: tuple[str, ...]
    max_length: int
    image_size: int
    record_fields: tuple[str, ...]
    duplicate_threshold: float
    match_threshold: float
    ood_threshold: float
    platt_a: float
    platt_b: float
    preprocessing_digest: str
    max_batch_size: int
    manifest: dict[str, Any]
    # Calibrated per kind of item served: {"record": {"duplicate", "match", "ood", "platt_a",
    # "platt_b"}, ...}; the top-level fields are the bundle's primary kind (and the fallback).
    by_modality: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        root = Path(path)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no model bundle at {root}: {manifest_path} is missing")
        manifest = json.loads(manifest_path.read_text())
        thresholds = manifest["thresholds"]
        calibration = manifest.get("calibration", {})
        return cls(
            path=root,
            name=str(manifest["name"]),
            version=str(manifest["version"]),
            modalities=tuple(manifest["modalities"]),
            dim=int(manifest["dim"]),
            inputs=tuple(manifest.get("inputs", ["input_ids", "attention_mask"])),
            max_length=int(manifest.get("max_length", 128)),
            image_size=int(manifest.get("image_size", 0)),
            record_fields=tuple(manifest.get("record_fields", ())),
            duplicate_threshold=float(thresholds["duplicate"]),
            match_threshold=float(thresholds["match"]),
            ood_threshold=float(thresholds.get("ood", math.inf)),
            platt_a=float(calibration.get("platt_a", 0.0)),
            platt_b=float(calibration.get("platt_b", 0.0)),
            preprocessing_digest=str(manifest.get("preprocessing_digest", "")),
            max_batch_size=int(manifest.get("max_batch_size", 64)),
            manifest=manifest,
            by_modality={str(kind): {str(k): float(v) for k, v in values.items()}
                         for kind, values in thresholds.get("by_modality", {}).items()},
        )

    def serves(self, modality: int) -> bool:
        return MODALITY_NAMES.get(modality, "") in self.modalities

    @property
    def model_ref(self) -> items_pb2.ModelRef:
        return items_pb2.ModelRef(
            name=self.name, version=self.version, preprocessing_digest=self.preprocessing_digest
        )

    def for_modality(self, modality: int) -> ModelBundle:
        """This bundle with the thresholds and Platt scaling calibrated for items of ``modality``
        (a text+record bundle calibrates records and prose separately), else itself."""
        own = self.by_modality.get(MODALITY_NAMES.get(modality, ""))
        if not own:
            return self
        return replace(self, duplicate_threshold=own.get("duplicate", self.duplicate_threshold),
                       match_threshold=own.get("match", self.match_threshold),
                       ood_threshold=own.get("ood", self.ood_threshold),
                       platt_a=own.get("platt_a", self.platt_a), platt_b=own.get("platt_b", self.platt_b),
                       by_modality={})

    @property
    def thresholds(self) -> decisions_pb2.Thresholds:
        return decisions_pb2.Thresholds(
            duplicate=self.duplicate_threshold, match=self.match_threshold, ood=self.ood_threshold
        )

    def duplicate_probability(self, score: float) -> float:
        """Calibrated P(duplicate | cosine score), Platt scaling fitted at calibration time."""
        if self.platt_a == 0.0 and self.platt_b == 0.0:
            return 1.0 if score >= self.duplicate_threshold else 0.0
        z = self.platt_a * score + self.platt_b
        return 1.0 / (1.0 + math.exp(-z)) if z > -50 else 0.0


def load_bundles(folders: Iterable[str | Path]) -> list[ModelBundle]:
    """Load the bundle in each folder (``settings.encoder.model_dirs``)."""
    return [ModelBundle.load(folder) for folder in folders]
