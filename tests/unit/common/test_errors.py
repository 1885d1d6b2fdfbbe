"""Library errors are classified at the client boundary (common/errors.py, common/encoding.py)."""

from __future__ import annotations

import grpc
import pytest
from pymilvus.exceptions import MilvusException
from tritonclient.utils import InferenceServerException

from twinstream.common.errors import TransientError, guarded, milvus_transient, triton_transient
from twinstream.common.status import status_for


class Flaky:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.name = "a plain attribute"

    def query(self, expr: str) -> list[str]:
        raise self.error


def test_an_unreachable_milvus_becomes_transient_and_bad_input_passes_through() -> None:
    down = guarded(Flaky(MilvusException(grpc.StatusCode.UNAVAILABLE, "Retry timeout")),
                   milvus_transient, "Milvus")
    with pytest.raises(TransientError, match="Milvus unavailable"):
        down.query("pk in []")
    assert down.name == "a plain attribute"
    bad = MilvusException(6, "unterminated string literal (newline)")
    with pytest.raises(MilvusException) as raised:
        guarded(Flaky(bad), milvus_transient, "Milvus").query("pk in ['a\n']")
    assert raised.value is bad, "an unclassified error is left for the loop to isolate"
    assert milvus_transient(ConnectionRefusedError())


@pytest.mark.parametrize(("status", "message", "transient"), [
    ("StatusCode.UNAVAILABLE", "failed to connect", True),
    ("StatusCode.DEADLINE_EXCEEDED", "timeout", True),
    ("StatusCode.INTERNAL", "Stub process 'm_0_0' is not healthy.", True),
    ("StatusCode.INVALID_ARGUMENT", "unexpected shape", False),
])
def test_triton_errors_are_classified(status: str, message: str, transient: bool) -> None:
    assert triton_transient(InferenceServerException(msg=message, status=status)) is transient


def test_a_failed_milvus_reconnect_is_transient() -> None:
    # what pymilvus 3.0 raises from its reconnect while a restarted Milvus is not up yet
    failed = MilvusException(2, "Fail connecting to server on 127.0.0.1:19530, illegal connection "
                                "params or server unavailable")
    assert milvus_transient(failed)


@pytest.mark.parametrize(("error", "code"), [
    (InferenceServerException(msg="Stub process 'm_0_0' is not healthy.", status="StatusCode.INTERNAL"),
     grpc.StatusCode.UNAVAILABLE),
    (MilvusException(2, "Fail connecting to server on 127.0.0.1:19530"), grpc.StatusCode.UNAVAILABLE),
    (ConnectionRefusedError("connection refused"), grpc.StatusCode.UNAVAILABLE),
    (InferenceServerException(msg="unexpected shape", status="StatusCode.INVALID_ARGUMENT"), None),
], ids=["triton-stub-down", "milvus-reconnect", "refused", "triton-bad-request"])
def test_an_api_call_maps_an_outage_by_the_rule_the_stream_loops_retry_on(
        error: BaseException, code: grpc.StatusCode | None) -> None:
    """One classification for both: an outage a loop retries is UNAVAILABLE to a caller, never
    UNKNOWN (status.py had its own, narrower copy: a crashed Triton stub reached callers as UNKNOWN)."""
    mapped = status_for(error)
    assert (mapped[0] if mapped else None) == code
