"""Reductions of decoded values: how ``allreduce``, ``reduce`` and ``reduce_scatter`` combine.

Values are combined in rank order on every rank that combines them, so every such rank computes
the bitwise same result (MPI's own reductions may associate floats differently per rank).

NaN rule for "max" and "min": a NaN anywhere makes the result NaN, whichever rank holds it (as
numpy's ``maximum``/``minimum``; Python's ``max`` would keep or drop it depending on the order).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List

import numpy as np


def _is_nan(x: Any) -> bool:
    return isinstance(x, (float, np.floating)) and x != x


def nan_max(a: Any, b: Any) -> Any:
    """The larger of two numbers under the NaN rule (the drop-ins' object reductions use it too)."""
    if _is_nan(a):
        return a
    if _is_nan(b):
        return b
    return b if b > a else a


def nan_min(a: Any, b: Any) -> Any:
    """The smaller of two numbers under the NaN rule."""
    if _is_nan(a):
        return a
    if _is_nan(b):
        return b
    return b if b < a else a


SCALAR_REDUCE: Dict[str, Callable[[Any, Any], Any]] = {
    "sum": operator.add, "prod": operator.mul, "max": nan_max, "min": nan_min,
    "land": lambda a, b: bool(a) and bool(b), "lor": lambda a, b: bool(a) or bool(b),
    "lxor": lambda a, b: bool(a) != bool(b),
    "band": operator.and_, "bor": operator.or_, "bxor": operator.xor,
}
ARRAY_REDUCE: Dict[str, Any] = {
    "sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum,
    "land": np.logical_and, "lor": np.logical_or, "lxor": np.logical_xor,
    "band": np.bitwise_and, "bor": np.bitwise_or, "bxor": np.bitwise_xor,
}
LOGICAL = frozenset({"land", "lor", "lxor"})
BITWISE = frozenset({"band", "bor", "bxor"})


def check_operands(op: str, kind: str) -> str:
    """The error text when ``op`` does not apply to values of numpy kind ``kind`` ("" if fine).

    Bitwise ops need integers or bools, as in MPI; the others take any number.
    """
    if op in BITWISE and kind not in "biu":
        return f"TypeError: expected integers or bools for op {op!r}, got numpy kind {kind!r}"
    return ""


def reduce_values(values: List[Any], op: str) -> Any:
    """Combine in rank order, so every rank computes the bitwise same result."""
    first = values[0]
    if isinstance(first, np.ndarray):
        ufunc = ARRAY_REDUCE[op]
        if op in LOGICAL:
            acc = first.astype(bool)
            for v in values[1:]:
                ufunc(acc, v, out=acc)
            return acc
        acc = first.copy()
        for v in values[1:]:
            ufunc(acc, v, out=acc)
        return acc
    combine = SCALAR_REDUCE[op]
    acc = first
    for v in values[1:]:
        acc = combine(acc, v)
    return bool(acc) if op in LOGICAL else acc
