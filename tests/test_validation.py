"""Ingestion's validation rules, one function at a time."""

from __future__ import annotations

import json

import pytest

from twinstream.ingestion.validation import (
    InvalidItem,
    Limits,
    assign_item_id,
    parse_item,
    validate,
)
from twinstream.v1 import items_pb2

LIMITS = Limits(max_item_bytes=1000, max_text_chars=500)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20


def item(**fields: object) -> items_pb2.Item:
    base: dict[str, object] = {"item_id": "a1", "tenant": "acme", "modality": items_pb2.TEXT,
                               "content": b"hello world"}
    base.update(fields)
    return items_pb2.Item(**base)  # type: ignore[arg-type]


def reason(candidate: items_pb2.Item, require_id: bool = True) -> str:
    with pytest.raises(InvalidItem) as caught:
        validate(candidate, LIMITS, require_id=require_id)
    return caught.value.reason


def test_valid_text_gets_default_collection_and_stable_hash() -> None:
    first, second = item(), item(content=b"  hello world \n")
    assert validate(first, LIMITS) == validate(second, LIMITS)
    assert first.collection == "default"
    assert validate(item(content=b"hello there"), LIMITS) != validate(item(), LIMITS)


@pytest.mark.parametrize(("candidate", "expected"), [
    (item(content=b""), "empty_payload"),
    (item(content=b"   \n\t"), "empty_payload"),
    (item(content=b"x" * 1001), "oversize"),
    (item(content=("é" * 501).encode()), "oversize"),
    (item(modality=items_pb2.MODALITY_UNSPECIFIED), "unknown_modality"),
    (item(modality=42), "unknown_modality"),
    (item(content=b"caf\xe9 \xff"), "invalid_utf8"),
    (item(item_id=""), "missing_id"),
    (item(item_id="has space"), "invalid_id"),
    (item(tenant=""), "missing_tenant"),
    (item(tenant="../etc"), "invalid_tenant"),
    (item(collection="a b"), "invalid_collection"),
    (item(content_type="image/png"), "content_type_mismatch"),
    (item(modality=items_pb2.IMAGE, content=b"GIF? no"), "unsupported_image_format"),
    (item(modality=items_pb2.RECORD, content=b"[1,2]"), "invalid_record"),
    (item(modality=items_pb2.RECORD, content=b"{not json"), "invalid_record"),
    (item(modality=items_pb2.RECORD, content=b'{"a": {"nested": 1}}'), "invalid_record"),
    (item(metadata={"bad key": "v"}), "invalid_metadata"),
    (item(content=b"nul\x00inside"), "invalid_text"),
])
def test_rejections_carry_a_precise_reason(candidate: items_pb2.Item, expected: str) -> None:
    assert reason(candidate) == expected


def test_missing_id_is_allowed_when_ingestion_assigns_it() -> None:
    candidate = item(item_id="")
    digest = validate(candidate, LIMITS, require_id=False)
    assigned = assign_item_id(candidate, digest)
    assert assigned.startswith("h-") and assigned == assign_item_id(candidate, digest)


def test_records_hash_canonically_and_images_by_bytes() -> None:
    a = item(modality=items_pb2.RECORD, content=json.dumps({"x": 1, "y": "b"}).encode())
    b = item(modality=items_pb2.RECORD, content=b'{"y":"b",  "x":1}')
    assert validate(a, LIMITS) == validate(b, LIMITS)
    assert validate(item(modality=items_pb2.IMAGE, content=PNG), LIMITS)


def test_parse_item_rejects_malformed_and_empty_bytes() -> None:
    with pytest.raises(InvalidItem) as caught:
        parse_item(b"\xff\xff\xff\xff not a protobuf")
    assert caught.value.reason == "malformed"
    with pytest.raises(InvalidItem) as caught:
        parse_item(b"")
    assert caught.value.reason == "empty_payload"
    assert parse_item(item().SerializeToString()).item_id == "a1"
