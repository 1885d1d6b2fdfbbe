"""Service settings, read once from ``TWINSTREAM_*`` environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "TWINSTREAM_"


@dataclass(frozen=True)
class Topics:
    """Kafka topic names (see DESIGN.md)."""

    raw: str = "items.raw"
    accepted: str = "items.accepted"
    embedded: str = "items.embedded"
    decisions: str = "items.decisions"
    dlq: str = "items.dlq"

    def all(self) -> list[str]:
        return [self.raw, self.accepted, self.embedded, self.decisions, self.dlq]


@dataclass(frozen=True)
class Settings:
    """Everything a service reads from its environment; each field maps to TWINSTREAM_<NAME>."""

    service: str = "twinstream"
    instance_id: str = field(default_factory=socket.gethostname)
    log_level: str = "INFO"
    kafka_bootstrap: str = "127.0.0.1:9092"
    consumer_group: str = ""
    # kafka-python's default session timeout (45 s) makes tansu hold every join for 22.5 s;
    # 6 s keeps rebalances quick and still tolerates a slow batch (heartbeats run in a thread).
    kafka_session_timeout_ms: int = 6000
    kafka_max_poll_interval_ms: int = 120_000
    batch_size: int = 64
    batch_wait_ms: int = 50
    # A stream loop that makes no progress this long turns gRPC health NOT_SERVING.
    loop_stall_s: float = 60.0
    # Retry backoff cap for a failed batch (it doubles from 0.2 s).
    loop_max_backoff_s: float = 10.0
    # Dead letters carry at most this many payload bytes (the rest is cut, and the letter says so).
    dead_letter_max_bytes: int = 1_048_576
    # Ingestion backpressure: refuse new items (RESOURCE_EXHAUSTED + retry-after) while the
    # embedding group lags this many records behind on items.accepted (0 = unbounded).
    ingest_max_lag: int = 50_000
    grpc_port: int = 0
    grpc_host: str = "127.0.0.1"
    metrics_port: int = 0
    milvus_uri: str = "var/milvus.db"
    milvus_token: str = ""
    milvus_collection_prefix: str = "twinstream"
    # Flush Milvus after this many upserted rows: only Milvus Lite needs it (it searches unflushed
    # rows slowly; the local stack sets 2000 for it). 0 leaves sealing to a Milvus server, where
    # frequent flushes would only make small segments.
    milvus_flush_rows: int = 0
    triton_url: str = "127.0.0.1:8001"
    # "triton" (default) or "inprocess": run the bundle's TorchScript encoder in this process.
    encoder_backend: str = "triton"
    model_dir: str = "var/models/twinstream_text/1"
    data_dir: str = "var/data"
    max_item_bytes: int = 1_048_576
    max_text_chars: int = 100_000
    # Pixels (width x height) an image may declare; ingestion reads only the header to check.
    max_image_pixels: int = 40_000_000
    partitions: int = 4
    neighbours: int = 10
    match_k_limit: int = 1000
    # Time-to-live of items, in seconds: a default (0 = keep forever) and per-scope overrides
    # "tenant/collection=seconds,*/collection=seconds" (the most specific rule wins).
    ttl_seconds: int = 0
    collection_ttls: str = ""
    # Tombstones of deleted/expired rows are kept this long (>= the Kafka retention), so a
    # replayed message can never bring a deleted item back.
    tombstone_retention_s: int = 7 * 24 * 3600
    reaper_interval_s: float = 60.0
    # How long Delete waits for indexing to apply it before answering pending=true.
    delete_wait_s: float = 10.0
    topics: Topics = field(default_factory=Topics)
    # Dependency probes (common/probes.py, issue 11): every service checks the broker / Milvus /
    # Triton it needs this often, each call bounded by the timeout; health turns NOT_SERVING
    # after this many failures in a row, so an idle service shows an outage too.
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 2.0
    probe_failures: int = 2
    # A stream loop whose polls return nothing while records wait this long makes its Kafka
    # consumer again (common/kafka.py, ConsumeLoop._check_fetching).
    loop_fetch_stall_s: float = 15.0

    @classmethod
    def from_env(cls, service: str, **overrides: Any) -> Settings:
        """Read settings for ``service`` from the environment; ``overrides`` win."""
        hints = get_type_hints(cls)
        values: dict[str, Any] = {"service": service}
        for f in fields(cls):
            env = os.environ.get(ENV_PREFIX + f.name.upper())
            if env is None or f.name in ("service", "topics"):
                continue
            values[f.name] = _parse(env, hints[f.name], f.name)
        values.update(overrides)
        settings = cls(**values)
        if not settings.consumer_group:
            settings = cls(**{**values, "consumer_group": f"twinstream-{service}"})
        return settings

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def ttl_rules(self) -> list[tuple[str, str, int]]:
        """(tenant or "*", collection or "*", seconds), most specific first."""
        rules = []
        for part in filter(None, (p.strip() for p in self.collection_ttls.split(","))):
            scope, _, seconds = part.partition("=")
            tenant, _, collection = scope.partition("/")
            if not seconds.strip().isdigit() or not tenant or not collection:
                raise ValueError(f"TWINSTREAM_COLLECTION_TTLS entry {part!r} is not "
                                 "tenant/collection=seconds")
            rules.append((tenant.strip(), collection.strip(), int(seconds)))
        if self.ttl_seconds > 0:
            rules.append(("*", "*", self.ttl_seconds))
        return sorted(rules, key=lambda r: (r[0] == "*", r[1] == "*"))

    def ttl_for(self, tenant: str, collection: str) -> int:
        for rule_tenant, rule_collection, seconds in self.ttl_rules():
            if rule_tenant in ("*", tenant) and rule_collection in ("*", collection):
                return seconds
        return 0


def _parse(raw: str, kind: Any, name: str) -> Any:
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
    return raw
