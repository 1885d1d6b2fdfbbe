"""The indexer's plan (indexing/plan.py) as pure functions of a batch and what was read, and the
apply step (service.Indexer) on an in-memory store: both start nothing."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from twinstream.common.kafka import Rejected
from twinstream.common.vectorstore import decode_decision, encode_decision, row_key
from twinstream.indexing.calibration import WARMUP_ITEMS, Calibration, CollectionState
from twinstream.indexing.plan import (
    ClustersNeeded,
    CommandPlan,
    GroupReads,
    IndexPlan,
    Pending,
    fence,
    plan_command,
    plan_group,
    plan_steps,
    triage,
)
from twinstream.indexing.profile import text_profile
from twinstream.indexing.service import UNKNOWN_MODEL_VERSION, Indexer
from twinstream.v1 import decisions_pb2, items_pb2

from .conftest import TENANT, FakeCalibrations, FakeStore, MakeItem, MakeRecord, hit
from .test_profile import code, prose, reference_state

MakeGroup = Callable[[Sequence[items_pb2.EmbeddedItem]], Pending]
WARM = Calibration(version=1, duplicate=0.9, match=0.7, ood_floor=0.5, fitted_on=100)


def plan(group: Pending, stored: dict[str, dict[str, Any]] | None = None, hits: Sequence[Sequence[Any]] = (),
         exact_rows: Sequence[dict[str, Any]] = (), state: CollectionState | None = None,
         first_seen: dict[str, tuple[int, str] | None] | None = None) -> IndexPlan:
    triaged = triage(group, stored or {})
    reads = GroupReads(list(hits) or [[] for _ in triaged.todo], list(exact_rows),
                       state or CollectionState(), first_seen or {})
    return plan_group(group, triaged, reads, neighbours=10)


def stored_row(make_item: MakeItem, item_id: str, angle: float = 0.0, content_hash: str = "",
               cluster_id: str = "", kind: decisions_pb2.DecisionKind.ValueType = decisions_pb2.NOVEL,
               ingest_ms: int = 100) -> dict[str, Any]:
    """A row as an earlier batch stored it."""
    item = make_item(item_id, angle, ingest_ms=ingest_ms, content_hash=content_hash)
    decision = decisions_pb2.Decision(item_id=item_id, tenant=TENANT, collection="default", kind=kind,
                                      cluster_id=cluster_id or item_id,
                                      content_hash=item.accepted.content_hash)
    return {"pk": row_key(TENANT, "default", item_id), "item_id": item_id, "tenant": TENANT,
            "collection": "default", "content_hash": item.accepted.content_hash,
            "cluster_id": decision.cluster_id, "ingest_ms": ingest_ms, "decision": encode_decision(decision),
            "deleted_ms": 0, "vector": list(item.vector)}


def kinds(result: IndexPlan) -> dict[str, decisions_pb2.DecisionKind.ValueType]:
    return {d.item_id: d.kind for _, d, _ in result.decided}


# -- decisions ------------------------------------------------------------------------------

def test_an_item_with_no_neighbour_is_novel_and_starts_its_own_cluster(make_item: MakeItem,
                                                                       make_group: MakeGroup) -> None:
    result = plan(make_group([make_item("a")]))
    (_, decision, new), = result.decided
    assert decision.kind == decisions_pb2.NOVEL and new
    assert result.rows[0]["cluster_id"] == "a" and result.merges == []


def test_an_item_with_a_stored_copy_of_its_content_is_an_exact_duplicate(make_item: MakeItem,
                                                                         make_group: MakeGroup) -> None:
    original = stored_row(make_item, "orig", angle=80, content_hash="h-same", cluster_id="cl-orig")
    result = plan(make_group([make_item("copy", content_hash="h-same", ood=0.99)]), exact_rows=[original])
    (_, decision, _), = result.decided
    assert decision.kind == decisions_pb2.EXACT_DUPLICATE, "the content hash holds even for an OOD score"
    assert decision.duplicate_of == "orig" and result.rows[0]["cluster_id"] == "cl-orig"


def test_an_item_close_to_a_stored_one_is_its_near_duplicate_and_joins_its_cluster(
        make_item: MakeItem, make_group: MakeGroup) -> None:
    near = stored_row(make_item, "near", angle=0)
    result = plan(make_group([make_item("new", angle=10)]), hits=[[hit(near, 0.985)]])
    (_, decision, _), = result.decided
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "near"
    assert decision.cluster_id == "near" and result.rows[0]["cluster_id"] == "near"


def test_an_item_close_to_an_earlier_item_of_the_same_batch_joins_it_in_flight(
        make_item: MakeItem, make_group: MakeGroup) -> None:
    result = plan(make_group([make_item("first", 0, ingest_ms=1, content="A short text, the first."),
                              make_item("second", 5, ingest_ms=2, content="A short text, the first!")]))
    assert kinds(result) == {"first": decisions_pb2.NOVEL, "second": decisions_pb2.NEAR_DUPLICATE}
    second = result.decided[1][1]
    assert second.neighbours[0].in_flight and second.cluster_id == "first"


def test_a_match_below_the_duplicate_threshold_keeps_its_own_cluster(make_item: MakeItem,
                                                                     make_group: MakeGroup) -> None:
    result = plan(make_group([make_item("new")]), hits=[[hit(stored_row(make_item, "other"), 0.8)]])
    (_, decision, _), = result.decided
    assert decision.kind == decisions_pb2.MATCH and decision.cluster_id == "new"


def test_an_item_unlike_a_warm_collection_is_out_of_distribution_and_joins_nothing(
        make_item: MakeItem, make_group: MakeGroup) -> None:
    state = CollectionState(items=100, calibration=WARM)
    result = plan(make_group([make_item("odd")]), hits=[[hit(stored_row(make_item, "x"), 0.3)]], state=state)
    (_, decision, _), = result.decided
    assert decision.kind == decisions_pb2.OUT_OF_DISTRIBUTION
    assert decision.cluster_id == "odd" and result.merges == []
    assert result.state is None, "a refused item tells the calibration nothing"


def test_a_text_unlike_the_collections_content_is_refused_and_a_kept_ones_profile_observed(
        make_item: MakeItem, make_group: MakeGroup) -> None:
    rng = random.Random(12)
    state = reference_state([prose(rng) for _ in range(WARMUP_ITEMS)])
    paragraph = prose(rng)
    items = [make_item("code", content=code(rng), ingest_ms=1000),
             make_item("prose", content=paragraph, ingest_ms=1001)]
    near = hit(stored_row(make_item, "x"), 0.8)  # as close as the collection's own items: the cosine keeps both
    result = plan(make_group(items), hits=[[near], [near]], state=state)
    assert kinds(result)["code"] == decisions_pb2.OUT_OF_DISTRIBUTION
    assert kinds(result)["prose"] != decisions_pb2.OUT_OF_DISTRIBUTION
    assert result.state is not None and result.state.profiles[-1] == text_profile(paragraph)
    assert len(result.state.profiles) == len(state.profiles) + 1  # the refused one left out

def test_an_item_never_joins_an_out_of_distribution_neighbour(make_item: MakeItem,
                                                              make_group: MakeGroup) -> None:
    refused = stored_row(make_item, "ood", kind=decisions_pb2.OUT_OF_DISTRIBUTION)
    result = plan(make_group([make_item("new", 2)]), hits=[[hit(refused, 0.999)]])
    (_, decision, _), = result.decided
    assert decision.kind == decisions_pb2.NOVEL and decision.cluster_id == "new"
    assert decision.duplicate_of == ""


def test_an_item_linking_two_clusters_merges_them_into_the_older(make_item: MakeItem,
                                                                 make_group: MakeGroup) -> None:
    older = stored_row(make_item, "older", angle=-4, ingest_ms=10)
    younger = stored_row(make_item, "younger", angle=4, ingest_ms=20)
    group = make_group([make_item("bridge", 0)])
    hits = [[hit(older, 0.99), hit(younger, 0.99)]]
    with pytest.raises(ClustersNeeded) as need:
        plan(group, hits=hits)
    assert need.value.clusters == {"older", "younger"}
    result = plan(group, hits=hits, first_seen={"older": (10, "older"), "younger": (20, "younger")})
    (_, decision, _), = result.decided
    assert decision.cluster_id == "older" and list(decision.merged_clusters) == ["younger"]
    assert result.merges == [(["younger"], "older")]


def test_an_image_linking_two_clusters_joins_the_older_and_merges_nothing(make_item: MakeItem,
                                                                         make_group: MakeGroup) -> None:
    """The indexer runs the image cluster rule (decide.image_cluster): no merge, so no read of
    the clusters' first members either."""
    older = stored_row(make_item, "older", angle=-4, ingest_ms=10)
    younger = stored_row(make_item, "younger", angle=4, ingest_ms=20)
    bridge = make_item("bridge", 0)
    bridge.accepted.item.modality = items_pb2.IMAGE
    result = plan(make_group([bridge]), hits=[[hit(older, 0.99), hit(younger, 0.99)]])
    (_, decision, _), = result.decided
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.cluster_id == "older"
    assert not decision.merged_clusters and result.merges == []


def test_the_plan_asks_for_a_merges_clusters_and_goes_on_with_the_answer(make_item: MakeItem,
                                                                         make_group: MakeGroup) -> None:
    older, younger = stored_row(make_item, "older", -4, ingest_ms=10), stored_row(make_item, "younger", 4, ingest_ms=20)
    group = make_group([make_item("bridge", 0)])
    triaged = triage(group, {})
    steps = plan_steps(group, triaged, GroupReads([[hit(younger, 0.99), hit(older, 0.99)]], [], CollectionState()), 10)
    assert next(steps) == {"older", "younger"}
    with pytest.raises(StopIteration) as done:
        steps.send({"older": (10, "older"), "younger": None})
    assert done.value.value.merges == [(["younger"], "older")]


def test_the_plan_observes_into_a_copy_of_the_calibration_state(make_item: MakeItem,
                                                                make_group: MakeGroup) -> None:
    state = CollectionState()
    result = plan(make_group([make_item("a")]), state=state)
    assert state.items == 0 and result.state is not None and result.state.items == 1


# -- replays and conflicts ------------------------------------------------------------------

def test_a_stored_item_gets_its_stored_decision_again_and_is_not_rewritten(make_item: MakeItem,
                                                                          make_group: MakeGroup) -> None:
    row = stored_row(make_item, "a", cluster_id="cl-a", kind=decisions_pb2.MATCH)
    result = plan(make_group([make_item("a")]), stored={str(row["pk"]): row})
    (_, decision, new), = result.decided
    assert not new and decision.SerializeToString() == decode_decision(row["decision"]).SerializeToString()
    assert result.rows == {} and result.state is None


def test_the_same_batch_and_reads_plan_byte_identical_decisions(make_item: MakeItem,
                                                                make_group: MakeGroup) -> None:
    items = [make_item("a", 0, ingest_ms=1), make_item("b", 3, ingest_ms=2), make_item("c", 50, ingest_ms=3)]
    hits = [[hit(stored_row(make_item, "old", 1), 0.99)]] * 3
    first, second = (plan(make_group(copy.deepcopy(items)), hits=hits) for _ in range(2))
    assert [d.SerializeToString() for _, d, _ in first.decided] == \
           [d.SerializeToString() for _, d, _ in second.decided]
    assert first.rows == second.rows


def test_a_stored_id_with_other_content_is_dead_lettered_as_id_conflict(make_item: MakeItem,
                                                                        make_group: MakeGroup) -> None:
    row = stored_row(make_item, "a", content_hash="h-first")
    result = plan(make_group([make_item("a", content_hash="h-second")]), stored={str(row["pk"]): row})
    (rejected,) = result.rejected
    assert rejected.reason == "id_conflict" and rejected.item_id == "a" and "h-first" in rejected.detail
    assert result.decided == [] and result.rows == {}


def test_an_item_repeated_in_one_batch_is_decided_once(make_item: MakeItem, make_group: MakeGroup) -> None:
    result = plan(make_group([make_item("a"), make_item("a")]))
    assert [i for i, _, _ in result.decided] == [0] and list(result.rows) == [0]


def test_rows_written_since_the_reads_win_over_the_plan(make_item: MakeItem, make_group: MakeGroup) -> None:
    result = plan(make_group([make_item("a"), make_item("b", 80, content="Something else entirely.")]))
    successor = stored_row(make_item, "a", kind=decisions_pb2.MATCH)
    fenced = fence(result, {str(successor["pk"]): successor})
    assert [(d.item_id, d.kind, new) for _, d, new in fenced.decided] == [
        ("a", decisions_pb2.MATCH, False), ("b", decisions_pb2.NOVEL, True)]
    assert list(fenced.rows) == [1]


# -- store commands -------------------------------------------------------------------------

@pytest.mark.parametrize(("action", "purge", "ingested_before"), [
    (items_pb2.StoreCommand.DELETE, False, None),
    (items_pb2.StoreCommand.EXPIRE, False, 500),
    (items_pb2.StoreCommand.PURGE, True, None),
])
def test_a_store_command_resolves_to_its_rows(make_record: MakeRecord, action: items_pb2.StoreCommand.Action.ValueType,
                                             purge: bool, ingested_before: int | None) -> None:
    command = items_pb2.StoreCommand(action=action, tenant=TENANT, collection="default", item_ids=["a", "b/c"],
                                     time_ms=900, cutoff_ms=500)
    planned = plan_command(make_record(command))
    assert isinstance(planned, CommandPlan)
    assert planned.pks == ["acme/default/a", "acme/default/b/c"]
    assert (planned.purge, planned.time_ms, planned.ingested_before_ms) == (purge, 900, ingested_before)


def test_a_command_without_action_or_tenant_is_dead_lettered(make_record: MakeRecord) -> None:
    for command in (items_pb2.StoreCommand(tenant=TENANT, item_ids=["a"]),
                    items_pb2.StoreCommand(action=items_pb2.StoreCommand.DELETE, item_ids=["a"])):
        planned = plan_command(make_record(command))
        assert isinstance(planned, Rejected) and planned.reason == "invalid_command"


def test_a_command_that_does_not_parse_is_dead_lettered_as_malformed(make_record: MakeRecord) -> None:
    planned = plan_command(make_record(items_pb2.StoreCommand(), value=b"\xff\xff"))
    assert isinstance(planned, Rejected) and planned.reason == "malformed"


# -- the apply step, on an in-memory store --------------------------------------------------

def published(result_outputs: Sequence[Any]) -> list[decisions_pb2.Decision]:
    return [decisions_pb2.Decision.FromString(o.value) for o in result_outputs]


def test_a_delete_between_two_copies_is_applied_in_its_place(make_indexer: Callable[..., Indexer],
                                                             make_item: MakeItem, make_record: MakeRecord) -> None:
    delete = items_pb2.StoreCommand(action=items_pb2.StoreCommand.DELETE, tenant=TENANT, collection="default",
                                    item_ids=["a"], time_ms=5)
    batch = [make_record(make_item("a", content_hash="h"), 0), make_record(delete, 1),
             make_record(make_item("b", content_hash="h", ingest_ms=2000), 2)]
    result = make_indexer()(batch)
    assert [(d.item_id, d.kind) for d in published(result.outputs)] == [
        ("a", decisions_pb2.NOVEL), ("b", decisions_pb2.NOVEL)], "b's copy was deleted before b came"


def test_a_replayed_batch_publishes_byte_identical_decisions_and_writes_nothing(
        make_indexer: Callable[..., Indexer], make_item: MakeItem, make_record: MakeRecord) -> None:
    store = FakeStore()
    indexer = make_indexer(store)
    batch = [make_record(make_item(f"i{n}", angle=n * 3, ingest_ms=1000 + n), n, timestamp_ms=5000)
             for n in range(6)]
    first = indexer(batch)
    writes = store.writes
    replay = indexer(batch)
    assert [o.value for o in replay.outputs] == [o.value for o in first.outputs]
    assert store.writes == writes


def test_two_indexers_on_the_same_batch_publish_byte_identical_decisions(
        make_indexer: Callable[..., Indexer], make_item: MakeItem, make_record: MakeRecord) -> None:
    batch = [make_record(make_item(f"i{n}", angle=n * 4, ingest_ms=1000 + n), n, timestamp_ms=7000 + n)
             for n in range(6)]
    one, other = make_indexer()(batch), make_indexer()(batch)
    assert [o.value for o in one.outputs] == [o.value for o in other.outputs]
    assert {d.decided_time_ms for d in published(one.outputs)} == set(range(7000, 7006)), \
        "a decision's time is its record's, not the clock"


def test_a_merge_reads_the_clusters_and_relabels_the_stored_rows(
        make_indexer: Callable[..., Indexer], make_item: MakeItem, make_record: MakeRecord) -> None:
    store = FakeStore()
    indexer = make_indexer(store)
    indexer([make_record(make_item("left", -20, ingest_ms=1), 0)])
    indexer([make_record(make_item("right", 20, ingest_ms=2), 1)])  # cos 40 deg: a match, not a duplicate
    result = indexer([make_record(make_item("bridge", 0, ingest_ms=3), 2)])
    (decision,) = published(result.outputs)
    assert decision.cluster_id == "left" and list(decision.merged_clusters) == ["right"]
    assert {r["item_id"]: r["cluster_id"] for r in store.rows["unit_unit_v1"].values()} == {
        "left": "left", "right": "left", "bridge": "left"}


def test_a_version_being_backfilled_writes_rows_but_publishes_no_decision(
        make_indexer: Callable[..., Indexer], make_item: MakeItem, make_record: MakeRecord) -> None:
    store = FakeStore(live=False)
    result = make_indexer(store)([make_record(make_item("a"), 0)])
    assert result.outputs == [] and list(store.rows["unit_unit_v1"]) == ["acme/default/a"]


def test_an_item_of_an_unknown_model_version_is_dead_lettered_with_its_redrive_command(
        make_indexer: Callable[..., Indexer], make_item: MakeItem, make_record: MakeRecord) -> None:
    item = make_item("a", model=items_pb2.ModelRef(name="unit", version="9"))
    result = make_indexer()([make_record(item, 0), make_record(make_item("b"), 1)])
    (rejected,) = result.rejected
    assert rejected.reason == UNKNOWN_MODEL_VERSION and rejected.item_id == "a"
    assert "unit:9" in rejected.detail and "twinstream dlq redrive" in rejected.detail
    assert len(result.outputs) == 1, "the rest of the batch is decided"


def test_an_item_without_a_finite_vector_is_dead_lettered(make_indexer: Callable[..., Indexer],
                                                          make_item: MakeItem, make_record: MakeRecord) -> None:
    item = make_item("a")
    item.vector[0] = float("nan")
    result = make_indexer()([make_record(item, 0)])
    (rejected,) = result.rejected
    assert rejected.reason == "invalid_embedding" and rejected.item_id == "a" and result.outputs == []


def test_the_calibration_state_is_saved_after_the_rows(make_indexer: Callable[..., Indexer],
                                                       make_item: MakeItem, make_record: MakeRecord) -> None:
    calibrations = FakeCalibrations()
    make_indexer(calibrations=calibrations)([make_record(make_item("a"), 0), make_record(make_item("b", 60), 1)])
    (state,) = calibrations.states.values()
    assert CollectionState.from_json(state).items == 2
