"""Which dead letters ``twinstream dlq redrive`` sends back (pure selection; the stack test
tests/stack/test_redrive.py re-drives for real)."""

from __future__ import annotations

from twinstream.common.config import Settings
from twinstream.dlq import select
from twinstream.v1 import items_pb2

SETTINGS = Settings(service="dlqtest")


def letter(tenant: str, item_id: str, reason: str = "unknown_model_version",
           detail: str = "") -> items_pb2.DeadLetter:
    item = items_pb2.EmbeddedItem(accepted=items_pb2.AcceptedItem(
        item=items_pb2.Item(item_id=item_id, tenant=tenant, collection="c")))
    return items_pb2.DeadLetter(stage="indexing", reason=reason, detail=detail,
                                source_topic=SETTINGS.topics.embedded, key=f"{tenant}/c".encode(),
                                payload=item.SerializeToString(), item_id=item_id)


def test_only_letters_of_the_reason_and_tenant_are_selected() -> None:
    letters = [letter("a", "1"), letter("b", "2"), letter("a", "3", reason="malformed")]
    chosen = select(letters, SETTINGS, "unknown_model_version", tenant="a")
    assert [x.item_id for x in chosen.letters] == ["1"]


def test_the_same_bytes_dead_lettered_twice_are_sent_once() -> None:
    chosen = select([letter("a", "1"), letter("a", "1")], SETTINGS, "unknown_model_version")
    assert (len(chosen.letters), chosen.repeated) == (1, 1)


def test_a_truncated_payload_is_not_re_driven() -> None:
    cut = letter("a", "1", detail="x [payload truncated: 9 bytes, sha256 00; the first 4 kept]")
    chosen = select([cut], SETTINGS, "unknown_model_version")
    assert (chosen.letters, chosen.truncated) == ([], 1)
