"""TypedComm: typed, self-checking collectives. Each public method is one line over an op helper.

The op helpers take the :class:`~typedcoll._protocol.Protocol`, so the executor layer and the
torch backend reuse them unchanged. Argument problems (a bad schema, root, reduce op or step) are
never raised before the collective: the rank still takes part and flags its error, so every rank
raises in the same call and none is left waiting.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Type, TypeVar, overload

import numpy as np

from . import codecs
from ._args import check_root, check_step, first_error, payload_mode, resolve
from ._callsite import register_internal
from ._errors import DecodeError
from ._payloads import Phase1, reduce_values
from ._protocol import (_TAKE_PY, EMPTY_SCHEMA, MODE_ARRAY, MODE_EMPTY, MODE_MSG, Protocol,
                        _fast_allgather, _fast_collective)
from .codecs import KIND_NUMPY_SCALAR, SchemaInfo
from ._wire import FLAG_OVERFLOW, NO_ROOT, NO_STEP, REDUCE_OPS

T = TypeVar("T")
_ZEROS = bytes(8)
# The kinds of _speedups.collective (see _speedups.c).
_KIND_ALL, _KIND_GATHER, _KIND_BCAST, _KIND_EMPTY = 0, 1, 2, 3


def _steady(p: Protocol, value: Any, schema: Any, step: Any, op: str, root: int, reduce_code: int,
            kind: int) -> Any:
    """The C steady state of one collective (``_speedups.collective``): a list (the result, or
    for the other kinds a 1-item list holding it), ``_TAKE_PY``, or ``(code, lasti, seq)`` when
    the slots were exchanged but the call was not the steady state."""
    try:
        return _fast_collective(p, value, schema, step, op, root, reduce_code, kind)  # type: ignore[misc]
    except BaseException as exc:
        p.failed(exc)
        raise


def _unsteady(p: Protocol, out: Any, op: str, info: SchemaInfo, step: Any, root: int,
              reduce_code: int, rest: Any) -> Any:
    """Finish a collective whose slots the C path exchanged outside the steady state: the
    general path's verdict from the received slots (the error every rank agrees on, or phase 2
    when a peer overflowed), then ``rest(phase1)`` as the general path would."""
    code, lasti, seq = out
    try:  # the C path runs only without a timeout: no deadline, as on every rank
        p1 = p.unsteady_phase1(seq, op, info, code, lasti, False,
                               NO_STEP if step is None else step, None, root, reduce_code)
        result = rest(p1)
    except BaseException as exc:
        p.failed(exc)
        raise
    p.completed()
    return result


def gather_op(p: Protocol, value: Any, root: Any, schema: Any, step: Any) -> Optional[List[Any]]:
    if _fast_collective is not None and type(root) is int and 0 <= root < p.size:
        out = _steady(p, value, schema, step, "gather", root, 0, _KIND_GATHER)
        if out.__class__ is list:
            return out[0]
        if out is not _TAKE_PY:
            return _unsteady(p, out, "gather", resolve(value, schema)[0], step, root, 0,  # type: ignore[arg-type]
                             lambda p1: _gather_rest(p, p1, root))
    info, error = resolve(value, schema)
    mode, payload, array_fp, mode_error = payload_mode(info, value)
    root_error = check_root(root, p.size)
    error = first_error(error, mode_error, root_error, check_step(step))
    try:
        p1 = p.phase1("gather", info, payload, mode, root=NO_ROOT if root_error else int(root),
                      step=None if error else step, array_fp=array_fp, validate=True,
                      error=error)
        out = _gather_rest(p, p1, int(root))
    except BaseException as exc:
        p.failed(exc)
        raise
    p.completed()
    return out


def _gather_rest(p: Protocol, p1: Phase1, root: int) -> Optional[List[Any]]:
    bufs = p.gather_payloads(p1, root)
    return None if bufs is None else [p.decode(p1, b, r) for r, b in enumerate(bufs)]


def bcast_op(p: Protocol, value: Any, root: Any, schema: Any, step: Any) -> Any:
    if _fast_collective is not None and type(root) is int and 0 <= root < p.size:
        out = _steady(p, value, schema, step, "bcast", root, 0, _KIND_BCAST)
        if out.__class__ is list:
            return out[0]
        if out is not _TAKE_PY:
            return _unsteady(p, out, "bcast", resolve(value, schema)[0], step, root, 0,  # type: ignore[arg-type]
                             lambda p1: p.decode(p1, p.bcast_payload(p1, root), root))
    root_error = check_root(root, p.size)
    is_root = root_error is None and p.rank == root
    info, error = resolve(value, schema)
    if not is_root and schema is None and value is None:
        # Without a schema a non-root cannot know what it will decode; the root's type is not
        # something it may guess (that would be pickle's positional trust again).
        error = ("TypeError: expected schema= on the non-root ranks of bcast (the type of the "
                 "root's value), got none")
    mode, payload, _, mode_error = payload_mode(info, value) if is_root else (MODE_EMPTY, None,
                                                                               _ZEROS, None)
    error = first_error(error, mode_error, root_error, check_step(step))
    try:
        p1 = p.phase1("bcast", info, payload, mode, root=NO_ROOT if root_error else int(root),
                      step=None if error else step, error=error)
        out = p.decode(p1, p.bcast_payload(p1, int(root)), int(root))
    except BaseException as exc:
        p.failed(exc)
        raise
    p.completed()
    return out


def allreduce_op(p: Protocol, value: Any, op: Any, step: Any) -> Any:
    reduce_code = REDUCE_OPS.get(op) if isinstance(op, str) else None
    if _fast_collective is not None and reduce_code is not None and type(value) in (int, float):
        out = _steady(p, value, None, step, "allreduce", NO_ROOT, reduce_code, _KIND_ALL)
        if out.__class__ is list:
            return reduce_values(out, op)
        if out is not _TAKE_PY:
            return _unsteady(p, out, "allreduce", codecs.resolve(type(value)), step, NO_ROOT,
                             reduce_code, lambda p1: _allreduce_rest(p, p1, value, op, MODE_MSG))
    op_error = None if reduce_code is not None else (
        f"ValueError: expected op 'sum', 'max', 'min' or 'prod', got {op!r}")
    info: Optional[SchemaInfo] = None
    mode, payload, array_fp, value_error = MODE_MSG, value, _ZEROS, None
    is_scalar = isinstance(value, np.generic)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.generic, np.ndarray)):
        value_error = (f"TypeError: expected an int, float, numpy scalar or numpy array, got "
                       f"{type(value).__name__}")
    elif isinstance(value, (np.ndarray, np.generic)):
        payload = np.asarray(value)
        if payload.dtype.kind not in "iufc":
            value_error = f"TypeError: expected a numeric dtype, got {payload.dtype}"
        info = codecs.resolve(type(value) if is_scalar else np.ndarray)
        mode = MODE_ARRAY
        array_fp = codecs.array_fingerprint(payload.dtype.str, payload.shape)
    else:
        info = codecs.resolve(type(value))
    error = first_error(value_error, op_error, check_step(step))
    try:
        p1 = p.phase1("allreduce", info, payload, mode, reduce_op=reduce_code or 0,
                      step=None if error else step, array_fp=array_fp, error=error)
        result = _allreduce_rest(p, p1, payload, op, mode)
        if is_scalar:
            result = result[()]
    except BaseException as exc:
        p.failed(exc)
        raise
    p.completed()
    return result


def _allreduce_rest(p: Protocol, p1: Phase1, payload: Any, op: str, mode: int) -> Any:
    overflowed = [bool(f & FLAG_OVERFLOW) for f in p1.flags]
    if any(overflowed) and (not all(overflowed) or mode != MODE_ARRAY):
        # Equal dtype and shape (checked) make every rank overflow alike, and only arrays can:
        # anything else is a corrupt header.
        raise DecodeError(f"collective #{p1.seq} on {p.name}: expected every rank or none "
                          f"to send an overflowing array, got overflow flags "
                          f"{[int(o) for o in overflowed]}", seq=p1.seq, comm=p.name,
                          source=overflowed.index(not overflowed[p.rank]) if not all(
                              overflowed) else p.rank, schema=p1.info.name if p1.info else "?")
    if overflowed[0]:
        return p.allreduce_large(p1, payload, op)
    values = [_decode_reduce(p, p1, buf, r)
              for r, buf in enumerate(p.gather_payloads(p1))]  # type: ignore[arg-type]
    return reduce_values(values, op)


def _decode_reduce(p: Protocol, p1: Phase1, buf: Any, source: int) -> Any:
    if p1.info is not None and p1.info.kind == KIND_NUMPY_SCALAR:
        # Reduce numpy scalars as 0-d arrays: array ufuncs wrap on integer overflow like MPI,
        # where scalar arithmetic would warn.
        array_info = codecs.resolve(np.ndarray)
        return p.decode(Phase1(p1.seq, p1.flags, p1.lengths, None, None, array_info, p1.op), buf,
                        source)
    return p.decode(p1, buf, source)


def barrier_op(p: Protocol) -> None:
    if _fast_collective is not None:
        out = _steady(p, None, None, None, "barrier", NO_ROOT, 0, _KIND_EMPTY)
        if out.__class__ is list:
            return
        if out is not _TAKE_PY:
            _unsteady(p, out, "barrier", EMPTY_SCHEMA, None, NO_ROOT, 0, lambda p1: None)
            return
    empty_op(p, "barrier")


def empty_op(p: Protocol, op: str, error: Optional[str] = None) -> Phase1:
    """A collective with no payload (barrier, split, dup): envelopes only."""
    try:
        p1 = p.phase1(op, EMPTY_SCHEMA, None, MODE_EMPTY, error=error)
    except BaseException as exc:
        p.failed(exc)
        raise
    p.completed()
    return p1


class TypedComm:
    """Typed, self-checking collectives over an mpi4py intracommunicator (or torch.distributed).

    Every collective carries a schema-tagged, sequence-numbered envelope that every rank checks:
    ranks that disagree about what they are calling all raise :class:`DesyncError` in the same
    call. ``timeout`` bounds each collective in seconds (None: wait forever). Typed traffic runs
    on a private duplicate of ``comm``, so it never mixes with the caller's own messages.
    """

    def __init__(self, comm: Any, timeout: Optional[float] = None, *,
                 name: Optional[str] = None) -> None:
        from ._mpi import MPITransport, comm_name
        if not hasattr(comm, "Dup"):
            raise TypeError(f"expected an mpi4py intracommunicator, got {comm!r} (for "
                            f"torch.distributed use TypedComm.from_torch)")
        self._p = Protocol(MPITransport(comm.Dup()), name or comm_name(comm), timeout)

    @classmethod
    def _from_transport(cls, transport: Any, name: str, timeout: Optional[float]) -> "TypedComm":
        self = cls.__new__(cls)
        self._p = Protocol(transport, name, timeout)
        return self

    @classmethod
    def from_torch(cls, group: Any = None, timeout: Optional[float] = None, *,
                   name: Optional[str] = None,
                   tensor_check: Optional[str] = None) -> "TypedComm":
        """A TypedComm over an initialised torch.distributed process group (default: world).

        ``tensor_check`` chooses how CUDA tensor envelopes are verified: "deferred" (default;
        no host sync, verified at the next tensor call or :meth:`synchronize`) or "eager" (one
        host sync per call, verified before the payload reaches NCCL); see docs/torch.md.
        """
        from ._torch import transport_for_group
        transport, default_name = transport_for_group(group)
        comm = cls._from_transport(transport, name or default_name, timeout)
        if tensor_check is not None:
            from ._tensor_device import set_tensor_check
            set_tensor_check(comm, tensor_check)
        return comm

    @property
    def rank(self) -> int:
        return self._p.rank

    @property
    def size(self) -> int:
        return self._p.size

    @property
    def seq(self) -> int:
        """Collectives issued so far on this communicator: the 0-based number of the next one."""
        return self._p.seq

    @property
    def name(self) -> str:
        return self._p.name

    @property
    def timeout(self) -> Optional[float]:
        return self._p.timeout

    def __repr__(self) -> str:
        return f"TypedComm({self.name}, rank {self.rank} of {self.size}, seq {self.seq})"

    @overload
    def allgather(self, value: T, *, schema: None = None, step: Optional[int] = None) -> List[T]: ...
    @overload
    def allgather(self, value: Any, *, schema: Type[T], step: Optional[int] = None) -> List[T]: ...
    @overload
    def allgather(self, value: Any, *, schema: Any, step: Optional[int] = None) -> List[Any]: ...

    def allgather(self, value, *, schema=None, step=None):
        """Every rank's value, in rank order. ``schema`` defaults to ``type(value)``."""
        if _fast_allgather is None:
            return self._p.allgather(value, schema, step)
        try:  # the C steady state, called from here to save a Python frame per collective
            out = _fast_allgather(self._p, value, schema, step, "allgather", False)
        except BaseException as exc:
            self._p.failed(exc)
            raise
        if out.__class__ is list:
            return out
        return self._p.after_fast(out, value, schema, step, "allgather", False)

    @overload
    def gather(self, value: T, root: int = 0, *, schema: None = None,
               step: Optional[int] = None) -> Optional[List[T]]: ...
    @overload
    def gather(self, value: Any, root: int = 0, *, schema: Type[T],
               step: Optional[int] = None) -> Optional[List[T]]: ...
    @overload
    def gather(self, value: Any, root: int = 0, *, schema: Any,
               step: Optional[int] = None) -> Optional[List[Any]]: ...

    def gather(self, value, root=0, *, schema=None, step=None):
        """Every rank's value on ``root`` (in rank order); None on the other ranks."""
        return gather_op(self._p, value, root, schema, step)

    @overload
    def bcast(self, value: T, root: int = 0, *, schema: None = None,
              step: Optional[int] = None) -> T: ...
    @overload
    def bcast(self, value: Any, root: int = 0, *, schema: Type[T],
              step: Optional[int] = None) -> T: ...
    @overload
    def bcast(self, value: Any, root: int = 0, *, schema: Any, step: Optional[int] = None) -> Any: ...

    def bcast(self, value, root=0, *, schema=None, step=None):
        """``root``'s value on every rank; other ranks' ``value`` is ignored (pass None)."""
        return bcast_op(self._p, value, root, schema, step)

    def allreduce(self, value: T, op: str = "sum", *, step: Optional[int] = None) -> T:
        """Combine ints, floats, numpy scalars or arrays with "sum", "max", "min" or "prod"."""
        return allreduce_op(self._p, value, op, step)

    def barrier(self) -> None:
        """Wait until every rank arrives (and check that they all called barrier)."""
        barrier_op(self._p)

    def split(self, color: Optional[int], key: int = 0) -> Optional["TypedComm"]:
        """A TypedComm per color, ranks ordered by key; None where color is None."""
        error = None
        if color is not None and (not isinstance(color, int) or isinstance(color, bool)
                                  or color < 0):
            error = f"ValueError: expected color to be None or an int >= 0, got {color!r}"
        elif not isinstance(key, int) or isinstance(key, bool):
            error = f"TypeError: expected key to be an int, got {key!r}"
        empty_op(self._p, "split", error)
        sub = self._p.transport.split(color, key)
        if sub is None:
            return None
        return TypedComm._from_transport(sub, f"{self.name}.split({color})", self.timeout)

    def dup(self) -> "TypedComm":
        """A TypedComm over a new communicator with the same ranks and its own sequence."""
        empty_op(self._p, "dup")
        return TypedComm._from_transport(self._p.transport.dup(), f"{self.name}.dup",
                                         self.timeout)

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (after a CollectiveTimeout, say)."""
        self._p.transport.abort(code)

    # --- tensor collectives (torch.distributed backend) ------------------------------------
    def all_gather_tensor(self, tensor: Any, *, name: str = "", step: Optional[int] = None) -> Any:
        """Checked all-gather of ``tensor`` along dim 0 (torch backend)."""
        from . import _tensor
        return _tensor.all_gather_tensor(self._p, tensor, name, step)

    def all_reduce_tensor(self, tensor: Any, op: str = "sum", *, name: str = "",
                          step: Optional[int] = None) -> Any:
        """Checked all-reduce of ``tensor`` (torch backend)."""
        from . import _tensor
        return _tensor.all_reduce_tensor(self._p, tensor, op, name, step)

    def broadcast_tensor(self, tensor: Any, root: int = 0, *, name: str = "",
                         step: Optional[int] = None) -> Any:
        """Checked broadcast of ``root``'s ``tensor`` (torch backend)."""
        from . import _tensor
        return _tensor.broadcast_tensor(self._p, tensor, root, name, step)

    def reduce_scatter_tensor(self, tensor: Any, op: str = "sum", *, name: str = "",
                              step: Optional[int] = None) -> Any:
        """Checked reduce-scatter of ``tensor`` along dim 0 (torch backend)."""
        from . import _tensor
        return _tensor.reduce_scatter_tensor(self._p, tensor, op, name, step)

    def synchronize(self) -> None:
        """Verify every deferred tensor check now (torch/NCCL backend); no-op elsewhere."""
        from . import _tensor
        _tensor.synchronize(self._p)


register_internal(__file__)
