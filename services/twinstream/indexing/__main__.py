"""``python -m twinstream.indexing``: items.embedded -> Milvus + items.decisions."""

from __future__ import annotations

import threading

from twinstream.common.bundle import load_bundles
from twinstream.common.config import Settings
from twinstream.common.kafka import ConsumeLoop, make_producer, publish
from twinstream.common.probes import DependencyMonitor, broker_probe, milvus_probe
from twinstream.common.runtime import ServiceRuntime
from twinstream.common.vectorstore import VectorStore
from twinstream.indexing.reaper import Reaper
from twinstream.indexing.service import Indexer


def main() -> None:
    settings = Settings.from_env("indexing")
    runtime = ServiceRuntime(settings)
    store = VectorStore(settings.milvus_uri, settings.milvus_token, settings.milvus_collection_prefix)
    indexer = Indexer(settings, store, load_bundles(settings.model_dir))
    loop = ConsumeLoop(settings, settings.topics.embedded, indexer,
                       on_health=runtime.health_hook("stream"))

    reaper_producer = make_producer(settings)

    monitor = DependencyMonitor(settings, [broker_probe(settings, settings.topics.embedded),
                                           milvus_probe(store.client)], runtime.health_hook)

    def work(stopping: threading.Event) -> None:
        monitor.start(stopping)
        reaper = threading.Thread(
            target=Reaper(settings, store, lambda messages: publish(reaper_producer, messages)).run,
            args=(stopping,), name="reaper", daemon=True)
        reaper.start()
        loop.run(stopping, on_ready=lambda: runtime.set_serving(True))

    runtime.run_until_stopped(work)


if __name__ == "__main__":
    main()
