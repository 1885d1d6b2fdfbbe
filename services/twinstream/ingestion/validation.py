"""Item validation and content hashing. Every rejection carries a reason code and a detail."""

from __future__ import annotations

import hashlib
import io
import json
import unicodedata
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from twinstream.common.encoding import ContentError, load_record
from twinstream.common.names import DEFAULT_COLLECTION, ITEM_ID_RULE, NAME_RULE, is_item_id, is_name
from twinstream.common.status import InvalidArgument
from twinstream.v1 import items_pb2

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


class InvalidItem(InvalidArgument):
    """The item breaks a rule; ``reason`` is a stable code, ``detail`` says what to fix.

    Over gRPC it is INVALID_ARGUMENT with details ``"<reason>: <detail>"``; on items.raw, a
    dead letter with the reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail, reason)


@dataclass(frozen=True)
class Limits:
    max_item_bytes: int
    max_text_chars: int
    # Width x height an image may declare: decoding allocates ~4 bytes per pixel, so a 1 KiB
    # PNG declaring 20000x20000 would take 1.6 GB in embedding (Pillow's DecompressionBombError).
    max_image_pixels: int = 40_000_000


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
    if not is_name(item.tenant):
        raise InvalidItem("invalid_tenant", f"tenant must be {NAME_RULE}")
    if not item.collection:
        item.collection = DEFAULT_COLLECTION
    elif not is_name(item.collection):
        raise InvalidItem("invalid_collection", f"collection must be {NAME_RULE}")
    if require_id and not item.item_id:
        raise InvalidItem("missing_id", "item_id is required (it is the idempotency key)")
    if item.item_id and not is_item_id(item.item_id):
        raise InvalidItem("invalid_id", f"item_id must be {ITEM_ID_RULE}")
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
        if not is_name(key):
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
        _check_image_size(item.content, limits.max_image_pixels)
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
            record = load_record(text)
        except ContentError as exc:
            raise InvalidItem(exc.reason, exc.detail) from exc
        return json.dumps(record, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()
    return unicodedata.normalize("NFC", text).strip().encode()


def _check_image_size(content: bytes, max_pixels: int) -> None:
    """Read only the header (Pillow's ``open`` is lazy) and refuse images too large to decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as image:
                width, height = image.size
    except Image.DecompressionBombError as exc:
        raise InvalidItem("image_too_large", f"{exc}; the limit is {max_pixels} pixels") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidItem("undecodable_image", f"the image header cannot be read: {exc}") from exc
    if width * height > max_pixels:
        raise InvalidItem("image_too_large", f"the image declares {width}x{height} pixels; "
                                             f"the limit is {max_pixels}")
