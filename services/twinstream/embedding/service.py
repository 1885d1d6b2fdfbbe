"""Embedding's batch handler: preprocess, encode per model, publish the vectors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.config import Settings
from twinstream.common.encoding import ContentError, ItemEncoder
from twinstream.common.kafka import BatchResult, Outgoing, Rejected, parse_record
from twinstream.v1 import items_pb2


class Embedder:
    """Turns a batch of AcceptedItem records into EmbeddedItem messages.

    Content that cannot be encoded becomes a dead letter. Triton being down raises
    TransientError (common/encoding.py), so the batch is retried after a backoff; any other
    encoder failure is isolated by the stream loop down to the record that causes it.
    """

    def __init__(self, settings: Settings, encoders: Sequence[ItemEncoder]) -> None:
        self.settings = settings
        self.encoders = list(encoders)

    def encoder_for(self, modality: int) -> ItemEncoder | None:
        return next((e for e in self.encoders if e.bundle.serves(modality)), None)

    def __call__(self, records: Sequence[ConsumerRecord]) -> BatchResult:
        result = BatchResult()
        groups: dict[int, list[tuple[int, items_pb2.AcceptedItem, str | np.ndarray]]] = {}
        outputs: dict[int, Outgoing] = {}
        for index, record in enumerate(records):
            accepted = parse_record(record, items_pb2.AcceptedItem)
            if isinstance(accepted, Rejected):
                result.rejected.append(accepted)
                continue
            item = accepted.item
            encoder = self.encoder_for(item.modality)
            if encoder is None:
                result.rejected.append(Rejected(
                    record, "no_encoder_for_modality",
                    f"no deployed model encodes {items_pb2.Modality.Name(item.modality)}",
                    item.item_id))
                continue
            try:
                prepared = encoder.model_input(item.modality, item.content)
            except ContentError as exc:
                result.rejected.append(Rejected(record, exc.reason, exc.detail, item.item_id))
                continue
            groups.setdefault(id(encoder), []).append((index, accepted, prepared))
        for members in groups.values():
            encoder = self.encoder_for(members[0][1].item.modality)
            assert encoder is not None
            embedded = encoder.encode([m[2] for m in members])
            for (index, accepted, _), vector, ood in zip(
                members, embedded.vectors, embedded.ood_scores, strict=True
            ):
                record = records[index]
                if not np.all(np.isfinite(vector)):
                    result.rejected.append(Rejected(record, "non_finite_embedding",
                                                    "the encoder produced NaN/inf",
                                                    accepted.item.item_id))
                    continue
                message = items_pb2.EmbeddedItem(
                    accepted=accepted, vector=vector.tolist(), model=encoder.bundle.model_ref,
                    ood_score=float(ood),
                )
                outputs[index] = Outgoing(self.settings.topics.embedded, record.key or b"",
                                          message.SerializeToString())
        # publish in input order, so each partition's order carries through to the indexer
        result.outputs = [outputs[i] for i in sorted(outputs)]
        return result
