"""The real Triton Inference Server from ``.venv-triton``, on loopback, as a ``ManagedProcess``
(the repository it serves is written by ``twinstream.model.triton_repo``)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from types import TracebackType

from twinstream.devstack.process import REPO_ROOT, ManagedProcess, free_port


class TritonServer:
    """Runs the real Triton Inference Server from ``.venv-triton`` on loopback."""

    def __init__(self, repository: Path, log_path: Path | None = None, venv: Path | None = None,
                 threads: int = 2, ready_timeout_s: float = 180.0, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        """Ports left as None are picked free on 127.0.0.1; the venv defaults to
        ``$TWINSTREAM_TRITON_VENV`` or ``<repo root>/.venv-triton``. Nothing starts here."""
        self.repository = Path(repository)
        self.venv = Path(venv or os.environ.get("TWINSTREAM_TRITON_VENV") or REPO_ROOT / ".venv-triton")
        self.log_path = Path(log_path or self.repository.parent / "triton.log")
        self.threads = threads
        self.ready_timeout_s = ready_timeout_s
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.process: ManagedProcess | None = None
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

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

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
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Spawn the server without waiting for it (``wait_ready`` does)."""
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
        self.process = ManagedProcess("triton", argv, env, self.log_path, term_grace_s=30.0)
        self.process.start()

    def wait_ready(self) -> None:
        import tritonclient.grpc as triton_grpc

        tls = {} if self.tls is None else {"ssl": True, "root_certificates": str(self.tls[2])}
        client = triton_grpc.InferenceServerClient(self.grpc_url, **tls)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.popen is not None and not self.process.alive:
                raise RuntimeError(f"tritonserver exited ({self.process.popen.returncode}):\n{self.log_tail()}")
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
        """SIGTERM, then SIGKILL after 30 s (ManagedProcess.stop); nothing if it is not running."""
        if self.process is not None and self.process.alive:
            self.process.stop()

    def kill(self) -> None:
        """SIGKILL: a crash (the fault tests)."""
        if self.process is not None and self.process.alive:
            self.process.kill()

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
