"""Accepted-id store: makes client ids idempotency keys (SQLite; one file per replica's volume).

An id is reserved before its item is published and marked published once the broker has
acknowledged it. A retry with the same content is answered from here; the same id with other
content is a conflict. A reservation that never got published (a crash in between) is published
again on the next attempt, with the ingest time first recorded, so the item stays identical.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path


class Reservation(enum.Enum):
    NEW = "new"              # first time: publish it
    UNPUBLISHED = "retry"    # seen, never acknowledged by the broker: publish it again
    PUBLISHED = "done"       # seen and published: nothing to do
    CONFLICT = "conflict"    # the id was accepted with different content


@dataclass(frozen=True)
class Reserved:
    state: Reservation
    ingest_time_ms: int
    content_hash: str


class AcceptedIds:
    """Thread-safe reservations keyed by (tenant, collection, item_id)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS accepted (tenant TEXT, collection TEXT, item_id TEXT,"
            " content_hash TEXT NOT NULL, ingest_time_ms INTEGER NOT NULL,"
            " published INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tenant, collection, item_id))"
        )
        self._lock = threading.Lock()

    def reserve(self, tenant: str, collection: str, item_id: str, content_hash: str,
                ingest_time_ms: int) -> Reserved:
        with self._lock:
            row = self._db.execute(
                "SELECT content_hash, ingest_time_ms, published FROM accepted"
                " WHERE tenant=? AND collection=? AND item_id=?",
                (tenant, collection, item_id),
            ).fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO accepted VALUES (?, ?, ?, ?, ?, 0)",
                    (tenant, collection, item_id, content_hash, ingest_time_ms),
                )
                return Reserved(Reservation.NEW, ingest_time_ms, content_hash)
            stored_hash, stored_time, published = row
            if stored_hash != content_hash:
                return Reserved(Reservation.CONFLICT, stored_time, stored_hash)
            state = Reservation.PUBLISHED if published else Reservation.UNPUBLISHED
            return Reserved(state, stored_time, stored_hash)

    def mark_published(self, keys: list[tuple[str, str, str]]) -> None:
        with self._lock:
            self._db.executemany(
                "UPDATE accepted SET published=1 WHERE tenant=? AND collection=? AND item_id=?",
                keys,
            )

    def release(self, keys: list[tuple[str, str, str]]) -> None:
        """Forget unpublished reservations (their publish failed and the caller was told so)."""
        with self._lock:
            self._db.executemany(
                "DELETE FROM accepted WHERE tenant=? AND collection=? AND item_id=? AND published=0",
                keys,
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
