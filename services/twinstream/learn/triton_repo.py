"""Triton model repositories from model bundles, and a real Triton server to serve them.

On CPU (here) the only backend the pip-installed Triton ships is the python backend, so each
version folder holds ``model.py`` and ``encoder_runtime.py``, which run the bundle's ONNX export
with OpenVINO (or, as the fallback, the TorchScript ``encoder.pt``). On GPU nodes ``encoder.pt``
is served by the ``pytorch_libtorch`` backend (``gpu=True``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from twinstream.common import encoder_runtime
from twinstream.common.encoder_runtime import RUNTIMES, SUB_BATCH, default_parallelism
from twinstream.common.names import NAME_RULE, is_name
from twinstream.devstack import REPO_ROOT, free_port

MODEL_PY = '''"""Triton python backend: serves a twinstream encoder (written by twinstream.learn.triton_repo).

The runtime (OpenVINO on encoder.onnx, or TorchScript on encoder.pt), precision, threads and
length-bucket size come from this model's config parameters; encoder_runtime.py, copied next to
this file from twinstream.common, does the work, as it does in the in-process encoder.
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


def _config(manifest: dict[str, object], gpu: bool, instances: int,
            parameters: dict[str, str] | None = None) -> str:
    """config.pbtxt for one bundle: python backend on CPU, or pytorch_libtorch on GPU."""
    name, dim = manifest["name"], manifest["dim"]
    max_batch = int(manifest.get("max_batch_size", 64))  # type: ignore[call-overload]
    if "image" in manifest["modalities"]:  # type: ignore[operator]
        size = manifest["image_size"]
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
    return f"""# Written by twinstream.learn.triton_repo from the model bundle manifest.
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
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        name, version = str(manifest["name"]), str(manifest["version"])
        # Both become paths under repo_dir: "../../x" must not write outside it.
        if not is_name(name):
            raise ValueError(f"{bundle}: model name {name[:80]!r} must be {NAME_RULE}")
        if not version.isascii() or not version.isdigit():
            raise ValueError(f"{bundle}: model version {version[:80]!r} must be a positive integer "
                             "(Triton's version folders are numbers)")
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


def _place_encoder(bundle: Path, version_dir: Path, runtime: str, manifest: dict[str, object]) -> None:
    """Copy the one encoder file ``runtime`` loads. A bundle written before the ONNX export gets
    its ``encoder.onnx`` here, once (half a minute on 2 busy cores), beside its ``encoder.pt``
    (in the repository instead when the bundle folder is read-only)."""
    name = "encoder.pt" if runtime == "torchscript" else "encoder.onnx"
    (version_dir / ("encoder.onnx" if runtime == "torchscript" else "encoder.pt")).unlink(missing_ok=True)
    source = bundle / name
    if not source.is_file() and runtime != "torchscript":
        from twinstream.learn.bundle import export_onnx

        try:
            export_onnx(bundle / "encoder.pt", source, manifest)
        except OSError:
            export_onnx(bundle / "encoder.pt", version_dir / name, manifest)
            return
    shutil.copyfile(source, version_dir / name)


class TritonServer:
    """Runs the real Triton Inference Server from ``.venv-triton`` on loopback."""

    def __init__(self, repository: Path, log_path: Path | None = None, venv: Path | None = None,
                 threads: int = 2, ready_timeout_s: float = 180.0, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        """Ports left as None are picked free on 127.0.0.1; the venv defaults to
        ``$TWINSTREAM_TRITON_VENV`` or ``<repo root>/.venv-triton``."""
        self.repository = Path(repository)
        self.venv = Path(venv or os.environ.get("TWINSTREAM_TRITON_VENV") or REPO_ROOT / ".venv-triton")
        self.log_path = Path(log_path or self.repository.parent / "triton.log")
        self.threads = threads
        self.ready_timeout_s = ready_timeout_s
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        # (certificate, key, CA): gRPC serves TLS (HTTP and metrics stay on loopback only)
        self.tls = tls

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _site_packages(self) -> Path:
        found = sorted((self.venv / "lib").glob("python3.*/site-packages"))
        if not found:
            raise FileNotFoundError(f"no Triton venv at {self.venv}: run scripts/setup.sh")
        return found[0]

    def _backend_dir(self, site: Path) -> Path:
        """Assemble the python backend with the stub for this Python version."""
        triton = site / "pytriton" / "tritonserver"
        python_version = site.parent.name.removeprefix("python")
        backends = self.repository.parent / f"{self.repository.name}-backends"
        python_dir = backends / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        sources = [*sorted((triton / "backends" / "python").iterdir()),
                   triton / "python_backend_stubs" / python_version / "triton_python_backend_stub"]
        for source in sources:
            link = python_dir / source.name
            if not link.exists():
                link.symlink_to(source)
        return backends

    def start(self) -> None:
        site = self._site_packages()
        binary = site / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        argv = [
            str(binary), f"--model-repository={self.repository}",
            f"--backend-directory={self._backend_dir(site)}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--log-verbose=0",
        ]
        if self.tls is not None:
            cert, key, ca = self.tls
            argv += ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}",
                     f"--grpc-server-key={key}", f"--grpc-root-cert={ca}"]
        env = {**os.environ, "PYTHONPATH": str(site), "TWINSTREAM_TRITON_SITE": str(site),
               "OMP_NUM_THREADS": str(self.threads), "TWINSTREAM_TRITON_THREADS": str(self.threads)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_ready()

    def wait_ready(self) -> None:
        import tritonclient.grpc as triton_grpc

        tls = {} if self.tls is None else {"ssl": True, "root_certificates": str(self.tls[2])}
        client = triton_grpc.InferenceServerClient(self.grpc_url, **tls)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.process.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Triton not ready after {self.ready_timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
