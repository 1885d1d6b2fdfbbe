"""Ingestion's logic: gRPC Ingest/IngestStream and the items.raw consumer share one path."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.commands import scope_key
from twinstream.common.config import Settings
from twinstream.common.kafka import BatchResult, Outgoing, Producer, Rejected, publish
from twinstream.common.metrics import Metrics
from twinstream.ingestion.store import AcceptedIds, Reservation
from twinstream.ingestion.validation import (
    InvalidItem,
    Limits,
    assign_item_id,
    parse_item,
    validate,
)
from twinstream.v1 import ingestion_pb2, ingestion_pb2_grpc, items_pb2

log = logging.getLogger(__name__)


class IdConflict(InvalidItem):
    """The id was accepted before with different content (ALREADY_EXISTS over gRPC)."""

    code = grpc.StatusCode.ALREADY_EXISTS


@dataclass(frozen=True)
class Admission:
    """A valid item to publish; ``repeat`` when the broker acknowledged it before.

    A repeat is published again: every stage downstream is idempotent, and the broker may have
    lost what it acknowledged (a broker on memory storage restarted), so a client's retry is
    what brings such an item to a decision.
    """

    accepted: items_pb2.AcceptedItem
    key: tuple[str, str, str]
    repeat: bool


# gRPC's standard trailer for "retry after this many milliseconds" (also read by its retry policy).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class Backpressure:
    """Refuses new items while embedding lags too far behind on items.accepted.

    ``measure`` (a GroupLag) is polled about once a second on a thread of its own, so a request
    never waits on the broker for it. An unknown lag (broker down) admits: publishing will fail
    then anyway, with UNAVAILABLE.
    """

    def __init__(self, limit: int, measure: Callable[[], int | None],
                 interval_s: float = 1.0, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self.metrics = metrics or Metrics.unexported()
        self.measure = measure
        self.interval_s = interval_s
        self.lag: int | None = None

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                self.lag = self.measure()
            except Exception:  # the broker is away; admit until it answers again
                log.debug("measuring the embedding lag failed", exc_info=True)
                self.metrics.errors.labels("lag_unknown").inc()
                self.lag = None
            stopping.wait(self.interval_s)

    def retry_after_s(self) -> float | None:
        """None to admit; otherwise seconds to wait, 1-10 by how far the lag is over."""
        lag = self.lag
        if self.limit <= 0 or lag is None or lag <= self.limit:
            return None
        return min(10.0, max(1.0, 10.0 * (lag - self.limit) / self.limit))


def partition_key(item: items_pb2.Item) -> bytes:
    """Items of one tenant/collection share a partition, so one consumer sees them in order."""
    return scope_key(item.tenant, item.collection)


class Ingestion(ingestion_pb2_grpc.IngestionServicer):
    def __init__(self, settings: Settings, ids: AcceptedIds, producer: Producer,
                 backpressure: Backpressure | None = None,
                 on_broker_health: Callable[[bool], None] = lambda healthy: None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics.unexported()
        self.ids = ids
        self.producer = producer
        self.limits = Limits(settings.limits.max_item_bytes, settings.limits.max_text_chars,
                             settings.limits.max_image_pixels)
        self.backpressure = backpressure
        self.on_broker_health = on_broker_health

    # -- the shared path -------------------------------------------------------------------
    def admit(self, item: items_pb2.Item, source: str, assign_id: bool = False) -> Admission:
        """Validate, hash and reserve the id. Raises InvalidItem (or IdConflict), counted."""
        try:
            content_hash = _checked(item, self.limits, require_id=not assign_id)
            if not item.item_id:
                item.item_id = assign_item_id(item, content_hash)
            key = (item.tenant, item.collection, item.item_id)
            reserved = self.ids.reserve(*key, content_hash, int(time.time() * 1000))
            if reserved.state is Reservation.CONFLICT:
                raise IdConflict(
                    "id_conflict",
                    f"item_id {item.item_id!r} was accepted before with different content "
                    f"(sha256 {reserved.content_hash[:12]}...); ids are idempotency keys",
                )
        except InvalidItem as exc:
            self._count_rejection(exc)
            raise
        accepted = items_pb2.AcceptedItem(
            item=item, content_hash=content_hash, ingest_time_ms=reserved.ingest_time_ms,
            source=source,
        )
        return Admission(accepted, key, reserved.state is Reservation.PUBLISHED)

    def _outgoing(self, admission: Admission) -> Outgoing:
        return Outgoing(self.settings.topics.accepted, partition_key(admission.accepted.item),
                        admission.accepted.SerializeToString())

    def _publish(self, admissions: Sequence[Admission], context: grpc.ServicerContext) -> None:
        """Publish and wait for the broker's acknowledgement; only then mark them published."""
        try:
            publish(self.producer, [self._outgoing(a) for a in admissions], timeout_s=15)
        except Exception as exc:
            self.ids.release([a.key for a in admissions if not a.repeat])
            self.metrics.errors.labels("publish_failed").inc()
            log.warning("publishing to items.accepted failed", exc_info=True)
            self.on_broker_health(False)
            context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, "1000"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the broker did not accept the items: {exc}")
        self.on_broker_health(True)
        self.ids.mark_published([a.key for a in admissions if not a.repeat])
        repeats = sum(a.repeat for a in admissions)
        self.metrics.items_processed.labels("accepted").inc(len(admissions) - repeats)
        self.metrics.items_processed.labels("already_accepted").inc(repeats)

    def _admit_or_push_back(self, context: grpc.ServicerContext) -> None:
        """Abort with RESOURCE_EXHAUSTED and a retry-after while embedding lags too far."""
        gate = self.backpressure
        wait_s = gate.retry_after_s() if gate is not None else None
        if gate is None or wait_s is None:
            return
        self.metrics.errors.labels("backpressure").inc()
        context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(int(wait_s * 1000))),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"backpressure: embedding is {gate.lag} records behind on "
                      f"{self.settings.topics.accepted} (limit {gate.limit}); "
                      f"retry in {wait_s:.1f} s")

    # -- gRPC --------------------------------------------------------------------------------
    def Ingest(self, request: ingestion_pb2.IngestRequest,
               context: grpc.ServicerContext) -> ingestion_pb2.IngestResponse:
        """One item; an InvalidItem becomes INVALID_ARGUMENT (ALREADY_EXISTS for an id conflict)
        with details "<reason>: <detail>" in the server's interceptor."""
        self._admit_or_push_back(context)
        admission = self.admit(request.item, "grpc", request.assign_id)
        self._publish([admission], context)
        return ingestion_pb2.IngestResponse(
            item_id=admission.accepted.item.item_id,
            content_hash=admission.accepted.content_hash,
            already_accepted=admission.repeat,
        )

    def IngestStream(self, request_iterator: Iterator[ingestion_pb2.IngestRequest],
                     context: grpc.ServicerContext) -> ingestion_pb2.IngestSummary:
        """Every item gets its own outcome: accepted (its id in ``item_ids``) or a rejection with
        its index and reason; one bad item never fails the call. The call fails as a whole only
        when the broker does not take the items (UNAVAILABLE): items of earlier chunks may then be
        accepted already, and sending the whole stream again is safe (ids are idempotency keys)."""
        # Checked once, before the first item: a stream admitted runs to its end, so a client
        # never has to guess which of its items a refused stream had accepted.
        self._admit_or_push_back(context)
        summary = ingestion_pb2.IngestSummary()
        pending: list[Admission] = []
        for index, request in enumerate(request_iterator):
            try:
                admission = self.admit(request.item, "grpc", request.assign_id)
            except InvalidItem as exc:
                summary.rejections.add(index=index, item_id=request.item.item_id,
                                       reason=exc.reason, detail=exc.detail)
                continue
            pending.append(admission)
            summary.item_ids.append(admission.accepted.item.item_id)
            if len(pending) >= 256:
                self._publish(pending, context)
                pending = []
        self._publish(pending, context)
        summary.accepted = len(summary.item_ids)
        summary.rejected = len(summary.rejections)
        return summary

    # -- Kafka items.raw ---------------------------------------------------------------------
    def handle_raw(self, records: Sequence[ConsumerRecord]) -> BatchResult:
        """Validate a batch from items.raw; bad records become dead letters with the reason."""
        result = BatchResult()
        admitted: list[Admission] = []
        for record in records:
            try:
                item = parse_item(record.value)
            except InvalidItem as exc:
                self._count_rejection(exc)
                result.rejected.append(Rejected(record, exc.reason, exc.detail, ""))
                continue
            item_id = item.item_id
            try:
                admission = self.admit(item, "kafka")
            except InvalidItem as exc:
                result.rejected.append(Rejected(record, exc.reason, exc.detail, item_id))
                continue
            admitted.append(admission)
            result.outputs.append(self._outgoing(admission))
        result.after_flush = lambda: self.ids.mark_published(
            [a.key for a in admitted if not a.repeat])
        return result

    def _count_rejection(self, exc: InvalidItem) -> None:
        self.metrics.items_processed.labels("rejected").inc()
        self.metrics.errors.labels(exc.reason).inc()


def _checked(item: items_pb2.Item, limits: Limits, require_id: bool) -> str:
    """``validate``, with any crash of it turned into a rejection of this item.

    Validation is a pure check of one input, so whatever it raises is about that input; an
    unexpected error is logged as the bug it is, and the item is rejected with reason
    ``handler_error`` instead of failing the call, the stream or the partition.
    """
    try:
        return validate(item, limits, require_id=require_id)
    except InvalidItem:
        raise
    except Exception as exc:
        log.error("validation crashed", exc_info=True, extra={"item_id": item.item_id[:256]})
        raise InvalidItem("handler_error", f"the item could not be validated: "
                                           f"{type(exc).__name__}: {str(exc)[:200]}") from exc
