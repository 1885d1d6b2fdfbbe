"""Shared fixtures: the tiny base bundle (tests/conftest.py) is this folder's base bundle."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def base_bundle(tiny_base_bundle: Path) -> Path:
    return tiny_base_bundle
