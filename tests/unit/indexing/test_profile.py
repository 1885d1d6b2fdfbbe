"""Content profiles and the collection's profile reference (indexing/profile.py), and the OOD
rule they feed (indexing/decide.py): foreign items the cosine lets through are refused."""

from __future__ import annotations

import json
import math
import random

from PIL import Image, ImageDraw, ImageEnhance

from twinstream.indexing.calibration import WARMUP_ITEMS, CollectionState, Observation, image_signals, text_signals
from twinstream.indexing.decide import Candidate, decide, item_signals, observation
from twinstream.indexing.profile import (
    IMAGE_LIMIT_RATIO,
    K,
    ProfileReference,
    fit_reference,
    image_profile,
    of_signals,
    text_profile,
)
from twinstream.v1 import decisions_pb2, items_pb2

from .test_decide import BUNDLE, embedded

WORDS = ("the", "collection", "returns", "a", "value", "of", "each", "item", "when", "its", "stream", "is",
         "read", "and", "written", "by", "an", "index", "that", "keeps", "order", "for", "every", "new", "record",
         "partition", "consumer", "offsets", "committed", "downstream", "idempotent", "calibration", "threshold")


def prose(rng: random.Random) -> str:
    """A docstring-like paragraph: a few sentences of words, some with commas, numbers or names."""
    sentences = []
    for _ in range(rng.randint(2, 5)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(1, 2048)))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(("Milvus", "Kafka", "NumPy", "JSON")))
        if rng.random() < 0.5:
            words[rng.randrange(len(words) - 1)] += ","
        sentences.append(" ".join(words).capitalize() + rng.choice((".", ".", ".", "!", "?")))
    return " ".join(sentences)


def code(rng: random.Random) -> str:
    """A Python function of a few indented lines."""
    name = "_".join(rng.choice(WORDS) for _ in range(2))
    body = [f"    {rng.choice(WORDS)}_{k} = self.{rng.choice(WORDS)}[{k}:{k + 2}]" for k in range(rng.randint(2, 6))]
    return "\n".join([f"def {name}(self, key=None):", *body, f"    return {{'{name}': key}}"])


def photo(seed: int) -> Image.Image:
    """A photo-like picture: smooth colour gradients with noise, no background."""
    rng = random.Random(seed)
    image = Image.new("RGB", (96, 80))
    pixels = [(int(128 + 100 * math.sin(x / (5 + seed % 7))) + rng.randint(-20, 20),
               int(90 + 80 * math.cos(y / 9)) + rng.randint(-20, 20), (x * y + seed * 17) % 200)
              for y in range(80) for x in range(96)]
    image.putdata(pixels)
    return image


def page(seed: int) -> Image.Image:
    """A page of text: black lines of characters on white."""
    rng = random.Random(seed)
    image = Image.new("RGB", (300, 420), "white")
    draw = ImageDraw.Draw(image)
    for y in range(20, 400, 14):
        draw.text((20, y), code(rng).splitlines()[0][:40], fill="black")
    return image


def dark_photo(seed: int) -> Image.Image:
    """A dark, flat, colourless picture (a night sky, a moon on black): few grey levels, no background."""
    rng = random.Random(seed)
    image = Image.new("RGB", (120, 100))
    image.putdata([(v, v, v) for v in (max(0, min(255, 20 + (x + y) // 12 + rng.randint(-8, 8)))
                                       for y in range(100) for x in range(120))])
    return image


def sparse_page(seed: int) -> Image.Image:
    """A page with a few short lines of small grey-black text, mostly blank (a short snippet on a page)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (420, 594), "white")
    draw = ImageDraw.Draw(image)
    for y in range(30, 30 + 14 * rng.randint(3, 8), 14):
        draw.text((30, y), code(rng).splitlines()[-1][:40], fill="black")
    return image


def reference_state(texts: list[str]) -> CollectionState:
    """A text collection that accepted ``texts`` (best neighbours around 0.8: above its floor)."""
    state = CollectionState()
    for k, text in enumerate(texts):
        state.observe(Observation(0.7 + 0.2 * (k % 10) / 10, 0.5, (), tuple(text_profile(text))))
    return state


def decided(text: str, state: CollectionState) -> decisions_pb2.Decision:
    """``text`` decided in the collection of ``state``, its best neighbour as similar as the
    collection's typical items (the cosine rule alone would keep it)."""
    return decide(embedded(), [Candidate("a", 0.8, "a", 10)], BUNDLE, 3, 5, state.calibration, text_signals(text))


def test_code_and_prose_have_different_text_profiles() -> None:
    rng = random.Random(1)
    words, source = text_profile(prose(rng)), text_profile(code(rng))
    assert source[3] > words[3] + 0.05  # code punctuation: ( ) [ ] = _ :
    assert source[7] > 0.5 and words[7] == 0.0  # indented lines
    assert text_profile(code(random.Random(2))) == text_profile(code(random.Random(2)))  # deterministic


def test_a_page_of_text_has_another_image_profile_than_a_photo() -> None:
    picture, text = image_profile(photo(3)), image_profile(page(3))
    white, saturation, _, strokes, brightness, blank_rows = range(6)
    assert text[white] > 0.7 > picture[white]
    assert text[saturation] == 0.0 < picture[saturation]
    assert text[strokes] > picture[strokes]
    assert text[brightness] > 0.8 > picture[brightness]
    assert text[blank_rows] > 0.2 and picture[blank_rows] == 0.0  # line gaps and margins


def test_a_sparse_page_is_told_from_a_dark_flat_photo_by_brightness_and_blank_rows() -> None:
    # both are colourless, of few grey levels and (at the thumbnail) almost without strokes
    night, text = image_profile(dark_photo(1)), image_profile(sparse_page(1))
    _, saturation, entropy, _, brightness, blank_rows = range(6)
    assert night[saturation] == text[saturation] == 0.0 and abs(night[entropy] - text[entropy]) < 0.3
    assert text[brightness] > 0.9 > 0.2 > night[brightness]
    assert text[blank_rows] > 0.8 > 0.0 == night[blank_rows]


def image_state(images: list[Image.Image]) -> CollectionState:
    """An image collection that accepted ``images`` (best neighbours above its floor)."""
    state = CollectionState()
    for k, image in enumerate(images):
        signals = image_signals(image)
        state.field_names(signals)
        state.observe(Observation(0.7 + 0.2 * (k % 10) / 10, 0.5, (), of_signals(signals)))
    return state


def test_an_image_collection_refuses_a_page_that_its_dark_flat_photos_stand_beside() -> None:
    state = image_state([photo(k) if k % 4 else dark_photo(k) for k in range(WARMUP_ITEMS)])
    reference = state.calibration.profile
    assert reference is not None
    assert all(reference.distance(image_profile(sparse_page(k))) > reference.limit for k in range(10))
    kept = [photo(k) for k in range(100, 130)] + [dark_photo(k) for k in range(100, 110)]
    assert all(reference.distance(image_profile(image)) <= reference.limit for image in kept)


def varied(seed: int, brighter: float = 1.0) -> Image.Image:
    """``photo(seed)`` of another colourfulness and brightness (``brighter``: a copy's change)."""
    image = ImageEnhance.Color(photo(seed)).enhance((seed % 5) / 4)
    return ImageEnhance.Brightness(image).enhance((0.4 + (seed % 7) / 6) * brighter)


def test_an_image_references_limit_stays_within_a_quarter_beyond_its_second_farthest_item() -> None:
    # a young collection: 8 pictures with 4 copies each, and 10 pictures alone
    images = [varied(k, 1 + 0.03 * j) for k in range(8) for j in range(5)] + [varied(100 + k) for k in range(10)]
    profiles = [image_profile(image) for image in images]
    uncapped, capped = fit_reference(profiles), fit_reference(profiles, IMAGE_LIMIT_RATIO)
    assert uncapped is not None and capped is not None
    assert capped.limit < 0.8 * uncapped.limit  # the quantile rule's margin reached far beyond the items
    own = sorted(capped.distance(p) for p in profiles)
    assert own[-2] < capped.limit  # its own items stay within, but for its one farthest
    assert image_state(images).calibration.profile == capped  # an image collection fits with the cap
    texts = reference_state([prose(random.Random(k)) for k in range(WARMUP_ITEMS)])
    assert texts.calibration.profile == fit_reference(texts.profiles)  # text keeps the quantile rule


def test_items_carry_their_profile_in_their_signals() -> None:
    text = prose(random.Random(4))
    item = items_pb2.Item(item_id="x", tenant="t", modality=items_pb2.TEXT, content=text.encode())
    assert of_signals(item_signals(item)) == tuple(text_profile(text))
    record = items_pb2.Item(item_id="r", tenant="t", modality=items_pb2.RECORD, content=b'{"name": "x"}')
    assert of_signals(item_signals(record)) == ()  # records keep their own rule


def test_a_collection_refuses_a_foreign_item_after_its_warm_up_and_not_during_it() -> None:
    rng = random.Random(5)
    young = reference_state([prose(rng) for _ in range(WARMUP_ITEMS - 1)])
    assert decided(code(rng), young).kind != decisions_pb2.OUT_OF_DISTRIBUTION
    warm = reference_state([prose(rng) for _ in range(WARMUP_ITEMS)])
    foreign = decided(code(rng), warm)
    assert foreign.kind == decisions_pb2.OUT_OF_DISTRIBUTION
    assert foreign.profile_distance > foreign.thresholds.ood_profile  # the decision says why
    assert decided(prose(rng), warm).kind != decisions_pb2.OUT_OF_DISTRIBUTION


def test_in_distribution_items_are_kept() -> None:
    rng = random.Random(6)
    reference = fit_reference([text_profile(prose(rng)) for _ in range(128)])
    assert reference is not None
    later = [reference.distance(text_profile(prose(rng))) for _ in range(300)]
    assert sum(d > reference.limit for d in later) <= 0.02 * len(later)


def test_accepted_foreign_items_fewer_than_k_do_not_make_the_next_one_typical() -> None:
    rng = random.Random(7)
    texts = [prose(rng) for _ in range(WARMUP_ITEMS - (K - 1))] + [code(rng) for _ in range(K - 1)]
    state = reference_state(texts)  # K - 1 foreign items got in during the warm-up
    assert state.calibration.profile is not None
    assert decided(code(rng), state).kind == decisions_pb2.OUT_OF_DISTRIBUTION


def test_a_refused_item_does_not_join_the_reference() -> None:
    rng = random.Random(8)
    state = reference_state([prose(rng) for _ in range(WARMUP_ITEMS)])
    foreign = decided(code(rng), state)
    assert observation(foreign, [Candidate("a", 0.8, "a", 10)], text_signals(code(rng))) is None


def test_the_profile_state_round_trips_through_json_and_decides_the_same() -> None:
    rng = random.Random(9)
    state = reference_state([prose(rng) for _ in range(WARMUP_ITEMS + 7)])
    text = state.to_json()
    back = CollectionState.from_json(text)
    assert back.to_json() == text
    assert back.calibration.profile == state.calibration.profile and back.profiles == state.profiles
    item = code(rng)
    assert decided(item, back).SerializeToString() == decided(item, state).SerializeToString()


def test_a_profile_of_another_kind_is_not_measured() -> None:
    reference = ProfileReference((0.0, 0.0), (1.0, 1.0), ((0.0, 0.0),) * 10, 1.0)
    assert math.isnan(reference.distance([0.5, 0.5, 0.5]))


def test_a_long_text_collections_state_stays_well_under_milvuss_64_kib_string() -> None:
    rng = random.Random(10)
    state = CollectionState()
    state.field_names({"minhash": [1], "shingles": 3})
    for _ in range(3000):  # every window full: 2 x 2048 scores, the profile window and the reference
        state.observe(Observation(rng.uniform(0.3, 0.99), rng.uniform(0.1, 0.9), ("012",),
                                  tuple(round(rng.uniform(0, 5), 3) for _ in range(len(text_profile("x"))))))
    assert state.calibration.profile is not None
    assert len(state.to_json().encode()) < 56 * 1024


def test_a_state_stored_before_profiles_existed_reads_back_without_a_reference() -> None:
    rng = random.Random(11)
    raw = json.loads(reference_state([prose(rng) for _ in range(WARMUP_ITEMS)]).to_json())
    del raw["profile_reference"], raw["profiles"]
    old = CollectionState.from_json(json.dumps(raw))
    assert old.calibration.profile is None and old.profiles == []
    assert decided(code(rng), old).thresholds.ood_profile == math.inf  # nothing refused by a profile
