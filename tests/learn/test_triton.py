"""The real Triton server serves a bundle exactly as the in-process TorchScript module computes it."""

from __future__ import annotations

import json
import queue
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from twinstream.learn.encoders import load_tokenizer
from twinstream.learn.triton_repo import TritonServer, write_repository

TOLERANCE = 1e-4  # absolute, on embeddings and OOD scores (float32, same weights, other process)

TEXTS = [
    "given name: ada | surname: lovelace | suburb: marylebone",
    "a much longer piece of text, so that this batch needs padding: the encoder must pool over "
    "real tokens only, whatever the longest sequence in the batch happens to be",
    "x",
]


def _tokens(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = load_tokenizer(128).encode_batch(texts)
    return (np.array([e.ids for e in encoded], dtype=np.int64),
            np.array([e.attention_mask for e in encoded], dtype=np.int64))


def _in_process(bundle: Path, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    module = torch.jit.load(str(bundle / "encoder.pt"))
    with torch.inference_mode():
        embedding, ood = module(torch.from_numpy(ids), torch.from_numpy(mask))
    return embedding.numpy(), ood.numpy()


def test_repository_layout(base_bundle: Path, tmp_path: Path) -> None:
    write_repository([base_bundle], tmp_path / "repo")
    write_repository([base_bundle], tmp_path / "gpu-repo", gpu=True)
    config = (tmp_path / "repo" / "twinstream_text" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "KIND_CPU" in config and "dynamic_batching" in config
    assert 'name: "embedding"' in config and "dims: [ 384 ]" in config
    assert {p.name for p in (tmp_path / "repo" / "twinstream_text" / "1").iterdir()} == {"model.py", "encoder.pt"}
    gpu_config = (tmp_path / "gpu-repo" / "twinstream_text" / "config.pbtxt").read_text()
    assert 'platform: "pytorch_libtorch"' in gpu_config and "KIND_GPU" in gpu_config
    assert (tmp_path / "gpu-repo" / "twinstream_text" / "1" / "model.pt").is_file()


def test_triton_matches_torchscript(base_bundle: Path, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    write_repository([base_bundle], repo)
    ids, mask = _tokens(TEXTS)
    assert mask.sum(1).min() < ids.shape[1]  # the batch really is padded
    short_ids, short_mask = _tokens(TEXTS[:1])
    with TritonServer(repo, log_path=tmp_path / "triton.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready("twinstream_text", "1")
        done: queue.Queue[tuple[int, object, object]] = queue.Queue()
        # Two requests of different lengths in flight together: dynamic batching may merge them.
        for tag, (a, m) in enumerate([(ids, mask), (short_ids, short_mask)]):
            inputs = [grpcclient.InferInput("input_ids", list(a.shape), "INT64"),
                      grpcclient.InferInput("attention_mask", list(m.shape), "INT64")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(m)
            client.async_infer("twinstream_text", inputs, model_version="1",
                               callback=lambda result, error, tag=tag: done.put((tag, result, error)))
        results = {}
        for _ in range(2):
            tag, result, error = done.get(timeout=60)
            assert error is None, error
            results[tag] = result
        metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        assert "nv_inference_request_success" in metrics
        process = server.process
    assert process is not None and process.poll() is not None  # stopped on exit
    for tag, (a, m) in enumerate([(ids, mask), (short_ids, short_mask)]):
        expected_embedding, expected_ood = _in_process(base_bundle, a, m)
        embedding = results[tag].as_numpy("embedding")
        ood = results[tag].as_numpy("ood_score")
        assert embedding.shape == (len(a), 384) and ood.shape == (len(a), 1)
        np.testing.assert_allclose(embedding, expected_embedding, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(ood[:, 0], expected_ood, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_failed_start_reports_the_log(base_bundle: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repository([base_bundle], repo)
    (repo / "twinstream_text" / "1" / "encoder.pt").write_bytes(b"not a torchscript file")
    server = TritonServer(repo, log_path=tmp_path / "triton.log", ready_timeout_s=120)
    with pytest.raises((RuntimeError, TimeoutError)) as failure, server:
        pass
    assert "twinstream_text" in str(failure.value)


def test_manifest_contract(base_bundle: Path) -> None:
    manifest = json.loads((base_bundle / "manifest.json").read_text())
    assert manifest["name"] == "twinstream_text" and manifest["version"] == "1"
    assert manifest["modalities"] == ["text", "record"] and manifest["trained"] is False
    thresholds = manifest["thresholds"]
    assert -1 < thresholds["match"] <= thresholds["duplicate"] < 1
    # records and prose are calibrated apart; the base's primary kind (top level) is records
    assert set(thresholds["by_modality"]) == {"text", "record"}
    assert thresholds["duplicate"] == thresholds["by_modality"]["record"]["duplicate"]
    for kind in thresholds["by_modality"].values():
        assert -1 < kind["match"] <= kind["duplicate"] < 1 and kind["platt_a"] > 0
    assert manifest["calibration"]["platt_a"] > 0  # higher cosine, likelier duplicate
    assert (base_bundle / "tokenizer.json").is_file() and len(manifest["preprocessing_digest"]) == 64
