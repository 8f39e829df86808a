"""The collectives, each as one function over a :class:`~typedcoll.core.protocol.Protocol`.

Each op builds one :class:`Call` from its arguments (argument errors become the call's flagged
error, never a raise: every rank must reach the exchange), chooses its exchange shape, and says
what follows the verdict: which payloads move in phase 2 and which are decoded. ``run`` wraps
the protocol's steps around that. The C fast path (``fast``) serves the steady state of the hot
ops first and hands the rest to these functions.
"""

from __future__ import annotations

from typing import Any, Callable, List, NoReturn, Optional, Tuple

import numpy as np

from ..codecs import KIND_NUMPY_SCALAR, array_fingerprint, check_operands, reduce_values, resolve
from .transport import TransportTimeout
from . import fast, guesses, payloads, verdict
from .verdict import where
from .args import (check_reduce_op, check_root, check_step, first_error, payload_mode,
                   schema_of)
from .call import MODE_ARRAY, MODE_EMPTY, Call
from .errors import DecodeError
from .identity import check_name
from .plumbing import register_internal
from .protocol import Protocol
from .settle import settled
from .wire import (FLAG_OVERFLOW, FLAG_WILD_SCHEMA, GATHER, NO_ROOT, REDUCE, REDUCE_OP_NAMES,
                   block_flags)

_ZEROS = bytes(8)
# Up to this many ranks, rooted ops that need every rank's payload (gather, reduce) take them in
# the GATHER exchange itself: one backend operation. Beyond it, a REDUCE exchange (O(log N))
# and the backend's own rooted gather.
GATHER_DIRECT_MAX = 16


def run(p: Protocol, call: Call, rest: Callable[[Call], Any]) -> Any:
    """Start, exchange, then ``rest(call)``: the op's phase 2 and decoding."""
    p.start(call)
    try:
        p.exchange(call)
        result = settled(p, call, rest)
    except BaseException as exc:
        # An interrupt flagged to every rank as this rank's error is what it raises, records
        # and logs, not the EncodeError its flag raised here.
        p.failed(exc if call.interrupt is None else call.interrupt)
        if call.interrupt is not None:
            raise call.interrupt from None
        raise
    p.completed(call)
    return result


def refuse(p: Protocol, op: str, shape: int, error: str, step: Any, name: Any, *,
           schema: Any = Any, root: int = NO_ROOT, reduce_op: int = 0) -> NoReturn:
    """Take part in ``op`` with this rank's argument ``error`` flagged: every rank raises in
    it (EncodeError here, PeerError on the others), so no peer is left waiting in it."""
    call = value_call(op, shape, None, schema, step, name, root=root, reduce_op=reduce_op,
                      error=error)
    run(p, call, lambda c: None)
    raise AssertionError("a flagged error raises in the exchange")  # pragma: no cover


def run_after_fast(p: Protocol, out: Any, call: Call, rest: Callable[[Call], Any]) -> Any:
    """``run``, or ``finish`` where the C fast path already started and exchanged ``call``
    (``out``: its answer that was not the steady state's; ``fast.TAKE_PY``: it did nothing)."""
    if out is fast.TAKE_PY:
        return run(p, call, rest)
    return finish(p, fast.resumed(p, call, out), rest)


def finish(p: Protocol, call: Call, rest: Callable[[Call], Any]) -> Any:
    """``run`` after the C fast path already started and exchanged ``call``."""
    try:
        if call.timed_out:
            verdict.timed_out(p, call)
        p.after_exchange(call)
        result = settled(p, call, rest)
    except BaseException as exc:
        p.failed(exc)
        raise
    p.completed(call)
    return result


def _common(step: Any, name: Any) -> Tuple[Any, Any, Optional[str]]:
    """(step, name, error): a bad step or name is flagged, and left out of the header."""
    step_error, name_error = check_step(step), check_name(name)
    return (None if step_error else step, None if name_error else name,
            first_error(step_error, name_error))


def _array_fp(meta: Any, same_shape: bool) -> bytes:
    if meta is None:
        return _ZEROS
    return array_fingerprint(meta[1], meta[0] if same_shape else None)


def value_call(op: str, shape: int, value: Any, schema: Any, step: Any, name: Any, *,
               root: int = NO_ROOT, reduce_op: int = 0, same_shape: bool = False,
               validate: bool = False, error: Optional[str] = None) -> Call:
    """A call where this rank contributes ``value`` under ``schema``."""
    info, schema_error = schema_of(value, schema)
    mode, encoded, meta, mode_error = payload_mode(info, value)
    step, name, common_error = _common(step, name)
    return Call(op, shape, info, mode, encoded, root=root, reduce_op=reduce_op, step=step,
                name=name, error=first_error(error, schema_error, mode_error, common_error),
                array_fp=_array_fp(meta, same_shape), array_meta=meta, same_shape=same_shape,
                validate=validate)


# --- allgather ---------------------------------------------------------------------------------
def allgather(p: Protocol, value: Any, schema: Any, step: Any, name: Any,
              op: str = "allgather", out: Any = None) -> List[Any]:
    """``out``: the C path's answer where the caller already ran it (TypedComm), else None."""
    if out is None:
        out = fast.allgather(p, value, schema, step, name, op)
        if out.__class__ is list:
            return out
    call = value_call(op, GATHER, value, schema, step, name)
    return run_after_fast(p, out, call, lambda c: _decode_all(p, c))  # type: ignore[no-any-return]


def _decode_all(p: Protocol, call: Call) -> List[Any]:
    bufs = payloads.gathered(p, call)
    arrays = payloads.equal_split_arrays(call, bufs) if call.mode == MODE_ARRAY else None
    if arrays is not None:
        return arrays
    return [payloads.decode(p, call, buf, r) for r, buf in enumerate(bufs)]


# --- gather and reduce to a root --------------------------------------------------------------
def gather(p: Protocol, value: Any, root: Any, schema: Any, step: Any,
           name: Any, out: Any = None) -> Optional[List[Any]]:
    direct = p.size <= GATHER_DIRECT_MAX
    if not direct:
        out = fast.TAKE_PY
    elif out is None:
        out = fast.rooted(p, value, schema, step, name, "gather", root)
        if out.__class__ is list:
            return out[0]  # type: ignore[no-any-return]
    root_error = check_root(root, p.size)
    call = value_call("gather", GATHER if direct else REDUCE, value, schema, step, name,
                      root=NO_ROOT if root_error else int(root), validate=True,
                      error=root_error)
    rest = lambda c: _at_root(p, c, c.root, lambda values: values)  # noqa: E731
    return run_after_fast(p, out, call, rest)  # type: ignore[no-any-return]


def reduce(p: Protocol, value: Any, op: Any, root: Any, step: Any, name: Any,
           out: Any = None) -> Any:
    """``out``: the C path's answer where the caller already ran it (TypedComm), else None."""
    code, op_error = check_reduce_op(op)
    direct = p.size <= GATHER_DIRECT_MAX
    if out is not None:
        pass
    elif direct and op_error is None and type(value) in (int, float):
        out = fast.reduce(p, value, step, name, code, root)
        if out.__class__ is list:
            return reduced_at_root(out, code)
    else:
        out = fast.TAKE_PY
    root_error = check_root(root, p.size)
    call = _reduce_call("reduce", GATHER if direct else REDUCE, value, code, step, name,
                        root=NO_ROOT if root_error else int(root),
                        error=first_error(op_error, root_error))
    op_name = REDUCE_OP_NAMES.get(code, "sum")
    rest = lambda c: _at_root(p, c, c.root,  # noqa: E731
                              lambda values: _combine(values, op_name, c))
    return run_after_fast(p, out, call, rest)


def reduced_at_root(out: List[Any], code: int) -> Any:
    """A C-path reduce's answer: ``[values]`` on the root, ``[None]`` elsewhere."""
    values = out[0]
    return None if values is None else reduce_values(values, REDUCE_OP_NAMES[code])


def _at_root(p: Protocol, call: Call, root: int, finish_values: Callable[[List[Any]], Any]) -> Any:
    """Every rank's payload on ``root`` only, decoded there (each was checked on its sender)."""
    if call.shape == GATHER:
        bufs = payloads.gathered_to(p, call, root)
    else:
        own = call.overflow if call.overflow is not None else bytes(
            p.send_view[64:64 + _own_length(p)])
        try:
            bufs = p.transport.gather_parts(own, root, call.deadline)
        except TransportTimeout:
            verdict.timed_out(p, call)
    if bufs is None:
        return None
    return finish_values([_decode_reduce(p, call, buf, r) for r, buf in enumerate(bufs)])


def _own_length(p: Protocol) -> int:
    return int.from_bytes(p.send[60:64], "little")


# --- bcast -------------------------------------------------------------------------------------
def bcast(p: Protocol, value: Any, root: Any, schema: Any, step: Any, name: Any,
          out: Any = None) -> Any:
    if out is None:
        out = fast.rooted(p, value, schema, step, name, "bcast", root)
        if out.__class__ is list:
            return out[0]
    root_error = check_root(root, p.size)
    is_root = root_error is None and p.rank == root
    step, name, common_error = _common(step, name)
    wild = not is_root and schema is None
    info, schema_error = (None, None) if wild else schema_of(value, schema)
    mode, encoded, meta, mode_error = payload_mode(info, value) if is_root else (
        MODE_EMPTY, None, None, None)
    call = Call("bcast", REDUCE, info, mode, encoded, root=NO_ROOT if root_error else int(root),
                step=step, name=name, wild=wild,
                error=first_error(root_error, schema_error, mode_error, common_error))
    rest = lambda c: _from_root(p, c, payloads.root_payload(p, c, c.root), c.root)  # noqa: E731
    return run_after_fast(p, out, call, rest)


def _from_root(p: Protocol, call: Call, buf: Any, root: int) -> Any:
    """A root's payload: its class path, then its value, decoded as the agreed schema."""
    path, rest = payloads.split_path(p, call, buf, root)
    info = call.info
    error = ""
    found = call.wild  # this rank finds the root's class by name, and remembers it (guess)
    if call.wild:
        info, error = payloads.resolve_wild(p, call, path)
    elif call.guessed and info is not None and path != info.path_prefix[1:].decode(
            errors="replace"):
        # The fingerprint (structure and qualified name) agreed, the module did not: the root's
        # own class where this rank has it, else the guessed one, which decodes alike (no
        # outcome only this rank could judge, so nothing to settle).
        other, _ = payloads.resolve_wild(p, call, path)
        if other is not None and (other.hook is None) == (info.hook is None):
            # (Where only one of them runs hooks, the guessed one, which set the header's
            # flag, decodes: the ranks agreed whether to settle from it.)
            info, found = other, True
    if block_flags(p.block) & FLAG_WILD_SCHEMA:
        # Finding a class by name depends on what this rank imported: agree on the outcome
        # (one more exchange, which reuses the buffers the payload sits in).
        rest = bytes(rest)
        p.settle(call, error or None, hook=info is not None and info.hook is not None)
    if found and info is not None:
        guesses.remember(p, call, info)
    return payloads.decode(p, call, rest, root, info)


# --- allreduce ---------------------------------------------------------------------------------
def allreduce(p: Protocol, value: Any, op: Any, step: Any, name: Any, out: Any = None) -> Any:
    """``out``: the C path's answer where the caller already ran it (TypedComm), else None."""
    code, op_error = check_reduce_op(op)
    if out is not None:
        pass
    elif op_error is None and type(value) in (int, float):
        out = fast.allreduce(p, value, step, name, code)
        if out.__class__ is list:
            return reduce_values(out, REDUCE_OP_NAMES[code])
    else:
        out = fast.TAKE_PY
    call = _reduce_call("allreduce", GATHER, value, code, step, name, error=op_error)
    op_name = REDUCE_OP_NAMES.get(code, "sum")
    rest = lambda c: _allreduce_rest(p, c, op_name)  # noqa: E731
    return run_after_fast(p, out, call, rest)


def _reduce_call(op: str, shape: int, value: Any, code: int, step: Any, name: Any, *,
                 root: int = NO_ROOT, error: Optional[str] = None) -> Call:
    """A call contributing a number, numpy scalar or array to a reduction."""
    value_error = None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.generic, np.ndarray)):
        value_error = (f"TypeError: expected an int, float, numpy scalar or numpy array, got "
                       f"{type(value).__name__}"
                       + (" (send int(flag) or numpy.bool_(flag))" if isinstance(value, bool)
                          else ""))
        schema: Any = type(None)
    elif isinstance(value, (np.ndarray, np.generic)):
        kind = np.asarray(value).dtype.kind
        if kind not in "biufc":
            value_error = f"TypeError: expected a numeric dtype, got {np.asarray(value).dtype}"
        elif code:
            value_error = check_operands(REDUCE_OP_NAMES[code], kind) or None
        schema = type(value) if isinstance(value, np.generic) else np.ndarray
    else:
        if code and isinstance(value, float):
            value_error = check_operands(REDUCE_OP_NAMES[code], "f") or None
        schema = type(value)
    return value_call(op, shape, value, schema, step, name, root=root, reduce_op=code,
                      same_shape=True, validate=shape == REDUCE,
                      error=first_error(error, value_error))


# Reductions whose result is the same bit for bit in any order: integer arithmetic wraps alike,
# min, max and the bitwise ops are exact. Only these may use the backend's own reduction, past
# the slot; every other array is combined in rank order, as inline ones are (floats round by
# order; the NaN rule; bools).
_ORDER_FREE = frozenset({"sum", "prod", "max", "min", "band", "bor", "bxor"})


def _allreduce_rest(p: Protocol, call: Call, op: str) -> Any:
    flags = [p.recv[r * p.slot + 56] & FLAG_OVERFLOW for r in range(p.size)]
    if any(flags):
        if not all(flags) or call.mode != MODE_ARRAY:
            # Equal dtype and shape (checked) make every rank overflow alike, and only arrays
            # can: anything else is a corrupt header.
            source = flags.index(0) if not all(flags) else p.rank
            raise DecodeError(f"{where(p, call)}: expected every rank or "
                              f"none to send an overflowing array, got overflow flags "
                              f"{[int(bool(f)) for f in flags]}", seq=call.seq, comm=p.name,
                              source=source, schema=call.schema_name)
        array = np.asarray(call.value)
        if op in _ORDER_FREE and array.dtype.kind in "iu":
            try:
                return p.transport.allreduce_array(array, op, call.deadline)
            except TransportTimeout:
                verdict.timed_out(p, call)
    values = [_decode_reduce(p, call, buf, r)
              for r, buf in enumerate(payloads.gathered(p, call))]
    return _combine(values, op, call)


def _decode_reduce(p: Protocol, call: Call, buf: Any, source: int) -> Any:
    if call.info is not None and call.info.kind == KIND_NUMPY_SCALAR:
        # Reduce numpy scalars as 0-d arrays: array ufuncs wrap on integer overflow like MPI,
        # where scalar arithmetic would warn.
        return payloads.decode(p, call, buf, source, resolve(np.ndarray))
    return payloads.decode(p, call, buf, source)


def _combine(values: List[Any], op: str, call: Call) -> Any:
    result = reduce_values(values, op)
    if call.info is not None and call.info.kind == KIND_NUMPY_SCALAR:
        return result[()]
    return result


# --- barrier -----------------------------------------------------------------------------------
def barrier(p: Protocol, step: Any, name: Any, out: Any = None) -> None:
    if out is None:
        out = fast.empty(p, step, name)
        if out.__class__ is list:
            return
    step, name, error = _common(step, name)
    call = Call("barrier", REDUCE, None, MODE_EMPTY, None, step=step, name=name, error=error)
    run_after_fast(p, out, call, lambda c: None)


register_internal(__file__)
