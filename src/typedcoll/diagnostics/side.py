"""The side channel: asking a peer where it is, over the job's own transport.

When a collective times out, the ranks that did not arrive are by definition not in it, and may
be stuck in another collective, in a C call or in a sleep: nothing can be asked of them through
the collective itself. Each process therefore runs one daemon thread, the watcher, that answers
questions arriving on a channel typed traffic never uses:

* MPI: the private ``side`` communicator every MPI channel reserves for diagnostics. The asker
  sends each peer a :class:`Query` (nonblocking, tag ``QUERY_TAG``); each peer's watcher polls
  with a matched probe (``MPI_Improbe``) every ``MPI_INTERVAL`` seconds and answers with its
  :class:`~typedcoll.diagnostics.model.RankStatus` (tag ``ANSWER_TAG``). Matched probes let the
  asking thread and the watcher receive on one communicator without stealing each other's
  messages. Needs ``MPI_THREAD_MULTIPLE`` (mpi4py's default); otherwise there is no side channel
  and the hang report says why.
* torch: the process group's Store (the channel's ``transport.store``, private to it). The asker
  takes a question number with ``add("q", 1)`` and writes ``q/<n>``; each peer's watcher polls the
  counter every ``STORE_INTERVAL`` seconds (slower in big jobs), writes its answer to
  ``a/<n>/<rank>`` and adds 1 to ``a/<n>/count``, the one key the asker polls. The Store spans
  nodes like the group itself.
* in-memory ranks (``typedcoll.testing``): threads of this process, answered in place.

mpi4py and torch release the GIL while a rank waits in a collective, so the watcher answers for a
rank stuck in one; a rank stuck in a C call that holds the GIL, or dead, does not answer, and the
asker names it unresponsive after its grace period. A rank whose main thread raises an uncaught
exception says so first (``farewell``, from the excepthook): an :class:`Ended` to every peer
(MPI: tag ``ENDED_TAG`` on the side communicator; torch: the key ``ended/<rank>``), which an
asker reads for the peers that did not answer (``ended``), so its report names the exception
that ended the rank rather than calling it unresponsive. A rank whose program ends normally
sends one too, marked ``normal``, with how many collectives it issued on each communicator;
MPI watchers take those with their polls, since a peer waiting without a timeout for a call
the ended rank never makes must learn it by itself (``ending``). Polling costs the steady
state one GIL hand-over and a few nonblocking probes per channel every few milliseconds
(measured in ``docs/diagnostics.md``).

``watcher`` runs the thread that polls these channels.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import msgspec

from ..core.channel import Channel
from ..core.plumbing import register_internal
from .model import RankStatus

QUERY_TAG = 0x7D51
ANSWER_TAG = 0x7D52
ENDED_TAG = 0x7D53
FAREWELL_SECONDS = 0.5  # how long an ending rank waits for its farewells to leave
MPI_INTERVAL = 0.005
STORE_INTERVAL = 0.05
STORE_MAX_INTERVAL = 0.5  # within the asker's grace, whatever the job's size
STORE_PREFIX = "typedcoll-diag/"


class Query(msgspec.Struct, array_like=True, frozen=True):
    """Where are you? Asked about communicator ``instance`` of the channel, at its ``seq``."""

    nonce: int
    asker: int  # the asker's rank in the communicator
    instance: int
    seq: int
    dump: bool  # write your dump file too (the asker has a trace directory)
    reason: str


class Answer(msgspec.Struct, array_like=True):
    nonce: int
    rank: int  # the answerer's rank in the communicator
    status: RankStatus


class Ended(msgspec.Struct, array_like=True, frozen=True):
    """A rank's farewell: what ended it (``ValueError: ... (raised at engine.py:88 in step)``).

    ``normal``: its program ended without an uncaught exception (it returned, or called
    ``sys.exit`` or ``MPI.Finalize()``); ``seqs`` then holds, for each communicator of the
    channel it never freed, its ``instance`` and how many collectives this rank issued on it.
    A peer inside a later collective of one of them waits for a call this rank never joins
    (``ending``)."""

    rank: int  # the sender's rank in the communicator
    text: str
    normal: bool = False
    seqs: Tuple[Tuple[int, int], ...] = ()


_ENCODER = msgspec.msgpack.Encoder()
_QUERY = msgspec.msgpack.Decoder(Query)
_ANSWER = msgspec.msgpack.Decoder(Answer)
_ENDED = msgspec.msgpack.Decoder(Ended)

# Called by the watcher as answer(channel, query) -> RankStatus (set by the package at install).
Answerer = Callable[[Channel, Query], RankStatus]


def decode_answer(data: Any) -> Optional[Answer]:
    try:
        return _ANSWER.decode(data)
    except Exception:  # a peer of another typedcoll version, or corrupt bytes: no answer
        return None


def _decode_ended(data: Any) -> Optional[Ended]:
    try:
        return _ENDED.decode(data)
    except Exception:  # as for answers: nothing we can read
        return None


# --- MPI ---------------------------------------------------------------------------------------
class MPISide:
    """Questions and answers as point-to-point messages on the channel's ``side`` communicator."""

    interval: Optional[float] = MPI_INTERVAL

    def __init__(self, channel: Channel) -> None:
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = channel.transport.side
        self.rank = channel.transport.rank
        self.sends: List[Tuple[Any, bytes]] = []  # in-flight Isends and the bytes they send
        self.lock = threading.Lock()
        self.nonce = -1  # the question being asked on this channel now (-1: none)
        self.inbox: Dict[int, Answer] = {}  # its answers, when the watcher received them
        self.farewells: Dict[int, Ended] = {}  # peers' farewells received so far
        self.closed = False  # its communicator is freed (the channel closed): send nothing

    def _send(self, data: bytes, dest: int, tag: int) -> None:
        request = self.comm.Isend([data, len(data), self.MPI.BYTE], dest, tag)
        with self.lock:
            self.sends.append((request, data))

    def _receive(self, tag: int) -> Optional[Tuple[int, bytearray]]:
        MPI = self.MPI
        status = MPI.Status()
        message = self.comm.Improbe(MPI.ANY_SOURCE, tag, status)
        if message is None:
            return None
        buf = bytearray(status.Get_count(MPI.BYTE))
        message.Recv([buf, MPI.BYTE])
        return status.Get_source(), buf

    def serve(self, answer: Answerer, channel: Channel) -> None:
        """Answer every question that has arrived; keep late answers away from the next ask."""
        while True:
            got = self._receive(QUERY_TAG)
            if got is None:
                break
            source, data = got
            try:
                query = _QUERY.decode(data)
            except Exception:  # not a question we understand: nothing to answer
                continue
            status = answer(channel, query)
            self._send(_ENCODER.encode(Answer(query.nonce, self.rank, status)), source,
                       ANSWER_TAG)
        got = self._receive(ANSWER_TAG)
        if got is not None:
            reply = decode_answer(got[1])
            with self.lock:
                if reply is not None and reply.nonce == self.nonce:
                    self.inbox[got[0]] = reply  # the asking thread collects it
        with self.lock:
            self.sends = [(r, d) for r, d in self.sends if not r.Test()]
        self._take_farewells()  # a peer waiting here for one that ended learns it (ending)

    def farewell(self, message: Ended, deadline: float) -> None:
        """Tell every peer this rank is ending, waiting until ``deadline`` for the sends."""
        data = _ENCODER.encode(message)
        requests = [self.comm.Isend([data, len(data), self.MPI.BYTE], r, ENDED_TAG)
                    for r in range(self.comm.Get_size()) if r != self.rank]
        while not self.MPI.Request.Testall(requests) and time.monotonic() < deadline:
            time.sleep(0.001)
        with self.lock:  # sends not done yet keep their bytes alive
            self.sends += [(r, data) for r in requests]

    def _take_farewells(self) -> None:
        while True:
            got = self._receive(ENDED_TAG)
            if got is None:
                return
            message = _decode_ended(got[1])
            if message is not None:
                with self.lock:
                    self.farewells[got[0]] = message

    def ended(self, peers: Sequence[int]) -> Dict[int, Ended]:
        """Which of ``peers`` said they are ending, and what ended each."""
        self._take_farewells()
        with self.lock:
            return {r: self.farewells[r] for r in peers if r in self.farewells}

    def departed(self) -> Dict[int, Ended]:
        """The peers whose programs ended normally, as far as the watcher has heard."""
        with self.lock:
            return {r: m for r, m in self.farewells.items() if m.normal}

    def ask(self, query: Query, peers: List[int], deadline: float) -> Dict[int, Answer]:
        """Ask ``peers``; their answers that arrive before ``deadline`` (monotonic)."""
        with self.lock:
            self.nonce, self.inbox = query.nonce, {}
        data = _ENCODER.encode(query)
        for r in peers:
            self._send(data, r, QUERY_TAG)
        answers: Dict[int, Answer] = {}
        try:
            while len(answers) < len(peers) and time.monotonic() < deadline:
                got = self._receive(ANSWER_TAG)
                with self.lock:
                    answers.update(self.inbox)
                    self.inbox.clear()
                if got is None:
                    time.sleep(0.001)
                    continue
                reply = decode_answer(got[1])
                if reply is not None and reply.nonce == query.nonce:
                    answers[got[0]] = reply
        finally:
            with self.lock:
                self.nonce = -1
        return answers


# --- in-memory ranks ---------------------------------------------------------------------------
# Who answers for this process: set when the watcher starts (``watcher.start``).
ANSWERER: List[Optional[Answerer]] = [None]
# (job, communicator context) -> comm rank -> channel: the in-memory ranks of this process.
_LOCAL: Dict[Tuple[int, Any], "weakref.WeakValueDictionary[int, Channel]"] = {}


class LocalSide:
    """In-memory ranks are threads of this process: a question is answered in place, by the
    same function the watcher answers with, so there is nothing to poll."""

    interval: Optional[float] = None

    def __init__(self, channel: Channel) -> None:
        transport = channel.transport
        self.key = (transport.world.serial, transport.context)
        _LOCAL.setdefault(self.key, weakref.WeakValueDictionary())[transport.rank] = channel

    def serve(self, answer: Answerer, channel: Channel) -> None:
        pass

    def farewell(self, message: Ended, deadline: float) -> None:
        pass  # ranks are threads here, and the excepthook is the main thread's alone

    def ended(self, peers: Sequence[int]) -> Dict[int, Ended]:
        return {}

    def ask(self, query: Query, peers: List[int], deadline: float) -> Dict[int, Answer]:
        answer = ANSWERER[0]
        members = _LOCAL.get(self.key)
        answers: Dict[int, Answer] = {}
        for r in peers:
            channel = members.get(r) if members is not None else None
            if answer is not None and channel is not None:
                answers[r] = Answer(query.nonce, r, answer(channel, query))
        if len(answers) < len(peers):
            # As over any transport: a peer that does not answer has had the whole grace.
            time.sleep(max(0.0, deadline - time.monotonic()))
        return answers


def forget_local(channel: Channel) -> None:
    transport = channel.transport
    if transport.kind == "memory":
        _LOCAL.get((transport.world.serial, transport.context), {}).pop(transport.rank, None)


# --- Store (torch) -----------------------------------------------------------------------------
class StoreSide:
    """Questions and answers as keys of a Store private to the channel."""

    def __init__(self, channel: Channel, store: Any, interval: float) -> None:
        self.store = store
        self.interval: Optional[float] = interval
        self.rank = channel.transport.rank
        self.farewells: Dict[int, Ended] = {}  # peers' farewells found so far
        self.seen = int(store.add(STORE_PREFIX + "q", 0))  # questions before us were not ours

    def serve(self, answer: Answerer, channel: Channel) -> None:
        store = self.store
        newest = int(store.add(STORE_PREFIX + "q", 0))
        while self.seen < newest:
            number = self.seen + 1
            key = f"{STORE_PREFIX}q/{number}"
            if not store.check([key]):
                break  # its asker took the number and has not written the question yet
            self.seen = number
            try:
                query = _QUERY.decode(store.get(key))
            except Exception:  # not a question we understand
                continue
            if query.asker == self.rank:
                continue
            status = answer(channel, query)
            store.set(f"{STORE_PREFIX}a/{number}/{self.rank}",
                      _ENCODER.encode(Answer(query.nonce, self.rank, status)))
            store.add(f"{STORE_PREFIX}a/{number}/count", 1)

    def farewell(self, message: Ended, deadline: float) -> None:
        # A store whose server has gone blocks for its own timeout: set from a thread waited
        # on until the deadline, never longer.
        data = _ENCODER.encode(message)
        setter = threading.Thread(
            target=self.store.set, args=(f"{STORE_PREFIX}ended/{self.rank}", data),
            name="typedcoll-farewell", daemon=True)
        setter.start()
        setter.join(max(0.0, deadline - time.monotonic()))

    def ended(self, peers: Sequence[int]) -> Dict[int, Ended]:
        # Only the peers asked about: one store request each, where every survivor of a job
        # that lost a rank asks at once.
        found = self.farewells
        for r in peers:
            key = f"{STORE_PREFIX}ended/{r}"
            if r != self.rank and r not in found and self.store.check([key]):
                message = _decode_ended(self.store.get(key))
                if message is not None:
                    found[r] = message
        return {r: found[r] for r in peers if r in found}

    def ask(self, query: Query, peers: List[int], deadline: float) -> Dict[int, Answer]:
        store = self.store
        number = int(store.add(STORE_PREFIX + "q", 1))
        store.set(f"{STORE_PREFIX}q/{number}", _ENCODER.encode(query))
        # One counter to poll, not a key per peer: a store round trip each, at any size.
        count = f"{STORE_PREFIX}a/{number}/count"
        while int(store.add(count, 0)) < len(peers) and time.monotonic() < deadline:
            time.sleep(min((self.interval or STORE_INTERVAL) / 4, 0.01))
        answers: Dict[int, Answer] = {}
        for r in peers:
            key = f"{STORE_PREFIX}a/{number}/{r}"
            if store.check([key]):
                reply = decode_answer(store.get(key))
                store.delete_key(key)
                if reply is not None:
                    answers[r] = reply
        return answers


Side = Union[MPISide, StoreSide, LocalSide]


def make_side(channel: Channel) -> Union[Side, str]:
    """The side channel of ``channel``, or why it has none."""
    transport = channel.transport
    kind = transport.kind
    if kind == "mpi":
        from mpi4py import MPI
        level = MPI.Query_thread()
        if level != MPI.THREAD_MULTIPLE:
            names = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED:
                     "MPI_THREAD_FUNNELED", MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED"}
            return (f"the MPI side channel needs MPI_THREAD_MULTIPLE, and MPI was initialised "
                    f"with {names.get(level, level)} (mpi4py.rc.thread_level = 'multiple' "
                    f"before importing mpi4py.MPI)")
        return MPISide(channel)
    store = getattr(transport, "store", None)
    if store is not None:
        # Every rank polls the one store server: slower polling in bigger jobs keeps its load
        # near 2,000 requests a second.
        return StoreSide(channel, store, min(STORE_MAX_INTERVAL,
                                             max(STORE_INTERVAL, transport.size / 2000)))
    if kind == "memory":
        return LocalSide(channel)
    return f"the {kind} transport has no side channel (it exposes no store)"


register_internal(__file__)
