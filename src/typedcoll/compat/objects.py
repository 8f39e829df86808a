"""Collectives of arbitrary Python objects over the typed protocol: what both drop-ins share.

Every call is one typed collective under the schema ``Any`` (``compat.values`` makes each value
self-describing), so it keeps what typed collectives check: its identity (call site or
``name=``), occurrence, step, op, root and reduce op are compared on every rank, and a rank that
skipped a vote raises DesyncError on every rank even when both votes are plain ints. Values may
differ in type from rank to rank, as they may under pickle.

Two things can make ranks reach different verdicts about the same bytes, and both are settled
before anyone returns:
  - a class marker names a class one rank imported and another did not (or has in another
    version): calls whose values hold classes end with one more exchange (``_settle``), in
    which every rank says whether it rebuilt every value, and then all raise or none does;
  - ``gather`` and ``reduce`` deliver to one root, so every rank takes every value (the same
    backend exchange as a gather up to 16 ranks) to read those flags, and ``reduce`` combines
    on every rank, so a combination that raises (an int plus a str) raises everywhere.

Refusals (a value that cannot be sent without pickle, a bad argument) are flagged in the
call's envelope like any typed argument error: EncodeError on that rank, PeerError on the
others, in the same call.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..codecs.reduce import nan_max, nan_min
from ..core import fast, ops, parts, payloads
from ..core.args import check_reduce_op, check_root, first_error
from ..core.errors import CollectiveError, DecodeError
from ..core.plumbing import register_internal
from ..core.site_walk import user_frame
from ..core.sites import format_site
from ..core.protocol import Protocol
from ..core.verdict import heading
from ..core.wire import GATHER, HEADER_SIZE, NO_ROOT, REDUCE, REDUCE_OP_NAMES
from . import values as tagged
from .values import CALL_HAS_CLASSES, HAS_CLASSES, Refused, Unresolved, is_plain

_CLASSES = HAS_CLASSES | CALL_HAS_CLASSES
SETTLE_NAME = "typedcoll.compat.settle"


def _encode(value: Any, flags: int = 0) -> Tuple[Any, int, Optional[str]]:
    """(tree, flags, None) or (None, 0, the refusal's text)."""
    try:
        tree, flags = tagged.encode(value, flags)
    except Refused as exc:
        return None, 0, exc.text()
    return tree, flags, None


def _site() -> str:
    frame = user_frame(2)
    return format_site(frame.f_code, frame.f_lasti) if frame is not None else "?"


# --- rebuilding values, and agreeing on whether every rank could ---------------------------------
class _Rebuilt:
    """The values of one call on this rank, or the first failure to rebuild one."""

    __slots__ = ("values", "failure", "source", "interrupt")

    def __init__(self) -> None:
        self.values: List[Any] = []
        self.failure: Optional[str] = None
        self.source = -1
        self.interrupt: Optional[BaseException] = None  # raised here once the peers know


def _rebuild(trees: Sequence[Any], sources: Sequence[int]) -> _Rebuilt:
    out = _Rebuilt()
    for tree, source in zip(trees, sources):
        try:
            out.values.append(tagged.decode(tree))
        except BaseException as exc:  # malformed markers, classes this rank lacks, a hook's
            out.failure = str(exc) if isinstance(exc, Unresolved) else \
                f"{type(exc).__name__}: {exc}"
            out.source = source
            if not isinstance(exc, Exception):  # an interrupt: its peers still settle with it
                out.interrupt = exc
            return out
    return out


def _settle(p: Protocol, rebuilt: _Rebuilt, op: str, seq: int, step: Any) -> None:
    """One more exchange: every rank says whether it rebuilt every value; all raise the first
    failure, or none does."""
    mine = None if rebuilt.failure is None else (rebuilt.source, rebuilt.failure)
    reports = ops.allgather(p, mine, Optional[Tuple[int, str]], step, SETTLE_NAME)
    _raise_first(p, [(r, rep) for r, rep in enumerate(reports) if rep is not None], op, seq)


def _raise_first(p: Protocol, failures: List[Tuple[int, Any]], op: str, seq: int) -> None:
    if not failures:
        return
    rank, (source, detail) = failures[0]
    more = "" if len(failures) == 1 else f" (and {len(failures) - 1} more ranks)"
    raise DecodeError(f"{heading(p, seq)}: {op}[Any] at {_site()}: rank {rank}{more} could "
                      f"not rebuild the value from rank {source}: {detail}",
                      seq=seq, comm=p.name, source=source, schema="Any")


def _finish(p: Protocol, trees: Sequence[Any], sources: Sequence[int], flags: int, op: str,
            seq: int, step: Any, rebuild: bool = True) -> List[Any]:
    """Rebuild the values (where ``rebuild``), settling when any holds classes."""
    if not flags and rebuild and not tagged.any_tagged(trees):
        return list(trees)  # plain values: decoded as they were sent (the common case)
    settling = bool(flags & _CLASSES)
    rebuilt = _rebuild(trees, sources) if rebuild else _Rebuilt()
    try:
        if settling:
            _settle(p, rebuilt, op, seq, step)
    finally:
        if rebuilt.interrupt is not None:  # settled first, so the peers are not left waiting
            raise rebuilt.interrupt
    if not settling and rebuilt.failure is not None:
        # A malformed value: the same bytes fail on every rank, so no settle is needed.
        _raise_first(p, [(p.rank, (rebuilt.source, rebuilt.failure))], op, seq)
    return rebuilt.values


def _flags(trees: Sequence[Any]) -> int:
    flags = 0
    for tree in trees:
        flags |= tagged.flags_of(tree)
    return flags


# --- the collectives ---------------------------------------------------------------------------
def _tree(value: Any) -> Tuple[Any, Optional[str]]:
    """What to send for ``value`` (itself where msgpack alone brings it back: the common case,
    tested without the tagger's calls), or the refusal's text."""
    try:
        if is_plain(value, 0):
            return value, None
    except RecursionError:  # deep in this rank's stack: encode() decides on a fresh one
        pass
    tree, _, error = _encode(value)
    return tree, error


def allgather(p: Protocol, value: Any, step: Any = None, name: Any = None) -> List[Any]:
    tree, error = _tree(value)
    if error is not None:
        ops.refuse(p, "allgather", GATHER, error, step, name)
    seq = p.seq
    trees = ops.allgather(p, tree, Any, step, name)
    if not tagged.any_tagged(trees):
        return trees  # plain values from every rank: nothing to rebuild, nothing to settle
    return _finish(p, trees, range(p.size), _flags(trees), "allgather", seq, step)


def _gathered(p: Protocol, op: str, value: Any, root: Any, code: int, op_error: Optional[str],
              step: Any, name: Any) -> Tuple[List[Any], int, int, int]:
    """Every rank's value on every rank, decoded except on a gather's non-roots: (trees,
    flags, root, seq). The envelope says ``op`` with its root (None: none) and reduce op, so
    those are compared too."""
    root_error = check_root(root, p.size) if root is not None else None
    root = NO_ROOT if root is None or root_error else int(root)
    tree, error = _tree(value)
    seq = p.seq
    out = fast.TAKE_PY
    if op_error is None and root_error is None and error is None:
        out = fast.gathered(p, tree, Any, step, name, op, code, root)
        if out.__class__ is list:  # the C path's steady state: every payload inline
            if op == "gather" and p.rank != root:
                return [], _inline_flags(p), root, seq  # nothing decoded here
            trees = out[0] if op == "gather" else out
            return trees, _flags(trees) if tagged.any_tagged(trees) else 0, root, seq
    call = ops.value_call(op, GATHER, tree, Any, step, name, root=root, reduce_op=code,
                          error=first_error(op_error, root_error, error))

    def rest(c: Any) -> Tuple[List[Any], int]:
        bufs = payloads.gathered(p, c)
        flags = 0
        for buf in bufs:
            flags |= tagged.flags_of_bytes(buf)
        # Decode here: the buffers are the protocol's, and the next exchange reuses them.
        if op == "gather" and p.rank != c.root:
            return [], flags
        return [payloads.decode(p, c, buf, r) for r, buf in enumerate(bufs)], flags

    trees, flags = ops.run_after_fast(p, out, call, rest)
    return trees, flags, root, seq


def _inline_flags(p: Protocol) -> int:
    """Every rank's payload flags, read as ``rest`` reads them from the exchange's buffers (a
    gather's other ranks, which decode nothing, still settle where a value holds classes)."""
    return tagged.flags_of_slots(p.recv, p.slot, p.size, HEADER_SIZE)


def gather(p: Protocol, value: Any, root: Any = 0, step: Any = None,
           name: Any = None) -> Optional[List[Any]]:
    trees, flags, root, seq = _gathered(p, "gather", value, root, 0, None, step, name)
    here = p.rank == root
    got = _finish(p, trees, range(p.size), flags, "gather", seq, step, rebuild=here)
    return got if here else None


def allreduce(p: Protocol, value: Any, op: Any = "sum", step: Any = None,
              name: Any = None) -> Any:
    code, op_error = check_reduce_op(op)
    trees, flags, _, seq = _gathered(p, "allreduce", value, None, code, op_error, step, name)
    got = _finish(p, trees, range(p.size), flags, "allreduce", seq, step)
    return combine(p, got, REDUCE_OP_NAMES[code], "allreduce", seq)


def reduce(p: Protocol, value: Any, op: Any = "sum", root: Any = 0, step: Any = None,
           name: Any = None) -> Any:
    code, op_error = check_reduce_op(op)
    trees, flags, root, seq = _gathered(p, "reduce", value, root, code, op_error, step, name)
    got = _finish(p, trees, range(p.size), flags, "reduce", seq, step)
    result = combine(p, got, REDUCE_OP_NAMES[code], "reduce", seq)
    return result if p.rank == root else None


def bcast(p: Protocol, value: Any, root: Any = 0, step: Any = None, name: Any = None,
          schema: Any = Any) -> Any:
    """``root``'s value on every rank. ``schema`` is ``Any``, or ``tuple[Any, ...]`` of a fixed
    length for a list broadcast item by item (torch's ``broadcast_object_list``: lengths that
    differ between ranks are then a schema mismatch)."""
    is_root = check_root(root, p.size) is None and p.rank == root
    many = schema is not Any
    tree: Any = None
    if is_root:
        if many:
            trees, errors = _encode_each(value)
            tree = None if errors else tuple(trees)
            error = errors
        else:
            tree, _, error = _encode(value)
        if error is not None:
            ops.refuse(p, "bcast", REDUCE, error, step, name, root=int(root))
    seq = p.seq
    got = ops.bcast(p, tree, root, schema, step, name)
    trees = list(got) if many else [got]
    values = _finish(p, trees, [int(root)] * len(trees), _flags(trees), "bcast", seq, step)
    return tuple(values) if many else values[0]


def _encode_each(items: Sequence[Any]) -> Tuple[List[Any], Optional[str]]:
    """Each item encoded on its own (flags per item); the first refusal's text, with its index."""
    trees = []
    for i, item in enumerate(items):
        tree, _, error = _encode(item)
        if error is not None:
            kind, _, detail = error.partition(": ")
            return [], f"{kind}: item {i}: {detail}"
        trees.append(tree)
    return trees, None


def _stamped(items: Sequence[Any]) -> Tuple[Optional[List[Any]], Optional[str]]:
    """Items encoded for scatter or alltoall: when any holds classes, every item says so, so
    every receiver knows to settle whichever item it gets."""
    trees, error = _encode_each(items)
    if error is not None:
        return None, error
    if _flags(trees) & HAS_CLASSES:
        trees = [tagged.encode(item, CALL_HAS_CLASSES)[0] for item in items]
    return trees, None


def scatter(p: Protocol, values: Any, root: Any = 0, step: Any = None, name: Any = None) -> Any:
    is_root = check_root(root, p.size) is None and p.rank == root
    trees: Any = None
    if is_root:
        if isinstance(values, Sequence) and not isinstance(values, (str, bytes)) \
                and len(values) == p.size:
            trees, error = _stamped(values)
            if error is not None:
                ops.refuse(p, "scatter", REDUCE, error, step, name, root=int(root))
        else:
            trees = values  # the core flags what is wrong with it, on this rank
    seq = p.seq
    got = parts.scatter(p, trees, root, Any, step, name)
    return _finish(p, [got], [int(root)], _flags([got]), "scatter", seq, step)[0]


def alltoall(p: Protocol, values: Any, step: Any = None, name: Any = None) -> List[Any]:
    trees: Any = values
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes)) \
            and len(values) == p.size:
        trees, error = _stamped(values)
        if error is not None:
            ops.refuse(p, "alltoall", REDUCE, error, step, name)
    seq = p.seq
    got = parts.alltoall(p, trees, Any, step, name)
    return _finish(p, got, range(p.size), _flags(got), "alltoall", seq, step)


def barrier(p: Protocol, step: Any = None, name: Any = None) -> None:
    ops.barrier(p, step, name)


def refuse(p: Protocol, op: str, error: str, step: Any = None, name: Any = None,
           root: Any = NO_ROOT) -> None:
    """Take part in ``op`` with an argument error of this rank flagged (never returns)."""
    shape = GATHER if op in ("allgather", "gather", "allreduce", "reduce") else REDUCE
    ops.refuse(p, op, shape, error, step, name,
            root=int(root) if check_root(root, p.size) is None else NO_ROOT)


# --- reductions of arbitrary objects ----------------------------------------------------------
def _elementwise(array_op: Any, scalar_op: Any) -> Any:
    """``array_op`` where either side is an array, else ``scalar_op``."""
    def apply(a: Any, b: Any) -> Any:
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return array_op(a, b)
        return scalar_op(a, b)
    return apply


# mpi4py's Python semantics of each op (``MPI.SUM(a, b)`` is ``a + b``), except that a NaN in
# max or min wins whichever rank holds it (the typed reductions' rule), and arrays compare
# element-wise.
PAIRWISE = {
    "sum": lambda a, b: a + b, "prod": lambda a, b: a * b,
    "max": _elementwise(np.maximum, nan_max), "min": _elementwise(np.minimum, nan_min),
    "land": _elementwise(np.logical_and, lambda a, b: bool(a) & bool(b)),
    "lor": _elementwise(np.logical_or, lambda a, b: bool(a) | bool(b)),
    "lxor": _elementwise(np.logical_xor, lambda a, b: bool(a) ^ bool(b)),
    "band": lambda a, b: a & b, "bor": lambda a, b: a | b, "bxor": lambda a, b: a ^ b,
}


def combine(p: Protocol, values: List[Any], op: str, what: str, seq: int) -> Any:
    """``values`` combined in rank order: the same result, or the same error, on every rank."""
    pair = PAIRWISE[op]
    acc = values[0]
    for r in range(1, len(values)):
        try:
            acc = pair(acc, values[r])
        except Exception as exc:  # a user type's operator: the same on every rank, in order
            raise CollectiveError(
                f"{heading(p, seq)}: {what}[Any] op={op} at {_site()}: combining "
                f"ranks 0..{r - 1}'s {type(acc).__name__} with rank {r}'s "
                f"{type(values[r]).__name__} failed: {type(exc).__name__}: {exc}", seq=seq,
                comm=p.name) from exc
    return acc

register_internal(__file__)
