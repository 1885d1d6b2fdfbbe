"""The import contract (pyproject.toml ``[tool.importlinter]``): layers point down, serving never
imports training, the dev stack or the benchmarks, and no sibling packages import each other in a
cycle. Plus what the contract cannot see: what a service really loads when it starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
SERVICES = ("ingestion", "embedding", "indexing", "matching")
# Never loaded by a service's start-up: training, the dev stack, in-process encoding.
NOT_AT_START = ("torch", "transformers", "sentence_transformers", "openvino", "matplotlib",
                "twinstream.learn", "twinstream.devstack", "twinstream.demo", "bench")


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(cwd / "pyproject.toml")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_the_import_contract_holds() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_contract_catches_a_service_layer_importing_learn(tmp_path: Path) -> None:
    """The same contract, on a copy of the package where ``common`` imports ``twinstream.learn``
    (what ``common/encoding.py`` once did lazily), must fail and name the import."""
    shutil.copytree(REPO / "services" / "twinstream", tmp_path / "services" / "twinstream",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "bench").symlink_to(REPO / "bench")
    shutil.copyfile(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    module = tmp_path / "services" / "twinstream" / "common" / "status.py"
    late = "\n\ndef _late() -> None:\n    from twinstream.learn import base  # noqa: F401\n"
    module.write_text(module.read_text() + late)
    result = lint_imports(tmp_path, pythonpath=tmp_path / "services")
    assert result.returncode != 0, result.stdout
    assert "twinstream.common.status -> twinstream.learn.base" in result.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_help_starts_nothing_and_loads_no_training_code(service: str) -> None:
    probe = (
        "import json, runpy, sys\n"
        f"sys.argv = ['twinstream.{service}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('twinstream.{service}', run_name='__main__')\n"
        "    code = None\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINSTREAM_")}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr
    *usage, last = result.stdout.splitlines()
    report = json.loads(last)
    assert report["code"] == 0 and f"usage: python -m twinstream.{service}" in "\n".join(usage)
    loaded = [m for m in report["modules"] if any(m == bad or m.startswith(bad + ".") for bad in NOT_AT_START)]
    assert loaded == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_rejects_arguments(service: str) -> None:
    result = subprocess.run([sys.executable, "-m", f"twinstream.{service}", "--port", "1"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "unrecognized arguments: --port 1" in result.stderr
