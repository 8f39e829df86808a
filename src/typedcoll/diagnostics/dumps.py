"""Post-mortem dumps, signals, the excepthook, and how a hung job ends.

Dumps. With ``TYPEDCOLL_TRACE_DIR`` set, each process writes ``<dir>/rank<R>.json`` (R: its world
rank) on any ``CollectiveError`` (before it reaches the caller), on an uncaught exception, on
SIGTERM and SIGINT, on SIGUSR1 (a live dump: the process goes on), when a timed-out peer asks
over the side channel, and on :func:`dump_traces`. A dump (:class:`~.model.Dump`) holds every
live communicator's flight-recorder ring, its notes and what the side channel last heard of each
peer (for a peer that has died since, its last state), and every thread's Python stack. It is
written to a temporary file and renamed, so a reader never sees half a dump; dumping never raises
into user code (a failure becomes a line on stderr).

Signals. A Python signal handler runs only when the main thread executes bytecode, and a hung
rank sits in a blocking MPI call. So the C-level handler's wake-up fd (``signal.set_wakeup_fd``)
wakes the watcher's signal thread, which dumps while the main thread is stuck; the Python
handlers only chain to the previous ones. SIGTERM ends the process even when the dump cannot be
written within ``SIGTERM_GRACE``.

How a hung job ends. After a ``CollectiveTimeout`` the backend collective is still pending, so
``MPI_Finalize`` at exit could wait forever. The excepthook therefore ends the job
(``MPI_Abort``, else ``os._exit``) when the uncaught exception is a ``CollectiveTimeout``, after
the previous hook has printed it and its hang report.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import msgspec

from ..core.errors import CollectiveError, CollectiveTimeout
from ..core.plumbing import register_internal
from ..core.protocol import Protocol
from ..core.wire import NO_STEP
from . import hang, log, state, watcher
from .model import FORMAT, VERSION, CommDump, Dump
from .watcher import warn
from .state import trace_dir

# SIGINT too: launchers (mpiexec.gforker, hydra on Ctrl-C) send it to every rank when one dies.
DUMP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
MAX_EVENTS = 20
# Seconds SIGTERM's dump may take before the process ends without it.
SIGTERM_GRACE = 10.0

_ENCODER = msgspec.json.Encoder()
# Serialises writers; reentrant because a signal handler may interrupt a dump on the main thread.
_LOCK = threading.RLock()
_TMP_COUNTER = itertools.count()


class _State:
    events: List[str] = []
    previous_excepthook: Any = None
    previous_handlers: Dict[int, Any] = {}
    via_watcher = False
    dumped: Dict[int, threading.Event] = {}
    main_took_sigterm = threading.Event()


# --- the dump ------------------------------------------------------------------------------------
def comm_dump(p: Protocol) -> CommDump:
    recorder = p.recorder
    entries = []
    if recorder is not None:
        for _ in range(3):  # the rank's own thread may record while this one reads
            try:
                entries = recorder.snapshot()
                break
            except Exception:
                entries = []
    ranks = state.world_ranks(p.channel)
    return CommDump(
        id=state.comm_id(p), rank=p.rank, size=p.size, seq=p.seq, name=p.name,
        instance=p.instance, world_ranks=ranks, transport=p.transport.kind,
        step=None if p.step == NO_STEP else p.step, timeout=p.timeout,
        where=state.where_now(p),
        capacity=recorder.capacity if recorder is not None else 0,
        recorded=recorder.count if recorder is not None else 0, entries=entries,
        notes=list(p.decisions()), peers=hang.peers_seen(p.channel))


def build_dump(reason: str, message: str = "") -> Dump:
    """This process's dump document (every live communicator, every thread)."""
    found = state.protocols(everyone=True)
    rank = state.process_world_rank()
    if rank is None:
        rank = min((state.world_rank_of(p) for p in found), default=0)
    return Dump(format=FORMAT, version=VERSION, rank=rank, world_size=state.process_world_size(),
                host=state.HOST, pid=os.getpid(), time_ns=time.time_ns(), reason=reason,
                message=message, events=list(_State.events), threads=state.all_stacks(),
                comms=[comm_dump(p) for p in found])


def write_atomic(path: str, data: bytes) -> None:
    """Write via a temporary file and rename, so readers see the old or the new file whole."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}.{next(_TMP_COUNTER)}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def dump_traces(reason: str = "dump_traces", message: str = "", *,
                directory: Optional[str] = None) -> Optional[str]:
    """Write this process's dump now; returns its path, or None.

    ``directory`` defaults to ``TYPEDCOLL_TRACE_DIR``; with neither, nothing is written. The file
    is ``<directory>/rank<R>.json``, R the world rank, replaced atomically. Never raises: a
    failure is reported on stderr and None returned.
    """
    directory = directory or trace_dir()
    if not directory:
        return None
    try:
        if not _LOCK.acquire(timeout=5.0):
            warn(f"dump ({reason}) skipped: another dump is still being written")
            return None
        try:
            _State.events.append(reason)
            del _State.events[:-MAX_EVENTS]
            os.makedirs(directory, exist_ok=True)
            doc = build_dump(reason, message)
            path = os.path.join(directory, f"rank{doc.rank}.json")
            write_atomic(path, _ENCODER.encode(doc))
        finally:
            _LOCK.release()
        log.event("info", "dump_written", path=path, reason=reason)
        return path
    except Exception as exc:  # dumping never raises into user code
        warn(f"could not write the trace dump ({reason}): {type(exc).__name__}: {exc}")
        return None


# --- hooks the protocol calls ----------------------------------------------------------------
def on_error(p: Protocol, exc: BaseException) -> None:
    if not isinstance(exc, CollectiveError):
        return
    log.log_error(p, exc)
    if trace_dir() is not None:
        dump_traces(type(exc).__name__, str(exc))


# --- signals -------------------------------------------------------------------------------------
def install_signals(wakeup_fd: int) -> None:
    """Dump on DUMP_SIGNALS (main thread only; with a trace directory only)."""
    if trace_dir() is None or _State.previous_handlers:
        return
    for signum in DUMP_SIGNALS:
        _State.dumped[signum] = threading.Event()
        if signal.getsignal(signum) == signal.SIG_IGN:
            continue  # an ignored signal (SIGINT in a background job) stays ignored
        try:
            _State.previous_handlers[signum] = signal.signal(signum, _handler)
        except (OSError, ValueError) as exc:
            warn(f"could not install a handler for {signal.Signals(signum).name}: {exc}")
    try:
        old = signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
    except (ValueError, OSError) as exc:
        warn(f"signals will be handled on the main thread only: {exc}")
        return
    if old not in (-1, wakeup_fd):  # someone else (asyncio) owns it: leave it to them
        signal.set_wakeup_fd(old)
        return
    _State.via_watcher = True


def on_signal(signum: int) -> None:
    """On the signal thread: dump now, even while the main thread is stuck in C."""
    if signum not in _State.dumped:
        return
    # SIGTERM must end the process as it would have without us, whatever the main thread is
    # doing (stuck in C, it never runs its handler) and however long the dump takes; unless the
    # program installed a handler of its own since (a graceful shutdown): SIGTERM is then its.
    ends = (signum == signal.SIGTERM and _State.previous_handlers.get(signum) == signal.SIG_DFL
            and signal.getsignal(signum) is _handler)
    if ends:
        reaper = threading.Timer(SIGTERM_GRACE, os._exit, (128 + signal.SIGTERM,))
        reaper.daemon = True
        reaper.start()
    dump_traces(signal.Signals(signum).name)
    _State.dumped[signum].set()
    if ends and not _State.main_took_sigterm.wait(1.0):
        os._exit(128 + signal.SIGTERM)


def _handler(signum: int, frame: Any) -> None:
    """Main-thread handler: the diagnostics thread dumps; this one chains to the previous."""
    event = _State.dumped.get(signum)
    if not _State.via_watcher or event is None or not event.wait(1.0):
        dump_traces(signal.Signals(signum).name)
    if event is not None:
        event.clear()
    if signum == signal.SIGTERM:
        _State.main_took_sigterm.set()
    previous = _State.previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL and signum == signal.SIGTERM:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


# --- the excepthook ------------------------------------------------------------------------------
def install_excepthook() -> None:
    if sys.excepthook is not _excepthook:
        _State.previous_excepthook = sys.excepthook
        sys.excepthook = _excepthook


def _excepthook(exc_type: Any, exc: BaseException, tb: Any) -> None:
    state.note_uncaught(tb)  # before any dump: this thread's stack is the hook's alone now
    ending = _process_ends_with(exc)
    try:
        try:
            if ending:
                # First, while the transports still run: peers waiting for this rank then name
                # the exception that ended it instead of calling it unresponsive.
                _farewell(exc_type, exc, tb)
            if trace_dir() is not None:
                dump_traces(f"uncaught {exc_type.__name__}", str(exc))
        finally:
            previous = _State.previous_excepthook or sys.__excepthook__
            previous(exc_type, exc, tb)
            if isinstance(exc, CollectiveTimeout):
                end_job()
            if ending:
                _end_job_if_waited_for(exc_type)
    finally:
        state.note_uncaught(None)


def _process_ends_with(exc: BaseException) -> bool:
    """Whether the interpreter calls the hook because ``exc`` ends the program: it stored the
    exception as ``sys.last_value`` first (a program that calls the hook to log an error and
    carries on does not), on the main thread, and no interactive session goes on after it."""
    return (getattr(sys, "last_value", None) is exc and not sys.flags.inspect
            and not hasattr(sys, "ps1")
            and threading.current_thread() is threading.main_thread())


def _farewell(exc_type: Any, exc: BaseException, tb: Any) -> None:
    try:
        watcher.farewell(state.uncaught_text(exc_type, exc, tb))
    except BaseException as failed:  # the dump, the chained hook and the job's end come first
        warn(f"farewell not sent: {type(failed).__name__}: {failed}")


def _end_job_if_waited_for(exc_type: Any) -> None:
    """Peers inside a collective without a timeout that this ending rank never joined would
    wait for ever (MPI_Finalize waits for them too): say so and end the job, as a launcher's
    abort-on-error mode would. Peers with a timeout report by themselves."""
    try:
        waiting = hang.waiting_for_this_rank()
    except BaseException as failed:  # no answer to build on: the job goes on as it would have
        warn(f"could not ask the peers: {type(failed).__name__}: {failed}")
        return
    if waiting:
        warn(f"this rank is ending (uncaught {getattr(exc_type, '__name__', exc_type)}) and "
             f"{'; '.join(waiting)}: ending the job")
        end_job()


_FORWARD_GRACE = 0.2  # seconds


def end_job(code: int = 1) -> None:
    """End every rank now: the timed-out collective is still pending, so exit could hang."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    # The launcher forwards this rank's output through a pipe of its own and tears the job
    # down on the abort: give it a moment to forward the report just printed.
    time.sleep(_FORWARD_GRACE)
    watcher.stop()
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


register_internal(__file__)
