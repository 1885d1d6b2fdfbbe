"""Shared fixtures: one small base bundle per session (building it takes ~15 s on two cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest

from twinstream.learn.modalities import DataSizes

TINY = DataSizes.tiny()


@pytest.fixture(scope="session")
def base_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from twinstream.learn.base import build_base_bundle

    return build_base_bundle(tmp_path_factory.mktemp("base") / "twinstream_text" / "1", sizes=TINY)
