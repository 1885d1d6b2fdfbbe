"""``python -m twinstream.indexing``: items.embedded -> Milvus + items.decisions."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY

from twinstream.common.config import Settings, load_settings
from twinstream.common.kafka import ConsumeLoop, make_producer, publish
from twinstream.common.logs import configure_logging
from twinstream.common.metrics import Metrics
from twinstream.common.probes import DependencyMonitor, broker_probe, milvus_probe
from twinstream.common.runtime import ServiceRuntime
from twinstream.common.security import milvus_client_options
from twinstream.common.usage import parse_service_args
from twinstream.common.vectorstore import VectorStore
from twinstream.indexing.reaper import Reaper
from twinstream.indexing.service import Indexer
from twinstream.model.bundle import load_bundles


def main(settings: Settings | None = None) -> None:
    """Run until SIGTERM; ``settings`` default to the environment's (read once, here)."""
    settings = settings or load_settings("indexing")
    configure_logging(settings.service, settings.server.log_level)
    metrics = Metrics.create(REGISTRY)
    runtime = ServiceRuntime(settings, metrics)
    store = VectorStore(settings.milvus.uri, prefix=settings.milvus.collection_prefix,
                        metrics=metrics, connection=milvus_client_options(settings))
    indexer = Indexer(settings, store, load_bundles(settings.encoder.model_dirs), metrics=metrics)
    loop = ConsumeLoop(settings, settings.topics.embedded, indexer,
                       on_health=runtime.health_hook("stream"), metrics=metrics,
                       on_rebalance=indexer.on_rebalance)

    reaper_producer = make_producer(settings, metrics)

    monitor = DependencyMonitor(settings, [broker_probe(settings, settings.topics.embedded),
                                           milvus_probe(store.client)], runtime.health_hook, metrics)

    def work(stopping: threading.Event) -> None:
        monitor.start(stopping)
        reaper = threading.Thread(
            target=Reaper(settings, store, lambda messages: publish(reaper_producer, messages)).run,
            args=(stopping,), name="reaper", daemon=True)
        reaper.start()
        loop.run(stopping, on_ready=lambda: runtime.set_serving(True))

    runtime.run_until_stopped(work)


if __name__ == "__main__":
    parse_service_args("indexing", __doc__)
    main()
