"""Ingestion's validation rules, one function at a time."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from twinstream.ingestion.validation import (
    InvalidItem,
    Limits,
    assign_item_id,
    parse_item,
    validate,
)
from twinstream.v1 import items_pb2

LIMITS = Limits(max_item_bytes=100_000, max_text_chars=50_000, max_image_pixels=1_000_000)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG that declares ``width`` x ``height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


PNG = _png(4, 3)


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
    (item(content=b"x" * 100_001), "oversize"),
    (item(content=("é" * 50_001).encode()), "oversize"),
    (item(modality=items_pb2.MODALITY_UNSPECIFIED), "unknown_modality"),
    (item(modality=42), "unknown_modality"),
    (item(content=b"caf\xe9 \xff"), "invalid_utf8"),
    (item(item_id=""), "missing_id"),
    (item(item_id="has\nnewline"), "invalid_id"),
    (item(item_id="x" * 257), "invalid_id"),
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


@pytest.mark.parametrize("field", ["tenant", "collection"])
def test_a_trailing_newline_in_a_name_is_rejected(field: str) -> None:
    assert reason(item(**{field: "acme\n"})) == f"invalid_{field}"


def test_metadata_keys_must_match_in_full() -> None:
    assert reason(item(metadata={"city\n": "x"})) == "invalid_metadata"


@pytest.mark.parametrize("item_id", ["10.1145/3299869.3319876", "https://x.org/a?b=%20#c",
                                     "with space", "Zürich/東京 😀"])
def test_ids_with_slashes_queries_spaces_and_non_ascii_are_accepted(item_id: str) -> None:
    candidate = item(item_id=item_id)
    validate(candidate, LIMITS)
    assert candidate.item_id == item_id


RECORD_POISON = {
    "nested_5000_deep": b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "integer_of_5000_digits": b'{"a": ' + b"9" * 5000 + b"}",
    "lone_surrogate_value": b'{"a": "\\ud800"}',
    "lone_surrogate_key": b'{"\\udfff": "x"}',
    "nan_literal": b'{"a": NaN}',
    "infinity_literal": b'{"a": -Infinity}',
    "float_overflow": b'{"a": 1e400}',
    "duplicate_key": b'{"a": 1, "a": 2}',
    "byte_order_mark": "\ufeff{\"a\": 1}".encode(),
}


@pytest.mark.parametrize("case", sorted(RECORD_POISON))
def test_records_that_once_crashed_validation_are_invalid_records(case: str) -> None:
    assert reason(item(modality=items_pb2.RECORD, content=RECORD_POISON[case])) == "invalid_record"


def test_long_but_reasonable_numbers_stay_valid() -> None:
    validate(item(modality=items_pb2.RECORD, content=b'{"a": 12345678901234567890123, "b": 1e300}'),
             LIMITS)


def test_an_image_declaring_20000_by_20000_pixels_is_rejected_from_its_header() -> None:
    bomb = _png_header(20_000, 20_000)
    assert len(bomb) < 200
    assert reason(item(modality=items_pb2.IMAGE, content=bomb)) == "image_too_large"


def test_an_image_over_the_configured_pixel_limit_is_rejected() -> None:
    assert reason(item(modality=items_pb2.IMAGE, content=_png(1001, 1000))) == "image_too_large"
    validate(item(modality=items_pb2.IMAGE, content=_png(1000, 1000)), LIMITS)


def test_an_image_whose_header_does_not_parse_is_rejected() -> None:
    broken = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20
    assert reason(item(modality=items_pb2.IMAGE, content=broken)) == "undecodable_image"


contents = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                            max_size=3),
                 max_leaves=10).map(lambda v: json.dumps(v).encode()),
    st.sampled_from(sorted(RECORD_POISON.values())),
)


@settings(max_examples=400, deadline=None)
@given(content=contents, modality=st.sampled_from([items_pb2.TEXT, items_pb2.RECORD, items_pb2.IMAGE,
                                                   items_pb2.Modality.ValueType(9)]),
       tenant=st.one_of(st.just("acme"), st.text(max_size=70)),
       item_id=st.one_of(st.just("a1"), st.text(max_size=70)),
       metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3))
def test_any_item_is_either_valid_or_an_invalid_item_with_a_reason(
        content: bytes, modality: items_pb2.Modality.ValueType, tenant: str, item_id: str,
        metadata: dict[str, str]) -> None:
    try:
        candidate = items_pb2.Item(item_id=item_id, tenant=tenant, modality=modality,
                                   content=content, metadata=metadata)
    except ValueError:  # protobuf refuses text that is not valid UTF-8 (lone surrogates)
        return
    try:
        validate(candidate, LIMITS)
    except InvalidItem as exc:
        assert exc.reason and exc.reason == exc.reason.lower() and exc.detail
