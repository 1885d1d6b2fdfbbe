"""A bundle's ONNX export (what OpenVINO serves), from its TorchScript ``encoder.pt``. Training
exports at write time; the Triton repository writer exports a bundle written before ONNX existed.
It needs torch (the ``encoder`` or ``learn`` extra): import it only where a bundle is written."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from twinstream.model.bundle import Manifest


def export_onnx(encoder_pt: Path, target: Path, manifest: Manifest) -> Path:
    """Export a bundle's TorchScript encoder to ONNX (opset 17, dynamic batch and sequence axes)
    for OpenVINO; it computes what the TorchScript module does to ~1e-6."""
    module = torch.jit.load(str(encoder_pt), map_location="cpu").eval()
    names = list(manifest.inputs)
    if names == ["pixels"]:
        size = manifest.image_size
        example: tuple[torch.Tensor, ...] = (torch.zeros(2, 3, size, size),)
        axes: dict[str, dict[int, str]] = {"pixels": {0: "batch"}}
    else:
        example = tuple(torch.ones(2, 8, dtype=torch.int64) for _ in names)
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes.update({"embedding": {0: "batch"}, "ood_score": {0: "batch"}})
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    # The traced module holds inference-mode constants: export under inference mode too.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the shapes declared dynamic above
        torch.onnx.export(module, example, str(partial), dynamo=False, opset_version=17,
                          input_names=names, output_names=["embedding", "ood_score"], dynamic_axes=axes)
    partial.replace(target)
    return target
