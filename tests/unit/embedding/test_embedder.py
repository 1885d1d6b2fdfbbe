"""The Embedder's batch handler with a real ItemEncoder (preprocessing, a word-level tokenizer
written here) over a fake encoder in place of Triton: starts nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from tokenizers import Tokenizer, models, pre_tokenizers

from twinstream.common.config import Settings
from twinstream.common.encoding import ItemEncoder
from twinstream.common.errors import TransientError
from twinstream.embedding.service import Embedder
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import items_pb2

DIM = 4


@dataclass
class FakeEncoder:
    """Answers every request with unit vectors (or fails as told) and counts the requests."""

    fail: Exception | None = None
    nan_rows: set[int] = field(default_factory=set)  # rows of each answer that come back NaN
    requests: int = 0
    backend = "fake"

    def encode(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        self.requests += 1
        if self.fail is not None:
            raise self.fail
        rows = len(inputs["input_ids"])
        vectors = np.zeros((rows, DIM), np.float32)
        vectors[:, 0] = 1.0
        for row in self.nan_rows & set(range(rows)):
            vectors[row] = np.nan
        return vectors, np.full(rows, 0.25, np.float32)


@pytest.fixture
def bundle(tmp_path: Path) -> ModelBundle:
    """A text+record bundle whose tokenizer is a word-level one built here (no model files)."""
    tokenizer = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hello": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return ModelBundle(
        path=tmp_path, name="unit", version="3", modalities=("text", "record"), dim=DIM,
        inputs=("input_ids", "attention_mask"), max_length=16, image_size=0, record_fields=(),
        duplicate_threshold=0.9, match_threshold=0.7, ood_threshold=0.5, platt_a=20.0, platt_b=-17.0,
        preprocessing_digest="d", max_batch_size=8, manifest={},
    )


@pytest.fixture
def make_embedder(bundle: ModelBundle) -> Callable[..., tuple[Embedder, FakeEncoder]]:
    def make(fail: Exception | None = None, nan_rows: frozenset[int] = frozenset()) -> tuple[Embedder, FakeEncoder]:
        encoder = FakeEncoder(fail, set(nan_rows))
        return Embedder(Settings(service="embedding"), [ItemEncoder(bundle, encoder)]), encoder
    return make


def record(item_id: str, content: bytes, modality: items_pb2.Modality.ValueType = items_pb2.TEXT,
           offset: int = 0) -> ConsumerRecord:
    accepted = items_pb2.AcceptedItem(
        item=items_pb2.Item(item_id=item_id, tenant="t", collection="c", modality=modality, content=content),
        content_hash=f"h-{item_id}", ingest_time_ms=1000)
    value = accepted.SerializeToString()
    key = f"t/c/{item_id}".encode()
    return ConsumerRecord("items.accepted", 0, -1, offset, 0, 0, key, value, [], None, len(key), len(value), -1)


def test_good_items_are_published_embedded_in_input_order(make_embedder: Callable[..., tuple[Embedder, FakeEncoder]],
                                                          bundle: ModelBundle) -> None:
    embedder, encoder = make_embedder()
    batch = [record("a", b"hello world", offset=0),
             record("b", b'{"name": "hello"}', items_pb2.RECORD, offset=1),
             record("c", b"hello", offset=2)]
    result = embedder(batch)
    assert result.rejected == []
    embedded = [items_pb2.EmbeddedItem.FromString(o.value) for o in result.outputs]
    assert [e.accepted.item.item_id for e in embedded] == ["a", "b", "c"]
    assert [o.key for o in result.outputs] == [r.key for r in batch], "the key keeps the partition"
    assert embedded[0].model == bundle.model_ref and embedded[0].ood_score == pytest.approx(0.25)
    assert list(embedded[0].vector) == [1.0, 0.0, 0.0, 0.0] and encoder.requests == 1


@pytest.mark.parametrize(("content", "modality", "reason"), [
    (b"\xff\xfe not utf-8", items_pb2.TEXT, "invalid_utf8"),
    (b'{"a": NaN}', items_pb2.RECORD, "invalid_record"),
    (b'{"a": {"nested": 1}}', items_pb2.RECORD, "invalid_record"),
    (b"[1, 2]", items_pb2.RECORD, "invalid_record"),
])
def test_bad_content_is_dead_lettered_with_its_reason_and_the_rest_goes_on(
        make_embedder: Callable[..., tuple[Embedder, FakeEncoder]], content: bytes,
        modality: items_pb2.Modality.ValueType, reason: str) -> None:
    embedder, _ = make_embedder()
    result = embedder([record("bad", content, modality, offset=0), record("good", b"hello", offset=1)])
    (rejected,) = result.rejected
    assert (rejected.reason, rejected.item_id, rejected.record.offset) == (reason, "bad", 0)
    assert rejected.detail
    assert [items_pb2.EmbeddedItem.FromString(o.value).accepted.item.item_id for o in result.outputs] == ["good"]


def test_an_item_no_deployed_model_encodes_is_dead_lettered(
        make_embedder: Callable[..., tuple[Embedder, FakeEncoder]]) -> None:
    embedder, encoder = make_embedder()
    result = embedder([record("img", b"\x89PNG", items_pb2.IMAGE)])
    (rejected,) = result.rejected
    assert rejected.reason == "no_encoder_for_modality" and "IMAGE" in rejected.detail
    assert result.outputs == [] and encoder.requests == 0


def test_a_record_that_is_not_an_accepted_item_is_dead_lettered_as_malformed(
        make_embedder: Callable[..., tuple[Embedder, FakeEncoder]]) -> None:
    embedder, _ = make_embedder()
    broken = record("x", b"hello")
    broken = broken._replace(value=b"\xff\xff\xff")
    (rejected,) = embedder([broken]).rejected
    assert rejected.reason == "malformed"


def test_a_transient_encoder_error_fails_the_whole_batch_for_a_retry(
        make_embedder: Callable[..., tuple[Embedder, FakeEncoder]]) -> None:
    embedder, _ = make_embedder(fail=TransientError("Triton unavailable", retry_after_s=1.0))
    with pytest.raises(TransientError, match="Triton"):
        embedder([record("a", b"hello"), record("b", b"hello world", offset=1)])


def test_another_encoder_error_propagates_for_the_loop_to_isolate(
        make_embedder: Callable[..., tuple[Embedder, FakeEncoder]]) -> None:
    embedder, _ = make_embedder(fail=RuntimeError("Triton returned no outputs"))
    with pytest.raises(RuntimeError, match="no outputs"):
        embedder([record("a", b"hello")])


def test_a_non_finite_embedding_is_dead_lettered_and_its_neighbours_published(
        make_embedder: Callable[..., tuple[Embedder, FakeEncoder]]) -> None:
    embedder, _ = make_embedder(nan_rows=frozenset({1}))
    result = embedder([record("a", b"hello"), record("b", b"hello world", offset=1), record("c", b"x", offset=2)])
    (rejected,) = result.rejected
    assert (rejected.reason, rejected.item_id) == ("non_finite_embedding", "b")
    assert [items_pb2.EmbeddedItem.FromString(o.value).accepted.item.item_id for o in result.outputs] == ["a", "c"]
