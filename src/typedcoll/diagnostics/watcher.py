"""The watcher: two daemon threads per process, one that answers the side channel and one that
takes signals.

The first polls every channel's side channel (``side``) when due, every few milliseconds for
MPI, and otherwise sleeps in ``select`` on its wake-up pipe: a rank blocked inside MPI still
answers its peers. It holds ``_Watcher.lock`` while it uses a transport, so whoever frees a
channel's communicators (``forget``) or finalises MPI (``stop``, at exit) first waits out a
poll in progress.

The second blocks on a pipe of its own, the signal wake-up fd (``dumps``), and calls no
transport: a poll that never returns (an MPI call after a peer died may block) cannot keep
SIGTERM from writing the dump and ending the process.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
import weakref
from typing import Callable, Dict, List, Optional, Set, Tuple, Union

from ..core.channel import Channel
from ..core.plumbing import register_internal
from . import side as side_channels
from .side import Answerer, MPISide, Side

IDLE_INTERVAL = 0.25  # with no side channel to poll: only a new one and stopping wake the thread


class _Watcher:
    thread: Optional[threading.Thread] = None
    rfd = -1
    wfd = -1
    signal_thread: Optional[threading.Thread] = None
    signal_rfd = -1
    signal_wfd = -1
    # id(channel) -> (weak channel, its side channel or why it has none), for every channel
    sides: Dict[int, Tuple["weakref.ref[Channel]", Union[Side, str]]] = {}
    polled: Dict[int, Tuple["weakref.ref[Channel]", Side]] = {}  # those that need polling
    due: Dict[int, float] = {}  # id(channel) -> when to poll it next (monotonic)
    # Held while the thread uses a transport: whoever frees a channel's communicators, or
    # finalises MPI, takes it first (see ``forget`` and ``stop``).
    lock = threading.RLock()
    prune_at = 64
    warned: Set[int] = set()
    stopped = False
    farewell_said = False  # this process has told its peers it is ending
    mpi_left = False  # MPI is being finalised: its side channels are polled no more
    answer: Optional[Answerer] = None
    on_signal: Optional[Callable[[int], None]] = None
    after_poll: Optional[Callable[[], None]] = None


def attach(channel: Channel) -> Union[Side, str]:
    """Serve ``channel``'s side channel from now on (idempotent); returns it or why none."""
    known = _Watcher.sides.get(id(channel))
    if known is not None and known[0]() is channel:
        return known[1]
    try:
        side: Union[Side, str] = side_channels.make_side(channel)
    except Exception as exc:  # a transport we cannot poll: no side channel, and say why
        side = f"no side channel: {type(exc).__name__}: {exc}"
    ref = weakref.ref(channel)
    with _Watcher.lock:
        if len(_Watcher.sides) >= _Watcher.prune_at:  # channels gone since: forget them
            for key, (old, _) in list(_Watcher.sides.items()):
                if old() is None:
                    del _Watcher.sides[key]
            _Watcher.prune_at = 2 * len(_Watcher.sides) + 64
        _Watcher.sides[id(channel)] = (ref, side)
        if not isinstance(side, str) and side.interval is not None:
            _Watcher.polled[id(channel)] = (ref, side)
            _Watcher.due[id(channel)] = 0.0
            wake()
    return side


def side_of(channel: Channel) -> Union[Side, str]:
    """``channel``'s side channel (attaching it if it was created before install)."""
    return attach(channel)


def forget(channel: Channel) -> None:
    """Stop serving ``channel`` (before its communicators are freed): waits out a poll."""
    with _Watcher.lock:
        known = _Watcher.sides.pop(id(channel), None)
        if known is not None and isinstance(known[1], MPISide):
            known[1].closed = True  # a farewell kept for a collected communicator skips it
        _Watcher.polled.pop(id(channel), None)
        _Watcher.due.pop(id(channel), None)
        side_channels.forget_local(channel)


def start(answer: Answerer, on_signal: Callable[[int], None],
          after_poll: Callable[[], None]) -> int:
    """Start the threads (once); returns the write end of the signal thread's pipe.

    ``answer(channel, query)`` builds this rank's answer, ``on_signal(signum)`` handles a signal
    and ``after_poll()`` does what may wait until the answers are sent (requested dumps).
    """
    _Watcher.answer = answer
    side_channels.ANSWERER[0] = answer
    _Watcher.on_signal = on_signal
    _Watcher.after_poll = after_poll
    if _Watcher.thread is None:
        _Watcher.rfd, _Watcher.wfd = os.pipe()
        os.set_blocking(_Watcher.wfd, False)
        os.set_blocking(_Watcher.rfd, False)
        _Watcher.signal_rfd, _Watcher.signal_wfd = os.pipe()
        os.set_blocking(_Watcher.signal_wfd, False)  # a signal handler must never block
        _Watcher.thread = threading.Thread(target=_run, name="typedcoll-diagnostics",
                                           daemon=True)
        _Watcher.signal_thread = threading.Thread(target=_take_signals,
                                                  name="typedcoll-signals", daemon=True)
        _Watcher.thread.start()
        _Watcher.signal_thread.start()
    return _Watcher.signal_wfd


def farewell(text: str) -> None:
    """Tell every peer of every served channel that this rank is ending, and why (the
    excepthook's farewell, with the exception's text)."""
    def messages() -> List[Tuple[Side, side_channels.Ended]]:
        found = []
        for ref, side in list(_Watcher.sides.values()):
            channel = ref()
            if channel is not None and channel.users > 0 and not isinstance(side, str):
                found.append((side, side_channels.Ended(channel.transport.rank, text)))
        return found
    say_farewell(messages)


def say_farewell(messages: Callable[[], List[Tuple[Side, side_channels.Ended]]]) -> None:
    """Send each of ``messages()`` (built under the lock) on its side channel: at most
    ``side.FAREWELL_SECONDS`` in all, and not at all while a poll holds the transports longer
    than that (a peer died under it). A normal end's messages come from ``ending``."""
    _Watcher.farewell_said = True
    deadline = time.monotonic() + side_channels.FAREWELL_SECONDS
    if not _Watcher.lock.acquire(timeout=side_channels.FAREWELL_SECONDS):
        return
    try:
        for side, message in messages():
            if isinstance(side, MPISide) and (side.closed or side.MPI.Is_finalized()):
                continue
            try:
                side.farewell(message, deadline)
            except Exception as exc:  # a broken channel: its peers call this rank unresponsive
                warn(f"side channel of rank {message.rank}: {type(exc).__name__}: {exc}")
    finally:
        _Watcher.lock.release()


def known_side(channel: Channel) -> Optional[Side]:
    """``channel``'s side channel if the watcher serves it (never attaching one). Called from
    a finalizer too, where the garbage collector may have cleared the weak reference to a
    channel that is being collected: ``channel`` still holds its id then."""
    known = _Watcher.sides.get(id(channel))
    if known is None or isinstance(known[1], str):
        return None
    alive = known[0]()
    return known[1] if alive is None or alive is channel else None


def leave_mpi() -> None:
    """MPI is being finalised (an explicit ``MPI.Finalize()``): poll no MPI side channel from
    now on. Waits out a poll in progress, which may be inside MPI, for as long as a farewell
    may take: one stuck there (a peer died under it) must not keep MPI from finalising."""
    _Watcher.mpi_left = True
    wait_out_poll()


def wait_out_poll() -> None:
    """Return once no poll (or work under ``while_running``) is in progress, or after as long
    as a farewell may take: one stuck inside a transport must not keep the caller."""
    if _Watcher.lock.acquire(timeout=side_channels.FAREWELL_SECONDS):
        _Watcher.lock.release()


def while_running(work: Callable[[], None]) -> None:
    """``work()`` holding the transports' lock, unless the watcher has stopped: whoever stops
    it (at exit) then waits for ``work`` to finish, and ``work`` never sees what follows."""
    with _Watcher.lock:
        if not _Watcher.stopped:
            work()


def departures() -> List[Tuple[Channel, Dict[int, side_channels.Ended]]]:
    """Each polled channel whose peers' programs ended normally, with their farewells."""
    found = []
    with _Watcher.lock:
        for ref, side in list(_Watcher.polled.values()):
            channel = ref()
            if channel is not None and isinstance(side, MPISide) and side.farewells:
                departed = side.departed()
                if departed:
                    found.append((channel, departed))
    return found


def said_farewell() -> bool:
    return _Watcher.farewell_said


def wake() -> None:
    if _Watcher.wfd >= 0:
        try:
            os.write(_Watcher.wfd, b"\0")
        except OSError:  # the pipe is full: the thread is awake anyway
            pass


def stop() -> None:
    """No more polling (at exit, before MPI is finalised); waits out a poll in progress."""
    with _Watcher.lock:
        _Watcher.stopped = True


def running() -> bool:
    return _Watcher.thread is not None and _Watcher.thread.is_alive() and not _Watcher.stopped


def _run() -> None:
    while not _Watcher.stopped:
        try:
            now = time.monotonic()
            wait = min(_Watcher.due.values(), default=now + IDLE_INTERVAL) - now
            readable, _, _ = select.select([_Watcher.rfd], [], [], max(wait, 0.0))
            if readable:  # a new channel or stopping woke it: drained even when polls run late
                _drain_pipe()
            _poll()
            if _Watcher.after_poll is not None:
                _Watcher.after_poll()
        except Exception as exc:  # the thread must survive anything, or peers go unanswered
            warn(f"diagnostics thread: {type(exc).__name__}: {exc}")
            time.sleep(IDLE_INTERVAL)


def _drain_pipe() -> None:
    try:
        os.read(_Watcher.rfd, 256)
    except BlockingIOError:
        pass


def _take_signals() -> None:
    """Each byte the C-level handler writes is a signal's number (``signal.set_wakeup_fd``)."""
    while True:
        try:
            data = os.read(_Watcher.signal_rfd, 256)
            for signum in data:
                if signum and _Watcher.on_signal is not None:
                    _Watcher.on_signal(signum)
        except Exception as exc:  # the thread must survive anything, or SIGTERM is lost
            warn(f"diagnostics signal thread: {type(exc).__name__}: {exc}")
            time.sleep(IDLE_INTERVAL)


def _poll() -> None:
    answer = _Watcher.answer
    with _Watcher.lock:
        if _Watcher.stopped or answer is None:
            return
        now = time.monotonic()
        for key, (ref, side) in list(_Watcher.polled.items()):
            channel = ref()
            if channel is None or channel.users <= 0 or (
                    isinstance(side, MPISide) and (_Watcher.mpi_left
                                                   or side.MPI.Is_finalized())):
                _Watcher.polled.pop(key, None)
                _Watcher.due.pop(key, None)
                continue
            if _Watcher.due.get(key, 0.0) > now:
                continue
            _Watcher.due[key] = now + (side.interval or IDLE_INTERVAL)
            try:
                side.serve(answer, channel)
            except Exception as exc:  # one broken channel (a dead peer) must not stop the rest
                if key not in _Watcher.warned:  # once per channel: it may fail every second
                    _Watcher.warned.add(key)
                    warn(f"side channel of {channel.label}: {type(exc).__name__}: {exc}")
                _Watcher.due[key] = now + 1.0


def warn(text: str) -> None:
    """One line on stderr, in one write: the launcher may put another rank's output between
    two."""
    try:
        sys.stderr.write(f"typedcoll diagnostics: {text}\n")
        sys.stderr.flush()
    except Exception:  # nowhere left to report to
        pass


register_internal(__file__)
