"""Create the pipeline's missing Kafka topics (run by the chart's topics Job).

Reads KAFKA_BOOTSTRAP, TOPICS (comma-separated), PARTITIONS, REPLICATION_FACTOR and TOPIC_CONFIGS
(a JSON object). Existing topics are left alone: repartitioning would move tenant/collection keys to
other partitions, so a topic with fewer partitions than asked for is only reported.
"""

import contextlib
import json
import os
import sys
import time

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError


def main() -> int:
    bootstrap = os.environ["KAFKA_BOOTSTRAP"].split(",")
    names = [t.strip() for t in os.environ["TOPICS"].split(",") if t.strip()]
    partitions = int(os.environ["PARTITIONS"])
    replication = int(os.environ["REPLICATION_FACTOR"])
    configs = {str(k): str(v) for k, v in json.loads(os.environ.get("TOPIC_CONFIGS", "{}")).items()}
    deadline = time.monotonic() + 300
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="twinstream-topics")
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise
            print(f"waiting for Kafka at {bootstrap}: {exc}", flush=True)
            time.sleep(5)
    try:
        # kafka-python 3 names the key "name"; 2.x called it "topic".
        existing = {t.get("name") or t["topic"]: len(t["partitions"]) for t in admin.describe_topics()}
        missing = [NewTopic(n, partitions, replication, topic_configs=configs)
                   for n in names if n not in existing]
        for name in names:
            if name in existing and existing[name] < partitions:
                print(f"{name} has {existing[name]} partitions (< {partitions}); not changed", flush=True)
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent run made it
                admin.create_topics(missing)
            print("created " + ", ".join(t.name for t in missing), flush=True)
        else:
            print("all topics exist", flush=True)
    finally:
        admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
