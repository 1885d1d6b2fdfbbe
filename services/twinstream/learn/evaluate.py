"""Held-out evaluation of encoders (base vs trained), the InfoNCE temperature study, and the
Markdown/JSON reports. Every encoder is scored the same way: thresholds calibrated on the
validation split, quality measured on the entity-disjoint test split."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twinstream.learn.bundle import Calibrated, calibrate_model, load_bundle_module, run_encoder
from twinstream.learn.calibration import (
    DUPLICATE_PRECISION,
    alignment_uniformity,
    all_pairs,
    ood_metrics,
    precision_recall_f1,
    roc_auc,
    stream_decisions,
    threshold_for_precision,
)
from twinstream.learn.data import Splits
from twinstream.learn.encoders import resolve_device
from twinstream.learn.modalities import DataSizes, Modality, ModelOptions, get_modality
from twinstream.learn.train import TrainConfig, seed_everything, train


@dataclass
class Scores:
    """One encoder on one modality's test split."""

    label: str
    duplicate_threshold: float
    pair_roc_auc: float
    precision: float
    recall: float
    f1: float
    alignment: float
    uniformity: float
    ood_auroc: float
    ood_fpr_at_95_tpr: float
    ood_fpr_at_99_tpr: float
    ood_threshold: float           # the bundle's own (calibrated on validation data)
    refused_in_distribution: float  # share of test items at or above it: real items decided OOD
    accepted_other_domain: float    # share of other-domain items below it


@dataclass
class EvalData:
    modality: Modality
    splits: Splits[Any]
    ood_views: list[Any]
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def load_eval_data(modality: Modality, sizes: DataSizes, seed: int, device: torch.device) -> EvalData:
    """The same entity-disjoint splits training used (they depend on the seed only)."""
    splits = modality.load_splits(replace(sizes, train_entities=0), seed)
    return EvalData(modality, splits, modality.ood_views(sizes.ood_views, seed + 1), seed, device)


def score_encoder(module: nn.Module, data: EvalData, label: str, ood_threshold: float) -> Scores:
    """Calibrate the duplicate threshold on validation, then measure on test and OOD views
    (``ood_threshold``: the bundle's, to measure what it refuses)."""
    module = module.to(data.device)
    encode = partial(run_encoder, module, data.modality, device=data.device)
    val = data.splits.val.shuffled(data.seed)
    val_vectors, _ = encode(val.views, progress=f"{label}: validation")
    val_decisions = stream_decisions(val_vectors, val.entities)
    threshold = threshold_for_precision(val_decisions.scores, val_decisions.nearest_is_same,
                                        DUPLICATE_PRECISION)
    test = data.splits.test.shuffled(data.seed)
    vectors, in_ood = encode(test.views, progress=f"{label}: test")
    _, out_ood = encode(data.ood_views, progress=f"{label}: other domain")
    sims, same = all_pairs(vectors, test.entities)
    precision, recall, f1 = precision_recall_f1(stream_decisions(vectors, test.entities), threshold)
    alignment, uniformity = alignment_uniformity(vectors, test.entities)
    ood = ood_metrics(in_ood, out_ood)
    return Scores(label, threshold, roc_auc(sims, same), precision, recall, f1, alignment, uniformity,
                  ood["auroc"], ood["fpr_at_95_tpr"], ood["fpr_at_99_tpr"], ood_threshold,
                  float((in_ood > ood_threshold).mean()), float((out_ood <= ood_threshold).mean()))


def _ood_threshold(manifest: Mapping[str, Any], modality: str) -> float:
    """The OOD threshold a manifest (or the sections calibration fitted) sets for ``modality``."""
    thresholds = manifest["thresholds"]
    return float(thresholds.get("by_modality", {}).get(modality, thresholds)["ood"])


def base_encoder(modality: Modality, data: EvalData, sizes: DataSizes) -> Calibrated:
    """The untrained tower (MiniLM as shipped; the CNN at its seeded random init), calibrated."""
    seed_everything(data.seed)
    return calibrate_model(modality.build_model(data.seed), modality, data.splits.val, sizes, data.seed,
                           device=data.device)


def evaluate(modality_name: str, bundle: Path, base: Path | None, sizes: DataSizes,
             seed: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Base vs trained on the held-out test split of ``modality_name``."""
    trained_module, manifest = load_bundle_module(bundle)
    training = manifest.get("training", {})
    seed = int(training.get("seed", 0)) if seed is None else seed
    options = ModelOptions(**training.get("config", {}).get("options", {}))
    modality = get_modality(modality_name, options)
    data = load_eval_data(modality, sizes, seed, resolve_device(device))
    base_module: nn.Module
    if base is not None:
        base_module, base_manifest = load_bundle_module(base)
        base_ood = _ood_threshold(base_manifest, modality_name)
        base_label = f"base ({base})"
    else:
        calibrated = base_encoder(get_modality(modality_name, ModelOptions(
            image_size=options.image_size, image_dim=options.image_dim)), data, sizes)
        base_module, base_ood = calibrated.module, _ood_threshold(calibrated.fitted, modality_name)
        base_label = "base (untrained, in memory)"
    rows = [score_encoder(base_module, data, "base", base_ood),
            score_encoder(trained_module, data, "trained", _ood_threshold(manifest, modality_name))]
    return {
        "modality": modality_name, "seed": seed, "bundle": str(bundle), "base": base_label,
        "data": modality.data_description, "ood_domain": modality.ood_domain,
        "test_views": len(data.splits.test), "test_entities": len(set(data.splits.test.entities)),
        "val_views": len(data.splits.val), "ood_views": len(data.ood_views),
        "training": training, "scores": [asdict(r) for r in rows],
    }


TRAINING_KEYS = ("loss", "temperature", "epochs", "train_seconds")
METRICS = [("pair_roc_auc", "pair ROC-AUC"), ("duplicate_threshold", "duplicate threshold (val, P>=0.95)"),
           ("precision", "precision"), ("recall", "recall"), ("f1", "F1"),
           ("alignment", "alignment (lower = tighter duplicates)"),
           ("uniformity", "uniformity (lower = more spread)"), ("ood_auroc", "OOD AUROC"),
           ("ood_fpr_at_95_tpr", "OOD FPR@95%TPR"), ("ood_fpr_at_99_tpr", "OOD FPR@99%TPR"),
           ("refused_in_distribution", "test items refused as OOD at the bundle's threshold"),
           ("accepted_other_domain", "other-domain items accepted at the bundle's threshold")]


def markdown(report: dict[str, Any]) -> str:
    scores = report["scores"]
    lines = [f"## {report['modality']}: base vs trained", "",
             f"- data: {report['data']}",
             f"- test split: {report['test_views']} views of {report['test_entities']} entities "
             f"(entity-disjoint from training and validation, seed {report['seed']})",
             f"- other domain for OOD: {report['ood_domain']} ({report['ood_views']} views)",
             f"- trained with: {json.dumps({k: report['training'].get(k) for k in TRAINING_KEYS})}",
             "", "| metric | " + " | ".join(s["label"] for s in scores) + " |",
             "|---|" + "---|" * len(scores)]
    for key, title in METRICS:
        lines.append(f"| {title} | " + " | ".join(f"{s[key]:.4f}" for s in scores) + " |")
    return "\n".join(lines) + "\n"


def compare_runs(title: str, runs: list[tuple[str, TrainConfig]], progress: bool = True) -> dict[str, Any]:
    """Train one model per labelled config (same data and seed) and score each on the test split."""
    results = []
    for label, config in runs:
        started = time.perf_counter()
        run = train(config, progress)
        device = resolve_device(config.device)
        data = EvalData(run.modality, run.splits,
                        run.modality.ood_views(config.sizes.ood_views, config.seed + 1), config.seed, device)
        calibrated = calibrate_model(run.model, run.modality, run.splits.val, config.sizes, config.seed,
                                     config.prototypes, device)
        scores = score_encoder(calibrated.module, data, label,
                               _ood_threshold(calibrated.fitted, config.modality))
        results.append({**asdict(scores), "loss": config.loss, "temperature": config.temperature,
                        "epochs": config.epochs, "train_seconds": round(run.history.seconds, 1),
                        "total_seconds": round(time.perf_counter() - started, 1),
                        "final_train_loss": run.history.epochs[-1]["train_loss"] if run.history.epochs else None})
    return {"title": title, "results": results}


def temperature_study(modality_name: str, temperatures: list[float], base_config: TrainConfig,
                      progress: bool = True) -> dict[str, Any]:
    """InfoNCE at each temperature, everything else fixed."""
    runs = [(f"T={t}", replace(base_config, modality=modality_name, loss="infonce", temperature=t))
            for t in temperatures]
    return compare_runs(f"InfoNCE temperature study: {modality_name} ({base_config.epochs} epochs, "
                        f"seed {base_config.seed})", runs, progress)


def loss_study(modality_name: str, losses: list[str], base_config: TrainConfig,
               progress: bool = True) -> dict[str, Any]:
    """Each loss with its default hyper-parameter, everything else fixed."""
    runs = [(loss, replace(base_config, modality=modality_name, loss=loss)) for loss in losses]
    return compare_runs(f"Loss study: {modality_name} ({base_config.epochs} epochs, seed {base_config.seed})",
                        runs, progress)


def study_markdown(study: dict[str, Any]) -> str:
    lines = [f"## {study['title']}", "",
             "| run | pair ROC-AUC | F1 | precision | recall | alignment | uniformity | OOD AUROC | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in study["results"]:
        lines.append(f"| {r['label']} | {r['pair_roc_auc']:.4f} | {r['f1']:.4f} | {r['precision']:.4f} | "
                     f"{r['recall']:.4f} | {r['alignment']:.4f} | {r['uniformity']:.4f} | "
                     f"{r['ood_auroc']:.4f} | {r['train_seconds']} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, stem: str, payload: dict[str, Any], text: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    (out_dir / f"{stem}.md").write_text(text)


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
