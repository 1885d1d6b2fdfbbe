"""Perceptual hashes of images: what an image pair is compared on beside the learned cosine.

pHash and dHash, 64 bits each, computed as ``imagehash`` 4.3 computes them (the bench's pHash
baseline) but with numpy's matrix product for the DCT, so the indexer needs no scipy; the DCT
is rounded, so bits that are float noise in imagehash (zero frequencies of symmetric images)
are fixed here. Pure and
deterministic: the same bytes give the same hash on every indexer, so stored hashes compare
across restarts and replays.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIZE = 8
_PHASH_SIDE = HASH_SIZE * 4  # pHash's DCT runs over a 32 x 32 thumbnail


def _dct_matrix(n: int) -> np.ndarray:
    """The unnormalised DCT-II as a matrix: ``x @ M.T`` is ``scipy.fftpack.dct(x)`` (type 2)."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT = _dct_matrix(_PHASH_SIDE)


def _hex(bits: np.ndarray) -> str:
    """Row-major bits, most significant first, as imagehash's ``str(hash)`` writes them."""
    return f"{int(''.join('1' if b else '0' for b in bits.reshape(-1)), 2):0{bits.size // 4}x}"


def phash(image: Image.Image) -> str:
    """The DCT perceptual hash: the 8 x 8 lowest frequencies of the grey 32 x 32 thumbnail,
    each above or below their median (16 hex digits)."""
    pixels = np.asarray(image.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS),
                        dtype=np.float64)
    # rounded: a symmetric image's odd frequencies are zero up to float noise, which would
    # otherwise decide their bits differently on another BLAS (imagehash's bits there are noise)
    low = np.round((_DCT @ pixels @ _DCT.T)[:HASH_SIZE, :HASH_SIZE], 3)
    return _hex(low > np.median(low))


def dhash(image: Image.Image) -> str:
    """The difference hash: whether each pixel of the grey 9 x 8 thumbnail is brighter than its
    left neighbour (16 hex digits)."""
    pixels = np.asarray(image.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS))
    return _hex(pixels[:, 1:] > pixels[:, :-1])


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes of the same length."""
    return (int(a, 16) ^ int(b, 16)).bit_count()
