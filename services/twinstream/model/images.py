"""Image decoding and preprocessing shared by training and the embedding service."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.25, 0.25, 0.25], dtype=np.float32)


def load_image(data: bytes) -> Image.Image:
    """Decode ``data``; ValueError for anything Pillow refuses, decompression bombs included
    (over ``Image.MAX_IMAGE_PIXELS``: ingestion rejects smaller limits from the header first)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"cannot decode image: {exc}") from exc
    return image.convert("RGB")


def to_tensor(image: Image.Image, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` and normalise to float32 [3, size, size]."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return np.ascontiguousarray(((array - MEAN) / STD).transpose(2, 0, 1))


def preprocess_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> float32 [3, size, size]; ValueError if they don't decode."""
    return to_tensor(load_image(data), size)
