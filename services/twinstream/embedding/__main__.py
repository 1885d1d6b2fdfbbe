"""``python -m twinstream.embedding``: the items.accepted -> items.embedded stage."""

from __future__ import annotations

import threading

from twinstream.common.bundle import load_bundles
from twinstream.common.config import Settings
from twinstream.common.encoding import TritonEncoder, make_encoder
from twinstream.common.kafka import ConsumeLoop
from twinstream.common.probes import DependencyMonitor, broker_probe, triton_probe
from twinstream.common.runtime import ServiceRuntime
from twinstream.embedding.service import Embedder


def main() -> None:
    settings = Settings.from_env("embedding")
    runtime = ServiceRuntime(settings)
    encoders = [make_encoder(b, settings.encoder_backend, settings.triton_url)
                for b in load_bundles(settings.model_dir)]
    for encoder in encoders:
        if isinstance(encoder.encoder, TritonEncoder):
            encoder.encoder.wait_ready()
    loop = ConsumeLoop(settings, settings.topics.accepted, Embedder(settings, encoders),
                       on_health=runtime.health_hook("stream"))

    monitor = DependencyMonitor(settings, [broker_probe(settings, settings.topics.accepted),
                                           triton_probe(encoders)], runtime.health_hook)

    def work(stopping: threading.Event) -> None:
        monitor.start(stopping)
        loop.run(stopping, on_ready=lambda: runtime.set_serving(True))

    runtime.run_until_stopped(work)


if __name__ == "__main__":
    main()
