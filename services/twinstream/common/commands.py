"""Store commands: how deletes, TTL expiry and purges reach the one writer of a scope's rows.

A command travels on items.embedded with the scope's key, so it lands on the partition that
carries the scope's items and the indexer owning that partition applies it between the inserts
before and after it. A header tells commands from embedded items on the same topic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.config import Settings
from twinstream.common.kafka import Outgoing
from twinstream.v1 import items_pb2

HEADER = "twinstream-message"
STORE_COMMAND = b"StoreCommand"
# Item ids per command message (ids are at most 256 bytes: a message stays well under 1 MiB).
IDS_PER_COMMAND = 1000


def scope_key(tenant: str, collection: str) -> bytes:
    """The Kafka key of a scope: its items and commands share one partition, hence one order."""
    return f"{tenant}/{collection}".encode()


def is_command(record: ConsumerRecord) -> bool:
    return any(name == HEADER and value == STORE_COMMAND for name, value in record.headers or ())


def store_commands(settings: Settings, action: items_pb2.StoreCommand.Action.ValueType, tenant: str,
                   collection: str, item_ids: Sequence[str], time_ms: int, cutoff_ms: int = 0,
                   origin: str = "") -> Iterator[Outgoing]:
    """The messages that apply ``action`` to ``item_ids`` of one scope (in chunks)."""
    for start in range(0, len(item_ids), IDS_PER_COMMAND):
        command = items_pb2.StoreCommand(
            action=action, tenant=tenant, collection=collection,
            item_ids=item_ids[start:start + IDS_PER_COMMAND], time_ms=time_ms,
            cutoff_ms=cutoff_ms, origin=origin)
        yield Outgoing(settings.topics.embedded, scope_key(tenant, collection),
                       command.SerializeToString(), ((HEADER, STORE_COMMAND),))
