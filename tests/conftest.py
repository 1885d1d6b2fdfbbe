"""Shared fixtures: the base model bundle and a real local stack (broker, Milvus Lite server,
Triton, the four services, Prometheus), plus helpers to read what the pipeline produced."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from twinstream.common.kafka import TopicReader
from twinstream.devstack import REPO_ROOT, LocalStack, StackConfig
from twinstream.v1 import decisions_pb2, items_pb2

BASE_BUNDLE = REPO_ROOT / "var" / "models" / "twinstream_text" / "1"


@pytest.fixture(scope="session")
def base_bundle() -> Path:
    """The untrained MiniLM bundle (built once, about a minute on 2 cores)."""
    if not (BASE_BUNDLE / "manifest.json").exists():
        from twinstream.learn.base import build_base_bundle

        build_base_bundle(BASE_BUNDLE)
    return BASE_BUNDLE


def start_stack(bundle: Path, name: str, **overrides: object) -> LocalStack:
    settings: dict[str, object] = {"bundles": [bundle], **overrides}
    config = StackConfig(root=REPO_ROOT / "var" / "test-stacks" / name, **settings)  # type: ignore[arg-type]
    return LocalStack(config).start()


@pytest.fixture(scope="session")
def stack(base_bundle: Path) -> Iterator[LocalStack]:
    """One shared stack for the tests that do not break it; each test uses its own tenant."""
    running = start_stack(base_bundle, "shared", extra_env={
        "TWINSTREAM_COLLECTION_TTLS": "*/ephemeral=3", "TWINSTREAM_REAPER_INTERVAL_S": "1"})
    yield running
    running.stop()


@pytest.fixture
def tenant() -> str:
    return "t" + uuid.uuid4().hex[:10]


def text(item_id: str, content: str, tenant: str, collection: str = "default",
         **metadata: str) -> items_pb2.Item:
    return items_pb2.Item(item_id=item_id, tenant=tenant, collection=collection,
                          modality=items_pb2.TEXT, content=content.encode(), metadata=metadata)


def record(item_id: str, fields: dict[str, str], tenant: str, collection: str = "default",
           **metadata: str) -> items_pb2.Item:
    import json

    return items_pb2.Item(item_id=item_id, tenant=tenant, collection=collection,
                          modality=items_pb2.RECORD, content=json.dumps(fields).encode(),
                          metadata=metadata)


def read_decisions(stack: LocalStack, item_ids: Iterable[str], tenant: str,
                   timeout_s: float = 120.0) -> dict[str, list[decisions_pb2.Decision]]:
    """Every decision published for ``item_ids`` of ``tenant`` (all copies, to count them)."""
    wanted = set(item_ids)
    settings = stack.settings()
    reader = TopicReader(settings, settings.topics.decisions)
    found: dict[str, list[decisions_pb2.Decision]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not wanted <= set(found):
            for record in reader.poll(300):
                decision = decisions_pb2.Decision.FromString(record.value)
                if decision.tenant == tenant and decision.item_id in wanted:
                    found.setdefault(decision.item_id, []).append(decision)
        # a short grace period to catch repeated copies that are still in flight
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            for record in reader.poll(200):
                decision = decisions_pb2.Decision.FromString(record.value)
                if decision.tenant == tenant and decision.item_id in wanted:
                    found.setdefault(decision.item_id, []).append(decision)
    finally:
        reader.close()
    missing = wanted - set(found)
    assert not missing, f"no decision for {len(missing)} items, e.g. {sorted(missing)[:5]}"
    return found


def first(decisions: dict[str, list[decisions_pb2.Decision]]) -> dict[str, decisions_pb2.Decision]:
    return {item_id: copies[0] for item_id, copies in decisions.items()}
