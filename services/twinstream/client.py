"""A small typed client for the Ingestion and Matching gRPC APIs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from twinstream.common.security import ClientCredentials
from twinstream.v1 import (
    ingestion_pb2,
    ingestion_pb2_grpc,
    items_pb2,
    matching_pb2,
    matching_pb2_grpc,
)

Modality = items_pb2.Modality
R = TypeVar("R")
# The trailer ingestion sets with RESOURCE_EXHAUSTED (backpressure) and UNAVAILABLE (broker down).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def pushback_s(error: grpc.RpcError) -> float | None:
    """The server's retry-after, in seconds, if it asked the client to come back later."""
    if error.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        return None
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for datum in trailers or ():
        if datum.key == RETRY_PUSHBACK_KEY:
            try:
                return max(0.0, int(datum.value) / 1000)
            except ValueError:
                return None
    return None


def text_item(item_id: str, text: str, tenant: str, collection: str = "default",
              metadata: Mapping[str, str] | None = None) -> items_pb2.Item:
    return items_pb2.Item(item_id=item_id, tenant=tenant, collection=collection,
                          modality=items_pb2.TEXT, content=text.encode(), metadata=metadata or {})


def record_item(item_id: str, record: Mapping[str, object], tenant: str,
                collection: str = "default",
                metadata: Mapping[str, str] | None = None) -> items_pb2.Item:
    return items_pb2.Item(item_id=item_id, tenant=tenant, collection=collection,
                          modality=items_pb2.RECORD, content=json.dumps(record).encode(),
                          metadata=metadata or {})


def image_item(item_id: str, data: bytes, tenant: str, collection: str = "default",
               metadata: Mapping[str, str] | None = None) -> items_pb2.Item:
    return items_pb2.Item(item_id=item_id, tenant=tenant, collection=collection,
                          modality=items_pb2.IMAGE, content=data, metadata=metadata or {})


@dataclass
class TwinstreamClient:
    """Talks to ingestion and matching; use as a context manager to close the channels.

    TLS (verified against the system's roots unless ``credentials`` names a CA) by default;
    ``ClientCredentials.plaintext()`` only when asked. The token in ``credentials`` goes with
    every call (``twinstream token issue``).
    """

    ingestion_target: str = "127.0.0.1:50051"
    matching_target: str = "127.0.0.1:50054"
    timeout_s: float = 30.0
    # How long ingest calls keep honouring the server's retry-after before giving up (0: never).
    retry_budget_s: float = 120.0
    credentials: ClientCredentials = field(default_factory=ClientCredentials)

    def __post_init__(self) -> None:
        self._ingest_channel = self.credentials.channel(self.ingestion_target)
        self._match_channel = self.credentials.channel(self.matching_target)
        self.ingestion = ingestion_pb2_grpc.IngestionStub(self._ingest_channel)
        self.matching = matching_pb2_grpc.MatchingStub(self._match_channel)

    def __enter__(self) -> TwinstreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._ingest_channel.close()
        self._match_channel.close()

    # -- ingestion ---------------------------------------------------------------------------
    def _with_pushback(self, call: Callable[[], R]) -> R:
        """Run ``call``; while the server answers with a retry-after, wait that long and retry.

        Safe because ingestion is idempotent: the item id is the idempotency key.
        """
        deadline = time.monotonic() + self.retry_budget_s
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                wait_s = pushback_s(error)
                if wait_s is None or time.monotonic() + wait_s > deadline:
                    raise
                time.sleep(wait_s)

    def ingest(self, item: items_pb2.Item, assign_id: bool = False) -> ingestion_pb2.IngestResponse:
        request = ingestion_pb2.IngestRequest(item=item, assign_id=assign_id)
        response: ingestion_pb2.IngestResponse = self._with_pushback(
            lambda: self.ingestion.Ingest(request, timeout=self.timeout_s))
        return response

    def ingest_many(self, items: Iterable[items_pb2.Item],
                    assign_id: bool = False) -> ingestion_pb2.IngestSummary:
        """Stream items in one call; bad items come back as rejections, the rest are accepted."""
        requests = [ingestion_pb2.IngestRequest(item=i, assign_id=assign_id) for i in items]
        summary: ingestion_pb2.IngestSummary = self._with_pushback(
            lambda: self.ingestion.IngestStream(iter(requests), timeout=max(self.timeout_s, 600)))
        return summary

    # -- matching ----------------------------------------------------------------------------
    def match(self, tenant: str, *, item_id: str = "", text: str | None = None,
              content: bytes | None = None,
              modality: items_pb2.Modality.ValueType = items_pb2.TEXT,
              vector: Sequence[float] | None = None, collection: str = "default", k: int = 10,
              min_score: float = 0.0,
              filters: Sequence[matching_pb2.MetadataCondition] = (), from_time_ms: int = 0,
              to_time_ms: int = 0, page_token: str = "") -> matching_pb2.MatchResponse:
        request = matching_pb2.MatchRequest(
            tenant=tenant, collection=collection, k=k, min_score=min_score, filters=filters,
            from_time_ms=from_time_ms, to_time_ms=to_time_ms, page_token=page_token,
        )
        if item_id:
            request.item_id = item_id
        elif text is not None:
            request.content.CopyFrom(matching_pb2.QueryContent(modality=items_pb2.TEXT,
                                                               content=text.encode()))
        elif content is not None:
            request.content.CopyFrom(matching_pb2.QueryContent(modality=modality, content=content))
        elif vector is not None:
            request.vector.values.extend(vector)
        response: matching_pb2.MatchResponse = self.matching.Match(request, timeout=self.timeout_s)
        return response

    def match_stream(self, requests: Iterable[matching_pb2.MatchRequest]
                     ) -> Iterator[matching_pb2.MatchResponse]:
        return iter(self.matching.MatchStream(iter(requests), timeout=max(self.timeout_s, 600)))

    def get(self, tenant: str, item_id: str, collection: str = "default") -> matching_pb2.StoredItem:
        request = matching_pb2.GetRequest(tenant=tenant, collection=collection, item_id=item_id)
        item: matching_pb2.StoredItem = self.matching.Get(request, timeout=self.timeout_s)
        return item

    def delete(self, tenant: str, item_ids: Sequence[str] = (), collection: str = "default",
               filters: Sequence[matching_pb2.MetadataCondition] = ()) -> int:
        request = matching_pb2.DeleteRequest(tenant=tenant, collection=collection,
                                             item_ids=list(item_ids), filters=filters)
        response: matching_pb2.DeleteResponse = self.matching.Delete(request, timeout=self.timeout_s)
        return int(response.deleted)

    def cluster(self, tenant: str, item_id: str, collection: str = "default") -> matching_pb2.Cluster:
        request = matching_pb2.GetClusterRequest(tenant=tenant, collection=collection,
                                                 item_id=item_id)
        cluster: matching_pb2.Cluster = self.matching.GetCluster(request, timeout=self.timeout_s)
        return cluster
