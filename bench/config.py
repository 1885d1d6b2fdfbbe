"""What a run measures: sizes (default, ``--quick``, overrides) and which model bundles."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinstream.devstack import REPO_ROOT

MODELS = REPO_ROOT / "var" / "models"
BASE_BUNDLE = MODELS / "twinstream_text" / "1"


@dataclass(frozen=True)
class Sizes:
    """How much each part does; the default run fits in about 15 minutes on two cores."""

    items: int = 2000               # FEBRL3 records streamed through the stack and linked
    text_items: int = 500           # text items per split (validation and test)
    image_items: int = 250          # images per split
    unseen_items: int = 400         # items per unseen-data set (whole entities, about)
    vectors: tuple[int, ...] = (100_000, 1_000_000)
    dims: int = 16
    freshness_probes: int = 40
    match_queries: int = 200        # gRPC Match calls on the stack
    latency_queries: int = 200      # single-vector searches per size (time-capped)
    recall_queries: int = 500
    max_latency_s: float = 45.0     # cap on the single-query loop per size
    encoder_seconds: float = 3.0    # per batch size in the bare-encoder sweep, per turn in the runtime rounds
    runtime_rounds: int = 5         # interleaved rounds of today's encoder vs OpenVINO

    @classmethod
    def quick(cls) -> Sizes:
        """Seconds, not minutes: checks the harness works, says nothing about speed."""
        return cls(items=120, text_items=40, image_items=24, unseen_items=40, vectors=(2_000, 5_000), dims=16,
                   freshness_probes=3, match_queries=10, latency_queries=20, recall_queries=40,
                   max_latency_s=3.0, encoder_seconds=0.2, runtime_rounds=1)

    def scaled(self, items: int) -> Sizes:
        """``--items N``: the records stream is N; text and image streams scale with it."""
        from dataclasses import replace

        return replace(self, items=items, text_items=max(20, items // 4), image_items=max(12, items // 8))


@dataclass(frozen=True)
class Bundles:
    """The text-family base bundle, and trained bundles per modality where there are any."""

    base: Path
    record: Path | None = None
    text: Path | None = None
    image: Path | None = None

    @property
    def stack(self) -> Path:
        """What the stack runs: the trained record bundle when given (what one would deploy
        for records), else the base."""
        return self.record or self.base


def manifest(bundle: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    return loaded


def trained_on(bundle: Path) -> str | None:
    """The modality a bundle was trained on (None for an untrained one)."""
    data = manifest(bundle)
    if not data.get("trained"):
        return None
    training = data.get("training", {})
    return str(training.get("trained_on") or training.get("config", {}).get("modality") or "") or None


def discover(root: Path = MODELS) -> dict[str, Path]:
    """The newest trained bundle per modality under ``root`` (``<root>/<name>/<version>``)."""
    found: dict[str, tuple[str, Path]] = {}
    for path in sorted(root.glob("*/*/manifest.json")):
        modality = trained_on(path.parent)
        created = str(manifest(path.parent).get("created_at", ""))
        if modality and (modality not in found or created > found[modality][0]):
            found[modality] = (created, path.parent)
    return {modality: path for modality, (_, path) in found.items()}


def describe(bundle: Path) -> dict[str, Any]:
    """What the report says about a bundle."""
    data = manifest(bundle)
    return {"path": str(bundle), "name": data["name"], "version": data["version"], "dim": data["dim"],
            "modalities": data["modalities"], "trained_on": trained_on(bundle),
            "thresholds": data["thresholds"], "base": data.get("base", "")}
