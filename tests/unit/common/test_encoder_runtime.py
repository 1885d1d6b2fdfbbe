"""Length bucketing and precision choice of the encoder runtimes (pure functions, nothing started)."""

from __future__ import annotations

import numpy as np
import pytest

from twinstream.model.encoder_runtime import buckets, default_parallelism, resolve_precision, run_bucketed


def _mask(lengths: list[int], width: int) -> np.ndarray:
    return np.array([[1] * n + [0] * (width - n) for n in lengths], dtype=np.int64)


def test_each_bucket_is_cut_to_its_longest_row() -> None:
    mask = _mask([9, 2, 5, 3, 8, 1], width=12)
    cut = buckets(mask, sub_batch=2)
    assert [sorted(rows.tolist()) for rows, _ in cut] == [[1, 5], [2, 3], [0, 4]]
    assert [width for _, width in cut] == [2, 5, 9]


def test_sub_batch_zero_keeps_the_batch_whole() -> None:
    mask = _mask([3, 1], width=6)
    [(rows, width)] = buckets(mask, sub_batch=0)
    assert rows.tolist() == [0, 1] and width == 6


def test_bucketed_rows_come_back_in_input_order() -> None:
    lengths = [7, 1, 4, 6, 2, 3, 5]
    ids = np.array([[10 * k + j for j in range(8)] for k in range(len(lengths))], dtype=np.int64)
    mask = _mask(lengths, width=8)
    widths = []

    def infer(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        widths.append(inputs["input_ids"].shape[1])
        row_id = inputs["input_ids"][:, :1].astype(np.float32)  # which input row this is
        return np.repeat(row_id, 3, axis=1), inputs["attention_mask"].sum(1).astype(np.float32)

    embedding, ood = run_bucketed(infer, {"input_ids": ids, "attention_mask": mask}, sub_batch=3)
    np.testing.assert_array_equal(embedding[:, 0], ids[:, 0])
    np.testing.assert_array_equal(ood, lengths)
    assert widths == [3, 6, 7]  # never padded to the batch's 8


def test_auto_precision_is_bf16_only_where_the_cpu_has_it() -> None:
    assert resolve_precision("auto", cpu_has_bf16=True) == "bf16"
    assert resolve_precision("auto", cpu_has_bf16=False) == "f32"
    assert resolve_precision("f32", cpu_has_bf16=True) == "f32"


def test_bf16_on_a_cpu_without_it_is_refused() -> None:
    with pytest.raises(ValueError, match="no BF16"):
        resolve_precision("bf16", cpu_has_bf16=False)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", cpu_has_bf16=True)


def test_parallelism_leaves_cores_to_the_pipeline() -> None:
    assert default_parallelism(1) == (1, 1)
    assert default_parallelism(2) == (1, 1)
    assert default_parallelism(16) == (8, 1)
