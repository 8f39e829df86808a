"""Argument checks of the collectives: what a rank flags to its peers instead of raising.

A rank whose arguments are bad (an unsupported schema, a step out of range, a bad root) still
takes part in the collective with its error in the envelope, so every rank raises in the same
call (core rule 4). These helpers return the error text, or None; they never raise.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from . import codecs
from ._callsite import register_internal
from ._payloads import MODE_ARRAY, MODE_MSG
from .codecs import KIND_MSGSPEC, KIND_NUMPY_SCALAR, SchemaInfo

_ZEROS = bytes(8)
_INT64 = 2 ** 63


def resolve(value: Any, schema: Any) -> Tuple[Optional[SchemaInfo], Optional[str]]:
    try:
        return codecs.resolve(type(value) if schema is None else schema), None
    except TypeError as exc:
        return None, f"TypeError: {exc}"


def check_step(step: Any) -> Optional[str]:
    if step is None or (isinstance(step, (int, np.integer)) and not isinstance(step, bool)
                        and -_INT64 < int(step) < _INT64):
        return None
    return f"TypeError: expected step to be None or a 64-bit int, got {step!r}"


def check_root(root: Any, size: int) -> Optional[str]:
    if isinstance(root, (int, np.integer)) and not isinstance(root, bool) and 0 <= root < size:
        return None
    return f"ValueError: expected root in 0..{size - 1}, got {root!r}"


def payload_mode(info: Optional[SchemaInfo], value: Any) -> Tuple[int, Any, bytes, Optional[str]]:
    """(mode, value to encode, array fingerprint, error) for a contribution under ``info``."""
    if info is None or info.kind == KIND_MSGSPEC:
        return MODE_MSG, value, _ZEROS, None
    if info.kind == KIND_NUMPY_SCALAR:
        if not isinstance(value, np.generic):
            return MODE_ARRAY, None, _ZEROS, (f"TypeError: expected a numpy scalar of type "
                                              f"{info.name}, got {type(value).__name__}")
        value = np.asarray(value)
    elif not isinstance(value, np.ndarray):
        return MODE_ARRAY, None, _ZEROS, (f"TypeError: expected numpy.ndarray, got "
                                          f"{type(value).__name__}")
    return MODE_ARRAY, value, codecs.array_fingerprint(value.dtype.str, value.shape), None


def first_error(*errors: Optional[str]) -> Optional[str]:
    for error in errors:
        if error is not None:
            return error
    return None


register_internal(__file__)
