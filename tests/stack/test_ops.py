"""What an operator of the local stack sees, on a real stack with traffic: the dashboard page in
headless Chromium, `twinstream status`, and an alert that fires on a stopped stage, reaches
Alertmanager and resolves."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import grpc
import pytest

from stack_helpers import read_decisions, record, start_stack
from twinstream import cli
from twinstream.client import TwinstreamClient
from twinstream.common.kafka import make_producer
from twinstream.demo import febrl_items
from twinstream.devstack import REPO_ROOT, LocalStack
from twinstream.v1 import items_pb2

pytestmark = pytest.mark.stack
CHROMIUM = shutil.which("chromium")
ALERTMANAGER = shutil.which("prometheus-alertmanager")
TENANT = "ops"
SCREENSHOT = REPO_ROOT / "var" / "dashboard.png"   # docs/img/dashboard.png is a copy of one run's
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


@pytest.fixture(scope="module")
def ops_stack(base_bundle: Path) -> Iterator[LocalStack]:
    """A stack of its own (the alert test freezes a stage), alerts firing after 5 s."""
    running = start_stack(base_bundle, "ops", alert_for="5s")
    yield running
    running.stop()


def _wave(stack: LocalStack, client: TwinstreamClient, wave: int) -> list[str]:
    """Forty FEBRL records, one item ingestion refuses (INVALID_ARGUMENT) and one Kafka record it
    dead-letters: every panel, errors and dead letters included, gets a series."""
    rows = febrl_items(120, seed=3)[wave * 40:(wave + 1) * 40]
    client.ingest_many(record(item_id, fields, TENANT) for item_id, fields in rows)
    ids = [item_id for item_id, _fields in rows]
    with pytest.raises(grpc.RpcError) as refused:
        client.ingest(items_pb2.Item(item_id=f"w{wave}-empty", tenant=TENANT, modality=items_pb2.TEXT))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    settings = stack.settings()
    producer = make_producer(settings)
    producer.send(settings.topics.raw, key=f"{TENANT}/default".encode(), value=b"\xff not a protobuf")
    producer.flush()
    producer.close()
    return ids


@pytest.fixture(scope="module")
def traffic(ops_stack: LocalStack) -> None:
    """Three waves 6 s apart (so rates have two samples), all decided, then two scrapes."""
    with ops_stack.client() as client:
        ids: list[str] = []
        for wave in range(3):
            ids += _wave(ops_stack, client, wave)
            time.sleep(6)
        read_decisions(ops_stack, ids, TENANT)
        client.match(TENANT, item_id=ids[0], k=3)
    time.sleep(12)


def _chromium(*args: str, timeout_s: float = 120) -> str:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="ts-chromium-") as profile:
        done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Panels(HTMLParser):
    """data-title -> data-state of every panel section in a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, str] = {}
        self.loaded = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section" and attributes.get("data-title"):
            self.states[str(attributes["data-title"])] = str(attributes.get("data-state"))
        if tag == "body":
            self.loaded = int(attributes.get("data-loaded") or 0)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")
def test_dashboard_page_shows_every_panel_with_data(ops_stack: LocalStack, traffic: None) -> None:
    from twinstream.dashboard import CONSOLE_PANELS

    url = ops_stack.dashboard_url
    assert url.endswith("/consoles/twinstream.html")
    # The page refreshes itself; virtual time lets its first round of queries finish.
    dom = _chromium("--virtual-time-budget=20000", "--dump-dom", f"{url}?range=300")
    panels = _Panels()
    panels.feed(dom)
    assert panels.loaded >= 1, dom[:2000]
    assert list(panels.states) == list(CONSOLE_PANELS)
    assert panels.states == dict.fromkeys(CONSOLE_PANELS, "data")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    _chromium("--virtual-time-budget=20000", "--window-size=1400,900", f"--screenshot={SCREENSHOT}",
              f"{url}?range=300")
    assert SCREENSHOT.stat().st_size > 20_000


def test_status_shows_rates_lag_decisions_dead_letters_and_health(ops_stack: LocalStack,
                                                                   traffic: None) -> None:
    assert ops_stack.security is not None
    argv = ["--ingestion", ops_stack.grpc_target("ingestion"), "--matching",
            ops_stack.grpc_target("matching"), "--ca-file", str(ops_stack.security.ca_file),
            "status", "--prometheus", ops_stack.prometheus_url,
            "--health", f"embedding={ops_stack.grpc_target('embedding')}",
            "--health", f"indexing={ops_stack.grpc_target('indexing')}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(argv)
    screen = out.getvalue()
    assert rc == 0, screen
    for stage in ("ingestion", "embedding", "indexing", "matching"):
        assert re.search(rf"^{stage}\s+SERVING\s+up\s+[0-9.,]+", screen, re.M), screen
    decided = re.search(r"^decisions\s+([0-9,]+) total", screen, re.M)
    assert decided and int(decided.group(1).replace(",", "")) >= 120, screen
    dead = re.search(r"^dead letters ([0-9,]+): .*\w", screen, re.M)
    assert dead and int(dead.group(1)) >= 3, screen


def test_status_says_when_prometheus_is_unreachable() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["status", "--prometheus", "http://127.0.0.1:9"])
    assert rc == 1 and "did not answer" in out.getvalue()


def _alerts(stack: LocalStack) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{stack.alertmanager_url}/api/v2/alerts", timeout=5) as reply:
        alerts: list[dict[str, object]] = json.load(reply)
    return alerts


def _about_embedding(alert: dict[str, object]) -> bool:
    labels = alert["labels"]
    assert isinstance(labels, dict)
    return "embedding" in (labels.get("service", ""), labels.get("job", "").removeprefix("twinstream-"))


@pytest.mark.skipif(ALERTMANAGER is None, reason="prometheus-alertmanager is not installed")
def test_a_stopped_stage_fires_an_alert_that_reaches_alertmanager_and_resolves(
        ops_stack: LocalStack, traffic: None) -> None:
    assert not [a for a in _alerts(ops_stack) if _about_embedding(a)]
    embedding = ops_stack.processes["embedding"]
    embedding.signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        fired: list[dict[str, object]] = []
        while time.monotonic() < deadline and not fired:
            fired = [a for a in _alerts(ops_stack) if _about_embedding(a)]
            time.sleep(2)
        assert fired, "no alert about the stopped embedding stage reached Alertmanager"
    finally:
        embedding.signal(signal.SIGCONT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and [a for a in _alerts(ops_stack) if _about_embedding(a)]:
        time.sleep(2)
    assert not [a for a in _alerts(ops_stack) if _about_embedding(a)], "the alert did not resolve"
    ops_stack.wait_serving("embedding")
