"""Fixtures every folder may use, and the test order. The stack's fixtures (the base bundle, a
shared local stack, a tenant per test) are in stack/conftest.py; unit tests start nothing
(unit/conftest.py); docs/testing.md says which folder holds what."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

# Seconds spent per test file (setup + call + teardown of its tests; a shared fixture counts
# where it is first set up), printed at the end: docs/testing.md's table comes from it.
_FILE_SECONDS: defaultdict[str, float] = defaultdict(float)


@pytest.fixture(scope="session")
def tiny_base_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small base bundle (about 15 s on two cores) for the learning and Triton tests."""
    from twinstream.learn.base import build_base_bundle
    from twinstream.learn.modalities import DataSizes

    return build_base_bundle(tmp_path_factory.mktemp("base") / "twinstream_text" / "1", sizes=DataSizes.tiny())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the Helm tests first, then every test that uses the shared stack (tests/stack/conftest.py
    stops it after the last of them rather than let it idle through the rest of the run).

    Helm first: helm-python-sdk loads a Go runtime into this process, and loading it after
    OpenVINO's thread pool has run here (the bench's in-process encoder in tests/stack/test_bench.py)
    kills the interpreter with SIGSEGV; loaded first, both work (reproduced both ways on
    2026-11-29). The sort is stable: within each group every test keeps its order."""
    items.sort(key=lambda item: (item.path.name != "test_helm.py",
                                 "stack" not in getattr(item, "fixturenames", ())))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _FILE_SECONDS[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FILE_SECONDS:
        return
    terminalreporter.write_sep("=", "seconds per test file (slowest first)")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda entry: -entry[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {path}")
    terminalreporter.write_line(f"{sum(_FILE_SECONDS.values()):8.1f}  in all")
