"""write_repository keeps every file inside the Triton repository, whatever the manifest says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twinstream.model.triton_repo import write_repository


def bundle_with(tmp_path: Path, name: str, version: str) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({
        "name": name, "version": version, "dim": 4, "modalities": ["text"], "max_batch_size": 8,
        "thresholds": {"duplicate": 0.9, "match": 0.8}}))
    (bundle / "encoder.pt").write_bytes(b"weights")
    return bundle


@pytest.mark.parametrize(("name", "version"), [("../../x", "1"), ("/abs", "1"), ("ok\n", "1"),
                                               ("ok", "../../2"), ("ok", "1/../../..")])
def test_a_manifest_cannot_name_a_path_outside_the_repository(tmp_path: Path, name: str,
                                                              version: str) -> None:
    repo = tmp_path / "a" / "b" / "repo"
    with pytest.raises(ValueError, match="must be"):
        write_repository([bundle_with(tmp_path, name, version)], repo)
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - set((tmp_path / "bundle").iterdir())
    assert written == set()
