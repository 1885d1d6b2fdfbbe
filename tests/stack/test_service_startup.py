"""A service refuses bad settings at start, before it connects to anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.stack


@pytest.mark.parametrize("service", ["matching", "ingestion"])
def test_a_service_with_a_misspelled_variable_exits_at_start_naming_it(service: str) -> None:
    """A real ``python -m twinstream.<service>``; nothing listens on the addresses it is given,
    so getting past the settings would hang or fail with another message."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINSTREAM_")}
    env |= {"TWINSTREAM_KAFKA_BOOTSTARP": "127.0.0.1:9", "TWINSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:9",
            "TWINSTREAM_MILVUS_URI": "http://127.0.0.1:9", "TWINSTREAM_GRPC_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", f"twinstream.{service}"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"twinstream {service}: invalid settings: TWINSTREAM_KAFKA_BOOTSTARP: unknown setting "
        "(did you mean TWINSTREAM_KAFKA_BOOTSTRAP?)")
