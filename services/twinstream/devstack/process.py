"""Child processes of the dev stack: ``ManagedProcess`` (its own process group, its log file,
SIGTERM-then-SIGKILL), free loopback ports and the repository root. The lowest devstack module:
``stack.py`` and ``triton.py`` both build on it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
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
