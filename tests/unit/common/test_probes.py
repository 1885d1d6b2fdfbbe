"""DependencyMonitor: health follows each dependency's probe (unit test; the fault matrix in
tests/stack/test_faults.py proves it on real outages)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from twinstream.common.config import Settings
from twinstream.common.metrics import Metrics
from twinstream.common.probes import DependencyMonitor, Probe


class Switch:
    """A dependency that is up or down as the test says."""

    def __init__(self) -> None:
        self.up = True

    def check(self, timeout_s: float) -> None:
        if not self.up:
            raise ConnectionError("refused")


@pytest.fixture
def reports() -> dict[str, list[bool]]:
    return {}


def monitor(switch: Switch, reports: dict[str, list[bool]], failures: int = 2) -> DependencyMonitor:
    def hook(component: str) -> Callable[[bool], None]:
        return reports.setdefault(component, []).append
    settings = Settings(service="probetest", probes={"failures": failures})
    return DependencyMonitor(settings, [Probe("broker", switch.check)], hook,
                             Metrics.create(CollectorRegistry()))


def test_health_turns_unhealthy_after_consecutive_failures_and_back_on_the_first_success(
        reports: dict[str, list[bool]]) -> None:
    switch = Switch()
    probes = monitor(switch, reports)
    probes.probe_once()
    switch.up = False
    probes.probe_once()
    probes.probe_once()
    switch.up = True
    probes.probe_once()
    assert reports["probe:broker"] == [True, True, False, True], "one failure is tolerated, two are not"


def test_failed_probes_are_counted_and_the_dependency_shown_down(reports: dict[str, list[bool]]) -> None:
    switch = Switch()
    switch.up = False
    probes = monitor(switch, reports, failures=1)
    labels = {"dependency": "broker"}
    registry = probes.metrics.registry
    assert probes.probe_once() == {"broker": False}
    assert registry.get_sample_value("twinstream_dependency_probe_failures_total", labels) == 1
    assert registry.get_sample_value("twinstream_dependency_up", labels) == 0
