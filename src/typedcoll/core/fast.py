"""The C fast path's binding: its contract with the Python protocol, checked at import.

``_speedups.c`` runs the steady state of the hot ops (allgather and the flush, bcast, barrier,
gather, scatter, alltoall, allreduce of Python numbers) in one C call: encode, header,
exchange, verdict, decode; for an allgather of numpy arrays that fit the slot, ``array_slots``
encodes and decodes around the C call.
It reads a communicator's state from one list, ``Protocol.fast``, whose fields are named by
``FAST_FIELDS``; the extension exports the names it was built against, and they must be equal
here, as must the wire constants it copies, or the extension is not used at all.

Each entry point returns:
  - a list: the steady state's result (for rooted and empty ops, a 1-item list holding it);
  - ``TAKE_PY``: nothing was done; the Python steps run the whole call;
  - a tuple ``(code, lasti, via, callers, seq, occurrence, deadline, timed_out, observed)``
    (``callers``: ``core.callers``' levels, as the C path walked them), for an array
    sent past its slot followed by ``(prefix, data)``: the exchange ran but was not the steady
    state (a peer disagreed, failed or overflowed, a payload does not decode, the deadline
    passed); :func:`resumed` hands its facts to the Python steps, which reach the verdict every
    rank reaches from the same bytes. ``observed``: the C path already
    fed this exchange to the slot-size rule (each exchange feeds it exactly once).

``TYPEDCOLL_PURE_PYTHON=1`` turns the extension off: the Python steps serve every call, which is
how CI's second leg holds both paths to the same results.
"""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING, Any, List, Optional

import numpy as np

from ..codecs import nesting, resolve
from ..codecs.nesting import MAX_NESTING
from ..codecs.schema import _BY_ID, _CACHE
from .call import Call
from .identity import name_fingerprint, site_fingerprint
from .plumbing import SKIP_CODES, SKIP_FILES, register_internal
from .site_walk import CHAIN_MAX, forwarding, thin_chain
from . import array_slots, callers, guesses, recorder, wire
from .transport import TransportFailure

if TYPE_CHECKING:
    from .protocol import Protocol

TAKE_PY: Any = object()  # "not the steady state, nothing done"

FAST_FIELDS = (
    "send", "recv", "block", "slot", "size", "rank", "exchange", "engine", "ring", "ring_objects",
    "ring_state", "capacity", "min_slot", "counts", "busy", "acquire", "release", "instance",
    "timeout", "protocol",
)

try:
    from . import _speedups  # type: ignore[attr-defined]  # C extension, no stub
except ImportError:  # built without a compiler: the Python steps serve every call
    _speedups = None

_CONSTANTS = {
    "HEADER_SIZE": wire.HEADER_SIZE, "CHECKED": wire.CHECKED, "AGREE_SIZE": wire.AGREE_SIZE,
    "MAGIC": wire.MAGIC, "FLAGS_OFFSET": wire.FLAGS_OFFSET, "LENGTH_OFFSET": wire.LENGTH_OFFSET,
    "FLAG_LOCAL_ERROR": wire.FLAG_LOCAL_ERROR, "FLAG_OVERFLOW": wire.FLAG_OVERFLOW,
    "FLAG_WILD_SCHEMA": wire.FLAG_WILD_SCHEMA, "FLAG_SPLIT_ARRAY": wire.FLAG_SPLIT_ARRAY,
    "FLAG_GUESSED": wire.FLAG_GUESSED, "FLAG_ROLE": wire.FLAG_ROLE,
    "FLAG_DECODE_HOOK": wire.FLAG_DECODE_HOOK,
    "GATHER": wire.GATHER,
    "MAX_NESTING": MAX_NESTING, "ENTRY_SIZE": recorder.ENTRY.size,
    "OBJECTS_PER_ENTRY": recorder.OBJECTS_PER_ENTRY,
    "FORWARDING_FORM": 3,  # site_walk.forwarding: True, False, offsets, or a decorator's 1-tuple
    "CHAIN_MAX": CHAIN_MAX,  # thin wrappers a call's via keeps (site_walk.site_from)
}


def _compatible(module: Any) -> bool:
    """The extension was built from this source: same field layout and wire constants."""
    try:
        return (tuple(module.FAST_FIELDS) == FAST_FIELDS
                and all(getattr(module, k) == v for k, v in _CONSTANTS.items()))
    except AttributeError:
        return False


if _speedups is not None and (os.environ.get("TYPEDCOLL_PURE_PYTHON")
                              or not _compatible(_speedups)):
    _speedups = None

ENABLED = _speedups is not None
_ARRAY_INFO = resolve(np.ndarray)
if _speedups is not None:
    from ..codecs import ENCODER
    nesting.use_native(_speedups.nesting_ok)
    _speedups.configure(_CACHE, _BY_ID, wire.OPS, ENCODER.encode, SKIP_FILES, SKIP_CODES,
                        site_fingerprint, name_fingerprint, TAKE_PY, forwarding,
                        callers.role_site, callers.combined, thin_chain)


def bind(p: "Protocol") -> Optional[List[Any]]:
    """``p``'s state as the C path reads it, or None where only the Python steps may run."""
    if _speedups is None:
        return None
    transport = p.transport
    engine = getattr(transport, "engine", None)
    # A deadline needs the C engine: other transports report a timeout as a Python exception.
    if ((p.timeout is not None and engine is None) or p.channel.broken is not None
            or p.recv_u32 is None or p.slot != p.policy.size or p.observer is not None
            or p.deferred is not None or p.freed):
        return None
    rec = p.recorder
    on = rec is not None
    state = {
        "send": p.send, "recv": p.recv, "block": p.block, "slot": p.slot, "size": p.size,
        "rank": p.rank, "exchange": partial(_exchange_or_failure, p, transport.exchange),
        "engine": engine,
        "ring": rec.numbers if on else None,  # type: ignore[union-attr]
        "ring_objects": rec.objects if on else None,  # type: ignore[union-attr]
        "ring_state": rec.state if on else None,  # type: ignore[union-attr]
        "capacity": rec.capacity if on else 0,  # type: ignore[union-attr]
        "min_slot": p.policy.min_slot, "counts": p.counts, "busy": p.channel.busy,
        "acquire": p.channel.lock.acquire, "release": p.channel.lock.release,
        "instance": p.instance,
        "timeout": None if p.timeout in (None, float("inf")) else float(p.timeout),
        "protocol": p,
    }
    return [state[name] for name in FAST_FIELDS]


def allgather(p: "Protocol", value: Any, schema: Any, step: Any, name: Any, op: str) -> Any:
    if _speedups is None or p.fast is None:
        return TAKE_PY
    if value.__class__ is np.ndarray:
        if op != "allgather" or (schema is not None and schema is not np.ndarray):
            return TAKE_PY
        try:
            encoded = array_slots.encode(value, p.slot - wire.HEADER_SIZE)
        except Exception:  # before anything is sent: the Python steps flag it to every rank
            return TAKE_PY
        if encoded is None:
            return TAKE_PY
        out = _speedups.arrays(p, encoded, _ARRAY_INFO, step, name)
        if out.__class__ is tuple and encoded[3] is not None:
            # Exchanged with the array's prefix inline, not finished: phase 2 sends its data.
            return out + ((encoded[0], encoded[3]),)
        return out
    return _speedups.allgather(p, value, schema, step, name, op)


def gathered(p: "Protocol", value: Any, schema: Any, step: Any, name: Any, op: str, code: int,
             root: int) -> Any:
    """The mpi4py drop-in's GATHER calls ("gather", "allreduce", "reduce"; ``root``: NO_ROOT or
    a valid rank, ``code``: the reduce op's): ``[values]`` on a gather's root and ``[None]`` on
    its other ranks, every rank's values for the others."""
    if _speedups is None or p.fast is None:
        return TAKE_PY
    return _speedups.allgather(p, value, schema, step, name, op, code, root)


def rooted(p: "Protocol", value: Any, schema: Any, step: Any, name: Any, op: str,
           root: Any) -> Any:
    if _speedups is None or p.fast is None or type(root) is not int or not 0 <= root < p.size:
        return TAKE_PY
    return _speedups.rooted(p, value, schema, step, name, op, root)


def allreduce(p: "Protocol", value: Any, step: Any, name: Any, code: int) -> Any:
    if _speedups is None or p.fast is None:
        return TAKE_PY
    return _speedups.allreduce(p, value, step, name, code)


def reduce(p: "Protocol", value: Any, step: Any, name: Any, code: int, root: Any) -> Any:
    if _speedups is None or p.fast is None or type(root) is not int or not 0 <= root < p.size:
        return TAKE_PY
    return _speedups.allreduce(p, value, step, name, code, root)


def empty(p: "Protocol", step: Any, name: Any) -> Any:
    if _speedups is None or p.fast is None:
        return TAKE_PY
    return _speedups.empty(p, step, name)


def entries() -> Any:
    """The C entry points, for callers that run the steady state themselves (TypedComm's hot
    collectives: ``allgather``, ``rooted``, ``allreduce``, ``empty``) where ``p.fast`` is bound;
    None without the extension. An entry that raises has told the protocol (``p.failed``)
    already."""
    return _speedups


def _exchange_or_failure(p: "Protocol", exchange: Any, send: Any, recv: Any, block: Any,
                         shape: int, deadline: Optional[float]) -> bool:
    """The transport's exchange as the C path calls it: False where the backend failed it (a
    peer is gone), which the Python steps then report (``verdict.timed_out`` reads
    ``p.failure``) as they report a passed deadline."""
    try:
        exchange(send, recv, block, shape, deadline)
    except TransportFailure as exc:
        p.failure = exc
        return False
    return True


def resumed(p: "Protocol", call: Call, out: Any) -> Call:
    """``call`` as the C path started and exchanged it (its answer ``out``): the same site,
    number, occurrence, deadline and step clock that the C path wrote into the header."""
    (call.code, call.lasti, call.via, call.callers, call.seq, call.occurrence, call.deadline,
     call.timed_out, call.observed) = out[:9]
    if len(out) > 9:  # the C path sent an array's prefix inline: (prefix, data) for phase 2
        call.split = out[9]
        call.overflow = out[9][1]
    if call.step is None and p.step != wire.NO_STEP:
        call.step = p.step
    if call.wild:  # the C path guessed the root's class from the same table
        guesses.guess(p, call)
    return call


def mpi_engine(transport: Any) -> Any:
    """The C binding of the MPI exchange over ``transport``'s communicator, or None."""
    if _speedups is None or not hasattr(_speedups, "engine") \
            or os.environ.get("TYPEDCOLL_DIRECT_MPI", "1") == "0":
        return None
    from mpi4py import MPI
    comm = transport.comm
    try:
        handle_size = MPI._sizeof(MPI.Comm)
        if MPI._sizeof(MPI.Datatype) != handle_size or MPI._sizeof(MPI.Request) != handle_size:
            return None
        return _speedups.engine(MPI.__file__, comm, MPI._addressof(comm), MPI.BYTE.handle,
                                MPI.COMM_NULL.handle, handle_size, comm.Get_size(),
                                comm.Get_rank(), transport.tag, transport.notice_tag,
                                MPI.ANY_SOURCE, MPI.Exception, transport.notice_polls)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return None


def run_engine(engine: Any, send: Any, recv: Any, block: Any, shape: int,
               deadline: Optional[float]) -> bool:
    """The C exchange: False when the deadline passed first."""
    assert _speedups is not None
    return bool(_speedups.exchange(engine, send, recv, block, shape,
                                   -1.0 if deadline is None else deadline))


register_internal(__file__)
