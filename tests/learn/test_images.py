from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from twinstream.model.images import preprocess_image


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decodes_to_normalised_chw(fmt: str) -> None:
    image = Image.new("RGB", (40, 30), (255, 0, 128))
    array = preprocess_image(_encoded(image, fmt), 16)
    assert array.shape == (3, 16, 16) and array.dtype == np.float32
    red, green = array[0].mean(), array[1].mean()
    assert red > 1.5 and green < -1.5  # (1 - 0.5) / 0.25 = 2, (0 - 0.5) / 0.25 = -2


def test_grayscale_becomes_three_channels() -> None:
    array = preprocess_image(_encoded(Image.new("L", (8, 8), 128), "PNG"), 8)
    assert array.shape == (3, 8, 8)
    assert np.allclose(array[0], array[1]) and np.allclose(array[1], array[2])


@pytest.mark.parametrize("data", [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_undecodable_bytes_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="cannot decode image"):
        preprocess_image(data, 16)
