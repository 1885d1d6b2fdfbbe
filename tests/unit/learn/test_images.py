"""Image decoding on the serving path refuses decompression bombs with a ValueError, which the
embedding service turns into a dead letter instead of crashing its batch."""

from __future__ import annotations

import struct
import zlib

import pytest

from twinstream.model.images import load_image, preprocess_image


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (10_000, 10_000)])
def test_a_decompression_bomb_is_a_value_error(width: int, height: int) -> None:
    with pytest.raises(ValueError, match="cannot decode image"):
        preprocess_image(png_declaring(width, height), 16)


def test_a_truncated_image_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(png_declaring(8, 8)[:40])
