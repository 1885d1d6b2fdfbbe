"""``python -m twinstream.embedding``: the items.accepted -> items.embedded stage."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY

from twinstream.common.config import Settings, load_settings
from twinstream.common.encoding import TritonEncoder, TritonTLS, make_encoder
from twinstream.common.kafka import ConsumeLoop
from twinstream.common.logs import configure_logging
from twinstream.common.metrics import Metrics
from twinstream.common.probes import DependencyMonitor, broker_probe, triton_probe
from twinstream.common.runtime import ServiceRuntime
from twinstream.common.usage import parse_service_args
from twinstream.embedding.service import Embedder
from twinstream.model.bundle import load_bundles


def main(settings: Settings | None = None) -> None:
    """Run until SIGTERM; ``settings`` default to the environment's (read once, here)."""
    settings = settings or load_settings("embedding")
    configure_logging(settings.service, settings.server.log_level)
    metrics = Metrics.create(REGISTRY)
    runtime = ServiceRuntime(settings, metrics)
    encoders = [make_encoder(b, settings.encoder.backend, settings.encoder.triton_url, metrics,
                             TritonTLS.from_settings(settings))
                for b in load_bundles(settings.encoder.model_dirs)]
    for encoder in encoders:
        if isinstance(encoder.encoder, TritonEncoder):
            encoder.encoder.wait_ready()
    loop = ConsumeLoop(settings, settings.topics.accepted, Embedder(settings, encoders),
                       on_health=runtime.health_hook("stream"), metrics=metrics)

    monitor = DependencyMonitor(settings, [broker_probe(settings, settings.topics.accepted),
                                           triton_probe(encoders)], runtime.health_hook, metrics)

    def work(stopping: threading.Event) -> None:
        monitor.start(stopping)
        loop.run(stopping, on_ready=lambda: runtime.set_serving(True))

    runtime.run_until_stopped(work)


if __name__ == "__main__":
    parse_service_args("embedding", __doc__)
    main()
