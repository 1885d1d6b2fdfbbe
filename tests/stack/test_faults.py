"""The fault matrix on one shared stack (S3-backed broker, Milvus server, Triton): for each fault,
a fresh tenant streams FEBRL records through Kafka, one piece is SIGKILLed (or a consumer is
SIGSTOPped past its session timeout) a fifth of the way in, then brought back.

Each run asserts every accepted item has exactly one Milvus row, every repeated decision is
byte-identical, the stream finishes within a bound, and health showed the outage while it
lasted. ``python -m bench.faults`` runs the same matrix at 5000 items and prints the table.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.faults import FAULTS, run_fault
from stack_helpers import start_stack
from twinstream.demo import febrl_items
from twinstream.devstack import LocalStack

pytestmark = pytest.mark.stack

ITEMS = int(os.environ.get("FAULT_MATRIX_ITEMS", "300"))
# An infrastructure outage lasts until a witness's health leaves SERVING, at most this long:
# the dependency probes (common/probes.py) turn a witness NOT_SERVING within a few seconds.
MAX_OUTAGE_S = float(os.environ.get("FAULT_MATRIX_MAX_OUTAGE_S", "20"))


@pytest.fixture(scope="module")
def fault_stack(base_bundle: Path) -> Iterator[LocalStack]:
    running = start_stack(base_bundle, "faults", prometheus=False, batch_size=32)
    yield running
    running.stop()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_loses_duplicates_and_contradicts_nothing(fault_stack: LocalStack, fault: str) -> None:
    if fault in ("broker", "storage") and fault_stack.s3 is None:
        pytest.skip("a memory:// broker loses every topic when it restarts, by design")
    result = run_fault(fault_stack, fault, febrl_items(ITEMS, seed=5), rate=60.0, bound_s=90.0,
                       max_outage_s=MAX_OUTAGE_S)
    print(result)
    counts = (result.lost, result.duplicate_rows, result.contradicting, result.undecided)
    assert result.accepted == ITEMS, result.notes
    assert counts == (0, 0, 0, 0), (f"lost, duplicate rows, contradicting, undecided: {counts}\n"
                                    f"{stream_logs(fault_stack)}")
    assert result.recovery_s >= 0, "the stream did not finish within the bound"
    assert result.match_after, "Match did not answer after the fault"
    assert result.health_saw_outage, f"no health check of {FAULTS[fault]} showed the {fault} outage"


def stream_logs(stack: LocalStack, lines: int = 25) -> str:
    """The stream services' own recent log lines (not the Kafka client's), for a failure message:
    CI shows the test output only, and the stack's log files go with its machine."""
    tails = []
    for service in ("ingestion", "embedding", "indexing"):
        log_path = stack.processes[service].log_path
        own = [line for line in log_path.read_text(errors="replace").splitlines()
               if '"logger": "kafka.' not in line]
        tails.append(f"--- {service} ({log_path}) ---\n" + "\n".join(own[-lines:]))
    return "\n".join(tails)
