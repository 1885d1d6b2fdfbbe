"""``twinstream dlq redrive``: send dead letters back to the topic they came from.

A dead letter keeps its source topic, key and the record's untouched bytes (common/kafka.py's
``dead_letter``), so once the cause is fixed (e.g. the model version behind
``unknown_model_version`` is deployed to indexing) the same bytes can go through again. The
re-drive is idempotent downstream: indexing keeps one row per item (by primary key and content
hash) and repeats a stored decision byte for byte, so re-driving a letter twice, or one whose
item was decided meanwhile, changes nothing. A letter that is still not processable comes back
to items.dlq with the same reason.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from twinstream.common.config import Settings, load_settings
from twinstream.common.kafka import Outgoing, TopicReader, make_producer, publish
from twinstream.v1 import items_pb2

TRUNCATED_MARK = "[payload truncated:"


def letter_tenant(letter: items_pb2.DeadLetter, topics: Settings) -> str:
    """The tenant of the item a letter carries, read from its payload (the key names the scope
    too, but a raw record's key is the client's)."""
    message: items_pb2.EmbeddedItem | items_pb2.AcceptedItem | items_pb2.Item
    if letter.source_topic == topics.topics.embedded:
        message = items_pb2.EmbeddedItem()
    elif letter.source_topic == topics.topics.accepted:
        message = items_pb2.AcceptedItem()
    else:
        message = items_pb2.Item()
    try:
        message.ParseFromString(letter.payload)
    except Exception:  # a malformed payload is what some letters are about
        return ""
    if isinstance(message, items_pb2.EmbeddedItem):
        return message.accepted.item.tenant
    if isinstance(message, items_pb2.AcceptedItem):
        return message.item.tenant
    return message.tenant


@dataclass
class Selection:
    """The letters to re-drive (one per distinct source record) and those that cannot be."""

    letters: list[items_pb2.DeadLetter] = field(default_factory=list)
    truncated: int = 0     # payload cut to fit the letter: the original bytes are gone
    repeated: int = 0      # the same bytes dead-lettered again (e.g. after an earlier re-drive)


def select(letters: Iterable[items_pb2.DeadLetter], settings: Settings, reason: str,
           tenant: str = "") -> Selection:
    """The letters with ``reason`` (and ``tenant``), each distinct (topic, key, payload) once."""
    chosen = Selection()
    seen: set[tuple[str, bytes, str]] = set()
    for letter in letters:
        if letter.reason != reason or (tenant and letter_tenant(letter, settings) != tenant):
            continue
        if TRUNCATED_MARK in letter.detail:
            chosen.truncated += 1
            continue
        identity = (letter.source_topic, letter.key, hashlib.sha256(letter.payload).hexdigest())
        if identity in seen:
            chosen.repeated += 1
            continue
        seen.add(identity)
        chosen.letters.append(letter)
    return chosen


def read_letters(settings: Settings, timeout_s: float = 60.0) -> list[items_pb2.DeadLetter]:
    """Every letter items.dlq retains, up to its end as of the read."""
    reader = TopicReader(settings, settings.topics.dlq)
    try:
        records = reader.read_until(lambda _: reader.at_end(), timeout_s)
        if not reader.at_end():
            raise TimeoutError(f"could not read {settings.topics.dlq} to its end in {timeout_s:.0f}s; "
                               f"is the broker at {','.join(settings.kafka.bootstrap)} up?")
    finally:
        reader.close()
    return [items_pb2.DeadLetter.FromString(r.value) for r in records]


def redrive(settings: Settings, reason: str, tenant: str = "", dry_run: bool = False) -> Selection:
    """Publish the selected letters' bytes to their source topics (unless ``dry_run``)."""
    chosen = select(read_letters(settings), settings, reason, tenant)
    if chosen.letters and not dry_run:
        producer = make_producer(settings)
        try:
            publish(producer, [Outgoing(letter.source_topic, letter.key, letter.payload)
                               for letter in chosen.letters])
        finally:
            producer.close(timeout=5)
    return chosen


def main(kafka: str, reason: str, tenant: str, dry_run: bool) -> int:
    settings = load_settings("dlq").replace(kafka={"bootstrap": kafka})
    chosen = redrive(settings, reason, tenant, dry_run)
    topics: dict[str, int] = {}
    for letter in chosen.letters:
        topics[letter.source_topic] = topics.get(letter.source_topic, 0) + 1
    verb = "would re-drive" if dry_run else "re-drove"
    where = ", ".join(f"{n} to {t}" for t, n in sorted(topics.items())) or "none"
    print(f"{verb} {len(chosen.letters)} letters with reason {reason}"
          f"{f' of tenant {tenant}' if tenant else ''}: {where}")
    if chosen.repeated:
        print(f"{chosen.repeated} repeated letters of the same bytes sent once")
    if chosen.truncated:
        print(f"{chosen.truncated} letters skipped: their payload was truncated to fit the letter",
              file=sys.stderr)
    return 0
