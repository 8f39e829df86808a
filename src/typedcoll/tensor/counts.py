"""The counts of an all-to-all whose ranks move different numbers of rows (torch's
``all_to_all_single`` with split sizes): what each rank sends to and expects from each rank.

Ranks' tensors differ in length by design there, so the envelope cannot hold the shape that must
agree; what must agree is the table (the rows rank r sends to rank j are the rows j expects from
r) and what one row is. Every rank gathers every rank's :class:`AllToAllCounts` in one checked
call and reads the table alike (:func:`rows_differ`, :func:`unmatched`), so a rank whose counts
or rows disagree with a peer's raises the same ``DesyncError`` on every rank, naming them,
before any row moves: gloo would fail on the receiving rank alone, NCCL would hang or copy past
the end of a peer's rows. Pure logic, no communicator.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgspec

from ..core.plumbing import register_internal
from ..core.mismatch import MismatchKind, compact_ranks


class AllToAllCounts(msgspec.Struct, array_like=True, frozen=True):
    """One rank's side of an all-to-all: rows it sends to each rank, rows it expects from each
    rank, in rank order, and what one row is (:func:`row_of`)."""

    sends: Tuple[int, ...]
    receives: Tuple[int, ...]
    dtype: str = ""
    row_shape: Tuple[int, ...] = ()
    device: str = ""


Pair = Tuple[int, int, int, int]  # sender, receiver, rows sent, rows the receiver expects


def split_counts(counts: Any, rows: int, what: str, size: int
                 ) -> Tuple[Optional[List[int]], Optional[str]]:
    """``counts`` (the argument named ``what``) as ``size`` ints that split ``rows`` rows among
    the ranks, or why they cannot: (counts, None) or (None, error). None or an empty list splits
    them equally, as torch's ``all_to_all_single`` does; any integers count (numpy's, a
    tensor's elements)."""
    if counts is None or (isinstance(counts, (list, tuple)) and not counts):
        if rows % size:
            return None, (f"ValueError: expected the tensor's {rows} rows (dim 0) to be a "
                          f"multiple of the group size {size}, as {what} is not given")
        return [rows // size] * size, None
    try:
        values: Optional[List[int]] = [operator.index(n) for n in counts]
    except TypeError:  # not iterable, or an item that is no integer
        values = None
    if values is None or len(values) != size or any(n < 0 for n in values):
        return None, (f"ValueError: expected {what} to be {size} ints >= 0, one per rank, got "
                      f"{counts!r}"[:300])
    if sum(values) != rows:
        return None, (f"ValueError: expected {what} to add up to the tensor's {rows} rows "
                      f"(dim 0), got {values} (sum {sum(values)})")
    return values, None


def rows_differ(table: Sequence[AllToAllCounts]) -> Tuple[Optional[str], List[MismatchKind]]:
    """Where the ranks' rows differ in dtype, shape or device: ``ranks 0-1,3 move rows of
    float32 (3,) on cpu; rank 2 of int64 (3,) on cpu`` (the same text on every rank) and the
    kinds that differ; else (None, []). Counts are in rows, so such ranks would move different
    bytes for the same counts: on NCCL, behind a device check not yet verified, a hang or a
    copy past a peer's rows."""
    groups: Dict[Tuple[str, Tuple[int, ...], str], List[int]] = {}
    for rank, counts in enumerate(table):
        groups.setdefault((counts.dtype, counts.row_shape, counts.device), []).append(rank)
    if len(groups) == 1:
        return None, []
    kinds = [kind for kind, index in ((MismatchKind.DTYPE, (0, 2)), (MismatchKind.SHAPE, (1,)))
             if len({tuple(key[i] for i in index) for key in groups}) > 1]
    parts: List[str] = []
    for (dtype, shape, device), ranks in groups.items():
        verb = ("" if parts else " moves rows of" if len(ranks) == 1 else " move rows of")
        parts.append(f"{compact_ranks(ranks)}{verb or ' of'} {dtype} {shape} on {device}")
    return "; ".join(parts), kinds


def unmatched(table: Sequence[AllToAllCounts]) -> List[Pair]:
    """The (sender, receiver) pairs whose counts disagree, in rank order."""
    return [(r, j, mine.sends[j], table[j].receives[r])
            for r, mine in enumerate(table) for j in range(len(table))
            if mine.sends[j] != table[j].receives[r]]


def describe_unmatched(pairs: Sequence[Pair], limit: int = 4) -> str:
    """``rank 0 sends 3 rows to rank 1, which expects 2 from it; ...``: the same text on every
    rank, the first ``limit`` pairs and how many more."""
    text = "; ".join(f"rank {r} sends {sent} row{'s' * (sent != 1)} to rank {j}, which expects "
                     f"{wanted} from it" for r, j, sent, wanted in pairs[:limit])
    more = len(pairs) - limit
    return text + (f"; and {more} more pair{'s' * (more != 1)}" if more > 0 else "")


register_internal(__file__)
