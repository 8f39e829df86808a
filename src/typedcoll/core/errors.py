"""The exception tree.

Every error a typed collective raises is a :class:`CollectiveError` and is raised on *every* rank
of the communicator in the same call (except where a docstring says otherwise), so no rank is left
waiting in a collective its peers abandoned. Each message starts with one shape,
``collective #<seq> on <communicator>: ...``, then says what was expected and what was got.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Type

CREATE_SEQ = 2 ** 64 - 1  # the creation exchange's number on the wire: before the first, apart


def numbered(seq: int) -> str:
    """How a message names call ``seq`` in a sentence: ``collective #14``, ``the creation``."""
    return "the creation" if seq == CREATE_SEQ else f"collective #{seq}"


class CollectiveError(Exception):
    """Base of every error raised by a typed collective.

    ``seq`` is the 0-based number of the failing collective on its communicator (-1: the
    communicator's creation) and ``comm`` the communicator's name. Catch this to handle any
    typedcoll failure. Also raised, on the calling rank only, for a call on a communicator that
    was freed (a bug of the calling code).
    """

    def __init__(self, message: str, *, seq: int, comm: str = "") -> None:
        super().__init__(message)
        self.seq = -1 if seq == CREATE_SEQ else seq
        self.comm = comm

    def __reduce__(self) -> Tuple[Any, ...]:
        # The keyword-only fields are not in ``args``: rebuilt from the message and the
        # attributes, an error crosses a process boundary (an engine's worker pipe, Ray) and
        # copies whole.
        return _rebuilt, (type(self), self.args, dict(self.__dict__))


def _rebuilt(cls: Type["CollectiveError"], args: Tuple[Any, ...],
             state: Dict[str, Any]) -> "CollectiveError":
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class DesyncError(CollectiveError):
    """Raised on every rank when the ranks disagree about which collective they are in.

    The ranks called different operations, from different call sites (or names), on different
    communicators, with different schemas, roots, reduce ops, steps, array shapes or dtypes: the
    program took a rank-local branch around a collective. It is the program's fault, not the
    transport's: retrying the same code path fails the same way. Read the groups (which ranks
    called what, from which line, for the how-manieth time), find the branch that made them differ,
    and make every rank reach the same collectives (for conditional messages, post them to a
    :class:`~typedcoll.executor.SymmetricFlush`). Where only the call sites differ and the calls
    are really the same collective (a root and its peers calling ``bcast`` on different lines),
    give them the same ``name=``.

    ``kinds`` lists the :class:`MismatchKind` values that differ, ``groups`` the ranks that agree
    with each other, each with the envelope they sent; ``decisions`` the recorded notes whose
    values differ between the groups.

    The communicator stays usable after this error: every rank took part in the same backend
    exchange, and where the ranks were on different communicators sharing one channel, each
    gives back the number it spent, so the next typed collective is matched correctly again.
    The program is not realigned: its ranks are still a call (or an iteration) apart, so a loop
    that catches this error and goes on raises it again at its next call. End the job, or
    agree on where to resume before going on (every rank's step through one ``allreduce`` with
    ``op="max"``, then :meth:`~typedcoll.TypedComm.set_step`).
    """

    def __init__(self, message: str, *, seq: int, comm: str = "", kinds: Sequence[Any] = (),
                 groups: Sequence[Any] = (), decisions: Sequence[Any] = ()) -> None:
        super().__init__(message, seq=seq, comm=comm)
        self.kinds = tuple(kinds)
        self.groups = tuple(groups)
        self.decisions = tuple(decisions)


class CollectiveTimeout(CollectiveError):
    """Raised when a collective does not complete within the communicator's ``timeout``.

    Some rank never reached the matching collective: it is stuck elsewhere, dead, or took a branch
    around it (with no step clock, a rank that skipped one call of a loop surfaces this way).
    The ranks that arrived raise this; a rank that arrives after some peer gave up raises it too,
    in the same call, instead of returning its result (the message says who gave up; over MPI,
    where such a rank could otherwise complete the call, see ``transports/mpi.py``). ``missing``
    names the ranks that never arrived, when the hang report could tell (None on the rank that
    came late). The backend exchange is still
    pending, so the communicator is unusable afterwards: every later call raises this error again.
    Retrying does not help; end the job (``python -m mpi4py`` or ``comm.abort()``) and read the
    report. Also raised, before the timeout (or with none), when the backend itself fails the
    operation because a peer's process or connection is gone (gloo); the message then says so.
    """

    def __init__(self, message: str, *, seq: int, comm: str = "", op: str = "", schema: str = "",
                 site: str = "", timeout: float = 0.0,
                 missing: Optional[Sequence[int]] = None, failure: str = "") -> None:
        super().__init__(message, seq=seq, comm=comm)
        self.op = op
        self.schema = schema
        self.site = site
        self.timeout = timeout
        self.missing = tuple(missing) if missing is not None else None
        self.failure = failure  # the backend's own error, when it failed the call first


class EncodeError(CollectiveError):
    """Raised on the rank whose own contribution or arguments could not be sent.

    The value does not match the collective's schema, msgspec cannot encode it (an unsupported
    type, an int beyond 64 bits, nesting deeper than the limit), or an argument is invalid on this
    rank (schema, root, reduce op, step, name, timeout, color). It is the calling code's fault;
    fix the value or the call. The rank still took part in the collective, so its peers raise in
    the same call and nothing hangs: a :class:`PeerError` naming this rank, or, for a value that
    encoded but fails its schema where every rank decodes it, a :class:`DecodeError` naming this
    rank as the source.
    """

    # Set where this rank's own payload was refused as it decoded it after the exchange: the
    # DecodeError it raises instead where a settle shows that a peer decoded the same bytes.
    refused_here: Optional["DecodeError"] = None


class DecodeError(CollectiveError):
    """Raised when a payload received from ``source`` does not decode as the schema.

    The source rank sent a value that encodes but does not match the schema (a str in an int
    field, a Struct whose ``__post_init__`` rejects it: that rank raises :class:`EncodeError` in
    the same call), the payload nests deeper than the limit, or the bytes are corrupt. It never
    comes from a plain desync (that is a :class:`DesyncError`). Every rank that decodes the
    payload raises it, whatever its own stack depth; ranks that do not receive the payload
    (non-roots of ``gather``) do not, which is why ``gather`` checks each value on its sender
    instead (:class:`PeerError`). A ``__post_init__`` or validator that reads rank-local state
    can refuse a payload on some ranks only: those raise it, and the ranks that decoded the
    payload raise :class:`PeerError` naming them (``core/settle.py``).
    """

    def __init__(self, message: str, *, seq: int, comm: str = "", source: int = -1,
                 schema: str = "") -> None:
        super().__init__(message, seq=seq, comm=comm)
        self.source = source
        self.schema = schema


class PeerError(CollectiveError):
    """Raised on every other rank when one or more ranks failed their part of a collective.

    ``ranks`` are the failing ranks, ``error_type`` and ``detail`` what the first of them (the root
    cause) reported. The fault is on that rank; read its own error for what was wrong.
    """

    def __init__(self, message: str, *, seq: int, comm: str = "", ranks: Sequence[int] = (),
                 error_type: str = "", detail: str = "") -> None:
        super().__init__(message, seq=seq, comm=comm)
        self.ranks = tuple(ranks)
        self.error_type = error_type
        self.detail = detail


class ConcurrentCallError(CollectiveError):
    """Raised when two threads use one communicator at the same time.

    A TypedComm (and every TypedComm sharing its private channel: those built over the same
    parent communicator) serves one thread at a time. The thread that entered second raises this
    at once, without taking part in anything, naming both threads (``threads``); the channel is
    then unusable, and its next collective raises this on every rank, so no rank returns data
    paired across threads and none waits for a call that will not come. It is the calling code's
    fault: give each thread its own communicator (:meth:`TypedComm.dup`, made by every rank at
    the same point) and initialise MPI with ``MPI_THREAD_MULTIPLE``.
    """

    def __init__(self, message: str, *, seq: int, comm: str = "",
                 threads: Tuple[str, ...] = (), ranks: Sequence[int] = ()) -> None:
        super().__init__(message, seq=seq, comm=comm)
        self.threads = tuple(threads)
        self.ranks = tuple(ranks)


PUBLIC_ERRORS = (CollectiveError, DesyncError, CollectiveTimeout, EncodeError, DecodeError,
                 PeerError, ConcurrentCallError)
for _cls in PUBLIC_ERRORS:
    _cls.__module__ = "typedcoll"


def sendable(text: str) -> str:
    """``text`` as it can travel to peers: a lone surrogate (a path from ``os.fsdecode`` of
    undecodable bytes) would make UTF-8 encoding raise on the failing rank alone, before it
    tells its peers; it travels escaped instead."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")

