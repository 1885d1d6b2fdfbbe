"""Item validation and content hashing. Every rejection carries a reason code and a detail."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass

from twinstream.v1 import items_pb2

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ITEM_ID = re.compile(r"^[A-Za-z0-9_.:@+=-]{1,256}$")
_IMAGE_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
    b"BM": "image/bmp",
}
_CONTENT_TYPES = {
    items_pb2.TEXT: ("text/plain",),
    items_pb2.RECORD: ("application/json",),
    items_pb2.IMAGE: ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp"),
}
MAX_METADATA_KEYS = 64
DEFAULT_COLLECTION = "default"


class InvalidItem(ValueError):
    """The item breaks a rule; ``reason`` is a stable code, ``detail`` says what to fix."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_item_bytes: int
    max_text_chars: int


def parse_item(payload: bytes | None) -> items_pb2.Item:
    """Decode an Item from Kafka bytes; malformed bytes are an InvalidItem."""
    if not payload:
        raise InvalidItem("empty_payload", "the record has no value")
    item = items_pb2.Item()
    try:
        item.ParseFromString(payload)
    except Exception as exc:  # protobuf raises DecodeError (a subclass of Exception)
        raise InvalidItem("malformed", f"not a twinstream.v1.Item: {exc}") from exc
    return item


def assign_item_id(item: items_pb2.Item, content_hash: str) -> str:
    """A deterministic id for items sent without one, so a retried call maps to the same id."""
    key = f"{item.tenant}\x00{item.collection}\x00{content_hash}".encode()
    return "h-" + hashlib.sha256(key).hexdigest()[:32]


def validate(item: items_pb2.Item, limits: Limits, *, require_id: bool = True) -> str:
    """Check ``item`` in place (fills the default collection); return its content hash."""
    if not item.tenant:
        raise InvalidItem("missing_tenant", "tenant is required")
    if not _NAME.match(item.tenant):
        raise InvalidItem("invalid_tenant", "tenant must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    if not item.collection:
        item.collection = DEFAULT_COLLECTION
    elif not _NAME.match(item.collection):
        raise InvalidItem(
            "invalid_collection", "collection must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
        )
    if require_id and not item.item_id:
        raise InvalidItem("missing_id", "item_id is required (it is the idempotency key)")
    if item.item_id and not _ITEM_ID.match(item.item_id):
        raise InvalidItem("invalid_id", "item_id must be 1-256 characters of [A-Za-z0-9_.:@+=-]")
    if item.modality not in (items_pb2.TEXT, items_pb2.IMAGE, items_pb2.RECORD):
        raise InvalidItem(
            "unknown_modality", f"modality {item.modality} is not one of TEXT, IMAGE, RECORD"
        )
    if not item.content:
        raise InvalidItem("empty_payload", "content is empty")
    if len(item.content) > limits.max_item_bytes:
        raise InvalidItem(
            "oversize", f"content is {len(item.content)} bytes; the limit is {limits.max_item_bytes}"
        )
    if item.content_type and item.content_type not in _CONTENT_TYPES[item.modality]:
        raise InvalidItem(
            "content_type_mismatch",
            f"content_type {item.content_type!r} does not fit modality "
            f"{items_pb2.Modality.Name(item.modality)}",
        )
    _validate_metadata(item)
    normalised = _normalised_content(item, limits)
    digest = hashlib.sha256(bytes([item.modality]) + normalised).hexdigest()
    return digest


def _validate_metadata(item: items_pb2.Item) -> None:
    if len(item.metadata) > MAX_METADATA_KEYS:
        raise InvalidItem("invalid_metadata", f"at most {MAX_METADATA_KEYS} metadata keys")
    for key, value in item.metadata.items():
        if not _NAME.match(key):
            raise InvalidItem("invalid_metadata", f"metadata key {key[:40]!r} is not a valid name")
        if len(value) > 1024:
            raise InvalidItem("invalid_metadata", f"metadata value of {key!r} exceeds 1024 chars")


def _normalised_content(item: items_pb2.Item, limits: Limits) -> bytes:
    """The bytes the exact-duplicate hash is taken over."""
    if item.modality == items_pb2.IMAGE:
        if not any(item.content.startswith(m) for m in _IMAGE_MAGIC) and not (
            item.content[:4] == b"RIFF" and item.content[8:12] == b"WEBP"
        ):
            raise InvalidItem(
                "unsupported_image_format", "image must be PNG, JPEG, GIF, BMP or WebP"
            )
        return bytes(item.content)
    try:
        text = item.content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidItem("invalid_utf8", f"content is not valid UTF-8 ({exc.reason} at byte "
                                          f"{exc.start})") from exc
    if "\x00" in text:
        raise InvalidItem("invalid_text", "content contains NUL characters")
    if not text.strip():
        raise InvalidItem("empty_payload", "content is only whitespace")
    if len(text) > limits.max_text_chars:
        raise InvalidItem("oversize", f"text is {len(text)} characters; the limit is "
                                      f"{limits.max_text_chars}")
    if item.modality == items_pb2.RECORD:
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidItem("invalid_record", f"record is not valid JSON: {exc}") from exc
        if not isinstance(record, dict) or not record:
            raise InvalidItem("invalid_record", "record must be a non-empty JSON object")
        for key, value in record.items():
            if isinstance(value, dict | list):
                raise InvalidItem("invalid_record", f"field {key!r} must be a scalar")
        return json.dumps(record, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()
    return unicodedata.normalize("NFC", text).strip().encode()
