"""Fixtures of the tests that start processes: the base model bundle and a real local stack
(tansu on SeaweedFS, a Milvus server, Triton, the four services, Prometheus). Helpers live in
stack_helpers.py. Every module here sets ``pytestmark = pytest.mark.stack``."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack_helpers import BASE_BUNDLE, start_stack
from twinstream.devstack import LocalStack


@pytest.fixture(scope="session")
def base_bundle() -> Path:
    """The untrained MiniLM bundle (built once, about a minute on 2 cores)."""
    if not (BASE_BUNDLE / "manifest.json").exists():
        from twinstream.learn.base import build_base_bundle

        build_base_bundle(BASE_BUNDLE)
    return BASE_BUNDLE


@pytest.fixture(scope="session")
def version_two(base_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the base bundle published as version 2 (model rollouts, re-drives)."""
    bundle = tmp_path_factory.mktemp("bundles") / "twinstream_text" / "2"
    shutil.copytree(base_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "version": "2"}))
    return bundle


# The shared stack while it runs. The root conftest runs every test that uses it one after
# another, so it can stop after the last of them: idle, it still takes about half a core (Milvus'
# time ticks, the consumers' polls), which the stacks of later modules and the unit tests need.
_shared: list[LocalStack] = []
_stopped: list[bool] = []


@pytest.fixture(scope="session")
def stack(base_bundle: Path) -> Iterator[LocalStack]:
    """One shared stack for the tests that do not break it; each test uses its own tenant."""
    running = start_stack(base_bundle, "shared", extra_env={
        "TWINSTREAM_COLLECTION_TTLS": "*/ephemeral=3", "TWINSTREAM_REAPER_INTERVAL_S": "1"})
    _shared.append(running)
    yield running
    if _shared:
        _shared.pop().stop()


def uses_shared_stack(item: pytest.Item) -> bool:
    return "stack" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the shared stack once the next test does not use it (after the module fixtures
    built on it were torn down: this runs last)."""
    if _shared and not (nextitem is not None and uses_shared_stack(nextitem)):
        _shared.pop().stop()
        _stopped.append(True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test that needs the shared stack after it stopped would get a dead one: say why."""
    if _stopped and uses_shared_stack(item):
        pytest.fail("the shared stack stopped after the test before; the tests that use it must "
                    "run one after another (tests/conftest.py orders them so)")


@pytest.fixture
def tenant() -> str:
    return "t" + uuid.uuid4().hex[:10]
