"""Dependency probes: gRPC health shows a broker, Milvus or Triton outage even while the
service has nothing to process.

The stream loop only notices an outage when a batch fails, so an idle consumer would stay
SERVING through it. A ``DependencyMonitor`` thread runs one cheap call per dependency every
``probes.interval_s`` (each bounded by ``probes.timeout_s``) and reports through
``ServiceRuntime.health_hook("probe:<dependency>")``: NOT_SERVING after ``probes.failures``
failures in a row, SERVING again on the first success. The probes run one after another on
that one thread, so a service sends at most one probe request at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kafka import KafkaConsumer, TopicPartition

from twinstream.common.config import Settings
from twinstream.common.encoding import ItemEncoder, TritonEncoder
from twinstream.common.metrics import Metrics
from twinstream.common.security import kafka_client_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """One dependency: ``check(timeout_s)`` returns when it answers, raises when it does not."""

    dependency: str
    check: Callable[[float], None]
    close: Callable[[], None] = lambda: None


class DependencyMonitor:
    """Runs ``probes`` periodically and reports each dependency's health to ``hook``."""

    def __init__(self, settings: Settings, probes: Sequence[Probe],
                 hook: Callable[[str], Callable[[bool], None]], metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics.unexported()
        self.probes = list(probes)
        self._reports = {p.dependency: hook(f"probe:{p.dependency}") for p in self.probes}
        self._failures = {p.dependency: 0 for p in self.probes}

    def start(self, stopping: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stopping,), name="probes", daemon=True)
        thread.start()
        return thread

    def run(self, stopping: threading.Event) -> None:
        try:
            while not stopping.is_set():
                self.probe_once()
                stopping.wait(self.settings.probes.interval_s)
        finally:
            for probe in self.probes:
                try:
                    probe.close()
                except Exception:  # closing a client of a dead dependency may fail; nothing to do
                    log.debug("probe close failed", exc_info=True)

    def probe_once(self) -> dict[str, bool]:
        """Run every probe once; return which dependencies answered."""
        answered = {}
        for probe in self.probes:
            name = probe.dependency
            try:
                probe.check(self.settings.probes.timeout_s)
                ok = True
            except Exception as exc:  # any failure of the call means "not answering"
                ok = False
                self.metrics.dependency_probe_failures.labels(name).inc()
                if self._failures[name] == 0:
                    log.warning("dependency probe failed", extra={"dependency": name, "error": repr(exc)})
            previous = self._failures[name]
            self._failures[name] = 0 if ok else previous + 1
            up = self._failures[name] < self.settings.probes.failures
            self.metrics.dependency_up.labels(name).set(1 if up else 0)
            if ok and previous:
                log.info("dependency answers again", extra={"dependency": name})
            self._reports[name](up)
            answered[name] = ok
        return answered


def broker_probe(settings: Settings, topic: str) -> Probe:
    """ListOffsets(EARLIEST) of ``topic``'s partition 0: answered only when the broker runs and
    can read its storage (tansu keeps metadata in memory, so a metadata request would answer
    through an S3 outage). A consumer without a group, made on first use and kept."""
    consumer: list[KafkaConsumer] = []
    partition = TopicPartition(topic, 0)

    def check(timeout_s: float) -> None:
        if not consumer:
            consumer.append(KafkaConsumer(
                bootstrap_servers=list(settings.kafka.bootstrap),
                **kafka_client_options(settings),
                client_id=f"{settings.service}-{settings.server.instance_id}-probe",
                request_timeout_ms=max(1000, int(timeout_s * 1000)) + 1000,
                enable_auto_commit=False))
        consumer[0].beginning_offsets([partition], timeout_ms=int(timeout_s * 1000))

    def close() -> None:
        if consumer:
            consumer[0].close(autocommit=False)

    return Probe("broker", check, close)


class ServerVersion(Protocol):
    """What the Milvus probe needs of a (guarded) MilvusClient."""

    def get_server_version(self, timeout: float | None = None) -> object: ...


def milvus_probe(client: ServerVersion) -> Probe:
    """Milvus's server version: answered once its proxy and root coordinator are up."""
    def check(timeout_s: float) -> None:
        client.get_server_version(timeout=timeout_s)

    return Probe("milvus", check)


def triton_probe(encoders: Sequence[ItemEncoder]) -> Probe:
    """Every served model ready on Triton (``is_model_ready``), not only the server live: a
    restarted Triton answers before it has loaded the models."""
    tritons = [e.encoder for e in encoders if isinstance(e.encoder, TritonEncoder)]

    def check(timeout_s: float) -> None:
        for encoder in tritons:
            if not encoder.client.is_model_ready(encoder.bundle.name, encoder.bundle.version,
                                                 client_timeout=timeout_s):
                raise RuntimeError(f"model {encoder.bundle.name}:{encoder.bundle.version} not ready")

    return Probe("triton", check)
