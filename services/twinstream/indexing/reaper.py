"""Expires items past their collection's TTL and removes old tombstones.

Expiry first tombstones a row (every read path ignores it from then on, and a replayed
message cannot re-create it); tombstones older than ``tombstone_retention_s`` are then purged.
"""

from __future__ import annotations

import logging
import threading
import time

from twinstream.common.config import Settings
from twinstream.common.metrics import ITEMS_PROCESSED
from twinstream.common.vectorstore import VectorStore, quote

log = logging.getLogger(__name__)


def _scope(tenant: str, collection: str) -> str:
    parts = []
    if tenant != "*":
        parts.append(f"tenant == {quote(tenant)}")
    if collection != "*":
        parts.append(f"collection == {quote(collection)}")
    return " and ".join(parts)


def expiry_filters(settings: Settings, now_ms: int) -> list[str]:
    """One expression per TTL rule, excluding the scopes a more specific rule governs."""
    rules = settings.ttl_rules()
    filters = []
    for position, (tenant, collection, seconds) in enumerate(rules):
        parts = [f"deleted_ms == 0 and ingest_ms < {now_ms - seconds * 1000}"]
        if _scope(tenant, collection):
            parts.append(_scope(tenant, collection))
        parts += [f"not ({_scope(t, c)})" for t, c, _ in rules[:position] if _scope(t, c)]
        filters.append(" and ".join(f"({p})" for p in parts))
    return filters


class Reaper:
    def __init__(self, settings: Settings, store: VectorStore) -> None:
        self.settings = settings
        self.store = store

    def run_once(self, now_ms: int | None = None) -> tuple[int, int]:
        """Returns (rows expired, tombstones purged)."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        expired = purged = 0
        prefix = f"{self.store.prefix}_"
        for collection in self.store.client.list_collections():
            if not collection.startswith(prefix):
                continue
            for expr in expiry_filters(self.settings, now):
                pks = [r["pk"] for r in self.store.query(collection, expr, ["pk"])]
                expired += self.store.tombstone(collection, pks, now)
            cutoff = now - self.settings.tombstone_retention_s * 1000
            purged += self.store.purge(collection, f"deleted_ms > 0 and deleted_ms < {cutoff}")
        if expired or purged:
            ITEMS_PROCESSED.labels("indexing", "expired").inc(expired)
            log.info("reaped", extra={"expired": expired, "purged": purged})
        return expired, purged

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.settings.reaper_interval_s):
            try:
                self.run_once()
            except Exception:  # Milvus briefly unavailable: try again next round
                log.warning("reaper round failed", exc_info=True)
