"""The demo's pacing and its progress-aware time limit (pure functions, no stack)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from twinstream import demo
from twinstream.v1 import decisions_pb2


class FakeClock:
    """time.monotonic and time.sleep for code under test: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(demo.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(demo.time, "sleep", fake.sleep)
    return fake


def test_paced_items_leave_on_a_fixed_schedule(clock: FakeClock) -> None:
    sent = []
    for item in demo.paced(range(5), rate=10):
        sent.append((item, round(clock.now, 6)))
        clock.now += 0.03        # the consumer of the iterator takes time; the schedule holds
    assert sent == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]


def test_rate_zero_is_one_burst(clock: FakeClock) -> None:
    assert list(demo.paced(range(100), rate=0)) == list(range(100))
    assert clock.slept == []


def decision(item_id: str) -> bytes:
    return decisions_pb2.Decision(item_id=item_id, kind=decisions_pb2.NOVEL).SerializeToString()


def test_a_slow_but_moving_pipeline_is_never_cut_off(clock: FakeClock) -> None:
    """One decision every 50 s for 20 items (1000 s in all) with a 60 s stall limit."""
    def poll() -> Iterator[bytes]:
        clock.now += 50
        yield decision(f"item-{int(clock.now // 50)}")

    decided, received, stalled = demo.collect_decisions(lambda: list(poll()), 20, 60,
                                                        clock=clock.monotonic)
    assert not stalled and len(decided) == 20 and set(received) == set(decided)
    assert clock.now >= 1000


def test_no_decision_for_the_stall_limit_gives_up(clock: FakeClock) -> None:
    batches = [[decision("a"), decision("b"), decision("a")]]

    def poll() -> list[bytes]:
        clock.now += 1
        return batches.pop() if batches else []

    decided, _received, stalled = demo.collect_decisions(poll, 5, 30, clock=clock.monotonic)
    assert stalled and sorted(decided) == ["a", "b"]
    assert 30 < clock.now <= 32
