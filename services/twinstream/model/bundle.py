"""The model bundle's manifest (docs/model-bundle.md), read AND written here: training writes it
through ``Manifest.write``, the services and the Triton repository writer read it through
``Manifest.read``/``ModelBundle.load``. The schema lives once, in this file."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twinstream.common.names import NAME_RULE, is_name
from twinstream.v1 import decisions_pb2, items_pb2

MODALITY_NAMES: dict[int, str] = {
    items_pb2.TEXT: "text", items_pb2.IMAGE: "image", items_pb2.RECORD: "record"
}
MANIFEST_FILE = "manifest.json"
# Manifest keys the dataclass below types; any other top-level section (base, trained, training,
# ...) is training's own record and travels through ``Manifest.extra`` untouched.
_TYPED = ("name", "version", "modalities", "dim", "inputs", "max_length", "image_size", "record_fields",
          "max_batch_size", "thresholds", "calibration", "runtime", "preprocessing_digest", "created_at")


@dataclass(frozen=True)
class ManifestThresholds:
    """The ``thresholds`` section: cosine cut-offs of the primary kind served, and per kind
    (``by_modality``: {"record": {"duplicate", "match", "ood", "platt_a", "platt_b"}, ...})."""

    duplicate: float
    match: float
    ood: float | None = None            # None: no OOD gate (written bundles always have one)
    by_modality: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManifestThresholds:
        return cls(duplicate=float(data["duplicate"]), match=float(data["match"]),
                   ood=None if data.get("ood") is None else float(data["ood"]),
                   by_modality={str(kind): {str(k): float(v) for k, v in values.items()}
                                for kind, values in data.get("by_modality", {}).items()})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"duplicate": self.duplicate, "match": self.match}
        if self.ood is not None:
            out["ood"] = self.ood
        if self.by_modality:
            out["by_modality"] = self.by_modality
        return out


@dataclass(frozen=True)
class Manifest:
    """One bundle's ``manifest.json``: what the encoder serves, its inputs and preprocessing, its
    calibration. ``from_dict`` rejects a manifest the services could not serve with a ValueError
    naming the bundle and the field."""

    name: str
    version: str
    modalities: tuple[str, ...]
    dim: int
    thresholds: ManifestThresholds
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    max_length: int = 128               # tokens; written for token-input bundles only
    image_size: int = 0                 # written for image bundles only
    record_fields: tuple[str, ...] = ()  # serialisation order of record fields (text bundles)
    max_batch_size: int = 64
    preprocessing_digest: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)  # platt_a, platt_b and how they were fitted
    runtime: dict[str, Any] | None = None  # what the bundle is served with (learn.bundle.ENCODER_RUNTIME)
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        name, version = str(data.get("name", "")), str(data.get("version", ""))
        # Both become paths (Triton repository folders) and metric labels: "../../x" must not pass.
        if not is_name(name):
            raise ValueError(f"{source}: model name {name[:80]!r} must be {NAME_RULE}")
        if not version.isascii() or not version.isdigit() or int(version) < 1:
            raise ValueError(f"{source}: model version {version[:80]!r} must be a positive integer "
                             "(Triton's version folders are numbers)")
        missing = [key for key in ("modalities", "dim", "thresholds") if key not in data]
        if missing:
            raise ValueError(f"{source}: manifest lacks {', '.join(missing)}")
        unknown = set(data["modalities"]) - set(MODALITY_NAMES.values())
        if unknown:
            raise ValueError(f"{source}: unknown modalities {sorted(unknown)}")
        return cls(
            name=name, version=version, modalities=tuple(data["modalities"]), dim=int(data["dim"]),
            thresholds=ManifestThresholds.from_dict(data["thresholds"]),
            inputs=tuple(data.get("inputs", ("input_ids", "attention_mask"))),
            max_length=int(data.get("max_length", 128)), image_size=int(data.get("image_size", 0)),
            record_fields=tuple(data.get("record_fields", ())),
            max_batch_size=int(data.get("max_batch_size", 64)),
            preprocessing_digest=str(data.get("preprocessing_digest", "")),
            calibration=dict(data.get("calibration", {})), runtime=data.get("runtime"),
            created_at=str(data.get("created_at", "")),
            extra={key: value for key, value in data.items() if key not in _TYPED},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``Manifest.from_dict(m.to_dict()) == m``; optional fields left at their
        default are left out, as the writers always did."""
        out: dict[str, Any] = {"name": self.name, "version": self.version,
                               "modalities": list(self.modalities), "dim": self.dim,
                               "inputs": list(self.inputs)}
        if self.inputs != ("pixels",):
            out["max_length"] = self.max_length
        if self.image_size:
            out["image_size"] = self.image_size
        if self.record_fields:
            out["record_fields"] = list(self.record_fields)
        out.update(self.extra)
        out["max_batch_size"] = self.max_batch_size
        if self.runtime is not None:
            out["runtime"] = self.runtime
        out["thresholds"] = self.thresholds.to_dict()
        if self.calibration:
            out["calibration"] = self.calibration
        if self.preprocessing_digest:
            out["preprocessing_digest"] = self.preprocessing_digest
        if self.created_at:
            out["created_at"] = self.created_at
        return out

    @classmethod
    def read(cls, bundle_dir: str | Path) -> Manifest:
        path = Path(bundle_dir) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no model bundle at {bundle_dir}: {path} is missing")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a manifest is a JSON object")
        return cls.from_dict(data, str(path))

    def write(self, bundle_dir: str | Path) -> Path:
        """Write ``manifest.json`` last and atomically: its presence marks a complete bundle."""
        path = Path(bundle_dir) / MANIFEST_FILE
        partial = path.with_name(MANIFEST_FILE + ".partial")
        partial.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        partial.replace(path)
        return path


def preprocessing_digest(manifest: dict[str, Any] | Manifest, tokenizer_file: Path | None) -> str:
    """What a vector depends on besides the weights (tokenizer, lengths, sizes, field order):
    services refuse to compare vectors whose digests differ."""
    data = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    digest = hashlib.sha256(tokenizer_file.read_bytes() if tokenizer_file else b"")
    settings = {key: data.get(key) for key in ("max_length", "image_size", "record_fields")}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


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
    manifest: Manifest | None = None     # None for a bundle built in code (unit tests)
    # Calibrated per kind of item served: {"record": {"duplicate", "match", "ood", "platt_a",
    # "platt_b"}, ...}; the top-level fields are the bundle's primary kind (and the fallback).
    by_modality: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        root = Path(path)
        manifest = Manifest.read(root)
        thresholds, calibration = manifest.thresholds, manifest.calibration
        return cls(
            path=root, name=manifest.name, version=manifest.version, modalities=manifest.modalities,
            dim=manifest.dim, inputs=manifest.inputs, max_length=manifest.max_length,
            image_size=manifest.image_size, record_fields=manifest.record_fields,
            duplicate_threshold=thresholds.duplicate, match_threshold=thresholds.match,
            ood_threshold=math.inf if thresholds.ood is None else thresholds.ood,
            platt_a=float(calibration.get("platt_a", 0.0)), platt_b=float(calibration.get("platt_b", 0.0)),
            preprocessing_digest=manifest.preprocessing_digest, max_batch_size=manifest.max_batch_size,
            manifest=manifest, by_modality=thresholds.by_modality,
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
