"""The encoder's runtimes: OpenVINO on the bundle's ONNX export (default) and TorchScript (fallback).

This file imports only the standard library and numpy at module level (torch or openvino when a
runtime is built), because Triton's python backend runs this very file: the repository writer
copies it next to ``model.py``. The in-process encoder imports it too, so both compute alike.

Both runtimes sort a batch by real length and run it in sub-batches padded only to their own
longest row (length bucketing): attention costs grow with the padded width, and one long record
would otherwise pad 63 short ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

RUNTIMES = ("openvino", "torchscript")
PRECISIONS = ("auto", "bf16", "f32")
SUB_BATCH = 16  # rows per bucket: measured 1.17x (records) / 1.73x (prose) over one 64-row batch

Infer = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


class Runtime(Protocol):
    name: str
    precision: str

    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [B, dim] float32, ood scores [B] float32) for one batch of model inputs."""


def resolve_precision(requested: str, cpu_has_bf16: bool) -> str:
    """``auto`` is bf16 where the CPU computes it natively, else f32; asking for bf16 on a CPU
    without it is an error (OpenVINO would silently run f32 and report what it was asked)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if cpu_has_bf16 else "f32"
    if requested == "bf16" and not cpu_has_bf16:
        raise ValueError("precision bf16 asked for, but this CPU has no BF16 support: use auto or f32")
    return requested


def default_parallelism(cores: int) -> tuple[int, int]:
    """(model instances, intra-op threads each) for a CPU of ``cores`` cores: one thread per
    instance (one thread does more work per CPU-second than two sharing a batch), half the cores
    for the encoder and the rest for tokenising, Kafka, Milvus and the services."""
    return max(1, cores // 2), 1


def buckets(mask: np.ndarray, sub_batch: int) -> list[tuple[np.ndarray, int]]:
    """(row indices, width) per sub-batch: rows sorted by real length, each sub-batch cut to its
    longest row. ``sub_batch`` 0 keeps the batch whole (today's behaviour, the bench baseline)."""
    lengths = mask.sum(axis=1).astype(np.int64)
    rows = len(lengths)
    if sub_batch <= 0 or rows == 0:
        return [(np.arange(rows), mask.shape[1])]
    order = np.argsort(lengths, kind="stable")
    return [(order[s:s + sub_batch], max(1, int(lengths[order[s:s + sub_batch]].max())))
            for s in range(0, rows, sub_batch)]


def run_bucketed(infer: Infer, inputs: dict[str, np.ndarray], sub_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Run ``infer`` per length bucket and put the rows back in their input order. Inputs without
    an attention mask (images) have one size and run as one batch."""
    mask = inputs.get("attention_mask")
    if mask is None:
        embedding, ood = infer(inputs)
        return np.asarray(embedding, np.float32), np.asarray(ood, np.float32).reshape(-1)
    embeddings: np.ndarray | None = None
    oods = np.zeros(len(mask), np.float32)
    for rows, width in buckets(mask, sub_batch):
        part = {name: np.ascontiguousarray(array[rows, :width]) for name, array in inputs.items()}
        embedding, ood = infer(part)
        if embeddings is None:
            embeddings = np.zeros((len(mask), embedding.shape[1]), np.float32)
        embeddings[rows] = embedding
        oods[rows] = np.asarray(ood).reshape(-1)
    assert embeddings is not None
    return embeddings, oods


class OpenVINORuntime:
    """The ONNX export compiled by OpenVINO for the CPU, precision set explicitly (OpenVINO
    defaults to bf16 where the CPU has it). One infer request: not for concurrent callers."""

    name = "openvino"

    def __init__(self, onnx_path: str | Path, precision: str = "auto", threads: int = 1,
                 sub_batch: int = SUB_BATCH) -> None:
        import openvino as ov

        core = ov.Core()
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.precision = resolve_precision(precision, "BF16" in capabilities)
        self.threads = threads
        self.sub_batch = sub_batch
        self.compiled = core.compile_model(str(onnx_path), "CPU", {
            "INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output(i) for i in range(2)]

    def _infer(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer(inputs)
        return result[self.outputs[0]], result[self.outputs[1]]

    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return run_bucketed(self._infer, inputs, self.sub_batch)


class TorchScriptRuntime:
    """The bundle's TorchScript module (the fallback; always f32). ``threads`` sets torch's
    process-wide intra-op pool."""

    name = "torchscript"
    precision = "f32"

    def __init__(self, encoder_path: str | Path, threads: int = 1, sub_batch: int = SUB_BATCH,
                 input_names: tuple[str, ...] = ("input_ids", "attention_mask")) -> None:
        import torch

        self._torch = torch
        self.threads = threads
        if threads > 0:
            torch.set_num_threads(threads)
        self.sub_batch = sub_batch
        self.input_names = input_names
        self.module = torch.jit.load(str(encoder_path), map_location="cpu").eval()

    def _infer(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            embedding, ood = self.module(*[torch.from_numpy(inputs[n]) for n in self.input_names])
        return embedding.numpy(), ood.reshape(-1).numpy()

    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return run_bucketed(self._infer, inputs, self.sub_batch)


def load_runtime(folder: str | Path, runtime: str, precision: str = "auto", threads: int = 1,
                 sub_batch: int = SUB_BATCH, input_names: tuple[str, ...] = ("input_ids", "attention_mask"),
                 ) -> Runtime:
    """The runtime named ``runtime`` over ``encoder.onnx`` / ``encoder.pt`` in ``folder``."""
    folder = Path(folder)
    if runtime == "openvino":
        return OpenVINORuntime(folder / "encoder.onnx", precision, threads, sub_batch)
    if runtime == "torchscript":
        if precision not in ("auto", "f32"):
            raise ValueError(f"the torchscript runtime computes f32 only, not {precision!r}")
        return TorchScriptRuntime(folder / "encoder.pt", threads, sub_batch, input_names)
    raise ValueError(f"unknown encoder runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")

