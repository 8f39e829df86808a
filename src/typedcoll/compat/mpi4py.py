"""The mpi4py drop-in: mpi4py's lowercase communicator API over typed collectives, no pickle.

``typedcoll.compat.mpi4py(comm)`` returns a :class:`Comm` with the methods and signatures of
mpi4py's object API (``allgather``, ``gather``, ``bcast``, ``scatter``, ``alltoall``,
``allreduce``, ``reduce``, ``barrier``, ``send``, ``recv``, ``sendrecv``, ``isend``,
``irecv``, ``Get_rank``, ``Get_size``, ``rank``, ``size``) and of its communicator calls
(``Barrier``, ``Split``, ``Dup``, ``Clone``, ``Free``): results equal mpi4py's for the
supported payloads (``compat.values``), and every call is a typed collective, checked on every
rank. mpi4py's buffer calls (``Allreduce``, ``Bcast``, ...) stay on ``.comm``, unchecked.
Each method also takes keyword-only ``name=`` and ``step=``, as TypedComm's do, and
``set_step(it)`` sets the step clock they carry.

mpi4py is imported only by the TypedComm made over an mpi4py communicator, never here: the
same class serves a TypedComm over another transport (``typedcoll.testing``).
"""

from __future__ import annotations

import operator
import sys
from typing import Any, List, Optional, Sequence, Tuple

from .._comm import TypedComm
from ..core import p2p
from ..core.args import check_step
from ..core.errors import DecodeError
from ..core.plumbing import register_internal
from . import objects
from . import values as tagged
from .values import Refused, Unresolved


def _wildcards() -> Tuple[Any, Any]:
    """mpi4py's ANY_SOURCE and ANY_TAG, where mpi4py is loaded (they differ between MPIs)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return None, None
    return mpi.ANY_SOURCE, mpi.ANY_TAG


def _is_null(peer: Any) -> bool:
    """Whether ``peer`` is mpi4py's PROC_NULL: a send to it or a receive from it does nothing
    (the receive returns None), as mpi4py's do: the ends of a ring or a pipeline."""
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and isinstance(peer, int) and peer == mpi.PROC_NULL


def _null_status(status: Any) -> None:
    mpi = sys.modules.get("mpi4py.MPI")
    if status is not None and mpi is not None:
        status.Set_source(mpi.PROC_NULL)
        status.Set_tag(mpi.ANY_TAG)


def _source(source: Any) -> Any:
    return None if source is None or source == _wildcards()[0] else source


def _tag(tag: Any) -> Any:
    return None if tag is None or tag == _wildcards()[1] else tag


class Request:
    """mpi4py's request for ``isend`` and ``irecv``: ``wait()`` returns the received object
    (None for a send); ``test()`` returns ``(flag, object or None)``."""

    __slots__ = ("_comm", "_request", "_receives", "_done", "_value")

    def __init__(self, comm: "Comm", request: Any, receives: bool) -> None:
        self._comm = comm
        self._request = request
        self._receives = receives
        self._done = False
        self._value: Any = None

    @classmethod
    def _null(cls, comm: "Comm", receives: bool) -> "Request":
        """A request with PROC_NULL: complete at once, its value None."""
        request = cls(comm, None, receives)
        request._done = True
        return request

    def wait(self, status: Any = None) -> Any:
        if self._request is None and self._receives:
            _null_status(status)
        if not self._done:
            got = self._request.wait()
            self._value = self._comm._received(self._request, got, status) \
                if self._receives else None
            self._done = True
        return self._value

    def test(self, status: Any = None) -> Tuple[bool, Any]:
        if self._done:
            if self._request is None and self._receives:
                _null_status(status)
            return True, self._value
        flag, _ = self._request.test()
        if not flag:
            return False, None
        return True, self.wait(status)

    @staticmethod
    def waitall(requests: Sequence["Request"], statuses: Any = None) -> List[Any]:
        return [r.wait(statuses[i] if statuses is not None else None)
                for i, r in enumerate(requests)]

    @staticmethod
    def testall(requests: Sequence["Request"]) -> Tuple[bool, Optional[List[Any]]]:
        results = [r.test() for r in requests]
        if all(flag for flag, _ in results):
            return True, [value for _, value in results]
        return False, None


class Comm:
    """mpi4py's lowercase object API over a :class:`~typedcoll.TypedComm`.

    ``comm`` is an mpi4py intracommunicator (a TypedComm over it is created here: a collective,
    so every rank must construct its ``Comm`` at the same point) or a TypedComm. ``comm.comm``
    is the communicator beneath, ``comm.typed`` the TypedComm.
    """

    def __init__(self, comm: Any, timeout: Optional[float] = None) -> None:
        if isinstance(comm, TypedComm):
            self.typed = comm
            self.comm = None
        else:
            self.typed = TypedComm(comm, timeout)
            self.comm = comm
        self._p = self.typed._p
        self._owns_comm = False  # Free frees ``comm`` too: this object made it (Split, Dup)

    @classmethod
    def _made(cls, typed: TypedComm, comm: Any) -> "Comm":
        made = cls(typed)
        made.comm = comm
        made._owns_comm = comm is not None
        return made

    def __getattr__(self, attr: str) -> Any:
        # Only for names this class lacks: say where mpi4py's other methods are.
        if attr.startswith("_"):
            raise AttributeError(attr)
        hint = ("; mpi4py's buffer calls are not checked by typedcoll: call them on .comm, "
                "the mpi4py communicator beneath" if attr[:1].isupper() else "")
        raise AttributeError(f"typedcoll.compat.mpi4py's Comm has no attribute {attr!r}{hint}")

    # --- what it is ----------------------------------------------------------------------
    def Get_rank(self) -> int:
        return self._p.rank

    def Get_size(self) -> int:
        return self._p.size

    @property
    def rank(self) -> int:
        return self._p.rank

    @property
    def size(self) -> int:
        return self._p.size

    def __repr__(self) -> str:
        return f"compat.mpi4py({self.typed!r})"

    def set_step(self, step: Optional[int]) -> None:
        """The step clock of the TypedComm beneath (``TypedComm.set_step``): every later call,
        collective or point to point, carries ``step`` until it is set again, so a rank that
        skipped a call at one line of a loop (a vote skipped on an idle step) raises there
        instead of pairing with the next step's call. Local; a bad ``step`` raises at the next
        call, on every rank (EncodeError here, PeerError elsewhere)."""
        self.typed.set_step(step)

    def note(self, key: str, value: Any) -> None:
        """A rank-local decision (``can_queue``, a local timeout) for error reports, as
        ``TypedComm.note``: a DesyncError or a hang report lists the latest notes whose values
        differ between ranks, with the line that made each and its step; dumps hold them too.
        Local and cheap; ``value`` should be small and msgspec-encodable (``repr`` otherwise)."""
        self._p.note(key, value, sys._getframe(1))

    # --- collectives -----------------------------------------------------------------------
    def allgather(self, sendobj: Any, *, step: Optional[int] = None,
                  name: Optional[str] = None) -> List[Any]:
        return objects.allgather(self._p, sendobj, step, name)

    def gather(self, sendobj: Any, root: int = 0, *, step: Optional[int] = None,
               name: Optional[str] = None) -> Optional[List[Any]]:
        return objects.gather(self._p, sendobj, root, step, name)

    def bcast(self, obj: Any, root: int = 0, *, step: Optional[int] = None,
              name: Optional[str] = None) -> Any:
        return objects.bcast(self._p, obj, root, step, name)

    def scatter(self, sendobj: Optional[Sequence[Any]], root: int = 0, *,
                step: Optional[int] = None, name: Optional[str] = None) -> Any:
        return objects.scatter(self._p, sendobj, root, step, name)

    def alltoall(self, sendobj: Sequence[Any], *, step: Optional[int] = None,
                 name: Optional[str] = None) -> List[Any]:
        return objects.alltoall(self._p, sendobj, step, name)

    def allreduce(self, sendobj: Any, op: Any = "sum", *, step: Optional[int] = None,
                  name: Optional[str] = None) -> Any:
        """``op``: an ``MPI.Op`` (SUM, PROD, MAX, MIN, LAND, LOR, LXOR, BAND, BOR, BXOR) or its
        name; values combine in rank order with the op's Python meaning (``a + b`` for SUM)."""
        return objects.allreduce(self._p, sendobj, op, step, name)

    def reduce(self, sendobj: Any, op: Any = "sum", root: int = 0, *,
               step: Optional[int] = None, name: Optional[str] = None) -> Any:
        return objects.reduce(self._p, sendobj, op, root, step, name)

    def barrier(self, *, step: Optional[int] = None, name: Optional[str] = None) -> None:
        objects.barrier(self._p, step, name)

    Barrier = barrier  # mpi4py's upper-case name: the same checked barrier

    # --- communicators ---------------------------------------------------------------------
    def Split(self, color: Any = 0, key: int = 0, *, step: Optional[int] = None,
              name: Optional[str] = None) -> Any:
        """mpi4py's ``Split``, checked: a drop-in over the ranks of ``color`` ordered by
        ``key``; ``MPI.UNDEFINED`` (or None) gives ``MPI.COMM_NULL`` (None without mpi4py).

        Every rank's color and key are exchanged in band first (a bad one on any rank, or a
        rank at another call, raises on every rank); only then does the mpi4py communicator
        beneath split, so its ``.comm`` is the same split as mpi4py's.
        """
        mpi = sys.modules.get("mpi4py.MPI")
        undefined = mpi.UNDEFINED if mpi is not None else None
        # Only an int can be UNDEFINED; anything else goes on to the split's own check, which
        # flags it in the call (a comparison that raised here would leave the peers waiting).
        try:
            outside = color is None or (undefined is not None
                                        and operator.index(color) == undefined)
        except TypeError:
            outside = False
        # mpi4py takes any int, a bool among them (``Split(rank >= 2)``).
        color = int(color) if isinstance(color, bool) else color
        key = int(key) if isinstance(key, bool) else key
        typed = self.typed.split(None if outside else color, key, step=step, name=name)
        comm = None
        if self.comm is not None:
            comm = self.comm.Split(undefined if outside else color, key)
        if typed is None:
            return mpi.COMM_NULL if mpi is not None else None
        return Comm._made(typed, comm)

    def Dup(self, info: Any = None, *, step: Optional[int] = None,
            name: Optional[str] = None) -> "Comm":
        """mpi4py's ``Dup``, checked: a drop-in over the same ranks with its own sequence
        (``info`` is accepted and not used)."""
        typed = self.typed.dup(step=step, name=name)
        return Comm._made(typed, self.comm.Dup() if self.comm is not None else None)

    Clone = Dup

    # --- point to point --------------------------------------------------------------------
    # ``name=`` and ``step=`` (beyond mpi4py's signatures) as TypedComm's point to point
    # takes them; a peer that is PROC_NULL makes the call do nothing, as in mpi4py.
    def send(self, obj: Any, dest: int, tag: int = 0, *, name: Optional[str] = None,
             step: Optional[int] = None) -> None:
        if _is_null(dest):
            return
        tree, refused = _encoded(obj)
        p2p.send(self._p, tree, dest, tag, Any, name, refused, step=step)

    def isend(self, obj: Any, dest: int, tag: int = 0, *, name: Optional[str] = None,
              step: Optional[int] = None) -> Request:
        if _is_null(dest):
            return Request._null(self, False)
        tree, refused = _encoded(obj)
        return Request(self, p2p.isend(self._p, tree, dest, tag, Any, name, refused, step),
                       False)

    def recv(self, buf: Any = None, source: Any = None, tag: Any = None, status: Any = None,
             *, name: Optional[str] = None, step: Optional[int] = None) -> Any:
        """The next object from ``source`` with ``tag`` (default: any source, any tag, as
        mpi4py's ``ANY_SOURCE`` and ``ANY_TAG``); ``buf`` is ignored, as mpi4py ignores it."""
        if _is_null(source):
            _null_status(status)
            return None
        request = p2p.irecv(self._p, _source(source), _tag(tag), Any, name, step)
        return self._received(request, request.wait(), status)

    def irecv(self, buf: Any = None, source: Any = None, tag: Any = None, *,
              name: Optional[str] = None, step: Optional[int] = None) -> Request:
        """Posted now, it carries the step clock as it is now: one posted ahead for a later
        iteration passes ``step``."""
        if _is_null(source):
            return Request._null(self, True)
        return Request(self, p2p.irecv(self._p, _source(source), _tag(tag), Any, name, step),
                       True)

    def sendrecv(self, sendobj: Any, dest: int, sendtag: int = 0, recvbuf: Any = None,
                 source: Any = None, recvtag: Any = None, status: Any = None, *,
                 name: Optional[str] = None, step: Optional[int] = None) -> Any:
        sends = not _is_null(dest)
        tree, refused = _encoded(sendobj) if sends else (None, None)
        if sends and check_step(step) is not None:  # told to the receiver, nothing posted
            p2p.isend(self._p, tree, dest, sendtag, Any, name, refused, step).wait()
        request = None if _is_null(source) else \
            p2p.irecv(self._p, _source(source), _tag(recvtag), Any, name, step)
        sending = None
        if sends:
            sending = p2p.isend(self._p, tree, dest, sendtag, Any, name, refused, step)
        try:
            got = request.wait() if request is not None else None
        finally:
            if sending is not None:
                sending.wait()
        if request is None:
            _null_status(status)
            return None
        return self._received(request, got, status)

    def _received(self, request: Any, tree: Any, status: Any) -> Any:
        if status is not None:
            source, tag, _ = p2p.matched(request)
            status.Set_source(source)
            status.Set_tag(tag)
        try:
            return tagged.decode(tree)
        except Exception as exc:  # a class this rank lacks, or malformed markers
            detail = str(exc) if isinstance(exc, Unresolved) else f"{type(exc).__name__}: {exc}"
            source, _, _ = p2p.matched(request)
            raise DecodeError(f"{p2p.head(self._p, request)}: could not rebuild the value from "
                              f"rank {source}: {detail}", seq=-1, comm=self._p.name,
                              source=source, schema="Any") from None

    # --- lifetime --------------------------------------------------------------------------
    def free(self) -> None:
        """Collective: free the TypedComm beneath (not the mpi4py communicator)."""
        self.typed.free()

    def Free(self) -> None:
        """Collective: free the TypedComm beneath, and the mpi4py communicator where ``Split``
        or ``Dup`` made it (one passed in stays its owner's)."""
        self.typed.free()
        self._free_made_comm()

    def _free_made_comm(self) -> None:
        if self._owns_comm and self.comm is not None:
            self.comm.Free()
            self._owns_comm = False

    def __enter__(self) -> "Comm":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.typed.__exit__(exc_type, exc, tb)
        if exc_type is None:  # every rank is here: the mpi4py Free (collective) pairs
            self._free_made_comm()


def _encoded(obj: Any) -> Tuple[Any, Optional[str]]:
    try:
        return tagged.encode(obj)[0], None
    except Refused as exc:
        return None, exc.text()


register_internal(__file__)
