"""Ingestion's logic: gRPC Ingest/IngestStream and the items.raw consumer share one path."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.commands import scope_key
from twinstream.common.config import Settings
from twinstream.common.kafka import BatchResult, Outgoing, Rejected, publish
from twinstream.common.metrics import ERRORS, ITEMS_PROCESSED
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
    """What to do with a valid item: publish ``accepted`` unless it was published already."""

    accepted: items_pb2.AcceptedItem
    key: tuple[str, str, str]
    publish: bool


def partition_key(item: items_pb2.Item) -> bytes:
    """Items of one tenant/collection share a partition, so one consumer sees them in order."""
    return scope_key(item.tenant, item.collection)


class Ingestion(ingestion_pb2_grpc.IngestionServicer):
    def __init__(self, settings: Settings, ids: AcceptedIds, producer: KafkaProducer) -> None:
        self.settings = settings
        self.ids = ids
        self.producer = producer
        self.limits = Limits(settings.max_item_bytes, settings.max_text_chars,
                             settings.max_image_pixels)

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
        return Admission(accepted, key, reserved.state is not Reservation.PUBLISHED)

    def _outgoing(self, admission: Admission) -> Outgoing:
        return Outgoing(self.settings.topics.accepted, partition_key(admission.accepted.item),
                        admission.accepted.SerializeToString())

    def _publish(self, admissions: Sequence[Admission], context: grpc.ServicerContext) -> None:
        fresh = [a for a in admissions if a.publish]
        try:
            publish(self.producer, [self._outgoing(a) for a in fresh], timeout_s=15)
        except Exception as exc:
            self.ids.release([a.key for a in fresh])
            ERRORS.labels("ingestion", "publish_failed").inc()
            log.warning("publishing to items.accepted failed", exc_info=True)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the broker did not accept the items: {exc}")
        self.ids.mark_published([a.key for a in fresh])
        ITEMS_PROCESSED.labels("ingestion", "accepted").inc(len(fresh))
        ITEMS_PROCESSED.labels("ingestion", "already_accepted").inc(len(admissions) - len(fresh))

    # -- gRPC --------------------------------------------------------------------------------
    def Ingest(self, request: ingestion_pb2.IngestRequest,
               context: grpc.ServicerContext) -> ingestion_pb2.IngestResponse:
        """One item; an InvalidItem becomes INVALID_ARGUMENT (ALREADY_EXISTS for an id conflict)
        with details "<reason>: <detail>" in the server's interceptor."""
        admission = self.admit(request.item, "grpc", request.assign_id)
        self._publish([admission], context)
        return ingestion_pb2.IngestResponse(
            item_id=admission.accepted.item.item_id,
            content_hash=admission.accepted.content_hash,
            already_accepted=not admission.publish,
        )

    def IngestStream(self, request_iterator: Iterator[ingestion_pb2.IngestRequest],
                     context: grpc.ServicerContext) -> ingestion_pb2.IngestSummary:
        """Every item gets its own outcome: accepted (its id in ``item_ids``) or a rejection with
        its index and reason; one bad item never fails the call. The call fails as a whole only
        when the broker does not take the items (UNAVAILABLE): items of earlier chunks may then be
        accepted already, and sending the whole stream again is safe (ids are idempotency keys)."""
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
            if admission.publish:
                admitted.append(admission)
                result.outputs.append(self._outgoing(admission))
        result.after_flush = lambda: self.ids.mark_published([a.key for a in admitted])
        return result

    @staticmethod
    def _count_rejection(exc: InvalidItem) -> None:
        ITEMS_PROCESSED.labels("ingestion", "rejected").inc()
        ERRORS.labels("ingestion", exc.reason).inc()


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
