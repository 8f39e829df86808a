"""TypedComm: typed, self-checking collectives. Each public method is one call into the core.

Argument problems (a bad schema, root, reduce op, step or name) are never raised before the
collective: the rank still takes part and flags its error, so every rank raises in the same call
and none is left waiting (see ``core.protocol``).

The hot collectives (allgather, gather, bcast, scatter, allreduce, reduce, barrier) call the
C path's steady state straight from here where it is bound (``p.fast``), and hand anything else
to ``core.ops`` or ``core.parts`` with its answer (``out=``): naming the call site takes a frame
object of every frame between the caller and the C code, so each layer in between costs every
call (docs/bench.md has the figures). That is also why the rooted ones repeat the same few
lines rather than share a helper around the C call.

The tensor collectives and the point-to-point methods are TypedComm's bases, each written in
a module of its own (``_comm_tensors.py``, ``_comm_p2p.py``).
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional, Sequence, Type, TypeVar, overload

import numpy as np

from .core import fast, lifecycle, ops, parts
from .core.args import check_step
from .core.channel import Channel
from .core.plumbing import register_internal
from .core.protocol import Protocol
from .codecs import reduce_values
from .core.wire import NO_STEP, REDUCE_OP_NAMES, REDUCE_OPS
from ._comm_p2p import PointToPoint
from ._comm_tensors import TensorCollectives

T = TypeVar("T")
_C = fast.entries()  # the C path's entry points (None without the extension)
_NDARRAY = np.ndarray


class TypedComm(TensorCollectives, PointToPoint):
    """Typed, self-checking collectives over an mpi4py intracommunicator (or torch.distributed).

    Every collective carries an envelope that every rank checks: which call it is (its
    ``name=``, else its call site), which communicator, op, schema, step, root, reduce op and
    array shape. Ranks that disagree all raise :class:`DesyncError` in the same call.
    ``timeout`` bounds each collective in seconds (None: wait forever), and must be the same on
    every rank; creating the communicator waits at least 10 s whatever it is, since peers may
    still be starting or connecting. Typed traffic runs on a private duplicate of ``comm`` (one
    per parent, shared by every TypedComm over it), so it never mixes with the caller's own
    messages.

    One thread at a time: a thread entering a collective while another is inside one on the same
    channel raises :class:`ConcurrentCallError`. Free with :meth:`free` (collective) or use as a
    context manager.
    """

    __slots__ = ("_p", "__weakref__")

    def __init__(self, comm: Any, timeout: Optional[float] = None, *,
                 name: Optional[str] = None) -> None:
        from .transports.mpi import channel_for
        self._p = _created(channel_for(comm), timeout, name)

    @classmethod
    def from_torch(cls, group: Any = None, timeout: Optional[float] = None, *,
                   name: Optional[str] = None,
                   tensor_check: Optional[str] = None) -> "TypedComm":
        """A TypedComm over an initialised torch.distributed process group (default: world).

        ``tensor_check`` chooses how CUDA tensor envelopes are verified: "deferred" (default;
        no host sync, verified at the next tensor call or :meth:`synchronize`) or "eager" (one
        host sync per call, verified before the payload reaches NCCL); see docs/torch.md.
        """
        from .transports.torch_channels import channel_for_group
        comm = cls.__new__(cls)
        comm._p = _created(channel_for_group(group, timeout), timeout, name)
        if tensor_check is not None:
            from .tensor.device import set_tensor_check
            set_tensor_check(comm._p, tensor_check)
        return comm

    @classmethod
    def _over(cls, channel: Channel, name: str, timeout: Optional[float]) -> "TypedComm":
        """A TypedComm on a channel whose settings its parent already agreed on."""
        comm = cls.__new__(cls)
        comm._p = Protocol(channel, channel.next_instance(), name, timeout)
        return comm

    # --- what it is --------------------------------------------------------------------------
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

    @property
    def step(self) -> Optional[int]:
        """The step clock (:meth:`set_step`), or None when it was never set."""
        return None if self._p.step == NO_STEP else self._p.step

    def __repr__(self) -> str:
        return f"TypedComm({self.name}, rank {self.rank} of {self.size}, seq {self.seq})"

    # --- the step clock and decisions ---------------------------------------------------------
    def set_step(self, step: Optional[int]) -> None:
        """Stamp every later collective on this communicator with ``step`` (the iteration, say)
        until the next call; a collective's own ``step=`` overrides it. Local: no communication.

        With it, a rank that skipped one call of a loop raises DesyncError at the first
        misaligned call instead of returning another iteration's data. A bad ``step`` (not an
        int) is not raised here: the next collective the clock stamps raises EncodeError on
        this rank and PeerError on the others. The clock is this communicator's own: a
        ``split`` or ``dup`` child does not follow it (another thread may use the child), so
        set it on every communicator the loop calls on.
        """
        error = check_step(step)
        p = self._p
        if error is not None:
            # Not raised here, where this rank's peers would wait for it at their next
            # collective: that collective raises it (EncodeError here, PeerError elsewhere),
            # and so does every later one until the clock is set again.
            p.step, p.step_error = None, f"{error} (given to set_step)"
            return
        p.step, p.step_error = (NO_STEP if step is None else int(step)), None

    def note(self, key: str, value: Any) -> None:
        """Record a rank-local decision (``can_queue``, a local timeout) for error reports.

        Local and cheap. A DesyncError or CollectiveTimeout lists the latest notes whose values
        differ between the groups of ranks; dumps hold them too. ``value`` should be small and
        msgspec-encodable (it is shown with ``repr`` otherwise).
        """
        self._p.note(key, value, sys._getframe(1))

    # --- collectives -----------------------------------------------------------------------
    @overload
    def allgather(self, value: T, *, schema: None = None, step: Optional[int] = None,
                  name: Optional[str] = None) -> List[T]: ...
    @overload
    def allgather(self, value: Any, *, schema: Type[T], step: Optional[int] = None,
                  name: Optional[str] = None) -> List[T]: ...
    @overload
    def allgather(self, value: Any, *, schema: Any, step: Optional[int] = None,
                  name: Optional[str] = None) -> List[Any]: ...

    def allgather(self, value: Any, *, schema: Any = None, step: Optional[int] = None,
                  name: Optional[str] = None) -> Any:
        """Every rank's value, in rank order. ``schema`` defaults to ``type(value)``."""
        p = self._p
        out = None
        if p.fast is not None and value.__class__ is not _NDARRAY:
            out = _C.allgather(p, value, schema, step, name, "allgather")
            if out.__class__ is list:
                return out
        return ops.allgather(p, value, schema, step, name, out=out)

    @overload
    def gather(self, value: T, root: int = 0, *, schema: None = None,
               step: Optional[int] = None, name: Optional[str] = None) -> Optional[List[T]]: ...
    @overload
    def gather(self, value: Any, root: int = 0, *, schema: Type[T], step: Optional[int] = None,
               name: Optional[str] = None) -> Optional[List[T]]: ...
    @overload
    def gather(self, value: Any, root: int = 0, *, schema: Any, step: Optional[int] = None,
               name: Optional[str] = None) -> Optional[List[Any]]: ...

    def gather(self, value: Any, root: int = 0, *, schema: Any = None,
               step: Optional[int] = None, name: Optional[str] = None) -> Any:
        """Every rank's value on ``root`` (in rank order); None on the other ranks."""
        p = self._p
        out = None
        if p.fast is not None and p.size <= ops.GATHER_DIRECT_MAX and root.__class__ is int \
                and 0 <= root < p.size:
            out = _C.rooted(p, value, schema, step, name, "gather", root)
            if out.__class__ is list:
                return out[0]
        return ops.gather(p, value, root, schema, step, name, out=out)

    @overload
    def bcast(self, value: T, root: int = 0, *, schema: None = None, step: Optional[int] = None,
              name: Optional[str] = None) -> T: ...
    @overload
    def bcast(self, value: Any, root: int = 0, *, schema: Type[T], step: Optional[int] = None,
              name: Optional[str] = None) -> T: ...
    @overload
    def bcast(self, value: Any, root: int = 0, *, schema: Any, step: Optional[int] = None,
              name: Optional[str] = None) -> Any: ...

    def bcast(self, value: Any, root: int = 0, *, schema: Any = None,
              step: Optional[int] = None, name: Optional[str] = None) -> Any:
        """``root``'s value on every rank; other ranks' ``value`` is ignored (pass None).

        Receivers that pass no ``schema`` get the root's class, found by name among the modules
        they imported and checked against the root's structure.
        """
        p = self._p
        out = None
        if p.fast is not None and root.__class__ is int and 0 <= root < p.size:
            out = _C.rooted(p, value, schema, step, name, "bcast", root)
            if out.__class__ is list:
                return out[0]
        return ops.bcast(p, value, root, schema, step, name, out=out)

    def scatter(self, values: Optional[Sequence[Any]], root: int = 0, *, schema: Any = None,
                step: Optional[int] = None, name: Optional[str] = None) -> Any:
        """``values[i]`` of ``root`` on rank i; other ranks pass None."""
        p = self._p
        out = None
        if p.fast is not None and root.__class__ is int and 0 <= root < p.size:
            out = _C.rooted(p, values, schema, step, name, "scatter", root)
            if out.__class__ is list:
                return out[0]
        return parts.scatter(p, values, root, schema, step, name, out=out)

    def alltoall(self, values: Sequence[Any], *, schema: Any = None,
                 step: Optional[int] = None, name: Optional[str] = None) -> List[Any]:
        """``values[j]`` of rank i arrives on rank j at position i."""
        return parts.alltoall(self._p, values, schema, step, name)

    def allreduce(self, value: T, op: Any = "sum", *, step: Optional[int] = None,
                  name: Optional[str] = None) -> T:
        """Combine ints, floats, numpy scalars or arrays on every rank: "sum", "prod", "max",
        "min", "land", "lor", "lxor", "band", "bor", "bxor" (or the mpi4py ``MPI.Op``)."""
        p = self._p
        out = None
        if p.fast is not None and (value.__class__ is int or value.__class__ is float) and \
                op.__class__ is str and op in REDUCE_OPS:
            code = REDUCE_OPS[op]
            out = _C.allreduce(p, value, step, name, code)
            if out.__class__ is list:
                return reduce_values(out, REDUCE_OP_NAMES[code])  # type: ignore[no-any-return]
        return ops.allreduce(p, value, op, step, name, out=out)  # type: ignore[no-any-return]

    def reduce(self, value: T, op: Any = "sum", root: int = 0, *, step: Optional[int] = None,
               name: Optional[str] = None) -> Optional[T]:
        """As :meth:`allreduce`, the result on ``root`` only (None elsewhere)."""
        p = self._p
        out = None
        if p.fast is not None and (value.__class__ is int or value.__class__ is float) and \
                op.__class__ is str and op in REDUCE_OPS and root.__class__ is int and \
                0 <= root < p.size <= ops.GATHER_DIRECT_MAX:
            code = REDUCE_OPS[op]
            out = _C.allreduce(p, value, step, name, code, root)
            if out.__class__ is list:
                return ops.reduced_at_root(out, code)  # type: ignore[no-any-return]
        return ops.reduce(p, value, op, root, step, name, out=out)  # type: ignore[no-any-return]

    def reduce_scatter(self, values: Sequence[Any], op: Any = "sum", *, schema: Any = None,
                       step: Optional[int] = None, name: Optional[str] = None) -> Any:
        """Rank i gets ``op`` over every rank's ``values[i]``."""
        return parts.reduce_scatter(self._p, values, op, schema, step, name)

    def barrier(self, *, step: Optional[int] = None, name: Optional[str] = None) -> None:
        """Wait until every rank arrives (and check that they all called barrier)."""
        p = self._p
        out = None
        if p.fast is not None:
            out = _C.empty(p, step, name)
            if out.__class__ is list:
                return
        ops.barrier(p, step, name, out=out)

    # --- communicators -----------------------------------------------------------------------
    def split(self, color: Optional[int], key: int = 0, *, step: Optional[int] = None,
              name: Optional[str] = None) -> Optional["TypedComm"]:
        """A TypedComm per color, ranks ordered by key; None where color is None. ``name``
        names the split (every rank passes the same) and the child it makes (``tp``, and in
        diagnostics ``tp[0-1]`` with its members' world ranks); without one the child is
        ``<parent>.split(<color>)``."""
        child = lifecycle.split(self._p, color, key, step, name, self._child)
        return child  # type: ignore[no-any-return]

    def dup(self, *, step: Optional[int] = None, name: Optional[str] = None) -> "TypedComm":
        """A TypedComm over a new private communicator with the same ranks: its own sequence,
        and its own channel (another thread may use it concurrently). ``name`` names the
        call and the child; without one the child is ``<parent>.dup``."""
        return lifecycle.dup(self._p, step, name, self._child)  # type: ignore[no-any-return]

    def _child(self, transport: Any, name: str) -> "TypedComm":
        return TypedComm._over(Channel(transport, name), name, self._p.timeout)

    def free(self) -> None:
        """Collective: release this communicator on every rank (idempotent). Its private
        channel is freed with the last TypedComm using it."""
        lifecycle.free(self._p)

    def __enter__(self) -> "TypedComm":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.free()
        elif not self._p.freed:
            # The ranks may not all be here (one raised on its own): release locally only.
            lifecycle.release(self._p)

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (after a CollectiveTimeout, say)."""
        self._p.transport.abort(code)


def _created(channel: Channel, timeout: Any, name: Optional[str]) -> Protocol:
    """A new communicator on ``channel``, after the creation exchange agreed on its settings."""
    from . import diagnostics
    diagnostics.install()  # hang reports, dumps and logs need no set-up of the caller's
    instance = channel.next_instance()
    given = name if isinstance(name, str) and name else None
    p = Protocol(channel, instance, given or channel.name_of(instance),
                 timeout if isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                 and timeout > 0 and timeout == timeout else None)
    try:
        lifecycle.create(p, timeout)
    except BaseException:
        lifecycle.release(p)
        if channel.instances == instance:  # a failed creation numbers nothing: every rank
            channel.instances -= 1          # gives its number back, and later ones align
        raise
    return p


register_internal(__file__)
