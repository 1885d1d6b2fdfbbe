"""The per-batch fixed costs of the stream loops, old setting next to new, interleaved in rounds
against a running stack (``twinstream stack up`` or a demo with ``--keep``):

* produce and flush a 64-record batch of ~3 KiB records over 4 partitions, with kafka-python's
  16 KiB ``batch_size`` and with the 1 MiB the services now use;
* a synchronous offset commit (what every batch waited for) against ``commit_async``;
* a decide-path Milvus query at Strong against Session consistency (after a write, as the
  indexer reads once it wrote the collection).

``python -m bench.throughput_parts --kafka 127.0.0.1:9092 --milvus http://127.0.0.1:19530``
prints milliseconds (p50 / p90 per variant). Timings on a shared machine are noisy: compare the
variants of one run, not runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata
from pymilvus import DataType, MilvusClient

TOPIC = "bench.throughput"
RECORD = b"x" * 3000  # an EmbeddedItem of a FEBRL record is ~2.5-3 KiB


def timed(call: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    call(*args, **kwargs)
    return (time.perf_counter() - started) * 1000


def produce_batch(producer: KafkaProducer) -> None:
    futures = [producer.send(TOPIC, key=str(i % 4).encode(), value=RECORD, partition=i % 4)
               for i in range(64)]
    producer.flush()
    for future in futures:
        future.get()


def kafka_parts(bootstrap: str, rounds: int) -> dict[str, list[float]]:
    admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
    with contextlib.suppress(TopicAlreadyExistsError):
        admin.create_topics([NewTopic(TOPIC, 4, 1)])
    admin.close()
    producers = {size: KafkaProducer(bootstrap_servers=[bootstrap], acks="all", linger_ms=5,
                                     enable_idempotence=False, batch_size=size,
                                     max_in_flight_requests_per_connection=1)
                 for size in (16384, 1_048_576)}
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], group_id="bench-throughput",
                             enable_auto_commit=False)
    partitions = [TopicPartition(TOPIC, p) for p in range(4)]
    consumer.assign(partitions)
    out: dict[str, list[float]] = {"produce_64_batch16k": [], "produce_64_batch1m": [],
                                   "commit_sync": [], "commit_async": []}
    offset = 0
    for _ in range(rounds):
        for size, name in ((16384, "produce_64_batch16k"), (1_048_576, "produce_64_batch1m")):
            out[name].append(timed(produce_batch, producers[size]))
        offset += 1
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp in partitions}
        out["commit_sync"].append(timed(consumer.commit, offsets))
        offset += 1
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp in partitions}
        out["commit_async"].append(timed(consumer.commit_async, offsets))
        time.sleep(0.05)  # let the async answer arrive outside the next measurement
    for producer in producers.values():
        producer.close()
    consumer.close()
    return out


def milvus_parts(uri: str, rounds: int) -> dict[str, list[float]]:
    client = MilvusClient(uri=uri)
    name = "bench_throughput_consistency"
    if client.has_collection(name):
        client.drop_collection(name)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
    rng = np.random.default_rng(0)
    out: dict[str, list[float]] = {"query_strong": [], "query_session": []}
    for round_ in range(rounds):
        client.upsert(name, [{"pk": f"r{round_}-{i}", "vector": rng.normal(size=8).tolist()}
                             for i in range(16)])
        for level in ("Strong", "Session"):
            wanted = f'pk in ["r{round_}-0", "r{round_}-1"]'
            millis = timed(client.query, name, filter=wanted, output_fields=["pk"],
                           consistency_level=level)
            out[f"query_{level.lower()}"].append(millis)
    client.drop_collection(name)
    client.close()
    return out


def summary(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {name: {"p50_ms": round(float(np.percentile(v, 50)), 1),
                   "p90_ms": round(float(np.percentile(v, 90)), 1), "n": len(v)}
            for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka", required=True)
    parser.add_argument("--milvus", required=True)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    result = {**summary(kafka_parts(args.kafka, args.rounds)),
              **summary(milvus_parts(args.milvus, args.rounds))}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
