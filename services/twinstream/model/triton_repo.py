"""Triton model repositories from model bundles (the dev stack's ``TritonServer`` serves them).

On CPU (here) the only backend the pip-installed Triton ships is the python backend, so each
version folder holds ``model.py`` and ``encoder_runtime.py``, which run the bundle's ONNX export
with OpenVINO (or, as the fallback, the TorchScript ``encoder.pt``). On GPU nodes ``encoder.pt``
is served by the ``pytorch_libtorch`` backend (``gpu=True``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from twinstream.model import encoder_runtime
from twinstream.model.bundle import Manifest
from twinstream.model.encoder_runtime import RUNTIMES, SUB_BATCH, default_parallelism

MODEL_PY = '''"""Triton python backend: serves a twinstream encoder (written by twinstream.model.triton_repo).

The runtime (OpenVINO on encoder.onnx, or TorchScript on encoder.pt), precision, threads and
length-bucket size come from this model's config parameters; encoder_runtime.py, copied next to
this file from twinstream.model, does the work, as it does in the in-process encoder.
"""
import json
import os
import sys

# The backend stub's embedded interpreter runs isolated (it ignores PYTHONPATH), so the
# launcher names the site-packages holding numpy, openvino and torch in TWINSTREAM_TRITON_SITE.
_SITE = os.environ.get("TWINSTREAM_TRITON_SITE")
if _SITE and _SITE not in sys.path:
    sys.path.insert(0, _SITE)
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import numpy as np
import triton_python_backend_utils as pb_utils

import encoder_runtime


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.inputs = [i["name"] for i in config["input"]]
        self.runtime = encoder_runtime.load_runtime(
            _HERE, params.get("runtime", "openvino"), params.get("precision", "auto"),
            int(params.get("threads", "1")), int(params.get("sub_batch", str(encoder_runtime.SUB_BATCH))),
            tuple(self.inputs))
        labels = {"model": args["model_name"], "version": args["model_version"],
                  "runtime": self.runtime.name, "precision": self.runtime.precision,
                  "threads": params.get("threads", "1")}
        pb_utils.Logger.log_info("twinstream encoder loaded: " + json.dumps(labels, sort_keys=True))
        # The precision is chosen here, at start-up, from the CPU: report it as a metric too.
        self.family = pb_utils.MetricFamily(
            name="twinstream_encoder_runtime_info",
            description="the runtime and precision this model instance computes with (value 1)",
            kind=pb_utils.MetricFamily.GAUGE)
        self.info = self.family.Metric(labels=labels)
        self.info.set(1)

    def execute(self, requests):
        # Dynamic batching hands us several requests: run them as one batch, padded to the
        # longest sequence (the runtime's length buckets then cut each to its own width).
        arrays = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs]
                  for r in requests]
        sizes = [a[0].shape[0] for a in arrays]
        merged = {}
        for position, name in enumerate(self.inputs):
            parts = [a[position] for a in arrays]
            if parts[0].ndim == 2:  # token tensors: pad to the longest sequence
                width = max(p.shape[1] for p in parts)
                parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts]
            merged[name] = np.ascontiguousarray(np.concatenate(parts))
        embedding, ood = self.runtime(merged)
        embedding = embedding.astype(np.float32)
        ood = ood.reshape(-1, 1).astype(np.float32)
        responses, start = [], 0
        for size in sizes:
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("embedding", embedding[start:start + size]),
                pb_utils.Tensor("ood_score", ood[start:start + size]),
            ]))
            start += size
        return responses
'''


def _parameters(values: dict[str, str]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())


def _config(manifest: Manifest, gpu: bool, instances: int,
            parameters: dict[str, str] | None = None) -> str:
    """config.pbtxt for one bundle: python backend on CPU, or pytorch_libtorch on GPU."""
    name, dim, max_batch = manifest.name, manifest.dim, manifest.max_batch_size
    if "image" in manifest.modalities:
        size = manifest.image_size
        inputs = f'  {{ name: "pixels" data_type: TYPE_FP32 dims: [ 3, {size}, {size} ] }}'
    else:
        inputs = ('  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },\n'
                  '  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }')
    # encoder.pt returns ood_score as [B]; libtorch needs the reshape to serve it as [B, 1].
    ood = '{ name: "ood_score" data_type: TYPE_FP32 dims: [ 1 ]%s }'
    if gpu:
        backend, kind, ood = 'platform: "pytorch_libtorch"', "KIND_GPU", ood % " reshape: { shape: [ ] }"
        note = "# GPU form: pytorch_libtorch runs <version>/model.pt (= encoder.pt) on the GPU."
    else:
        backend, kind, ood = 'backend: "python"', "KIND_CPU", ood % ""
        note = ("# CPU form: the python backend's <version>/model.py runs the encoder with the runtime named\n"
                "# in the parameters below (OpenVINO on encoder.onnx, or TorchScript on encoder.pt).\n"
                "# Production GPU form (write_repository(..., gpu=True)): replace the backend line by\n"
                '#   platform: "pytorch_libtorch"   (serves <version>/model.pt, a copy of encoder.pt)\n'
                '# give ood_score `reshape: { shape: [ ] }`, and use instance_group kind KIND_GPU.')
    # One preferred size, the full batch: concurrent requests from the embedding service wait up
    # to 2 ms to be merged instead of leaving alone at a quarter batch.
    return f"""# Written by twinstream.model.triton_repo from the model bundle manifest.
{note}
name: "{name}"
{backend}
max_batch_size: {max_batch}
version_policy: {{ all: {{ }} }}  # serve every version present: services pin theirs
input [
{inputs}
]
output [
  {{ name: "embedding" data_type: TYPE_FP32 dims: [ {dim} ] }},
  {ood}
]
dynamic_batching {{
  preferred_batch_size: [ {max_batch} ]
  max_queue_delay_microseconds: 2000
}}
instance_group [ {{ kind: {kind} count: {instances} }} ]
{_parameters(parameters or {})}
"""


def write_repository(bundles: list[Path], repo_dir: Path, gpu: bool = False, instances: int | None = None,
                     runtime: str = "openvino", precision: str = "auto", threads: int | None = None) -> None:
    """Write (or refresh) a Triton model repository holding every bundle's encoder. On CPU it is
    served by ``runtime`` (OpenVINO on the bundle's ONNX export, exported here if the bundle has
    none, or TorchScript), ``instances`` x ``threads`` defaulting to the core count's share."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown encoder runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    default_instances, default_threads = default_parallelism(len(os.sched_getaffinity(0)))
    instances = instances or (1 if gpu else default_instances)
    parameters = {"runtime": runtime, "precision": precision, "threads": str(threads or default_threads),
                  "sub_batch": str(SUB_BATCH)}
    repo_dir.mkdir(parents=True, exist_ok=True)
    for bundle in bundles:
        # Manifest.read checks name and version: both become paths under repo_dir ("../../x"
        # must not write outside it).
        manifest = Manifest.read(bundle)
        name, version = manifest.name, manifest.version
        model_dir = repo_dir / name
        version_dir = model_dir / version
        version_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.pbtxt").write_text(_config(manifest, gpu, instances, None if gpu else parameters))
        if gpu:
            shutil.copyfile(Path(bundle) / "encoder.pt", version_dir / "model.pt")
            continue
        _place_encoder(Path(bundle), version_dir, runtime, manifest)
        (version_dir / "model.py").write_text(MODEL_PY)
        shutil.copyfile(encoder_runtime.__file__, version_dir / "encoder_runtime.py")


def _place_encoder(bundle: Path, version_dir: Path, runtime: str, manifest: Manifest) -> None:
    """Copy the one encoder file ``runtime`` loads. A bundle written before the ONNX export gets
    its ``encoder.onnx`` here, once (half a minute on 2 busy cores), beside its ``encoder.pt``
    (in the repository instead when the bundle folder is read-only)."""
    name = "encoder.pt" if runtime == "torchscript" else "encoder.onnx"
    (version_dir / ("encoder.onnx" if runtime == "torchscript" else "encoder.pt")).unlink(missing_ok=True)
    source = bundle / name
    if not source.is_file() and runtime != "torchscript":
        from twinstream.model.onnx_export import export_onnx  # torch: only for such old bundles

        try:
            export_onnx(bundle / "encoder.pt", source, manifest)
        except OSError:
            export_onnx(bundle / "encoder.pt", version_dir / name, manifest)
            return
    shutil.copyfile(source, version_dir / name)
