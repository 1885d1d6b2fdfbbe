"""Calibrate a trained tower and write it as a model bundle (docs/model-bundle.md)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from twinstream.learn.calibration import ValidationStream, calibrate
from twinstream.learn.data import ViewSet
from twinstream.learn.encoders import EmbeddingModel, ood_from_prototypes, spherical_kmeans
from twinstream.learn.modalities import DataSizes, Modality
from twinstream.model.bundle import Manifest, preprocessing_digest
from twinstream.model.onnx_export import export_onnx


def _over_batches(call: Callable[..., Any], modality: Modality, views: list[Any], device: torch.device,
                  batch_size: int, progress: str | None) -> list[Any]:
    outputs = []
    starts = range(0, len(views), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc=progress, leave=False, disable=progress is None):
            outputs.append(call(*[t.to(device) for t in modality.collate(views[start:start + batch_size])]))
    return outputs


def run_encoder(module: nn.Module, modality: Modality, views: list[Any], batch_size: int = 128,
                device: torch.device | None = None, progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run an export module (eager or TorchScript) over views -> (embeddings, ood scores)."""
    outputs = _over_batches(module, modality, views, device or torch.device("cpu"), batch_size, progress)
    return (np.concatenate([e.float().cpu().numpy() for e, _ in outputs]),
            np.concatenate([o.float().reshape(-1).cpu().numpy() for _, o in outputs]))


def backbone_features(model: EmbeddingModel, modality: Modality, views: list[Any], device: torch.device,
                      batch_size: int = 128, progress: str | None = None) -> torch.Tensor:
    """The backbone's features of ``views`` (what a frozen backbone caches, what OOD is scored on)."""
    model.eval()
    return torch.cat(_over_batches(model.backbone, modality, views, device, batch_size, progress)).clone()


def embed(model: EmbeddingModel, modality: Modality, views: list[Any], device: torch.device,
          batch_size: int = 128, progress: str | None = None) -> np.ndarray:
    """Embeddings of ``views`` by the tower alone (no OOD score)."""
    model.eval()
    outputs = _over_batches(model, modality, views, device, batch_size, progress)
    return np.concatenate([e.float().cpu().numpy() for e in outputs])


@dataclass
class Calibrated:
    """An export module with its prototypes, and the manifest sections fitted for it."""

    module: nn.Module
    fitted: dict[str, dict[str, object]]


def calibrate_model(model: EmbeddingModel, modality: Modality, val: ViewSet[Any], sizes: DataSizes,
                    seed: int, prototypes: int = 32, device: torch.device | None = None) -> Calibrated:
    """OOD prototypes (k-means of in-distribution features or embeddings); per kind served, the OOD
    threshold at 99% TPR on its held-out in-distribution views and duplicate/match thresholds + Platt
    on its validation split (``val`` for the modality trained on, the first and primary kind)."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    fit_views, heldout_views = modality.in_distribution(sizes, seed)

    def ood_space(views: list[Any], progress: str | None = None) -> torch.Tensor:
        if modality.ood_on_features:
            model.eval()
            reference = _over_batches(lambda *x: model.backbone.features_and_reference(*x)[1],
                                      modality, views, device, 128, progress)
            return functional.normalize(torch.cat(reference))
        return torch.from_numpy(embed(model, modality, views, device, progress=progress)).to(device)

    fit = ood_space(fit_views, "OOD reference")
    centroids = torch.from_numpy(spherical_kmeans(fit.cpu().numpy(), prototypes, seed)).to(device)
    heldout_ood = {kind: ood_from_prototypes(ood_space(views), centroids).cpu().numpy()
                   for kind, views in heldout_views.items()}
    streams = {}
    for kind, (views, description) in modality.calibration_sets(val, sizes, seed).items():
        stream = views.shuffled(seed)
        vectors = embed(model, modality, stream.views, device, progress=f"embedding {kind} validation")
        streams[kind] = ValidationStream(vectors, stream.entities, description)
    fitted = calibrate(streams, heldout_ood)
    fitted["calibration"]["ood_reference"] = {"prototypes": len(centroids), "fit_views": len(fit_views),
                                              "heldout_views": {k: len(v) for k, v in heldout_views.items()}}
    return Calibrated(modality.export_module(model, centroids).eval(), fitted)


def write_bundle(out_dir: Path, calibrated: Calibrated, modality: Modality, version: str,
                 extra: dict[str, object] | None = None) -> dict[str, object]:
    """Trace the export module to encoder.pt and write tokenizer.json and manifest.json."""
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"bundle version must be a positive integer, got {version!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = calibrated.module.cpu().eval()
    example = modality.collate(modality.example_views())
    with torch.inference_mode():
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(out_dir / "encoder.pt"))
    tokenizer_file = modality.tokenizer_file
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out_dir / "tokenizer.json")
    fields: dict[str, object] = {"name": modality.bundle_name, "version": version,
                                 **modality.manifest_fields(), "max_batch_size": 64,
                                 "runtime": ENCODER_RUNTIME, **calibrated.fitted, **(extra or {})}
    fields["preprocessing_digest"] = preprocessing_digest(fields, tokenizer_file)
    fields["created_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    manifest = Manifest.from_dict(fields, str(out_dir))  # the schema check, before any export
    export_onnx(out_dir / "encoder.pt", out_dir / "encoder.onnx", manifest)
    manifest.write(out_dir)
    return manifest.to_dict()


# What a bundle is served with (docs/model-bundle.md): OpenVINO on encoder.onnx, bf16 where the
# serving CPU computes it natively and f32 otherwise (chosen when Triton loads the model).
ENCODER_RUNTIME: dict[str, object] = {"name": "openvino", "file": "encoder.onnx", "precision": "auto",
                                      "opset": 17, "fallback": {"name": "torchscript", "file": "encoder.pt",
                                                                "precision": "f32"}}


def load_bundle_module(bundle_dir: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The TorchScript encoder and the manifest of a bundle."""
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    module = torch.jit.load(str(Path(bundle_dir) / "encoder.pt"), map_location="cpu").eval()
    return module, manifest
