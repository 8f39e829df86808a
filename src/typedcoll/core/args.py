"""Argument checks of the collectives: what a rank flags to its peers instead of raising.

A rank whose arguments are bad (an unsupported schema, a step out of range, a bad root, op,
name, color or timeout) still takes part in the collective with its error in the envelope, so
every rank raises in the same call and none is left waiting. These helpers return the error
text ("TypeError: expected ..., got ..."), or None; they never raise.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..codecs import KIND_ARRAY, KIND_MSGSPEC, KIND_NUMPY_SCALAR, SchemaInfo, resolve
from .call import MODE_ARRAY, MODE_MSG
from .wire import REDUCE_OPS

_INT64 = 2 ** 63
_INT32 = 2 ** 31


def schema_of(value: Any, schema: Any) -> Tuple[Optional[SchemaInfo], Optional[str]]:
    """The resolved schema (``type(value)`` when none is given), or the error text."""
    try:
        return resolve(type(value) if schema is None else schema), None
    except TypeError as exc:
        return None, f"TypeError: {exc}"


def check_step(step: Any) -> Optional[str]:
    if step is None or (isinstance(step, (int, np.integer)) and not isinstance(step, bool)
                        and -_INT64 < int(step) < _INT64):
        return None
    if isinstance(step, (int, np.integer)) and not isinstance(step, bool) and int(step) == -_INT64:
        # The wire's mark for "no step": a step must be told from it.
        return f"ValueError: expected step to be None or an int in -2**63+1..2**63-1, got {step!r}"
    return f"TypeError: expected step to be None or a 64-bit int, got {step!r}"[:300]


def check_root(root: Any, size: int) -> Optional[str]:
    if isinstance(root, (int, np.integer)) and not isinstance(root, bool) and 0 <= root < size:
        return None
    return f"ValueError: expected root in 0..{size - 1}, got {root!r}"[:300]


def check_dest(peer: Any, size: int, what: str) -> Optional[str]:
    if isinstance(peer, (int, np.integer)) and not isinstance(peer, bool) and 0 <= peer < size:
        return None
    return f"ValueError: expected {what} in 0..{size - 1}, got {peer!r}"[:300]


def check_reduce_op(op: Any) -> Tuple[int, Optional[str]]:
    """(wire code, None), or (0, error text): a name, or an mpi4py ``MPI.Op``."""
    name = op_name_of(op)
    if name is not None and name in REDUCE_OPS:
        return REDUCE_OPS[name], None
    return 0, (f"ValueError: expected op to be one of {', '.join(map(repr, REDUCE_OPS))} "
               f"(or the mpi4py MPI.Op of one), got {_op_text(op)}")[:300]


def _op_text(op: Any) -> str:
    """An op as messages show it: mpi4py's predefined ops by name (``MPI.MAXLOC``), whose repr
    is only an address."""
    MPI = _loaded_mpi()
    if MPI is not None and isinstance(op, MPI.Op):
        for name in ("MAXLOC", "MINLOC", "REPLACE", "NO_OP", "OP_NULL"):
            if op == getattr(MPI, name, None):
                return f"MPI.{name}"
        return "a user-defined MPI.Op"
    return repr(op)


def _loaded_mpi() -> Any:
    """mpi4py's MPI module where the process has loaded it, else None. Never imported here:
    importing it initialises MPI, which under an MPI launcher waits for every rank to do the
    same, so a bad op on one rank of a torch job would hang it. An ``MPI.Op`` exists only
    where the module is loaded."""
    return sys.modules.get("mpi4py.MPI")


# id(op) -> (op, its name or None): mpi4py's ops, found once (a call should not compare ten)
_OP_NAMES: Dict[int, Tuple[Any, Optional[str]]] = {}


def op_name_of(op: Any) -> Optional[str]:
    if isinstance(op, str):
        return op.lower()
    known = _OP_NAMES.get(id(op))
    if known is not None and known[0] is op:
        return known[1]
    MPI = _loaded_mpi()
    if MPI is None:
        return None
    found = None
    for name in REDUCE_OPS:
        if op == getattr(MPI, name.upper(), None) or (name == "prod" and op == MPI.PROD):
            found = name
            break
    if len(_OP_NAMES) < 64:  # the held op keeps its id from being reused
        _OP_NAMES[id(op)] = (op, found)
    return found


def check_timeout(timeout: Any) -> Optional[str]:
    if timeout is None:
        return None
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0 \
            and not math.isnan(timeout):
        return None
    return f"ValueError: expected timeout None or seconds > 0, got {timeout!r}"[:300]


def check_color_key(color: Any, key: Any) -> Optional[str]:
    if color is not None and not (isinstance(color, (int, np.integer))
                                  and not isinstance(color, bool) and 0 <= color < _INT32):
        return (f"ValueError: expected color to be None or an int in 0..2**31-1, got "
                f"{color!r}")[:300]
    if not (isinstance(key, (int, np.integer)) and not isinstance(key, bool)
            and -_INT32 <= key < _INT32):
        return f"ValueError: expected key to be an int in -2**31..2**31-1, got {key!r}"[:300]
    return None


def instance_check(info: SchemaInfo, value: Any) -> Optional[str]:
    """"expected RankState, got dict" where the schema is a record class and the value is not
    an instance, "expected Optional[RankState], got EmptyState" where it holds record classes
    the value does not fit: said on the sender, before any peer tries to decode it."""
    record = info.record_class
    if record is None or isinstance(value, record):
        return None
    walk = getattr(record, "check", None)  # records inside the schema (codecs.records)
    if walk is not None:
        return f"TypeError: expected {info.name}, got {walk(value)}"
    got = "None" if value is None else type(value).__name__
    hint = (f" (an idle rank's None needs schema=Optional[{info.name}] on every rank)"
            if value is None else "")
    return f"TypeError: expected {info.name}, got {got}{hint}"


def payload_mode(info: Optional[SchemaInfo],
                 value: Any) -> Tuple[int, Any, Optional[Tuple[Tuple[int, ...], str]],
                                      Optional[str]]:
    """(mode, value to encode, array meta (shape, dtype.str), error) for a contribution."""
    if info is None or info.kind == KIND_MSGSPEC:
        return MODE_MSG, value, None, None if info is None else instance_check(info, value)
    if info.kind == KIND_NUMPY_SCALAR:
        if not isinstance(value, np.generic):
            return MODE_ARRAY, None, None, (f"TypeError: expected a numpy scalar of type "
                                            f"{info.name}, got {type(value).__name__}")
        value = np.asarray(value)
    elif info.kind == KIND_ARRAY and not isinstance(value, np.ndarray):
        return MODE_ARRAY, None, None, (f"TypeError: expected numpy.ndarray, got "
                                        f"{type(value).__name__}")
    return MODE_ARRAY, value, (tuple(value.shape), value.dtype.str), None


def first_error(*errors: Optional[str]) -> Optional[str]:
    for error in errors:
        if error is not None:
            return error
    return None
