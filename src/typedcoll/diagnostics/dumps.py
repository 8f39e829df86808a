"""Diagnostics: flight-recorder dumps, the excepthook, signal handlers, and how a hung job ends.

Nothing here runs on the hot path. The protocol calls two hooks: ``NEW_PROTOCOL_HOOKS`` at
communicator creation (we give the communicator a cross-rank id and a hang reporter, and install
the process-wide pieces once) and ``ERROR_HOOKS`` before a ``CollectiveError`` propagates (we
log one JSON line and dump).

Dumps. With ``TYPEDCOLL_TRACE_DIR`` set, each rank writes every live communicator's ring buffer
to ``<dir>/rank<R>.json`` (R: the world rank) on any ``CollectiveError``, on an uncaught
exception, on SIGTERM and SIGINT, on SIGUSR1 (a live dump; the process goes on), and when a
peer that timed out asks for it (see ``_diag_hang``). The format is documented in ``docs/diagnostics.md``.
A dump is written to a temporary file and renamed, so a reader never sees half a dump from a
live writer. Dumping never raises into user code: every failure becomes a line on stderr.

Signals. A Python signal handler only runs when the main thread executes bytecode, but a hung
rank sits in a blocking MPI call (mpi4py releases the GIL there). So the C-level handler's
wakeup fd (``signal.set_wakeup_fd``) wakes the diagnostics thread, which dumps while the main
thread is stuck; the Python-level handlers only chain to the previous handler.

How a hung job ends. After a ``CollectiveTimeout`` the backend collective is still pending, so
``MPI_Finalize`` at exit could wait forever. Our excepthook (installed at the first communicator,
with or without a trace directory; it chains to the previous hook) therefore calls
``MPI.COMM_WORLD.Abort(1)`` when the uncaught exception is a ``CollectiveTimeout``, after the
traceback and the hang report are printed. ``python -m mpi4py`` does the same for any exception.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sys
import threading
import time
import weakref
from typing import Any, Dict, List, Optional

import msgspec

from . import _diag_log
from ._errors import CollectiveError, CollectiveTimeout
from ._protocol import ERROR_HOOKS, LIVE, NEW_PROTOCOL_HOOKS, Protocol

FORMAT = "typedcoll-trace"
VERSION = 1
DIR_ENV = "TYPEDCOLL_TRACE_DIR"
# SIGINT too: launchers (mpiexec.gforker, hydra on Ctrl-C) send it to every rank when one dies.
DUMP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_ENCODER = msgspec.json.Encoder()
# Serialises writers; reentrant because a signal handler may interrupt a dump on the main thread.
_LOCK = threading.RLock()
_TMP_COUNTER = itertools.count()


class CommMeta:
    """What diagnostics know of one communicator beyond its protocol."""

    __slots__ = ("id", "world_ranks")

    def __init__(self, comm_id: str, world_ranks: Optional[List[int]]) -> None:
        self.id = comm_id
        self.world_ranks = world_ranks


class _State:
    """Process-wide diagnostics state, set up once at the first communicator."""

    installed = False
    directory: Optional[str] = None
    events: List[str] = []
    created: Dict[str, int] = {}
    meta: "weakref.WeakKeyDictionary[Protocol, CommMeta]" = weakref.WeakKeyDictionary()
    world_rank: Optional[int] = None
    world_size: Optional[int] = None
    previous_excepthook: Any = None
    previous_handlers: Dict[int, Any] = {}


def trace_dir() -> Optional[str]:
    """The dump directory (``TYPEDCOLL_TRACE_DIR``), or None when dumps are off."""
    if _State.installed:
        return _State.directory
    return os.environ.get(DIR_ENV) or None


def warn(text: str) -> None:
    """Report a diagnostics failure without raising (stderr may itself be gone)."""
    try:
        print(f"typedcoll diagnostics: {text}", file=sys.stderr, flush=True)
    except Exception:  # nowhere left to report to
        pass


# --- identity ------------------------------------------------------------------------------
def world_rank() -> int:
    """This process's world rank: MPI's when mpi4py is loaded, else torch's, else a protocol's."""
    if _State.world_rank is not None:
        return _State.world_rank
    rank, size = _backend_world()
    if rank is not None:
        _State.world_rank, _State.world_size = rank, size
        return rank
    for p in list(LIVE):
        return p.rank
    return 0


def world_size() -> Optional[int]:
    world_rank()
    return _State.world_size


def _backend_world():
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            if mpi.Is_initialized() and not mpi.Is_finalized():
                return mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()
        except Exception:  # a broken MPI must not break diagnostics
            pass
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return dist.get_rank(), dist.get_world_size()
        except Exception:
            pass
    return None, None


def _world_ranks(p: Protocol) -> Optional[List[int]]:
    """Comm rank -> world rank (None when unknown: then they are taken as equal)."""
    transport = p.transport
    try:
        if transport.kind == "mpi":
            from mpi4py import MPI
            group, world = transport.comm.Get_group(), MPI.COMM_WORLD.Get_group()
            try:
                return list(MPI.Group.Translate_ranks(group, list(range(p.size)), world))
            finally:
                group.Free()
                world.Free()
        group = getattr(transport, "group", None)  # torch transports may not expose one
        if group is not None:
            import torch.distributed as dist
            return list(dist.get_process_group_ranks(group))
    except Exception:
        pass
    return None


def comm_meta(p: Protocol) -> CommMeta:
    """The communicator's diagnostics record (made on the fly for protocols created earlier)."""
    meta = _State.meta.get(p)
    if meta is None:
        # Communicators are created collectively, so the k-th one of a given name on this rank
        # is the k-th one on every member: name plus ordinal identifies it across ranks.
        k = _State.created.get(p.name, 0) + 1
        _State.created[p.name] = k
        meta = CommMeta(p.name if k == 1 else f"{p.name}#{k}", _world_ranks(p))
        _State.meta[p] = meta
    return meta


# --- dumps ---------------------------------------------------------------------------------
def _comm_record(p: Protocol) -> Dict[str, Any]:
    meta = comm_meta(p)
    recorder = p.recorder
    entries: List[Dict[str, Any]] = []
    if recorder is not None:
        for _ in range(3):  # the main thread may record while another thread reads
            try:
                entries = recorder.snapshot()
                break
            except Exception:
                entries = []
    return {
        "id": meta.id, "name": p.name, "rank": p.rank, "size": p.size,
        "world_ranks": meta.world_ranks, "transport": p.transport.kind, "seq": p.seq,
        "timeout": p.timeout, "capacity": recorder.capacity if recorder is not None else 0,
        "recorded": recorder.count if recorder is not None else 0, "entries": entries,
    }


def build_dump(reason: str, message: str = "") -> Dict[str, Any]:
    """The dump document for this rank (see docs/diagnostics.md for the format)."""
    protocols = sorted(list(LIVE), key=lambda p: comm_meta(p).id)
    return {
        "format": FORMAT, "version": VERSION, "rank": world_rank(), "world_size": world_size(),
        "host": socket.gethostname(), "pid": os.getpid(), "time_ns": time.time_ns(),
        "reason": reason, "message": message, "events": list(_State.events),
        "comms": [_comm_record(p) for p in protocols],
    }


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
    """Write this rank's flight-recorder dump now; returns its path, or None.

    ``directory`` defaults to ``TYPEDCOLL_TRACE_DIR``; with neither, nothing is written. The file
    is ``<directory>/rank<R>.json`` with R the world rank, replaced atomically. Never raises:
    a failure is reported on stderr and None returned.
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
            del _State.events[:-20]
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"rank{world_rank()}.json")
            write_atomic(path, _ENCODER.encode(build_dump(reason, message)))
            return path
        finally:
            _LOCK.release()
    except Exception as exc:  # dumping never raises into user code
        warn(f"could not write the trace dump ({reason}): {type(exc).__name__}: {exc}")
        return None


# --- hooks the protocol calls ----------------------------------------------------------------
def _on_new_protocol(p: Protocol) -> None:
    try:  # the protocol does not guard this hook: a failure here would break comm creation
        comm_meta(p)
        from . import _diag_hang
        p.hang_reporter = _diag_hang.hang_report
        if not _State.installed:
            install()
        _diag_log.attach(p)
    except Exception as exc:
        warn(f"diagnostics not attached to {p.name}: {type(exc).__name__}: {exc}")


def _on_error(p: Protocol, exc: BaseException) -> None:
    if not isinstance(exc, CollectiveError):
        return
    _diag_log.log_error(p, exc, comm_meta(p).id, world_rank())
    if trace_dir() is None:
        return
    dump_traces(type(exc).__name__, str(exc))
    if isinstance(exc, CollectiveTimeout):
        from . import _diag_hang
        _diag_hang.request_peer_dumps(exc)


def install() -> None:
    """Set up the process-wide pieces (idempotent): read the environment, excepthook, signals.

    Called at the first communicator. Signal handlers and the excepthook are only installed from
    the main thread; signal handlers and the diagnostics thread only when a trace directory is
    set.
    """
    if _State.installed:
        return
    _State.installed = True
    _State.directory = os.environ.get(DIR_ENV) or None
    _diag_log.configure()
    if threading.current_thread() is not threading.main_thread():
        return
    _State.previous_excepthook = sys.excepthook
    sys.excepthook = _excepthook
    if _State.directory is None:
        return
    from . import _diag_hang
    wakeup = _diag_hang.start_watcher(_State.directory)
    for signum in DUMP_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_IGN:
            continue  # an ignored signal (SIGINT in a background job) stays ignored
        try:
            _State.previous_handlers[signum] = signal.signal(signum, _handler)
        except (OSError, ValueError) as exc:
            warn(f"could not install a handler for {signal.Signals(signum).name}: {exc}")
    _diag_hang.take_wakeup_fd(wakeup)


def _excepthook(exc_type, exc, tb) -> None:
    try:
        if trace_dir() is not None:
            dump_traces(f"uncaught {exc_type.__name__}", str(exc))
    finally:
        previous = _State.previous_excepthook or sys.__excepthook__
        previous(exc_type, exc, tb)
        if isinstance(exc, CollectiveTimeout):
            end_job()


def end_job(code: int = 1) -> None:
    """End every rank now: the timed-out collective is still pending, so exit could hang."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


def _handler(signum: int, frame: Any) -> None:
    """Main-thread handler: the watcher thread dumps; this one chains to the previous handler."""
    from . import _diag_hang
    if not _diag_hang.signals_via_watcher():
        dump_traces(signal.Signals(signum).name)
    else:
        _diag_hang.wait_signal_dump(signum)
    if signum == signal.SIGTERM:
        _diag_hang.main_thread_took_sigterm()
    previous = _State.previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL and signum == signal.SIGTERM:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def previous_handler(signum: int) -> Any:
    return _State.previous_handlers.get(signum)


NEW_PROTOCOL_HOOKS.append(_on_new_protocol)
ERROR_HOOKS.append(_on_error)
