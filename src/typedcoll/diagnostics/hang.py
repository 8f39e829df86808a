"""The hang side channel: per-rank status files, written by a daemon thread, read on timeout.

Why files. When a collective times out, the ranks that did not arrive are by definition not in
that collective, and may be stuck in another one, so nothing can be asked of them through the
communicator. Each rank's diagnostics thread therefore publishes its position to
``$TYPEDCOLL_TRACE_DIR/rank<R>.status``: per communicator, how many collectives it has issued and
the newest flight-recorder entry (op, schema, site, step, state, start time). The thread wakes
every ``INTERVAL`` seconds and writes only when something changed, so the hot path pays nothing
and an idle or hung rank writes nothing. mpi4py releases the GIL inside blocking MPI calls, so the
thread keeps running while the main thread is stuck. A directory on a shared filesystem makes
this work across nodes; the files are small and replaced atomically.

On a timeout at collective #N the waiting rank reads its peers' status files: a peer that has
issued at most N collectives on that communicator has not arrived, and its newest entry on any
communicator says where it is. The same rank then writes ``dump-request.json``; every other
rank's thread sees it on its next tick and dumps its flight recorder, so the analyzer gets every
rank's buffer, including those of the ranks stuck elsewhere. The thread also receives SIGTERM and
SIGUSR1 through the signal wakeup fd, so those dumps happen even while the main thread is stuck
in C.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import msgspec

from . import _diag, _recorder
from ._mismatch import compact_ranks
from ._protocol import LIVE, Protocol

INTERVAL = 0.25
# How long a timed-out rank waits for its peers' requested dumps: a few watcher ticks.
PEER_DUMP_WAIT = 2.0
REQUEST_FILE = "dump-request.json"
_ENCODER = msgspec.json.Encoder()


class _Watcher:
    """The diagnostics thread's state."""

    thread: Optional[threading.Thread] = None
    directory = ""
    rfd = -1
    wfd = -1
    via_wakeup = False
    signature: Any = None
    request_mtime = 0
    started_ns = 0
    dumped: Dict[int, threading.Event] = {}
    main_took_sigterm = threading.Event()


def start_watcher(directory: str) -> int:
    """Start the thread; returns the write end of its wakeup pipe (for set_wakeup_fd)."""
    os.makedirs(directory, exist_ok=True)
    _Watcher.directory = directory
    _Watcher.started_ns = time.time_ns()
    _Watcher.request_mtime = _mtime(os.path.join(directory, REQUEST_FILE))
    _Watcher.rfd, _Watcher.wfd = os.pipe()
    os.set_blocking(_Watcher.wfd, False)
    for signum in _diag.DUMP_SIGNALS:
        _Watcher.dumped[signum] = threading.Event()
    _Watcher.thread = threading.Thread(target=_run, name="typedcoll-diagnostics", daemon=True)
    _Watcher.thread.start()
    return _Watcher.wfd


def take_wakeup_fd(wfd: int) -> None:
    """Route signals to the thread, unless someone else (asyncio) already owns the wakeup fd."""
    try:
        old = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    except (ValueError, OSError) as exc:
        _diag.warn(f"signals will be handled on the main thread only: {exc}")
        return
    if old != -1:
        signal.set_wakeup_fd(old)
        return
    _Watcher.via_wakeup = True


def signals_via_watcher() -> bool:
    return _Watcher.via_wakeup


def wait_signal_dump(signum: int) -> None:
    """Main-thread side of a signal: wait for the thread's dump, dump here if it never comes."""
    event = _Watcher.dumped.get(signum)
    if event is None or not event.wait(1.0):
        _diag.dump_traces(signal.Signals(signum).name)
    if event is not None:
        event.clear()


def main_thread_took_sigterm() -> None:
    _Watcher.main_took_sigterm.set()


def _run() -> None:
    while True:
        try:
            readable, _, _ = select.select([_Watcher.rfd], [], [], INTERVAL)
            if readable:
                for signum in os.read(_Watcher.rfd, 64):
                    _on_signal(signum)
            publish_status()
            _check_request()
        except Exception as exc:  # the thread must survive anything, or hang reports go stale
            _diag.warn(f"diagnostics thread: {type(exc).__name__}: {exc}")
            time.sleep(INTERVAL)


def _on_signal(signum: int) -> None:
    if signum not in _diag.DUMP_SIGNALS:
        return
    _diag.dump_traces(signal.Signals(signum).name)
    _Watcher.dumped[signum].set()
    if signum == signal.SIGTERM and _diag.previous_handler(signum) == signal.SIG_DFL:
        # The main thread may be stuck in C and never run its handler; SIGTERM must still end
        # the process, as it would have without us.
        if not _Watcher.main_took_sigterm.wait(1.0):
            os._exit(128 + signal.SIGTERM)


# --- status files ----------------------------------------------------------------------------
def _status_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.status")


def _comm_status(p: Protocol) -> Dict[str, Any]:
    recorder = p.recorder
    entry = recorder.last() if recorder is not None else None
    last = None
    if entry is not None:  # only the newest entry: a full snapshot per tick would cost the GIL
        last = _recorder.describe_entry(entry, recorder.state_of(entry, True),
                                        recorder.failures.get(entry[_recorder.SEQ]))
    return {"seq": p.seq, "last": last}


def publish_status(force: bool = False) -> None:
    """Write this rank's status file if any communicator moved since the last write."""
    protocols = list(LIVE)
    signature = tuple(sorted(
        (_diag.comm_meta(p).id, p.seq,
         p.recorder.count if p.recorder is not None else 0,
         p.recorder.in_flight if p.recorder is not None else False,
         len(p.recorder.failures) if p.recorder is not None else 0) for p in protocols))
    if signature == _Watcher.signature and not force:
        return
    doc = {"format": "typedcoll-status", "version": 1, "rank": _diag.world_rank(),
           "host": socket.gethostname(), "pid": os.getpid(), "time_ns": time.time_ns(),
           "comms": {_diag.comm_meta(p).id: _comm_status(p) for p in protocols}}
    _diag.write_atomic(_status_path(_Watcher.directory, doc["rank"]), _ENCODER.encode(doc))
    _Watcher.signature = signature


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as fh:
            doc = msgspec.json.decode(fh.read())
        return doc if isinstance(doc, dict) else None
    except (OSError, msgspec.DecodeError):
        return None


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


# --- dump requests -----------------------------------------------------------------------------
def request_peer_dumps(exc: Any) -> None:
    """Ask every rank's thread to dump, then wait (bounded) for their dumps to land."""
    directory = _diag.trace_dir()
    if not directory:
        return
    me = _diag.world_rank()
    asked = time.time_ns()
    doc = {"format": "typedcoll-dump-request", "version": 1, "nonce": uuid.uuid4().hex,
           "rank": me, "time_ns": asked, "reason": str(exc).split("\n", 1)[0]}
    try:
        _diag.write_atomic(os.path.join(directory, REQUEST_FILE), _ENCODER.encode(doc))
    except OSError as err:
        _diag.warn(f"could not ask peers to dump: {err}")
        return
    size = _diag.world_size() or 0
    pending = [r for r in range(size) if r != me]
    deadline = time.monotonic() + PEER_DUMP_WAIT
    while pending and time.monotonic() < deadline:
        time.sleep(0.05)
        pending = [r for r in pending
                   if _mtime(os.path.join(directory, f"rank{r}.json")) < asked]


def _check_request() -> None:
    path = os.path.join(_Watcher.directory, REQUEST_FILE)
    mtime = _mtime(path)
    if mtime == _Watcher.request_mtime:
        return
    _Watcher.request_mtime = mtime
    doc = _read_json(path)
    # A request left over from an earlier job in the same directory is not for us.
    if doc is None or doc.get("time_ns", 0) < _Watcher.started_ns:
        return
    if doc.get("rank") == _diag.world_rank():
        return
    _diag.dump_traces(f"request from rank {doc.get('rank')}", str(doc.get("reason", "")))


# --- the hang report ---------------------------------------------------------------------------
def hang_report(p: Protocol, seq: int) -> Tuple[Optional[List[int]], str]:
    """(ranks of ``p`` that have not reached collective ``seq``, report text); see module doc."""
    directory = _diag.trace_dir()
    if not directory:
        return None, ("hang report: the side channel is off; set TYPEDCOLL_TRACE_DIR to a "
                      "directory every rank can write (shared across nodes) to name the ranks "
                      "that did not arrive and where they are")
    meta = _diag.comm_meta(p)
    world = meta.world_ranks or list(range(p.size))
    peers = [r for r in range(p.size) if r != p.rank]
    statuses = {r: _read_json(_status_path(directory, world[r])) for r in peers}
    if any(not _arrived(statuses[r], meta.id, seq) for r in peers):
        # A peer may have arrived just before our deadline, after its last publication.
        time.sleep(INTERVAL * 1.5)
        statuses = {r: _read_json(_status_path(directory, world[r])) for r in peers}
    missing = [r for r in peers if not _arrived(statuses[r], meta.id, seq)]
    arrived = [r for r in range(p.size) if r not in missing]
    now = time.time_ns()
    lines = [f"hang report (status files in {directory}):"]
    if not missing:
        lines.append(f"  every rank's status shows it reached collective #{seq}: the collective "
                     f"is slow, or its transport is stuck")
        return [], "\n".join(lines)
    lines.append(f"  not arrived at collective #{seq} on {p.name}: {compact_ranks(missing)}")
    for r in missing:
        label = f"rank {r}" if world[r] == r else f"rank {r} (world rank {world[r]})"
        lines.append(f"    {label}: {_describe_status(statuses[r], meta.id, p.name, now)}")
    lines.append(f"  arrived: {compact_ranks(arrived)}")
    return missing, "\n".join(lines)


def _arrived(status: Optional[Dict[str, Any]], comm_id: str, seq: int) -> bool:
    if status is None:
        return False
    comm = status.get("comms", {}).get(comm_id)
    return comm is not None and comm.get("seq", 0) > seq


def describe_entry(entry: Dict[str, Any], comm_id: str, now_ns: int) -> str:
    """``allgather[Flag] at prog.py:15 (#2 on COMM_WORLD, step 4), in flight for 2.1 s``."""
    what = f"{entry['op']}[{entry['schema']}]" if entry.get("schema") else entry["op"]
    where = f"#{entry['seq']} on {comm_id}"
    if entry.get("step") is not None:
        where += f", step {entry['step']}"
    age = max(0.0, (now_ns - entry["t_start_ns"]) / 1e9)
    if entry["state"] == "started":
        state = f"in flight for {age:.1f} s"
    elif entry["state"] == "failed":
        state = f"failed: {entry.get('error')}"
    else:
        state = f"completed (started {age:.1f} s ago)"
    return f"{what} at {entry['site']} ({where}), {state}"


def _describe_status(status: Optional[Dict[str, Any]], comm_id: str, comm_name: str,
                     now_ns: int) -> str:
    if status is None:
        return ("no status file: not started yet, dead before its first collective, or "
                "writing to another TYPEDCOLL_TRACE_DIR")
    comms = status.get("comms", {})
    newest = max(((cid, c["last"]) for cid, c in comms.items() if c.get("last")),
                 key=lambda item: item[1]["t_start_ns"], default=None)
    here = comms.get(comm_id)
    if newest is None:
        text = "no collective recorded (flight recorder off or none issued)"
    else:
        text = "last started " + describe_entry(newest[1], newest[0], now_ns)
    if here is None:
        text += f"; has no {comm_name} communicator"
    elif newest is None or newest[0] != comm_id:
        text += f"; issued {here.get('seq', 0)} collectives on {comm_name}"
    if status.get("host") == socket.gethostname():
        try:
            os.kill(int(status["pid"]), 0)
        except ProcessLookupError:
            text += f" (process {status['pid']} is gone)"
        except (OSError, KeyError, ValueError, TypeError):
            pass
    return text
