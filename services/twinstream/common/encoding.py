"""Item content -> embedding: preprocessing, then the encoder on Triton (or in-process).

Shared by the embedding service (the stream) and matching (queries by raw content), so both
preprocess identically for a given model bundle.
"""

from __future__ import annotations

import json
import math
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tokenizers import Tokenizer

from twinstream.common.config import Settings
from twinstream.common.errors import TransientError, triton_transient
from twinstream.common.metrics import Metrics
from twinstream.model.bundle import ModelBundle
from twinstream.model.encoder_runtime import Runtime, TorchScriptRuntime
from twinstream.model.images import preprocess_image
from twinstream.model.records import serialize_record
from twinstream.v1 import items_pb2


class ContentError(ValueError):
    """The content cannot be turned into encoder input; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# Record values are scalars; an integer longer than this is not a value anyone dedups on, and
# Python refuses to parse ones above 4300 digits (ValueError) anyway.
MAX_INT_DIGITS = 128


def load_record(text: str) -> dict[str, object]:
    """Parse a record strictly: a non-empty JSON object of scalars with unique keys, finite
    numbers and valid Unicode; anything else is a ContentError("invalid_record", ...).

    Ingestion validates with this and embedding/matching preprocess with it, so an input that
    passes one cannot crash the other (deep nesting, 5000-digit integers, lone surrogates).
    """
    try:
        record = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant,
                            parse_int=_bounded_int, parse_float=_finite_float)
    except RecursionError as exc:
        raise ContentError("invalid_record", "record nests too deeply; fields must be scalars") from exc
    except json.JSONDecodeError as exc:
        raise ContentError("invalid_record", f"record is not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or not record:
        raise ContentError("invalid_record", "record must be a non-empty JSON object")
    for key, value in record.items():
        if isinstance(value, dict | list):
            raise ContentError("invalid_record", f"field {key[:40]!r} must be a scalar")
        for part in (key, value) if isinstance(value, str) else (key,):
            try:
                part.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ContentError("invalid_record", f"field {key[:40]!r} holds a lone surrogate "
                                   f"escape (\\u{ord(part[exc.start]):04x}), not Unicode text") from exc
    return record


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    record: dict[str, object] = {}
    for key, value in pairs:
        if key in record:  # which copy wins is parser-specific: the hash would be ambiguous
            raise ContentError("invalid_record", f"field {key[:40]!r} appears more than once")
        record[key] = value
    return record


def _no_constant(name: str) -> float:
    raise ContentError("invalid_record", f"{name} is not a JSON number; send a string or null")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ContentError("invalid_record", f"an integer of {len(digits)} digits exceeds the "
                           f"limit of {MAX_INT_DIGITS}; send it as a string")
    return int(digits)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ContentError("invalid_record", f"the number {literal[:40]} overflows a 64-bit float; "
                           "send it as a string")
    return value


class Encoder(Protocol):
    def encode(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Return (embeddings [B, dim], ood_scores [B]) for one batch of model inputs."""


class TritonEncoder:
    """Calls the bundle's model on a Triton server over gRPC."""

    backend = "triton"
    # Rows per request: a poll goes out as several requests in flight, which Triton merges up to
    # the model's max batch; each is padded only to its own longest row.
    request_size = 16

    def __init__(self, bundle: ModelBundle, url: str, timeout_s: float = 60.0,
                 tls: TritonTLS | None = None) -> None:
        import tritonclient.grpc as triton_grpc

        self._grpc = triton_grpc
        self.bundle = bundle
        # gRPC's reconnect backoff grows to 120 s by default: after a Triton restart the stream
        # would wait up to that long. 2 s keeps recovery quick (a retry is cheap here).
        self.client = triton_grpc.InferenceServerClient(url, **(tls.client_options() if tls else {}),
                                                        channel_args=[
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ])
        self.timeout_s = timeout_s

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.client.is_model_ready(self.bundle.name, self.bundle.version):
                    return
            except Exception:  # the server is still starting
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Triton model {self.bundle.name}:{self.bundle.version} not ready after "
                    f"{timeout_s:.0f}s"
                )
            time.sleep(0.5)

    def _tensors(self, inputs: dict[str, np.ndarray]) -> list[Any]:
        tensors = []
        for name, array in inputs.items():
            dtype = "INT64" if array.dtype == np.int64 else "FP32"
            tensor = self._grpc.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    def encode(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        try:
            result = self.client.infer(
                self.bundle.name,
                self._tensors(inputs),
                model_version=self.bundle.version,
                outputs=self._outputs(),
                client_timeout=self.timeout_s,
            )
        except Exception as exc:
            if triton_transient(exc):
                raise TransientError(f"Triton unavailable: {exc}") from exc
            raise
        return self._unpack(result)

    def encode_many(self, batches: Sequence[dict[str, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Send every batch at once (Triton's dynamic batcher merges them into full executions
        while the next ones travel) and wait for all; the first failure is raised as ``infer``
        would raise it, after every answer is in."""
        answers: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
        for index, inputs in enumerate(batches):
            self.client.async_infer(
                self.bundle.name, self._tensors(inputs),
                callback=lambda result, error, index=index: answers.put((index, result, error)),
                model_version=self.bundle.version, outputs=self._outputs(), client_timeout=self.timeout_s)
        results: dict[int, Any] = {}
        failure: Exception | None = None
        for _ in batches:
            # client_timeout bounds each answer; this guards a callback that never comes.
            index, result, error = answers.get(timeout=self.timeout_s + 30)
            if error is not None:
                failure = failure or error
            results[index] = result
        if failure is not None:
            if triton_transient(failure):
                raise TransientError(f"Triton unavailable: {failure}") from failure
            raise failure
        return [self._unpack(results[i]) for i in range(len(batches))]

    def _outputs(self) -> list[Any]:
        return [self._grpc.InferRequestedOutput("embedding"), self._grpc.InferRequestedOutput("ood_score")]

    def _unpack(self, result: Any) -> tuple[np.ndarray, np.ndarray]:
        embedding = result.as_numpy("embedding")
        ood = result.as_numpy("ood_score")
        if embedding is None or ood is None:
            raise RuntimeError(f"Triton returned no outputs for {self.bundle.name}")
        return embedding.astype(np.float32), ood.reshape(-1).astype(np.float32)


class InProcessEncoder:
    """Runs the bundle's encoder in this process (explicit fallback, and the bench's baseline).
    By default today's TorchScript module as it is (no bucketing, torch's threads); the bench
    passes the runtime Triton serves (``encoder_runtime.load_runtime``) to compare like with like."""

    backend = "inprocess"

    def __init__(self, bundle: ModelBundle, runtime: Runtime | None = None) -> None:
        self.bundle = bundle
        self.runtime = runtime or TorchScriptRuntime(bundle.path / "encoder.pt", threads=0, sub_batch=0,
                                                     input_names=bundle.inputs)

    def encode(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        embedding, ood = self.runtime(inputs)
        return embedding.astype(np.float32), ood.reshape(-1).astype(np.float32)


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray      # [N, dim] float32, L2-normalised
    ood_scores: np.ndarray   # [N]


class ItemEncoder:
    """Preprocesses item contents for one bundle and encodes them in batches."""

    def __init__(self, bundle: ModelBundle, encoder: Encoder, metrics: Metrics | None = None) -> None:
        self.bundle = bundle
        self.encoder = encoder
        self.metrics = metrics or Metrics.unexported()
        self.backend = getattr(encoder, "backend", "custom")
        self.tokenizer: Tokenizer | None = None
        if "image" not in bundle.modalities:
            self.tokenizer = Tokenizer.from_file(str(bundle.path / "tokenizer.json"))
            self.tokenizer.enable_truncation(bundle.max_length)
            self.tokenizer.enable_padding()

    def model_input(self, modality: int, content: bytes) -> str | np.ndarray:
        """Validate and convert one item's content; raises ContentError for bad content."""
        if not self.bundle.serves(modality):
            raise ContentError(
                "no_encoder_for_modality",
                f"model {self.bundle.name}:{self.bundle.version} does not encode "
                f"{items_pb2.Modality.Name(modality)}",  # type: ignore[arg-type]
            )
        if modality == items_pb2.IMAGE:
            try:
                return preprocess_image(content, self.bundle.image_size)
            except ValueError as exc:
                raise ContentError("undecodable_image", str(exc)) from exc
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ContentError("invalid_utf8", f"content is not valid UTF-8: {exc}") from exc
        if modality == items_pb2.RECORD:
            return serialize_record(load_record(text), list(self.bundle.record_fields))
        return text

    def encode(self, prepared: Sequence[str | np.ndarray]) -> Embedded:
        """Encode already-validated inputs (from ``model_input``), chunked to the model's batch."""
        if not prepared:
            return Embedded(np.zeros((0, self.bundle.dim), np.float32), np.zeros(0, np.float32))
        vectors, oods = [], []
        encode_many = getattr(self.encoder, "encode_many", None)
        step = max(1, self.bundle.max_batch_size)
        if encode_many is not None:
            step = min(step, max(1, int(getattr(self.encoder, "request_size", step))))
        batches = [self._tensors(prepared[start:start + step]) for start in range(0, len(prepared), step)]
        if encode_many is not None:
            started = time.perf_counter()
            answers = encode_many(batches)
            self.metrics.encoder_batch.labels(self.backend).observe(time.perf_counter() - started)
        else:
            answers = []
            for batch in batches:
                started = time.perf_counter()
                answers.append(self.encoder.encode(batch))
                self.metrics.encoder_batch.labels(self.backend).observe(time.perf_counter() - started)
        for embedding, ood in answers:
            vectors.append(embedding)
            oods.append(ood)
        return Embedded(np.concatenate(vectors), np.concatenate(oods))

    def _tensors(self, chunk: Sequence[str | np.ndarray]) -> dict[str, np.ndarray]:
        if self.tokenizer is None:
            return {"pixels": np.stack([np.asarray(x, dtype=np.float32) for x in chunk])}
        encodings = self.tokenizer.encode_batch([str(x) for x in chunk])
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }


@dataclass(frozen=True)
class TritonTLS:
    """TLS to Triton (``--grpc-use-ssl``): the CA that signed its certificate and, for mutual
    TLS, this client's certificate and key (PEM file paths)."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> TritonTLS | None:
        if not settings.encoder.triton_tls:
            return None
        return cls(settings.tls.ca_file, settings.tls.client_cert_file,
                   settings.tls.client_key_file)

    def client_options(self) -> dict[str, Any]:
        return {"ssl": True, "root_certificates": self.ca_file or None,
                "private_key": self.key_file or None, "certificate_chain": self.cert_file or None}


def make_encoder(bundle: ModelBundle, backend: str, triton_url: str,
                 metrics: Metrics | None = None, triton_tls: TritonTLS | None = None) -> ItemEncoder:
    """Build the configured encoder backend for a bundle."""
    if backend == "triton":
        return ItemEncoder(bundle, TritonEncoder(bundle, triton_url, tls=triton_tls), metrics)
    if backend == "inprocess":
        return ItemEncoder(bundle, InProcessEncoder(bundle), metrics)
    raise ValueError(f"unknown encoder backend {backend!r}: use 'triton' or 'inprocess'")
