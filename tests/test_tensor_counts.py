"""An all-to-all's counts table read alike on every rank: hand-built tables, no communicator."""

from __future__ import annotations

import pytest

import numpy as np

from typedcoll import MismatchKind
from typedcoll.tensor.counts import (AllToAllCounts, describe_unmatched, rows_differ,
                                     split_counts, unmatched)


def table(sends: list, receives: list) -> list:
    return [AllToAllCounts(tuple(s), tuple(r)) for s, r in zip(sends, receives)]


def test_counts_that_match_pair_every_rank():
    # rank r sends S[r][j] rows to j; j expects S[r][j] from r: the transpose
    sends = [[0, 3, 1], [2, 0, 0], [5, 1, 4]]
    receives = [[row[j] for row in sends] for j in range(3)]
    assert unmatched(table(sends, receives)) == []


def test_a_rank_expecting_other_counts_is_named_with_its_senders():
    sends = [[1, 1], [1, 1]]
    receives = [[1, 1], [2, 0]]  # rank 1 expects 2 rows from rank 0 and none from itself
    pairs = unmatched(table(sends, receives))
    assert pairs == [(0, 1, 1, 2), (1, 1, 1, 0)]
    assert describe_unmatched(pairs) == ("rank 0 sends 1 row to rank 1, which expects 2 from "
                                         "it; rank 1 sends 1 row to rank 1, which expects 0 "
                                         "from it")


def test_many_pairs_are_cut_with_a_count():
    size = 4
    sends = [[1] * size for _ in range(size)]
    receives = [[0] * size for _ in range(size)]
    pairs = unmatched(table(sends, receives))
    assert len(pairs) == size * size
    text = describe_unmatched(pairs, limit=2)
    assert text.endswith("; and 14 more pairs")
    assert text.count("sends 1 row to") == 2


@pytest.mark.parametrize("counts, rows, split", [
    (None, 4, [2, 2]),
    ([], 6, [3, 3]),
    ((1, 2), 3, [1, 2]),
    ([np.int64(3), np.int32(0)], 3, [3, 0]),
])
def test_counts_split_rows_as_torch_does(counts, rows, split):
    got, error = split_counts(counts, rows, "send_counts", 2)
    assert (got, error) == (split, None)
    assert all(type(n) is int for n in got)


def test_a_tensors_elements_count_as_ints():
    torch = pytest.importorskip("torch")  # the rest of this file needs no torch
    assert split_counts(torch.tensor([1, 2]), 3, "send_counts", 2) == ([1, 2], None)


@pytest.mark.parametrize("counts, rows, expected", [
    (None, 3, "expected the tensor's 3 rows (dim 0) to be a multiple of the group size 2, as "
              "send_counts is not given"),
    (3, 3, "expected send_counts to be 2 ints >= 0, one per rank, got 3"),
    ([1, 2, 0], 3, "expected send_counts to be 2 ints >= 0, one per rank, got [1, 2, 0]"),
    ([1, -1], 0, "expected send_counts to be 2 ints >= 0"),
    ([1.0, 2], 3, "expected send_counts to be 2 ints >= 0"),
    ("12", 3, "expected send_counts to be 2 ints >= 0"),
    ([2, 2], 3, "expected send_counts to add up to the tensor's 3 rows (dim 0), got [2, 2] "
                "(sum 4)"),
])
def test_counts_of_one_rank_are_checked_against_its_rows(counts, rows, expected):
    got, error = split_counts(counts, rows, "send_counts", 2)
    assert got is None
    assert error is not None and error.startswith("ValueError: ") and expected in error


def test_rows_of_another_dtype_or_shape_are_named_by_group():
    def counts(dtype: str, shape: tuple, device: str = "cpu") -> AllToAllCounts:
        return AllToAllCounts((1, 1, 1), (1, 1, 1), dtype, shape, device)

    alike = [counts("float32", (3,))] * 3
    assert rows_differ(alike) == (None, [])
    text, kinds = rows_differ([counts("float32", (3,)), counts("int64", (3,)),
                               counts("float32", (3,))])
    assert text == "ranks 0,2 move rows of float32 (3,) on cpu; rank 1 of int64 (3,) on cpu"
    assert kinds == [MismatchKind.DTYPE]
    text, kinds = rows_differ([counts("float32", (3,)), counts("float32", (2,), "cuda")])
    assert text == ("rank 0 moves rows of float32 (3,) on cpu; rank 1 of float32 (2,) on "
                    "cuda")
    assert kinds == [MismatchKind.DTYPE, MismatchKind.SHAPE]
