"""RETSim (Google's ``unisim`` wheel) as a text near-duplicate baseline.

``unisim`` brings its own ONNX runtime and pins, so it is not a twinstream dependency: the
benchmark runs it in a separate interpreter, by default ``var/retsim-venv`` (create it with
``python3 -m venv var/retsim-venv && var/retsim-venv/bin/pip install unisim==1.0.1``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from twinstream.devstack import REPO_ROOT

DEFAULT_PYTHON = REPO_ROOT / "var" / "retsim-venv" / "bin" / "python"
WORKER = Path(__file__).with_name("_retsim_worker.py")


class RetsimUnavailable(RuntimeError):
    """RETSim could not be run; the message says why (it goes into the report)."""


def interpreter(given: Path | None) -> Path:
    """The interpreter to run RETSim with: the given one, this one if it has ``unisim``, or the
    default scratch environment."""
    if given is not None:
        return given
    if importlib.util.find_spec("unisim") is not None:
        return Path(sys.executable)
    return DEFAULT_PYTHON


def embed(texts: Sequence[str], python: Path, timeout_s: float = 900) -> np.ndarray:
    """L2-normalised RETSim embeddings of ``texts`` [N, 256]."""
    if not python.exists():
        raise RetsimUnavailable(f"no interpreter with unisim at {python} (see bench/retsim.py)")
    with tempfile.TemporaryDirectory(prefix="bench-retsim-") as tmp:
        source, target = Path(tmp) / "texts.json", Path(tmp) / "vectors.npy"
        source.write_text(json.dumps(list(texts)), encoding="utf-8")
        try:
            done = subprocess.run([str(python), str(WORKER), str(source), str(target)], capture_output=True,
                                  text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RetsimUnavailable(f"RETSim took longer than {timeout_s:.0f}s") from exc
        if done.returncode != 0 or not target.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RetsimUnavailable(f"RETSim failed (exit {done.returncode}): {' | '.join(tail)}")
        vectors: np.ndarray = np.load(target)
    return vectors
