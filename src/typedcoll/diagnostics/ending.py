"""A rank whose program ends normally while its peers wait for it without a timeout (MPI).

A collective that one rank never joins does not complete: without a timeout its peers wait for
ever inside it, and the ending rank's own ``MPI_Finalize`` waits for them. An uncaught exception
is the excepthook's to handle (``dumps``): it tells the peers, asks whether any waits, and ends
the job. A normal end (the program returned, or called ``sys.exit``) runs no excepthook, and
asking every peer at every exit would cost each job's shutdown a side-channel round while its
peers finalise. So the ending rank only tells, and the waiting rank judges:

1. At exit, before MPI is finalised (``at_exit``: an ``atexit`` hook, as mpi4py finalises
   after the interpreter; or inside an explicit ``MPI.Finalize()``, ``watch_finalize``), the
   ending rank sends each peer of each channel one ``side.Ended`` marked ``normal``, holding
   for every communicator of the channel it never freed (live, or collected: ``on_gone``) its
   instance and how many collectives this rank issued on it, and the last collective it
   started. Nothing waits for an answer: the cost is one small message per peer.
2. A peer's watcher receives it with its polls (``side.MPISide.farewells``). After each poll
   (``check``) it tests whether this rank is inside a collective of that communicator numbered
   at or past the count the ended rank issued, without a timeout: one it never joins
   (``hang.waits_past``, the test the excepthook's question uses).
3. If so it prints what each of the two ranks did, logs it, writes its dump
   (``TYPEDCOLL_TRACE_DIR``) and ends the job (``dumps.end_job``), as a launcher's
   abort-on-error mode would. Every waiting rank finds it within one poll of the farewell.

With a timeout the peers report by themselves: their hang report names the rank as ended
normally, with its last collective. Over torch a rank that ends closes its connections, and its
peers' collectives fail at once: step 1 alone runs there (one key of the channel's store), so
their hang reports name it as ended normally. In-memory ranks are threads the harness bounds.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

from ..core.channel import BUSY_IDENT
from ..core.plumbing import register_internal
from ..core.protocol import LIVE, Protocol
from ..core.recorder import FlightRecorder, RecordEntry
from . import dumps, hang, log, state, watcher
from .side import Ended, MPISide, StoreSide


class _State:
    lock = threading.Lock()
    ending = False  # a check has found a wait that never ends: the job is ending
    exiting = False  # this process has begun its exit: its own judgements are over
    finalize_watched = False
    # Communicators collected without being freed (a local of a function that returned):
    # (id(side), instance) -> what at_exit tells of it (_Stop).
    gone: Dict[Tuple[int, int], "_Stop"] = {}


class _Stop(NamedTuple):
    """Where this rank stopped on one communicator: what its farewell says of it."""

    side: Union[MPISide, StoreSide]
    rank: int  # this rank's, in the communicator
    instance: int
    issued: int  # collectives
    name: str
    newest: Optional[FlightRecorder]  # its newest entry alone, described only when read

    @classmethod
    def of(cls, p: Protocol, side: Union[MPISide, StoreSide]) -> "_Stop":
        """Called from ``Protocol.__del__`` too, so it only copies: describing a call may
        take a lock that the code the collector interrupted holds."""
        try:
            newest = p.recorder.newest_alone() if p.recorder is not None else None
        except Exception:  # written concurrently by the rank's own thread: no entry
            newest = None
        return cls(side, p.rank, p.instance, p.seq, p.name, newest)

    def last(self) -> Optional[RecordEntry]:
        try:
            return self.newest.entry(1) if self.newest is not None else None
        except Exception:  # a farewell is said anyway
            return None


GONE_KEPT = 4096  # at most this many collected communicators are remembered


def on_gone(p: Protocol) -> None:
    """A communicator never freed is being collected (``Protocol.__del__``): its peers may
    still wait in it, so the count it issued goes into this rank's farewell."""
    if p.size <= 1:
        return
    side = watcher.known_side(p.channel)
    if isinstance(side, (MPISide, StoreSide)):
        if len(_State.gone) >= GONE_KEPT:
            _State.gone.pop(next(iter(_State.gone)))
        _State.gone[(id(side), p.instance)] = _Stop.of(p, side)


def at_exit(how: str = "its program ended without an uncaught exception") -> None:
    """The ``atexit`` hook: a normal end tells every peer where this rank stopped."""
    try:
        if watcher.said_farewell() or not watcher.running():
            return  # an uncaught exception said so already, or diagnostics are off
        stops = list(_State.gone.values())
        for p in list(LIVE):
            side = watcher.known_side(p.channel)
            # Over torch the peers' collectives fail as this process's connections close:
            # the note lets their hang reports say it ended normally, not "unresponsive".
            if p.size > 1 and not p.freed and isinstance(side, (MPISide, StoreSide)):
                stops.append(_Stop.of(p, side))
        if not stops:
            return
        text = _normal_text(how, stops)
        by_side: Dict[int, List[_Stop]] = {}
        for stop in stops:
            by_side.setdefault(id(stop.side), []).append(stop)
        watcher.say_farewell(lambda: [
            (these[0].side, Ended(these[0].rank, text, True,
                                  tuple((stop.instance, stop.issued) for stop in these)))
            for these in by_side.values()])
    except BaseException as failed:  # exit goes on: peers with a timeout still report
        watcher.warn(f"farewell not sent: {type(failed).__name__}: {failed}")


def watch_finalize() -> None:
    """An explicit ``MPI.Finalize()`` would come before ``at_exit``, which could then send
    nothing. MPI_Finalize first deletes ``MPI_COMM_SELF``'s attributes, while MPI still runs:
    an attribute of ours says the farewell there, and takes the watcher off MPI before the
    rest of the finalization. At mpi4py's own finalization, after the interpreter's, mpi4py
    runs no Python callback, and ``at_exit`` has said it already."""
    MPI = sys.modules.get("mpi4py.MPI")
    with _State.lock:
        if _State.finalize_watched or MPI is None or not MPI.Is_initialized() \
                or MPI.Is_finalized():
            return
        _State.finalize_watched = True
    keyval = MPI.Comm.Create_keyval(delete_fn=_at_finalize)
    MPI.COMM_SELF.Set_attr(keyval, 0)


def _at_finalize(comm: Any, keyval: int, value: Any) -> None:
    at_exit("it called MPI.Finalize()")
    watcher.leave_mpi()


def _normal_text(text: str, stops: List[_Stop]) -> str:
    """``its program ended without an uncaught exception; its last collective: ...``."""
    started = [(last, stop.name) for stop in stops for last in [stop.last()] if last is not None]
    if not started:
        return text
    last, name = max(started, key=lambda pair: pair[0].t_start_ns)
    return f"{text}; its last collective: {hang.entry_text(last, name, time.time_ns())}"


def watch_exit() -> None:
    """Mark the start of this process's exit (``exiting``) before any ``atexit`` hook runs:
    the interpreter calls the threading module's exit hooks first. Once set, this rank judges
    no collective of its main thread: its exit hooks may make collectives that its peers' exits
    make as well, after their farewells (hooks registered before typedcoll started on a rank
    run after its farewell, those registered later before it). Another thread's collective is
    still judged: the interpreter waits for that thread before any exit hook runs."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_exiting)
        except RuntimeError:  # the interpreter is exiting already
            _exiting()


def _exiting() -> None:
    _State.exiting = True
    watcher.wait_out_poll()  # a check in progress ends before any exit hook runs


def check() -> None:
    """After each poll, on the watcher thread: end the job where this rank waits, without a
    timeout, inside a collective that a peer whose program ended never joins. Not for the main
    thread's collectives once this process has begun to exit (``watch_exit``), nor at all once
    the watcher has stopped."""
    if not _State.ending:
        watcher.while_running(_check)


def _check() -> None:
    main = threading.main_thread().ident
    for channel, departed in watcher.departures():
        if _State.exiting and channel.busy[BUSY_IDENT] in (0, main):  # 0: only starting
            continue
        for p in list(LIVE):
            if p.channel is not channel or p.freed or p.timeout is not None:
                continue
            for rank, message in sorted(departed.items()):
                issued = dict(message.seqs).get(p.instance)
                if issued is None or p.seq <= issued:
                    continue  # the cheap test first: this runs every poll until the exit
                last = state.last_entry(p)
                if hang.waits_past(p.seq, last, bool(channel.busy[BUSY_IDENT]), issued):
                    _end(p, rank, message, issued, last)
                    return


def waited_for_text(p: Protocol, rank: int, message: Ended, issued: int,
                    last: Optional[RecordEntry]) -> str:
    """The lines a waiting rank prints before it ends the job."""
    waits = (f"collective #{last.seq}" if last is not None else
             f"a collective numbered {issued} or later")
    here = hang.entry_text(last, None, time.time_ns()) if last is not None else \
        f"inside {p.name}'s collective (flight recorder off)"
    peer = hang.ranks_label(p, [rank])
    return "\n".join([
        f"{peer} of {p.name} ended normally after {issued} "
        f"{'collective' if issued == 1 else 'collectives'} on it, and "
        f"{hang.ranks_label(p, [p.rank])}, this one, waits for it in {waits}, which has no "
        f"timeout: ending the job",
        f"  this rank: {here}",
        f"  {peer}: {message.text}"])


def _end(p: Protocol, rank: int, message: Ended, issued: int,
         last: Optional[RecordEntry]) -> None:
    with _State.lock:
        if _State.ending:
            return
        _State.ending = True
    text = waited_for_text(p, rank, message, issued, last)
    watcher.warn(text)
    log.event("error", "peer_ended", p, peer=rank, peer_issued=issued, seq=p.seq - 1)
    if state.trace_dir() is not None:
        dumps.dump_traces("a peer ended while this rank waits for it", text)
    dumps.end_job()


register_internal(__file__)
