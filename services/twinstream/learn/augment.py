"""Near-duplicate generators: the positives for text and images.

Text: the edits reposting, scraping and OCR make (typos, dropped or swapped words, case and
punctuation changes, truncation, boilerplate). Images: DISC21-style transformations from
``augly.image`` (crops, rotations, re-encoding, colour changes, overlays of text and emoji).
Both take an explicit ``random.Random`` so a seed fixes every view.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from PIL import Image

BOILERPLATE = ["Posted by admin", "Read more", "Share this:", "Originally published on the blog.",
               "[edit]", "Advertisement", "Click here to subscribe", "Copyright (c) all rights reserved"]


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:  # transpose
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:  # drop
        return word[:i] + word[i + 1:]
    return word[:i] + rng.choice(string.ascii_lowercase) + word[i + 1:]  # substitute


def _typos(words: list[str], rng: random.Random) -> list[str]:
    return [_typo(w, rng) if rng.random() < 0.12 else w for w in words]


def _drop_words(words: list[str], rng: random.Random) -> list[str]:
    kept = [w for w in words if rng.random() > 0.12]
    return kept or words


def _swap_neighbours(words: list[str], rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(max(1, len(words) // 15)):
        i = rng.randrange(max(1, len(words) - 1))
        words[i:i + 2] = words[i:i + 2][::-1]
    return words


def _change_case(words: list[str], rng: random.Random) -> list[str]:
    style = rng.choice([str.lower, str.upper, str.title])
    return [style(w) if rng.random() < 0.5 else w for w in words]


def _strip_punctuation(words: list[str], rng: random.Random) -> list[str]:
    table = str.maketrans("", "", ",.;:()\"'")
    return [w.translate(table) or w for w in words]


def _truncate(words: list[str], rng: random.Random) -> list[str]:
    cut = max(1, int(len(words) * rng.uniform(0.1, 0.25)))
    return words[cut:] if rng.random() < 0.5 else words[:-cut]


def _boilerplate(words: list[str], rng: random.Random) -> list[str]:
    extra = rng.choice(BOILERPLATE).split()
    return extra + words if rng.random() < 0.5 else words + extra


TEXT_EDITS: list[Callable[[list[str], random.Random], list[str]]] = [
    _typos, _drop_words, _swap_neighbours, _change_case, _strip_punctuation, _truncate, _boilerplate,
]


def perturb_text(text: str, rng: random.Random) -> str:
    """A near-duplicate of ``text``: two to four random edits."""
    words = text.split()
    for edit in rng.sample(TEXT_EDITS, rng.randint(2, 4)):
        words = edit(words, rng)
    return " ".join(words)


def _color(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


ImageEdit = Callable[[Image.Image, random.Random], Image.Image]


def _image_edits() -> list[ImageEdit]:
    import augly.image as imaugs

    def crop(img: Image.Image, rng: random.Random) -> Image.Image:
        x1, y1 = rng.uniform(0, 0.2), rng.uniform(0, 0.2)
        return imaugs.crop(img, x1=x1, y1=y1, x2=x1 + rng.uniform(0.7, 0.8), y2=y1 + rng.uniform(0.7, 0.8))

    return [
        crop,
        lambda img, rng: imaugs.rotate(img, degrees=rng.uniform(-25, 25)),
        lambda img, rng: imaugs.hflip(img),
        lambda img, rng: imaugs.blur(img, radius=rng.uniform(0.5, 2.0)),
        lambda img, rng: imaugs.color_jitter(img, brightness_factor=rng.uniform(0.6, 1.4),
                                             contrast_factor=rng.uniform(0.6, 1.4),
                                             saturation_factor=rng.uniform(0.3, 1.7)),
        lambda img, rng: imaugs.grayscale(img),
        lambda img, rng: imaugs.encoding_quality(img, quality=rng.randint(10, 40)),
        lambda img, rng: imaugs.pixelization(img, ratio=rng.uniform(0.3, 0.6)),
        lambda img, rng: imaugs.random_noise(img, var=rng.uniform(0.002, 0.02), seed=rng.randrange(2**31)),
        lambda img, rng: imaugs.overlay_text(img, text=[[rng.randrange(1000) for _ in range(8)]],
                                             font_size=rng.uniform(0.1, 0.2), color=_color(rng),
                                             x_pos=rng.uniform(0, 0.4), y_pos=rng.uniform(0, 0.8)),
        lambda img, rng: imaugs.overlay_emoji(img, emoji_size=rng.uniform(0.15, 0.3),
                                              x_pos=rng.uniform(0, 0.7), y_pos=rng.uniform(0, 0.7)),
        lambda img, rng: imaugs.overlay_stripes(img, line_width=rng.uniform(0.1, 0.4),
                                                line_color=_color(rng), line_angle=rng.uniform(-45, 45),
                                                line_density=rng.uniform(0.2, 0.5),
                                                line_opacity=rng.uniform(0.3, 0.7)),
        lambda img, rng: imaugs.pad(img, w_factor=rng.uniform(0.05, 0.25),
                                    h_factor=rng.uniform(0.05, 0.25), color=_color(rng)),
        lambda img, rng: imaugs.skew(img, skew_factor=rng.uniform(-0.3, 0.3)),
        lambda img, rng: imaugs.scale(img, factor=rng.uniform(0.3, 0.6)),
    ]


_IMAGE_EDITS: list[ImageEdit] = []


def apply_random_edits(image: Image.Image, edits: list[ImageEdit], rng: random.Random, most: int = 3) -> Image.Image:
    """``image`` after one to ``most`` distinct edits drawn from ``edits`` (RGB after each)."""
    for edit in rng.sample(edits, rng.randint(1, most)):
        image = edit(image, rng).convert("RGB")
    return image


def augment_image(image: Image.Image, rng: random.Random) -> Image.Image:
    """A DISC21-style copy of ``image``: one to three augly transformations."""
    if not _IMAGE_EDITS:
        _IMAGE_EDITS.extend(_image_edits())
    return apply_random_edits(image, _IMAGE_EDITS, rng)
