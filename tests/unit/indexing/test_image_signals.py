"""Images' pair signals: perceptual hashes beside the cosine, compared into levels for the pair model."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from twinstream.indexing import perceptual
from twinstream.indexing.calibration import (
    IMAGE_SIGNALS,
    PRIOR_DUPLICATE,
    CollectionState,
    compare,
    fit_fields,
    image_signals,
)
from twinstream.indexing.decide import Candidate, compare_fields, decide, item_signals, linked_clusters
from twinstream.v1 import decisions_pb2, items_pb2

from .test_decide import BUNDLE, embedded


def picture(seed: int) -> Image.Image:
    """Smooth random blobs (what a photo looks like to a perceptual hash), 128 px."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((128, 128), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def image(item: items_pb2.EmbeddedItem) -> items_pb2.EmbeddedItem:
    item.accepted.item.modality = items_pb2.IMAGE
    return item


def image_item(content: bytes) -> items_pb2.Item:
    return items_pb2.Item(item_id="i", tenant="t", collection="c", modality=items_pb2.IMAGE, content=content)


def test_the_hashes_are_imagehashs_phash_and_dhash() -> None:
    imagehash = pytest.importorskip("imagehash")
    for seed in range(5):
        image = picture(seed)
        assert perceptual.phash(image) == str(imagehash.phash(image))
        assert perceptual.dhash(image) == str(imagehash.dhash(image))


def test_an_image_item_is_compared_on_its_perceptual_hashes_and_profiled() -> None:
    signals = item_signals(image_item(jpeg(picture(1))))
    assert signals is not None and set(signals) == {"phash", "dhash", "profile"}
    assert signals == item_signals(image_item(jpeg(picture(1))))  # deterministic: hashes compare across restarts


def test_bytes_that_do_not_decode_leave_the_image_to_the_cosine() -> None:
    assert item_signals(image_item(b"not an image")) is None


def test_a_copy_agrees_on_the_hashes_and_another_image_does_not() -> None:
    original = image_signals(picture(1))
    copy = image_signals(Image.open(io.BytesIO(jpeg(picture(1).filter(ImageFilter.GaussianBlur(1)).resize((96, 96)),
                                                     quality=40))))
    other = image_signals(picture(2))
    assert compare(original, copy, 0.95, IMAGE_SIGNALS) == "000"
    assert compare(original, other, 0.95, IMAGE_SIGNALS)[1:] == "33"
    assert compare(original, {}, 0.75, IMAGE_SIGNALS) == "222"  # stored before images had signals


def test_an_image_collection_compares_cosine_phash_and_dhash() -> None:
    state = CollectionState()
    own = image_signals(picture(1))
    assert state.field_names(own) == list(IMAGE_SIGNALS)
    near = [Candidate("copy", 0.91, "copy", 1, signals=image_signals(picture(1))),
            Candidate("text", 0.95, "text", 2, signals={"minhash": [1, 2], "shingles": 2}),
            Candidate("old", 0.85, "old", 3)]
    compared = compare_fields(own, near, state.field_names(own), None)
    assert [c.pattern for c in compared] == ["000", "022", ""]  # a text: no hashes to compare


def test_a_text_in_an_image_collection_is_not_compared() -> None:
    assert compare({"minhash": [1], "shingles": 1}, image_signals(picture(1)), 0.9, IMAGE_SIGNALS) == ""


def test_before_the_pair_model_a_near_identical_phash_links_an_image_below_the_cosine_threshold() -> None:
    own = image_signals(picture(1))
    item = image(embedded())
    near = [Candidate("copy", 0.80, "copy", 1, signals=image_signals(picture(1))),  # the cosine alone: a match
            Candidate("other", 0.85, "other", 2, signals=image_signals(picture(2)))]
    compared = compare_fields(own, near, list(IMAGE_SIGNALS), None)
    assert compared[0].probability == PRIOR_DUPLICATE and math.isnan(compared[1].probability)
    decision = decide(item, compared, BUNDLE, 3, 5, CollectionState().calibration)
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "copy"


def test_the_pair_model_learns_from_image_pairs_that_agreeing_hashes_make_a_copy() -> None:
    rng = random.Random(3)
    counts: dict[str, int] = {}
    for _ in range(300):  # each image against 5 others (far in hashes, cosine spread) and, for a third, a copy
        for _ in range(5):
            pattern = rng.choice("0123") + rng.choice("233") + rng.choice("233")
            counts[pattern] = counts.get(pattern, 0) + 1
        if rng.random() < 0.33:
            pattern = rng.choice("001") + rng.choice("001") + rng.choice("01")
            counts[pattern] = counts.get(pattern, 0) + 1
    model = fit_fields(counts, IMAGE_SIGNALS)
    assert model is not None
    assert model.probability("100") > 0.9  # hashes agree: a copy, though the cosine is only fair
    assert model.probability("033") < 0.1  # a close cosine alone does not make a copy


def blob_and_copy(linking: int = 4) -> list[Candidate]:
    """Four members of a look-alike cluster "b0" (the first ``linking`` of them link to the item)
    and the item's own copy, a lone canonical."""
    blob = [Candidate(f"b{n}", 0.97 - n / 100 if n < linking else 0.5, "b0", n) for n in range(4)]
    return [*blob, Candidate("copy", 0.93, "copy", 9)]


def image_clustered(candidates: list[Candidate]) -> tuple[decisions_pb2.Decision, set[str]]:
    decision = decide(image(embedded()), candidates, BUNDLE, 10, 5)
    return decision, linked_clusters(decision, candidates)


def test_an_image_does_not_join_a_cluster_that_crowds_its_neighbours() -> None:
    decision, linked = image_clustered(blob_and_copy(linking=1))
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "b0"  # the decision stands
    assert linked == {"copy"} and decision.cluster_id == "copy"


def test_an_image_that_links_more_to_a_blob_than_to_its_copy_joins_neither() -> None:
    """Four links into the crowding blob, one to the copy: the links say the image looks like the
    blob's transformation, not which picture it shows (the old rule joined "copy")."""
    decision, linked = image_clustered(blob_and_copy())
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "b0"
    assert linked == set() and decision.cluster_id == "new"


def test_an_image_linked_to_a_canonical_but_more_to_another_clusters_members_keeps_its_own_cluster() -> None:
    """It links to x0 (canonical of {x0, x1}; x1 unlike it) and to two members of {y0, y1, y2}
    (not to y0): neither cluster is its picture on that evidence (the old rule joined "x0")."""
    near = [Candidate("y1", 0.96, "y0", 2), Candidate("x0", 0.95, "x0", 0), Candidate("y2", 0.94, "y0", 3),
            Candidate("x1", 0.5, "x0", 1), Candidate("y0", 0.5, "y0", 4)]
    decision, linked = image_clustered(near)
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "y1"
    assert linked == set() and decision.cluster_id == "new"
    decision, linked = image_clustered(near[:2] + near[3:])  # one link each: x0 holds as many as any
    assert linked == {"x0"} and decision.cluster_id == "x0"


def test_an_image_never_merges_clusters() -> None:
    """Links to two lone canonical items: a text mends the split, an image joins the best one only
    (on the bench's image streams such merges mostly fused different pictures)."""
    near = [Candidate("a", 0.95, "a", 10), Candidate("b", 0.93, "b", 11)]
    decision, linked = image_clustered(near)
    assert linked == {"a"} and decision.cluster_id == "a"
    text = decide(embedded(), near, BUNDLE, 10, 5)
    assert linked_clusters(text, near) == {"a", "b"}


def test_a_text_still_joins_the_cluster_of_its_best_canonical() -> None:
    decision = decide(embedded(), blob_and_copy(), BUNDLE, 10, 5)
    assert linked_clusters(decision, blob_and_copy()) == {"b0"}


def test_an_exact_copy_of_an_image_joins_its_copys_cluster_however_crowded() -> None:
    near = [*blob_and_copy(), Candidate("b2", 1.0, "b0", 2, exact=True)]
    decision = decide(image(embedded()), near, BUNDLE, 10, 5)
    assert decision.kind == decisions_pb2.EXACT_DUPLICATE and linked_clusters(decision, near) == {"b0"}
