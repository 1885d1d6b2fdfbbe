"""Service settings: typed, frozen sections read once from ``TWINSTREAM_*`` environment variables.

Every field names its variable where it is declared (``_env``), so the table of names lives in one
place. A service's ``__main__`` calls ``load_settings`` once and passes the result down; a
``TWINSTREAM_*`` variable that names no setting stops it there (a misspelling is never silently
ignored), as does a value of the wrong type. Values are parsed once: broker lists, bundle folders,
topic names and TTL rules are value objects, never strings split again at use.
``python -m twinstream.common.config --markdown`` writes the reference, docs/settings.md.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import socket
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

ENV_PREFIX = "TWINSTREAM_"

# TWINSTREAM_ variables that are not service settings, so a service must not refuse them: the
# Triton launcher's (learn/triton_repo.py), which a shell may export and the dev stack hands on
# to every child process.
NOT_SETTINGS = {
    "TWINSTREAM_TRITON_VENV": "the virtual environment the Triton server runs from (learn/triton_repo.py)",
    "TWINSTREAM_TRITON_SITE": "set by the Triton launcher for the python backend's imports",
    "TWINSTREAM_TRITON_THREADS": "set by the Triton launcher: the backend's CPU threads",
}

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
EncoderBackend = Literal["triton", "inprocess"]
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
# Kafka's own rule for topic names.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


class SettingsError(ValueError):
    """The environment does not describe valid settings; the message names each variable."""


def _env(name: str, default: Any = ..., description: str = "", **constraints: Any) -> Any:
    """A field read from ``TWINSTREAM_<name>``."""
    if callable(default) and not isinstance(default, type):
        return Field(default_factory=default, description=description,
                     json_schema_extra={"env": ENV_PREFIX + name}, **constraints)
    return Field(default, description=description, json_schema_extra={"env": ENV_PREFIX + name},
                 **constraints)


def _split(value: Any) -> Any:
    """A comma-separated variable becomes a tuple (empty parts dropped)."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Section):
    """The process: identity, logging, the gRPC and metrics ports, local state."""

    instance_id: str = _env("INSTANCE_ID", socket.gethostname,
                            "this replica's id in logs and metrics (default: the host name)")
    log_level: LogLevel = _env("LOG_LEVEL", "INFO", "log level")
    grpc_host: str = _env("GRPC_HOST", "127.0.0.1",
                          "address the gRPC and metrics servers bind (0.0.0.0 in a pod)")
    grpc_port: int = _env("GRPC_PORT", 0, "gRPC port (0: any free port)", ge=0, le=65535)
    metrics_port: int = _env("METRICS_PORT", 0, "Prometheus /metrics port (0: any free port)",
                             ge=0, le=65535)
    data_dir: Path = _env("DATA_DIR", Path("var/data"), "folder for local state (ingestion's id store)")
    # An open stream holds a worker for its whole life; health has its own server and pool.
    grpc_max_workers: int = _env("GRPC_MAX_WORKERS", 16, "worker threads of the API server", gt=0)
    grpc_max_concurrent_rpcs: int = _env(
        "GRPC_MAX_CONCURRENT_RPCS", 64,
        "calls in progress beyond which new calls get RESOURCE_EXHAUSTED (0: no limit)", ge=0)
    health_port: int = _env("HEALTH_PORT", 0,
                            "gRPC health on its own server and thread pool, for probes (0: any free port)",
                            ge=0, le=65535)
    # The chart sets both and derives terminationGracePeriodSeconds from them; locally nothing
    # routes by health, so no drain.
    shutdown_drain_s: float = _env("SHUTDOWN_DRAIN_S", 0.0,
                                   "on SIGTERM, seconds NOT_SERVING before the server stops", ge=0)
    shutdown_grace_s: float = _env("SHUTDOWN_GRACE_S", 5.0,
                                   "seconds calls in flight may finish when the server stops", ge=0)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class KafkaSettings(_Section):
    """The broker and this service's consumer group."""

    bootstrap: tuple[str, ...] = _env("KAFKA_BOOTSTRAP", ("127.0.0.1:9092",),
                                      "brokers, host:port[,host:port...]", min_length=1)
    consumer_group: str = _env("CONSUMER_GROUP", "", "consumer group (empty: twinstream-<service>)")
    # kafka-python's default session timeout (45 s) makes tansu hold every join for 22.5 s;
    # 6 s keeps rebalances quick and still tolerates a slow batch (heartbeats run in a thread).
    session_timeout_ms: int = _env("KAFKA_SESSION_TIMEOUT_MS", 6000,
                                   "consumer session timeout (ms): a dead member is noticed after it",
                                   gt=0)
    max_poll_interval_ms: int = _env("KAFKA_MAX_POLL_INTERVAL_MS", 120_000,
                                     "longest a batch may take before the member is dropped (ms)", gt=0)
    # Client security, in kafka-python's terms (docs/security.md: tansu 0.6 serves neither).
    security_protocol: KafkaSecurityProtocol = _env("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT",
                                                    "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    sasl_mechanism: SaslMechanism = _env("KAFKA_SASL_MECHANISM", "",
                                         "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols)")
    sasl_username: str = _env("KAFKA_SASL_USERNAME", "", "SASL user")
    sasl_password: SecretStr = _env("KAFKA_SASL_PASSWORD", SecretStr(""), "SASL password")
    ssl_ca_file: str = _env("KAFKA_SSL_CA_FILE", "", "CA the brokers' certificates are verified with")
    ssl_cert_file: str = _env("KAFKA_SSL_CERT_FILE", "", "client certificate (mutual TLS)")
    ssl_key_file: str = _env("KAFKA_SSL_KEY_FILE", "", "client key (mutual TLS)")

    @field_validator("security_protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value
    # kafka-python's 16 KiB default sent a flushed batch as several requests one after another,
    # each a storage write on an S3-backed tansu (docs/bench/throughput.md).
    producer_batch_bytes: int = _env("KAFKA_PRODUCER_BATCH_BYTES", 1_048_576,
                                     "bytes of one partition's records per produce request", gt=0)
    # tansu answers a held fetch as soon as a record arrives (long poll), so a longer wait adds no
    # latency; it only cuts the empty fetches an idle consumer sends, each a storage read on an
    # S3-backed tansu (docs/bench/throughput.md, 2026-11-29).
    fetch_max_wait_ms: int = _env("KAFKA_FETCH_MAX_WAIT_MS", 250,
                                  "longest time the broker holds an empty fetch of a stream loop or "
                                  "lag probe (ms)", ge=0)
    async_commit: bool = _env("KAFKA_ASYNC_COMMIT", True,
                              "commit offsets without waiting for the broker's answer (still after "
                              "the outputs' flush)")

    @field_validator("bootstrap", mode="before")
    @classmethod
    def _split_bootstrap(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("bootstrap")
    @classmethod
    def _host_ports(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for server in value:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{server!r} is not host:port")
        return value


class Topics(_Section):
    """Kafka topic names (see docs/design.md) and the partitions they are created with."""

    raw: str = _env("TOPIC_RAW", "items.raw", "items as sent to ingestion")
    accepted: str = _env("TOPIC_ACCEPTED", "items.accepted", "validated items, to embedding")
    embedded: str = _env("TOPIC_EMBEDDED", "items.embedded", "items with vectors, to indexing")
    decisions: str = _env("TOPIC_DECISIONS", "items.decisions", "indexing's decisions")
    dlq: str = _env("TOPIC_DLQ", "items.dlq", "dead letters of every stage")
    partitions: int = _env("PARTITIONS", 4, "partitions of each topic the stack creates", gt=0)

    @field_validator("raw", "accepted", "embedded", "decisions", "dlq")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if not _TOPIC.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not a Kafka topic name (1-249 of [A-Za-z0-9._-])")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> Topics:
        if len(set(self.all())) != len(self.all()):
            raise ValueError(f"topic names must differ: {self.all()}")
        return self

    def all(self) -> list[str]:
        return [self.raw, self.accepted, self.embedded, self.decisions, self.dlq]


class LoopSettings(_Section):
    """The consume loop every stream stage runs (common/kafka.py)."""

    batch_size: int = _env("BATCH_SIZE", 64, "records per batch", gt=0)
    batch_wait_ms: int = _env("BATCH_WAIT_MS", 50, "longest wait to fill a batch (ms)", ge=0)
    stall_s: float = _env("LOOP_STALL_S", 60.0,
                          "no progress this long with records pending turns health NOT_SERVING", ge=0)
    max_backoff_s: float = _env("LOOP_MAX_BACKOFF_S", 10.0,
                                "retry backoff cap for a failed batch (it doubles from 0.2 s)", gt=0)
    # Polls that return nothing while records wait this long make the Kafka consumer again
    # (ConsumeLoop._check_fetching).
    fetch_stall_s: float = _env("LOOP_FETCH_STALL_S", 15.0,
                                "records wait but polls return none this long: rebuild the consumer", ge=0)
    dead_letter_max_bytes: int = _env("DEAD_LETTER_MAX_BYTES", 1_048_576,
                                      "payload bytes a dead letter keeps (the rest is cut, and it says so)",
                                      gt=0)


class MilvusSettings(_Section):
    """The vector store (indexing and matching)."""

    uri: str = _env("MILVUS_URI", "var/milvus.db", "Milvus server URI or Milvus Lite file")
    token: SecretStr = _env("MILVUS_TOKEN", SecretStr(""), "Milvus token (user:password or API key)")
    user: str = _env("MILVUS_USER", "", "Milvus user (with password; else the token is used)")
    password: SecretStr = _env("MILVUS_PASSWORD", SecretStr(""), "Milvus password")
    # TLS when the URI is https://.
    ca_file: str = _env("MILVUS_CA_FILE", "", "CA the Milvus server's certificate is verified with")
    server_name: str = _env("MILVUS_SERVER_NAME", "", "name the Milvus certificate must carry")
    collection_prefix: str = _env("MILVUS_COLLECTION_PREFIX", "twinstream",
                                  "prefix of every collection and alias")
    # Only Milvus Lite needs it (it searches unflushed rows slowly; the local stack sets 2000 for
    # it). 0 leaves sealing to a Milvus server, where frequent flushes would only make small segments.
    flush_rows: int = _env("MILVUS_FLUSH_ROWS", 0, "flush after this many upserted rows (0: never)", ge=0)


class EncoderSettings(_Section):
    """Where vectors come from (embedding and matching)."""

    backend: EncoderBackend = _env("ENCODER_BACKEND", "triton",
                                   "triton, or inprocess: run the bundle's TorchScript encoder here")
    triton_url: str = _env("TRITON_URL", "127.0.0.1:8001", "Triton gRPC address")
    triton_tls: bool = _env("TRITON_TLS", False,
                            "dial Triton with TLS (its --grpc-use-ssl), verified with TLS_CA_FILE")
    model_dirs: tuple[Path, ...] = _env("MODEL_DIR", (Path("var/models/twinstream_text/1"),),
                                        "model bundle folders, comma-separated", min_length=1)

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split_model_dirs(cls, value: Any) -> Any:
        return _split(value)


class LimitSettings(_Section):
    """What ingestion and matching accept."""

    max_item_bytes: int = _env("MAX_ITEM_BYTES", 1_048_576, "largest item content", gt=0)
    max_text_chars: int = _env("MAX_TEXT_CHARS", 100_000, "longest text item", gt=0)
    max_image_pixels: int = _env("MAX_IMAGE_PIXELS", 40_000_000,
                                 "width x height an image may declare (only its header is read)", gt=0)
    ingest_max_lag: int = _env("INGEST_MAX_LAG", 50_000,
                               "refuse new items (RESOURCE_EXHAUSTED) while embedding lags this many "
                               "records on items.accepted (0: unbounded)", ge=0)
    match_k_limit: int = _env("MATCH_K_LIMIT", 1000, "largest k a Match call may ask for", gt=0)


class SearchSettings(_Section):
    """Indexing's neighbour search."""

    neighbours: int = _env("NEIGHBOURS", 10, "neighbours each new item is compared with", gt=0)
    keyed_reads: bool = _env("KEYED_READS", True,
                             "indexing also reads the stored records sharing a blocking key with a new "
                             "record, beside its cosine neighbours (docs/calibration.md; one query per batch)")
    # Strong before that: a new owner of a partition must see the previous owner's rows
    # (docs/store.md).
    decide_session_reads: bool = _env("DECIDE_SESSION_READS", True,
                                      "indexing reads a collection at Session consistency once it has "
                                      "written it since its partitions were assigned (False: always Strong)")


class TtlRule(_Section):
    """Items of ``tenant``/``collection`` (``*``: any) live ``seconds``."""

    tenant: str
    collection: str
    seconds: int = Field(ge=0)

    def matches(self, tenant: str, collection: str) -> bool:
        return self.tenant in ("*", tenant) and self.collection in ("*", collection)


def _ttl_rules(value: Any) -> Any:
    """``tenant/collection=seconds,*/collection=seconds`` -> rules, most specific first."""
    if not isinstance(value, str):
        return value
    rules = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        scope, _, seconds = part.partition("=")
        tenant, _, collection = scope.partition("/")
        if not seconds.strip().isdigit() or not tenant.strip() or not collection.strip():
            raise ValueError(f"entry {part!r} is not tenant/collection=seconds")
        rules.append(TtlRule(tenant=tenant.strip(), collection=collection.strip(),
                             seconds=int(seconds)))
    return tuple(sorted(rules, key=lambda r: (r.tenant == "*", r.collection == "*")))


class RetentionSettings(_Section):
    """Time to live, deletes and tombstones (indexing's reaper, matching's Delete)."""

    ttl_seconds: int = _env("TTL_SECONDS", 0, "items' default time to live (0: forever)", ge=0)
    collection_ttls: tuple[TtlRule, ...] = _env(
        "COLLECTION_TTLS", (), "per-scope TTLs, tenant/collection=seconds,*/collection=seconds "
        "(the most specific rule wins)")
    # Kept at least as long as the Kafka retention, so a replayed message can never bring a
    # deleted item back.
    tombstone_retention_s: int = _env("TOMBSTONE_RETENTION_S", 7 * 24 * 3600,
                                      "how long tombstones of deleted/expired rows are kept", ge=0)
    reaper_interval_s: float = _env("REAPER_INTERVAL_S", 60.0, "seconds between TTL sweeps", gt=0)
    delete_wait_s: float = _env("DELETE_WAIT_S", 10.0,
                                "how long Delete waits for indexing to apply it before answering "
                                "pending=true", ge=0)

    @field_validator("collection_ttls", mode="before")
    @classmethod
    def _parse_ttls(cls, value: Any) -> Any:
        return _ttl_rules(value)

    def ttl_rules(self) -> list[TtlRule]:
        """Every rule, most specific first; the default (``*/*``) last."""
        default = [TtlRule(tenant="*", collection="*", seconds=self.ttl_seconds)] if self.ttl_seconds > 0 else []
        return [*self.collection_ttls, *default]

    def ttl_for(self, tenant: str, collection: str) -> int:
        """Seconds items of that scope live (0: forever)."""
        return next((r.seconds for r in self.ttl_rules() if r.matches(tenant, collection)), 0)


class ProbeSettings(_Section):
    """Dependency probes (common/probes.py): an idle service shows a broker, Milvus or Triton outage."""

    interval_s: float = _env("PROBE_INTERVAL_S", 2.0, "seconds between probes of each dependency", gt=0)
    timeout_s: float = _env("PROBE_TIMEOUT_S", 2.0, "longest one probe call may take", gt=0)
    failures: int = _env("PROBE_FAILURES", 2, "failures in a row that turn health NOT_SERVING", gt=0)


class TlsSettings(_Section):
    """gRPC TLS of the servers and the services' own clients (docs/security.md)."""

    plaintext: bool = _env("GRPC_PLAINTEXT", False,
                           "serve and dial gRPC in plain text (only when asked: TLS is the default)")
    cert_file: str = _env("TLS_CERT_FILE", "", "the server's certificate (PEM)")
    key_file: str = _env("TLS_KEY_FILE", "", "the server's private key (PEM)")
    ca_file: str = _env("TLS_CA_FILE", "",
                        "CA that servers are verified with (and client certificates, with client_auth)")
    client_auth: bool = _env("TLS_CLIENT_AUTH", False,
                             "mutual TLS: servers require a client certificate signed by TLS_CA_FILE")
    client_cert_file: str = _env("TLS_CLIENT_CERT_FILE", "", "the certificate this service's clients present")
    client_key_file: str = _env("TLS_CLIENT_KEY_FILE", "", "the key this service's clients present")


class AuthSettings(_Section):
    """Bearer tokens (HS256 JWT) and tenant authorisation (docs/security.md)."""

    token_key_file: str = _env("AUTH_TOKEN_KEY_FILE", "",
                               "file with the key tokens are verified with; a server without it "
                               "refuses to start unless AUTH_DISABLED")
    disabled: bool = _env("AUTH_DISABLED", False, "accept calls without a token (only when asked)")


class Settings(BaseModel):
    """Everything a service reads from its environment, one section per concern."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    service: str = Field("twinstream", description="the process's name (set by its __main__)")
    server: ServerSettings = Field(default_factory=ServerSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: Topics = Field(default_factory=Topics)
    loop: LoopSettings = Field(default_factory=LoopSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    probes: ProbeSettings = Field(default_factory=ProbeSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)

    @property
    def consumer_group(self) -> str:
        return self.kafka.consumer_group or f"twinstream-{self.service}"

    @classmethod
    def from_env(cls, service: str, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings of ``service`` from ``environ`` (default ``os.environ``). Raises
        ``SettingsError`` naming every unknown ``TWINSTREAM_*`` variable and every bad value."""
        environ = os.environ if environ is None else environ
        fields = env_fields()
        sections: dict[str, dict[str, str]] = {}
        problems = []
        for name, raw in sorted(environ.items()):
            if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
                continue
            if name not in fields:
                close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{name}: unknown setting{hint}")
                continue
            section, field = fields[name]
            sections.setdefault(section, {})[field] = raw
        if problems:
            raise SettingsError("; ".join(problems))
        return cls._validated({"service": service, **sections})

    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some fields of some sections changed (and validated):
        ``settings.replace(kafka={"consumer_group": "g"})``."""
        data: dict[str, Any] = dict(self)
        for section, changes in sections.items():
            data[section] = {**dict(getattr(self, section)), **changes}
        return self._validated(data)

    @classmethod
    def _validated(cls, data: dict[str, Any]) -> Settings:
        """``model_validate``, with each error named by its variable."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            names = {v: k for k, v in env_fields().items()}
            problems = []
            for error in exc.errors():
                loc = tuple(str(part) for part in error["loc"])
                name = names.get((loc[0], loc[1])) if len(loc) >= 2 else None
                where = name or ".".join(loc) or "settings"
                section = data.get(loc[0]) if loc else None
                value = section.get(loc[1]) if isinstance(section, dict) and len(loc) >= 2 else None
                shown = f"={value!r}" if isinstance(value, str) else ""
                problems.append(f"{where}{shown}: {error['msg']}")
            raise SettingsError("; ".join(problems)) from None


def _sections() -> Iterator[tuple[str, type[BaseModel]]]:
    for name, info in Settings.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield name, info.annotation


def _env_name(info: FieldInfo) -> str | None:
    extra = info.json_schema_extra
    return str(extra["env"]) if isinstance(extra, dict) and "env" in extra else None


def env_fields() -> dict[str, tuple[str, str]]:
    """``TWINSTREAM_<NAME>`` -> (section, field): the one table of variable names."""
    table: dict[str, tuple[str, str]] = {}
    for section, model in _sections():
        for field, info in model.model_fields.items():
            name = _env_name(info)
            if name is None:
                raise TypeError(f"{model.__name__}.{field} names no environment variable")
            if name in table:
                raise TypeError(f"{name} is mapped twice")
            table[name] = (section, field)
    return table


def _render(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, TtlRule):
        return f"{value.tenant}/{value.collection}={value.seconds}"
    if isinstance(value, tuple | list):
        return ",".join(_render(v) for v in value)
    return str(value)


def environment(**sections: Mapping[str, Any]) -> dict[str, str]:
    """The ``TWINSTREAM_*`` variables that give a child process these section fields:
    ``environment(kafka={"bootstrap": "h:9092"})`` -> ``{"TWINSTREAM_KAFKA_BOOTSTRAP": "h:9092"}``.
    For launchers (the dev stack); services read theirs with ``load_settings``."""
    names = {v: k for k, v in env_fields().items()}
    env = {}
    for section, values in sections.items():
        for field, value in values.items():
            if (section, field) not in names:
                raise KeyError(f"no setting {section}.{field}")
            env[names[section, field]] = _render(value)
    return env


def load_settings(service: str) -> Settings:
    """Read the environment once, at a service's start; bad settings end the process (status 2)
    with one line naming each offending variable."""
    try:
        return Settings.from_env(service)
    except SettingsError as exc:
        print(f"twinstream {service}: invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin is tuple:
        return f"list of {_type_name(get_args(annotation)[0])}"
    if annotation is SecretStr:
        return "secret"
    if annotation is TtlRule:
        return "TTL rule"
    if isinstance(annotation, type | types.GenericAlias):
        return getattr(annotation, "__name__", str(annotation))
    return str(annotation)


def markdown() -> str:
    """The settings reference (docs/settings.md)."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated by `python -m twinstream.common.config --markdown > docs/settings.md`;",
        "     tests/unit/common/test_config.py fails when this file is stale. -->",
        "",
        "Every service reads these `TWINSTREAM_*` environment variables once, at start",
        "(`common/config.py`). A `TWINSTREAM_*` variable that is not listed here stops the service",
        "with a message naming it (and the closest valid name); so does a value of the wrong type.",
        "Lists are comma-separated. In code each variable is `settings.<section>.<field>`.",
        "",
        "To add one: a field `name: type = _env(\"NAME\", default, \"description\")` in its section",
        "class (a new section: a `_Section` subclass and a field of `Settings`), then regenerate this file.",
        "",
    ]
    for section, model in _sections():
        lines += [f"## `{section}`: {(model.__doc__ or '').strip()}", "",
                  "| Variable | Field | Type | Default | Description |",
                  "|---|---|---|---|---|"]
        for field, info in model.model_fields.items():
            default = "" if info.default_factory else _render(info.default)
            shown = f"`{default}`" if default else "(computed)" if info.default_factory else "(empty)"
            lines.append(f"| `{_env_name(info)}` | `{section}.{field}` | {_type_name(info.annotation)} "
                         f"| {shown} | {info.description} |")
        lines.append("")
    lines += ["## Not settings", "",
              "These `TWINSTREAM_*` variables belong to other programs and are not refused:", ""]
    lines += [f"- `{name}`: {why}" for name, why in NOT_SETTINGS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twinstream.common.config",
                                     description="Print the settings reference.")
    parser.add_argument("--markdown", action="store_true", help="the reference as Markdown")
    parser.parse_args(argv)
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
