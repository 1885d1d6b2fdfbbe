"""Service settings, read once from ``TWINSTREAM_*`` environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "TWINSTREAM_"


class Secret(str):
    """A password or token: a plain ``str`` to the libraries, masked in every repr and log."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


NO_SECRET = Secret("")


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
    milvus_token: Secret = NO_SECRET
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
    # security (docs/security.md). gRPC serves TLS from these files unless grpc_plaintext is
    # asked for; clients verify servers with tls_ca_file (the system's roots when empty).
    grpc_plaintext: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    # Mutual TLS: servers require a client certificate signed by tls_ca_file; the services'
    # own outgoing gRPC presents tls_client_cert_file/tls_client_key_file.
    tls_client_auth: bool = False
    tls_client_cert_file: str = ""
    tls_client_key_file: str = ""
    # Bearer tokens (HS256 JWT) are verified with the key in this file; a server without it
    # refuses to start unless auth_disabled is asked for.
    auth_token_key_file: str = ""
    auth_disabled: bool = False
    # Dial Triton with TLS (its --grpc-use-ssl), verified with tls_ca_file; mutual TLS presents
    # tls_client_cert_file/tls_client_key_file.
    triton_tls: bool = False
    # A plain-text port with grpc.health.v1 only, for kubelet probes (they cannot speak TLS); 0: none.
    grpc_health_port: int = 0
    # Kafka client security (kafka-python names): PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL;
    # SASL mechanism PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: Secret = NO_SECRET
    kafka_ssl_ca_file: str = ""
    kafka_ssl_cert_file: str = ""
    kafka_ssl_key_file: str = ""
    # Milvus: user/password (or milvus_token); TLS when milvus_uri is https://, verified with
    # milvus_ca_file (server_pem_path) and, when set, milvus_server_name.
    milvus_user: str = ""
    milvus_password: Secret = NO_SECRET
    milvus_ca_file: str = ""
    milvus_server_name: str = ""

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
        if kind is Secret:
            return Secret(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
    return raw
