"""The rendered infrastructure configs: nothing starts here."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from twinstream.devstack import LocalStack, MilvusServer, SeaweedS3, StackConfig

COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")


def test_the_milvus_config_uses_its_own_ports_on_loopback_only(tmp_path: Path) -> None:
    server = MilvusServer(tmp_path, port=40001)
    config = server.config()
    assert config["proxy"]["port"] == 40001
    served = [c for c in COMPONENTS if c != "indexCoord"]  # 2.3 runs index coordination in dataCoord
    ports = {config[c]["port"] for c in served} | {config["proxy"]["internalPort"]}
    assert len(ports) == len(served) + 1, "every component has a port of its own"
    assert not ports & {53100, 19530, 19529, 19531, 21123, 21121, 13333, 21124}, "no default port is left"
    assert all(config[c]["ip"] == "127.0.0.1" for c in COMPONENTS)
    assert config["etcd"]["endpoints"] == f"127.0.0.1:{server.ports['etcd_client']}"
    rendered = yaml.safe_dump(config)
    # 2379 as a whole number (etcd's default port), not inside a random free port such as 23797
    assert "{{" not in rendered and not re.search(r"(?<!\d)2379(?!\d)", rendered) and "localhost" not in rendered


def test_the_milvus_config_ticks_fast_enough_for_strong_reads(tmp_path: Path) -> None:
    config = MilvusServer(tmp_path, port=40001).config()
    assert 20 <= config["proxy"]["timeTickInterval"] <= 50
    assert 100 <= config["common"]["gracefulTime"] <= 200
    assert config["dataCoord"]["segment"]["maxSize"] == 2048
    assert config["dataCoord"]["segment"]["sealProportion"] >= 0.5


def test_the_embedded_etcd_listens_where_milvus_looks(tmp_path: Path) -> None:
    server = MilvusServer(tmp_path, port=40001)
    etcd = server.embedded_etcd_config()
    assert etcd["listen-client-urls"] == f"http://{server.config()['etcd']['endpoints']}"
    assert etcd["initial-cluster"] == f"{etcd['name']}={etcd['listen-peer-urls']}"
    assert server.config()["etcd"]["config"]["path"].endswith("embedEtcd.yaml")


def test_seaweedfs_gets_every_port_explicitly(tmp_path: Path) -> None:
    s3 = SeaweedS3(tmp_path, s3_port=40002)
    argv = s3.argv()
    for flag in ("-master.port=", "-master.port.grpc=", "-volume.port=", "-volume.port.grpc=", "-filer.port=",
                 "-filer.port.grpc=", "-s3.port=40002", "-s3.port.grpc=", "-admin.port=", "-admin.port.grpc="):
        assert any(a.startswith(flag) for a in argv), flag
    assert {"-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-ip.bind=127.0.0.1"} <= set(argv)
    ports = [int(m.group(1)) for a in argv if (m := re.search(r"port(?:\.grpc)?=(\d+)$", a)) and m.group(1) != "0"]
    assert 9101 not in ports and len(ports) == len(set(ports))
    admin = next(int(a.split("=")[1]) for a in argv if a.startswith("-admin.port="))
    assert f"-admin.port.grpc={admin + 10000}" in argv, "weed's worker dials the admin port + 10000"
    assert s3.client_env()["AWS_ENDPOINT"] == "http://127.0.0.1:40002"


def test_a_stack_spawns_on_the_calling_thread_and_waits_for_its_infrastructure_side_by_side(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage, Milvus and Triton become ready together (the barrier lets no wait through until
    all three wait at once), and every process is spawned on the calling thread: a child's
    parent-death signal fires when the thread that spawned it exits, which killed a broker
    spawned on a pool thread."""
    stack = LocalStack(StackConfig(root=tmp_path, bundles=[tmp_path]))
    together = threading.Barrier(3, timeout=10)
    spawned_on: list[str] = []

    def launcher(piece: str) -> Callable[[], Callable[[], None]]:
        def launch() -> Callable[[], None]:
            spawned_on.append(threading.current_thread().name)

            def wait() -> None:
                together.wait()
            return wait
        return launch

    for piece in ("storage", "milvus", "triton"):
        monkeypatch.setattr(stack, f"_launch_{piece}", launcher(piece))
    monkeypatch.setattr(stack, "start_broker", lambda: spawned_on.append(threading.current_thread().name))
    stack._start_infrastructure()
    assert spawned_on == [threading.current_thread().name] * 4


def test_the_first_failed_wait_is_raised_after_the_others_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed start raises only once every piece that did start is tracked (stop finds it)."""
    stack = LocalStack(StackConfig(root=tmp_path, bundles=[tmp_path]))
    finished: list[str] = []

    def fails() -> None:
        raise TimeoutError("Milvus not healthy")

    def slow() -> None:
        time.sleep(0.3)
        finished.append("triton")

    monkeypatch.setattr(stack, "_launch_storage", lambda: lambda: None)
    monkeypatch.setattr(stack, "_launch_milvus", lambda: fails)
    monkeypatch.setattr(stack, "_launch_triton", lambda: slow)
    monkeypatch.setattr(stack, "start_broker", lambda: finished.append("broker"))
    with pytest.raises(TimeoutError, match="Milvus"):
        stack._start_infrastructure()
    assert finished == ["triton"], "Triton's wait finished; the broker never started"
