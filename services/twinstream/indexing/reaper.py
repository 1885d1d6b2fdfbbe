"""Finds items past their collection's TTL and old tombstones; asks indexing to remove them.

Expiry first tombstones a row (every read path ignores it from then on, and a replayed
message cannot re-create it); tombstones older than ``tombstone_retention_s`` are then purged.
The reaper only reads: it publishes EXPIRE and PURGE store commands keyed by scope, and the
indexer owning the scope's partition applies them between its inserts (and re-checks the
condition there), so expiry never races a cluster merge or a Delete on the same rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from twinstream.common.commands import store_commands
from twinstream.common.config import Settings
from twinstream.common.kafka import Outgoing
from twinstream.common.vectorstore import VectorStore, quote
from twinstream.v1 import items_pb2

log = logging.getLogger(__name__)


def _scope(tenant: str, collection: str) -> str:
    parts = []
    if tenant != "*":
        parts.append(f"tenant == {quote(tenant)}")
    if collection != "*":
        parts.append(f"collection == {quote(collection)}")
    return " and ".join(parts)


def expiry_filters(settings: Settings, now_ms: int) -> list[tuple[str, int]]:
    """(expression, ingest cutoff) per TTL rule, excluding the scopes a more specific rule
    governs."""
    rules = settings.retention.ttl_rules()
    filters = []
    for position, rule in enumerate(rules):
        cutoff = now_ms - rule.seconds * 1000
        parts = [f"deleted_ms == 0 and ingest_ms < {cutoff}"]
        if _scope(rule.tenant, rule.collection):
            parts.append(_scope(rule.tenant, rule.collection))
        parts += [f"not ({_scope(r.tenant, r.collection)})" for r in rules[:position]
                  if _scope(r.tenant, r.collection)]
        filters.append((" and ".join(f"({p})" for p in parts), cutoff))
    return filters


# (action, tenant, collection, cutoff_ms) -> item ids
_Found = dict[tuple["items_pb2.StoreCommand.Action.ValueType", str, str, int], set[str]]


class Reaper:
    def __init__(self, settings: Settings, store: VectorStore,
                 send: Callable[[Sequence[Outgoing]], None]) -> None:
        self.settings = settings
        self.store = store
        self.send = send  # publishes and waits for the broker's acknowledgement

    def run_once(self, now_ms: int | None = None) -> tuple[int, int]:
        """Returns (rows asked to expire, tombstones asked to purge)."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        retained = now - self.settings.retention.tombstone_retention_s * 1000
        actions = items_pb2.StoreCommand
        found: _Found = {}
        for collection in self.store.collections():
            scans = [(actions.EXPIRE, expr, cutoff) for expr, cutoff in expiry_filters(self.settings, now)]
            scans.append((actions.PURGE, f"deleted_ms > 0 and deleted_ms < {retained}", retained))
            for action, expr, cutoff in scans:
                for row in self.store.query(collection, expr, ["pk", "tenant", "collection", "item_id"]):
                    key = (action, str(row["tenant"]), str(row["collection"]), cutoff)
                    found.setdefault(key, set()).add(str(row["item_id"]))
        messages: list[Outgoing] = []
        for (action, tenant, scope_collection, cutoff), ids in sorted(found.items()):
            # the cutoff travels with the command: the indexer re-checks it on the row
            messages += store_commands(self.settings, action, tenant, scope_collection, sorted(ids),
                                       now, cutoff, "reaper")
        if messages:
            self.send(messages)
        expired = sum(len(i) for k, i in found.items() if k[0] == actions.EXPIRE)
        purged = sum(len(i) for k, i in found.items() if k[0] == actions.PURGE)
        if expired or purged:
            log.info("reaper asked indexing to remove rows",
                     extra={"expired": expired, "purged": purged})
        return expired, purged

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.settings.retention.reaper_interval_s):
            try:
                self.run_once()
            except Exception:  # Milvus or the broker briefly unavailable: try again next round
                log.warning("reaper round failed", exc_info=True)
