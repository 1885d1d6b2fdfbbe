"""Helpers the stack tests share: starting a stack, making items, reading decisions."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from twinstream.common.kafka import TopicReader
from twinstream.devstack import REPO_ROOT, LocalStack, StackConfig
from twinstream.v1 import decisions_pb2, items_pb2

BASE_BUNDLE = REPO_ROOT / "var" / "models" / "twinstream_text" / "1"


def start_stack(bundle: Path, name: str, **overrides: object) -> LocalStack:
    """A stack of the default shape (tansu on S3, Milvus server); STACK_BROKER_STORAGE=memory and
    STACK_MILVUS=lite run the same tests on the small-footprint options."""
    settings: dict[str, object] = {"bundles": [bundle],
                                   "broker_storage": os.environ.get("STACK_BROKER_STORAGE", "s3"),
                                   "milvus": os.environ.get("STACK_MILVUS", "server"), **overrides}
    config = StackConfig(root=REPO_ROOT / "var" / "test-stacks" / name, **settings)  # type: ignore[arg-type]
    return LocalStack(config).start()


def text(item_id: str, content: str, tenant: str, collection: str = "default",
         **metadata: str) -> items_pb2.Item:
    return items_pb2.Item(item_id=item_id, tenant=tenant, collection=collection,
                          modality=items_pb2.TEXT, content=content.encode(), metadata=metadata)


def record(item_id: str, fields: dict[str, str], tenant: str, collection: str = "default",
           **metadata: str) -> items_pb2.Item:
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
