"""Child processes of the dev stack: ``ManagedProcess`` (its own process group, its log file,
SIGTERM-then-SIGKILL), free loopback ports and the repository root. The lowest devstack module:
``stack.py`` and ``triton.py`` both build on it."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


_handed_out: set[int] = set()
_lock = threading.Lock()


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out for port-0 binds and outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports the stack's components use when a setting is left out (Milvus' coordinators and nodes,
# its etcd, SeaweedFS, tansu): never handed out, so a component that still listened on its default
# could not collide with a port given to another, and a test can tell a default from a choice.
KNOWN_DEFAULTS = frozenset({2379, 2380, 8080, 8333, 8888, 9000, 9091, 9092, 9101, 9333, 13333, 18080, 19333,
                            19529, 19530, 19531, 21121, 21122, 21123, 21124, 53100})


def free_port() -> int:
    """A loopback port nothing listens on, for a process that binds it later.

    Chosen below the kernel's ephemeral range: a port picked now and bound seconds later by a
    child can otherwise be taken in between by any outgoing connection's local port or any
    port-0 bind (a fresh-clone CI run lost a service to exactly that), and never twice per run.
    """
    floor = _ephemeral_floor()
    low = max(1024, min(20000, floor - 2000))
    with _lock:
        for _ in range(200):
            port = random.randint(low, floor - 1)
            if port in _handed_out or port in KNOWN_DEFAULTS:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as sock:  # nothing free below the range: the kernel's choice
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    term_grace_s: float = 15.0          # how long stop() waits after SIGTERM before SIGKILL

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

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.popen is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(self.term_grace_s if timeout_s is None else timeout_s)
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
