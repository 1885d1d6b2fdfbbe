"""The decision rule as a pure function."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from twinstream.indexing.calibration import COSINE, Calibration, FieldModel
from twinstream.indexing.decide import Candidate, decide, linked_clusters
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import decisions_pb2, items_pb2

BUNDLE = ModelBundle(
    path=Path("."), name="m", version="1", modalities=("text",), dim=3,
    inputs=("input_ids", "attention_mask"), max_length=16, image_size=0, record_fields=(),
    duplicate_threshold=0.9, match_threshold=0.7, ood_threshold=0.5, platt_a=20.0, platt_b=-17.0,
    preprocessing_digest="d", max_batch_size=8,
)


def embedded(item_id: str = "new", ood: float = 0.1, content_hash: str = "h-new") -> items_pb2.EmbeddedItem:
    return items_pb2.EmbeddedItem(
        accepted=items_pb2.AcceptedItem(
            item=items_pb2.Item(item_id=item_id, tenant="t", collection="c", modality=items_pb2.TEXT),
            content_hash=content_hash, ingest_time_ms=1000),
        vector=[1.0, 0.0, 0.0], model=items_pb2.ModelRef(name="m", version="1"), ood_score=ood)


def run(candidates: list[Candidate], **kwargs: object) -> decisions_pb2.Decision:
    return decide(embedded(**kwargs), candidates, BUNDLE, max_neighbours=3, decided_time_ms=5)  # type: ignore[arg-type]


def test_novel_without_neighbours_starts_its_own_cluster() -> None:
    decision = run([])
    assert decision.kind == decisions_pb2.NOVEL
    assert decision.cluster_id == "new" and decision.duplicate_of == ""
    assert decision.thresholds.duplicate == pytest.approx(0.9) and decision.model.name == "m"


def test_near_duplicate_joins_the_earlier_items_cluster() -> None:
    decision = run([Candidate("a", 0.95, "cluster-a", 10), Candidate("b", 0.8, "b", 11)])
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE
    assert decision.duplicate_of == "a" and decision.cluster_id == "cluster-a"
    assert [n.item_id for n in decision.neighbours] == ["a", "b"]
    assert decision.duplicate_probability > 0.85  # sigmoid(20 * 0.95 - 17)


def test_match_below_duplicate_threshold_keeps_own_cluster() -> None:
    decision = run([Candidate("a", 0.75, "a", 10)])
    assert decision.kind == decisions_pb2.MATCH
    assert decision.duplicate_of == "a" and decision.cluster_id == "new"
    assert decision.duplicate_probability < 0.5


def test_exact_duplicate_wins_and_names_the_earliest_copy() -> None:
    decision = run([Candidate("late", 1.0, "x", 50, exact=True),
                    Candidate("early", 1.0, "c-early", 20, exact=True),
                    Candidate("other", 0.99, "o", 1)], ood=0.9)
    assert decision.kind == decisions_pb2.EXACT_DUPLICATE
    assert decision.duplicate_of == "early" and decision.cluster_id == "c-early"


def test_out_of_distribution_is_never_forced_into_a_match() -> None:
    decision = run([Candidate("a", 0.99, "a", 10)], ood=0.8)
    assert decision.kind == decisions_pb2.OUT_OF_DISTRIBUTION
    assert decision.duplicate_of == "" and decision.cluster_id == "new"
    assert decision.ood_score > decision.thresholds.ood


def test_each_modality_is_decided_by_its_own_calibration() -> None:
    from dataclasses import replace

    bundle = replace(BUNDLE, modalities=("text", "record"), by_modality={
        "record": {"duplicate": 0.95, "match": 0.9, "ood": 0.05, "platt_a": 40.0, "platt_b": -38.0},
        "text": {"duplicate": 0.6, "match": 0.5, "ood": 0.5, "platt_a": 10.0, "platt_b": -6.0}})
    as_text, as_record, record_ok = embedded(ood=0.2), embedded(ood=0.2), embedded(ood=0.01)
    for item in (as_record, record_ok):
        item.accepted.item.modality = items_pb2.RECORD
    close = [Candidate("a", 0.7, "a", 10)]
    text_decision = decide(as_text, close, bundle, 3, 5)
    record_decision = decide(as_record, close, bundle, 3, 5)
    assert text_decision.kind == decisions_pb2.NEAR_DUPLICATE  # 0.7 >= the text threshold 0.6
    assert text_decision.thresholds.duplicate == pytest.approx(0.6)
    assert text_decision.thresholds.ood == pytest.approx(0.5)
    assert text_decision.duplicate_probability > 0.5  # sigmoid(10 * 0.7 - 6)
    assert record_decision.kind == decisions_pb2.OUT_OF_DISTRIBUTION  # 0.2 > the record threshold 0.05
    assert record_decision.thresholds.ood == pytest.approx(0.05)
    assert decide(record_ok, close, bundle, 3, 5).kind == decisions_pb2.NOVEL  # 0.7 < the record match 0.9


def test_neighbours_are_capped_and_ranked() -> None:
    candidates = [Candidate(f"n{i}", 0.1 * i, f"n{i}", i, in_flight=i % 2 == 0) for i in range(6)]
    decision = run(candidates)
    assert [n.item_id for n in decision.neighbours] == ["n5", "n4", "n3"]
    assert decision.neighbours[1].in_flight


def test_the_named_duplicate_is_shown_even_outside_the_top_k() -> None:
    # a keyed candidate (found by its fields) links by the pair model below the cosine top 3
    near = [Candidate(f"n{i}", 0.8 + 0.01 * i, f"n{i}", i, probability=0.01) for i in range(4)]
    keyed = Candidate("keyed", 0.5, "keyed", 9, pattern="0003", probability=0.97)
    decision = run([*near, keyed])
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "keyed"
    assert [n.item_id for n in decision.neighbours] == ["n3", "n2", "n1", "keyed"]
    assert decision.neighbours[-1].comparison == "0003"
    assert decision.neighbours[-1].duplicate_probability == pytest.approx(0.97)
    # a named item already among the top k is not listed twice, nor is a non-duplicate's list grown
    assert len(run([*near, Candidate("keyed", 0.9, "keyed", 9, probability=0.97)]).neighbours) == 3
    assert len(run([*near, Candidate("keyed", 0.5, "keyed", 9, probability=0.2)]).neighbours) == 3


# -- the cluster rule -----------------------------------------------------------------------------
def clustered(item_id: str, candidates: list[Candidate], ood: float = 0.1,
              content_hash: str = "") -> tuple[decisions_pb2.Decision, set[str]]:
    decision = decide(embedded(item_id, ood=ood, content_hash=content_hash or f"h-{item_id}"),
                      candidates, BUNDLE, max_neighbours=10, decided_time_ms=5)
    return decision, linked_clusters(decision, candidates)


def test_a_chain_of_links_does_not_end_in_one_cluster() -> None:
    """A~B~C~...~Z: each item links only to the one before it (single-link made one cluster)."""
    ids = [chr(ord("A") + i) for i in range(26)]
    cluster: dict[str, str] = {}
    for i, item_id in enumerate(ids):
        candidates = [Candidate(ids[j], 0.95 if j == i - 1 else 0.5, cluster[ids[j]], j) for j in range(i)]
        decision, linked = clustered(item_id, candidates)
        assert decision.kind == (decisions_pb2.NEAR_DUPLICATE if i else decisions_pb2.NOVEL)
        winner = min(linked, key=ids.index) if linked else decision.cluster_id
        cluster = {k: (winner if c in linked else c) for k, c in cluster.items()}
        cluster[item_id] = winner
    sizes = sorted(Counter(cluster.values()).values())
    assert max(sizes) <= 2 and len(sizes) == 13


def test_a_link_to_the_canonical_item_joins_its_cluster() -> None:
    decision, linked = clustered("new", [Candidate("b", 0.95, "a", 11), Candidate("a", 0.93, "a", 10)])
    assert decision.cluster_id == "a" and linked == {"a"}


def test_one_link_to_a_member_alone_does_not_join_its_cluster() -> None:
    decision, linked = clustered("new", [Candidate("b", 0.95, "a", 11), Candidate("a", 0.5, "a", 10)])
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "b"
    assert decision.cluster_id == "new" and linked == set()


def test_links_to_canonical_items_join_and_merge_their_clusters() -> None:
    decision, linked = clustered("new", [Candidate("b", 0.95, "a", 11), Candidate("c", 0.94, "a", 12),
                                         Candidate("x", 0.92, "x", 3), Candidate("y", 0.91, "w", 4)])
    assert decision.cluster_id == "x" and linked == {"x"}  # "a" and "w": links to members only


def test_a_link_to_two_lone_canonical_items_merges_their_clusters() -> None:
    """A and B were both decided novel (a missed pair); C links to both: the split is mended."""
    decision, linked = clustered("new", [Candidate("a", 0.95, "a", 10), Candidate("b", 0.93, "b", 11)])
    assert decision.cluster_id == "a" and linked == {"a", "b"}


def test_one_item_never_merges_two_grown_clusters() -> None:
    """Links to the canonical items of {a, a2} and {b}: the item joins "a" and nothing merges, so
    two clusters never fuse on one item's word (their cross pairs would rest on one link)."""
    decision, linked = clustered("new", [Candidate("a", 0.96, "a", 10), Candidate("a2", 0.95, "a", 12),
                                         Candidate("b", 0.94, "b", 11)])
    assert decision.cluster_id == "a" and linked == {"a"}
    decision, linked = clustered("new", [Candidate("b", 0.96, "b", 11), Candidate("a", 0.94, "a", 10),
                                         Candidate("a2", 0.5, "a", 12)])
    assert decision.cluster_id == "b" and linked == {"b"}  # "a" shows two members: it stays apart


def test_merged_clusters_stay_small_along_a_stream_of_bridges() -> None:
    """Pairs (p_i, q_i) linked inside, and a bridge item after each pair linking to its own pair
    and the previous pair's canonical: old rule fused everything, this one keeps pairs apart."""
    cluster: dict[str, str] = {}
    order: list[str] = []

    def add(item_id: str, scores: dict[str, float]) -> None:
        candidates = [Candidate(k, scores.get(k, 0.5), cluster[k], order.index(k)) for k in order]
        decision, linked = clustered(item_id, candidates)
        winner = min(linked, key=order.index) if linked else decision.cluster_id
        for k, c in list(cluster.items()):
            cluster[k] = winner if c in linked else c
        cluster[item_id] = winner
        order.append(item_id)

    for i in range(8):
        add(f"p{i}", {})
        add(f"q{i}", {f"p{i}": 0.95})
        add(f"r{i}", {f"p{i}": 0.97, f"q{i}": 0.96, **({f"p{i - 1}": 0.95} if i else {})})
    assert max(Counter(cluster.values()).values()) == 3


def test_an_ood_item_never_joins_a_cluster() -> None:
    decision, linked = clustered("new", [Candidate("a", 0.99, "a", 10)], ood=0.9)
    assert decision.kind == decisions_pb2.OUT_OF_DISTRIBUTION
    assert decision.cluster_id == "new" and linked == set()


def test_links_to_a_refused_item_never_pull_it_into_a_cluster() -> None:
    decision, linked = clustered("new", [Candidate("a", 0.96, "a", 10),
                                         Candidate("ood", 0.95, "ood", 11, refused=True)])
    assert decision.cluster_id == "a" and linked == {"a"}


def test_an_exact_copy_merges_only_its_copies_clusters() -> None:
    decision, linked = clustered("new", [Candidate("a", 1.0, "a", 10, exact=True),
                                         Candidate("b", 0.97, "b", 11)], ood=0.9)
    assert decision.kind == decisions_pb2.EXACT_DUPLICATE
    assert linked == {"a"}


def test_a_record_sharing_none_of_the_collections_fields_is_refused_once_its_model_is_fitted() -> None:
    """Code sent as {"source": ...} into a books collection: close in vector space to a book
    (the best-neighbour floor lets it through) but nothing of it compares with a book."""
    model = FieldModel(("authors", "title", COSINE), m=((0.9, 0.1),) * 3, u=((0.1, 0.9),) * 3, prior=0.1)
    fitted = Calibration(version=2, duplicate=0.9, match=0.7, ood_floor=0.2, fitted_on=300, fields=model)
    book = Candidate("b1", 0.6, "b1", 10)
    code = {"fields": {"source": "def f(x):\n    return x + 1"}}
    assert decide(embedded(), [book], BUNDLE, 3, 5, fitted, code).kind == decisions_pb2.OUT_OF_DISTRIBUTION
    # one shared field is enough to be compared; before a fitted model nothing is refused so
    same_schema = {"fields": {"title": "Dune", "isbn": "0441013597"}}
    assert decide(embedded(), [book], BUNDLE, 3, 5, fitted, same_schema).kind != decisions_pb2.OUT_OF_DISTRIBUTION
    unfitted = Calibration(version=1, duplicate=0.9, match=0.7, ood_floor=0.2, fitted_on=60)
    assert decide(embedded(), [book], BUNDLE, 3, 5, unfitted, code).kind != decisions_pb2.OUT_OF_DISTRIBUTION
