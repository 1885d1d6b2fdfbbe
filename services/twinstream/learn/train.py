"""The one training loop every modality shares, and ``run_training`` (train -> calibrate -> bundle)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from twinstream.learn.bundle import backbone_features, calibrate_model, embed, write_bundle
from twinstream.learn.calibration import (
    DUPLICATE_PRECISION,
    all_pairs,
    precision_recall_f1,
    roc_auc,
    stream_decisions,
    threshold_for_precision,
)
from twinstream.learn.data import PairSampler, Splits, ViewSet
from twinstream.learn.encoders import EmbeddingModel, resolve_device
from twinstream.learn.losses import make_loss
from twinstream.learn.modalities import DataSizes, Modality, ModelOptions, get_modality


@dataclass
class TrainConfig:
    modality: str = "record"
    loss: str = "infonce"
    temperature: float = 0.05
    margin: float | None = None        # contrastive 1.0, triplet 0.2 when None
    epochs: int = 10
    batch_entities: int = 64           # a batch holds two views of each of this many entities
    learning_rate: float | None = None  # 1e-3 for heads and the CNN, 3e-5 for MiniLM layers
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    prototypes: int = 32
    sizes: DataSizes = field(default_factory=DataSizes)
    options: ModelOptions = field(default_factory=ModelOptions)

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        finetuning = self.modality != "image" and self.options.text_tuning == "finetune"
        return 3e-5 if finetuning else 1e-3


@dataclass
class History:
    step_loss: list[float] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class TrainedRun:
    model: EmbeddingModel
    modality: Modality
    splits: Splits[Any]
    history: History


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validation_metrics(vectors: np.ndarray, entities: list[str]) -> dict[str, float]:
    """Pair ROC-AUC and F1 at the precision-0.95 threshold, on the validation stream."""
    sims, same = all_pairs(vectors, entities)
    decisions = stream_decisions(vectors, entities)
    threshold = threshold_for_precision(decisions.scores, decisions.nearest_is_same, DUPLICATE_PRECISION)
    return {"val_pair_auc": roc_auc(sims, same), "val_f1": precision_recall_f1(decisions, threshold)[2]}


def fit(model: EmbeddingModel, modality: Modality, train: ViewSet[Any], val: ViewSet[Any],
        config: TrainConfig, progress: bool = True) -> History:
    """Train ``model`` in place on pairs of views of the same entity, with in-batch negatives.

    A frozen backbone (MiniLM with the head-only recipe) runs once over the data and the head
    trains on the cached features; otherwise the whole tower runs every step.
    """
    device = resolve_device(config.device)
    model.to(device)
    loss_fn = make_loss(config.loss, config.temperature, config.margin)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.resolved_learning_rate(),
                                  weight_decay=config.weight_decay)
    sampler = PairSampler(train, config.seed)
    steps = sampler.steps_per_epoch(config.batch_entities)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.resolved_learning_rate(), total_steps=max(1, steps * config.epochs),
        pct_start=0.1) if config.epochs else None
    stream = val.shuffled(config.seed)
    cached = model.backbone_frozen
    train_features = val_features = None
    if cached:
        model.eval()
        train_features = backbone_features(model, modality, train.views, device, progress="caching train")
        val_features = backbone_features(model, modality, stream.views, device, progress="caching val")
    history = History()
    started = time.perf_counter()
    bar = tqdm(total=steps * config.epochs, desc=f"train {modality.name}/{config.loss}",
               disable=not progress)
    for epoch in range(config.epochs):
        model.train()
        if cached:
            model.backbone.eval()
        for _ in range(steps):
            indices, labels = sampler.batch(config.batch_entities)
            if train_features is not None:
                embeddings = model.embed_features(train_features[indices])
            else:
                inputs = [t.to(device) for t in modality.collate([train.views[i] for i in indices])]
                embeddings = model(*inputs)
            loss = loss_fn(embeddings, torch.from_numpy(labels).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            history.step_loss.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{history.step_loss[-1]:.4f}", epoch=epoch + 1)
        model.eval()
        if val_features is not None:
            with torch.inference_mode():
                vectors = model.embed_features(val_features).cpu().numpy()
        else:
            vectors = embed(model, modality, stream.views, device)
        metrics = validation_metrics(vectors, stream.entities)
        history.epochs.append({"epoch": epoch + 1, "train_loss": float(np.mean(history.step_loss[-steps:])),
                               **metrics})
        bar.set_postfix(loss=f"{history.step_loss[-1]:.4f}", val_f1=f"{metrics['val_f1']:.3f}")
    bar.close()
    history.seconds = time.perf_counter() - started
    return history


def train(config: TrainConfig, progress: bool = True) -> TrainedRun:
    """Load the modality's data, build its tower and train it."""
    seed_everything(config.seed)
    modality = get_modality(config.modality, config.options)
    splits = modality.load_splits(config.sizes, config.seed)
    model = modality.build_model(config.seed)
    history = fit(model, modality, splits.train, splits.val, config, progress)
    return TrainedRun(model, modality, splits, history)


def plot_curve(history: History, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses = np.asarray(history.step_loss)
    left.plot(losses, alpha=0.35, label="step")
    if len(losses) >= 10:
        window = max(2, len(losses) // 20)
        left.plot(np.arange(window - 1, len(losses)),
                  np.convolve(losses, np.ones(window) / window, mode="valid"), label=f"mean of {window}")
    left.set(xlabel="step", ylabel="training loss", title=title)
    left.legend()
    epochs = [e["epoch"] for e in history.epochs]
    for key in ("val_pair_auc", "val_f1"):
        right.plot(epochs, [e[key] for e in history.epochs], marker="o", label=key)
    right.set(xlabel="epoch", ylabel="validation", ylim=(min([0.5] + [e["val_f1"] for e in history.epochs]), 1.0))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_training(config: TrainConfig, out_dir: Path, version: str, progress: bool = True) -> dict[str, object]:
    """Train, calibrate on the validation split, write the bundle plus its curve and history."""
    run = train(config, progress)
    device = resolve_device(config.device)
    calibrated = calibrate_model(run.model, run.modality, run.splits.val, config.sizes, config.seed,
                                 config.prototypes, device)
    summary = {"trained_on": config.modality, "loss": config.loss, "epochs": config.epochs,
               "seed": config.seed, "train_seconds": round(run.history.seconds, 1),
               "train_views": len(run.splits.train), "final": run.history.epochs[-1] if run.history.epochs else {},
               "config": _jsonable(asdict(config))}
    if config.loss == "infonce":
        summary["temperature"] = config.temperature
    manifest = write_bundle(out_dir, calibrated, run.modality, version,
                            {"trained": config.epochs > 0, "training": summary})
    (Path(out_dir) / "history.json").write_text(json.dumps(asdict(run.history), indent=1) + "\n")
    if run.history.step_loss:
        plot_curve(run.history, Path(out_dir) / "training_curve.png",
                   f"{config.modality} / {config.loss}")
    return manifest


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
