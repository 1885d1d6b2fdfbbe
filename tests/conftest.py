"""Fixtures every folder may use, and the test order. The stack's fixtures (the base bundle, a
shared local stack, a tenant per test) are in stack/conftest.py; unit tests start nothing
(unit/conftest.py); docs/testing.md says which folder holds what."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_base_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small base bundle (about 15 s on two cores) for the learning and Triton tests."""
    from twinstream.learn.base import build_base_bundle
    from twinstream.learn.modalities import DataSizes

    return build_base_bundle(tmp_path_factory.mktemp("base") / "twinstream_text" / "1", sizes=DataSizes.tiny())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the Helm tests first. helm-python-sdk loads a Go runtime into this process, and loading
    it after OpenVINO's thread pool has run here (the bench's in-process encoder in
    tests/stack/test_bench.py) kills the interpreter with SIGSEGV; loaded first, both work (reproduced
    both ways on 2026-11-29). The sort is stable: every other test keeps its order."""
    items.sort(key=lambda item: item.path.name != "test_helm.py")
