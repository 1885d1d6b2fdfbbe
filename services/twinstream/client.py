"""A small typed client for the Ingestion and Matching gRPC APIs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc

from twinstream.v1 import (
    ingestion_pb2,
    ingestion_pb2_grpc,
    items_pb2,
    matching_pb2,
    matching_pb2_grpc,
)

Modality = items_pb2.Modality


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
    """Talks to ingestion and matching; use as a context manager to close the channels."""

    ingestion_target: str = "127.0.0.1:50051"
    matching_target: str = "127.0.0.1:50054"
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self._ingest_channel = grpc.insecure_channel(self.ingestion_target)
        self._match_channel = grpc.insecure_channel(self.matching_target)
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
    def ingest(self, item: items_pb2.Item, assign_id: bool = False) -> ingestion_pb2.IngestResponse:
        request = ingestion_pb2.IngestRequest(item=item, assign_id=assign_id)
        response: ingestion_pb2.IngestResponse = self.ingestion.Ingest(request, timeout=self.timeout_s)
        return response

    def ingest_many(self, items: Iterable[items_pb2.Item],
                    assign_id: bool = False) -> ingestion_pb2.IngestSummary:
        """Stream items in one call; bad items come back as rejections, the rest are accepted."""
        requests = (ingestion_pb2.IngestRequest(item=i, assign_id=assign_id) for i in items)
        summary: ingestion_pb2.IngestSummary = self.ingestion.IngestStream(
            requests, timeout=max(self.timeout_s, 600))
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
