"""What diagnostics know of each communicator, and a rank's state, built only when asked.

Nothing here runs on the hot path: a communicator is registered once, when it is created
(``NEW_PROTOCOL_HOOKS``), and a rank's state (:class:`RankStatus`) is built from the protocol's
own fields, its flight recorder and ``sys._current_frames()`` only when a peer asks over the side
channel or a dump is written. Either may happen on the diagnostics thread while the rank's own
threads run on: every read here is of a value the GIL keeps whole (a list copied in one call, an
int), so a state is at worst a few microseconds old, never torn.

Communicator ids. A dump names each communicator by an id that every member computes alike
without talking: its name, plus ``#k`` for the k-th communicator of that name this rank created
(communicators are created collectively, so the k-th is the same one on every member).

Ranks as threads. Under ``typedcoll.testing`` every rank is a thread of one process, with
in-memory transports; a communicator's *owner* (``owner_key``) says which rank of which job it
belongs to, so that a rank's state lists its own communicators and threads, not its neighbours'.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import sysconfig
import threading
import time
import weakref
from types import CodeType, FrameType, TracebackType
from typing import Any, Dict, Hashable, List, Optional, Tuple

from ..core.channel import Channel
from ..core.mismatch import rank_runs
from ..core.plumbing import SKIP_CODES, SKIP_FILES, register_internal
from ..core.sites import source_name
from ..core.protocol import LIVE, Protocol
from ..core.recorder import RecordEntry
from ..core.wire import NO_STEP
from .model import CommState, RankStatus, ThreadStack

DIR_ENV = "TYPEDCOLL_TRACE_DIR"
MAX_FRAMES = 128  # per stack, innermost kept: a runaway recursion must not bloat an answer
MAX_THREADS = 256
HOST = socket.gethostname()


class CommMeta:
    """What diagnostics keep per communicator."""

    __slots__ = ("id", "creator")

    def __init__(self, comm_id: str, creator: int) -> None:
        self.id = comm_id
        self.creator = creator  # ident of the thread that created it


class _Registry:
    meta: "weakref.WeakKeyDictionary[Protocol, CommMeta]" = weakref.WeakKeyDictionary()
    world_ranks: "weakref.WeakKeyDictionary[Channel, Optional[List[int]]]" = \
        weakref.WeakKeyDictionary()
    created: Dict[Tuple[Hashable, str], int] = {}


def trace_dir() -> Optional[str]:
    """The dump directory (``TYPEDCOLL_TRACE_DIR``), or None when file dumps are off."""
    return os.environ.get(DIR_ENV) or None


# --- who is who ----------------------------------------------------------------------------
def owner_key(transport: Any) -> Hashable:
    """Which rank a transport belongs to: None for "this process" (MPI, torch); for in-memory
    ranks (threads of one process), the job and the rank in it."""
    if transport.kind == "memory":
        return (transport.world.serial, transport.members[transport.rank])
    return None


def process_world_rank() -> Optional[int]:
    """This process's world rank (MPI's when mpi4py is initialised, else torch's), or None."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            if mpi.Is_initialized() and not mpi.Is_finalized():
                return int(mpi.COMM_WORLD.Get_rank())
        except Exception:  # a broken MPI must not break diagnostics
            pass
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return int(dist.get_rank())
        except Exception:
            pass
    return None


def process_world_size() -> Optional[int]:
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            if mpi.Is_initialized() and not mpi.Is_finalized():
                return int(mpi.COMM_WORLD.Get_size())
        except Exception:
            pass
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return int(dist.get_world_size())
        except Exception:
            pass
    return None


def world_rank_of(p: Protocol) -> int:
    """The world rank of the rank that owns ``p``."""
    ranks = world_ranks(p.channel)
    return ranks[p.rank] if ranks is not None and p.rank < len(ranks) else p.rank


def world_ranks(channel: Channel) -> Optional[List[int]]:
    """Communicator rank -> world rank (None when the backend cannot tell)."""
    if channel in _Registry.world_ranks:
        return _Registry.world_ranks[channel]
    ranks = _translate(channel.transport)
    _Registry.world_ranks[channel] = ranks
    return ranks


def _translate(transport: Any) -> Optional[List[int]]:
    try:
        return transport.world_ranks()  # type: ignore[no-any-return]
    except Exception:  # world ranks are a nicety of messages: never fail for them
        return None


def register(p: Protocol) -> CommMeta:
    """Give ``p`` its cross-rank id (at creation; or late, for one created before install)."""
    meta = _Registry.meta.get(p)
    if meta is None:
        members = world_ranks(p.channel)
        name = p.name if p.transport.kind == "memory" else _with_members(p.name, members)
        key = (owner_key(p.transport), name)
        k = _Registry.created.get(key, 0) + 1
        _Registry.created[key] = k
        meta = CommMeta(name if k == 1 else f"{name}#{k}", threading.get_ident())
        _Registry.meta[p] = meta
    return meta


def _with_members(name: str, members: Optional[List[int]]) -> str:
    """A sub-communicator's name with its members' world ranks: ``tp.split(0)[0,2]``. Names
    from one split call differ only by color, and the k-th communicator of a name on one rank
    need not be the k-th on another (a rank's tp and dp splits both of color 0, its peer's
    dp alone), so only the members make an id every member gives alike."""
    world = process_world_size()
    if members is None or world is None or members == list(range(world)):
        return name
    text = rank_runs(sorted(set(members)))
    return name if name.endswith(f"[{text}]") else f"{name}[{text}]"


def comm_id(p: Protocol) -> str:
    return register(p).id


def protocols(owner: Hashable = ..., *, everyone: bool = False) -> List[Protocol]:
    """Live communicators of one owner (``everyone``: of the whole process), by id."""
    found = [p for p in list(LIVE) if not p.freed
             and (everyone or owner_key(p.transport) == owner)]
    found.sort(key=lambda p: (p.name, p.instance))
    for p in found:
        register(p)
    return sorted(found, key=comm_id)


# --- stacks ----------------------------------------------------------------------------------
def frame_text(frame: FrameType, short: bool = False) -> str:
    code = frame.f_code
    path = source_name(code.co_filename) if short else code.co_filename
    return f"{path}:{frame.f_lineno} in {code.co_name}"


def stack_of(frame: Optional[FrameType]) -> List[str]:
    """``frame``'s stack, outermost first, the innermost MAX_FRAMES frames."""
    out: List[str] = []
    while frame is not None and len(out) < MAX_FRAMES:
        out.append(frame_text(frame))
        frame = frame.f_back
    out.reverse()
    return out


# Thread ident -> the traceback of the uncaught exception the excepthook is handling on it.
# Its caller's frames have unwound by then, leaving typedcoll's hook alone on the stack: where
# the exception left the caller's code is where that thread was.
_UNCAUGHT: Dict[int, TracebackType] = {}


def note_uncaught(tb: Optional[TracebackType]) -> None:
    """The excepthook, on the thread whose exception it handles: keep where it was raised
    while the hook runs; None when it returns (an interactive session goes on, elsewhere)."""
    if tb is None:
        _UNCAUGHT.pop(threading.get_ident(), None)
    else:
        _UNCAUGHT[threading.get_ident()] = tb


def where_of(frame: Optional[FrameType], ident: int = 0) -> str:
    """Where a thread is, in the caller's terms (short form): above typedcoll's own frames (a
    thread inside a collective is at the collective's call site), and above the standard
    library's (a thread in ``queue.get`` is at the line that called it). A thread that has no
    frame of the caller's, in the excepthook, is where its uncaught exception left the
    caller's code; else at its innermost frame."""
    if frame is None:
        return "?"
    found = _callers_frame(frame)
    if found is not None:
        return frame_text(found, short=True)
    raised = _raised_at(_UNCAUGHT.get(ident))
    return raised if raised is not None else frame_text(frame, short=True)


def _callers_frame(frame: Optional[FrameType]) -> Optional[FrameType]:
    """Outward from ``frame``, the first that is the caller's own code: typedcoll frames may
    also sit below it (a rank of typedcoll.testing runs on one of our threads)."""
    while frame is not None and _plumbing(frame.f_code):
        frame = frame.f_back
    return frame


def uncaught_text(exc_type: Any, exc: BaseException, tb: Optional[TracebackType]) -> str:
    """``ValueError: no KV blocks (raised at engine.py:88 in step)``: an uncaught exception as
    a peer's report names it (its message's first line, up to 300 characters)."""
    message = str(exc).split("\n", 1)[0]
    if len(message) > 300:
        message = message[:297] + "..."
    text = f"{getattr(exc_type, '__name__', exc_type)}" + (f": {message}" if message else "")
    raised = _raised_at(tb)
    return text + (f" (raised at {raised})" if raised is not None else "")


def _raised_at(tb: Optional[TracebackType]) -> Optional[str]:
    """The innermost line of the caller's code in traceback ``tb`` (it runs outermost first)."""
    found = None
    while tb is not None:
        if not _plumbing(tb.tb_frame.f_code):
            found = tb
        tb = tb.tb_next
    if found is None:
        return None
    code = found.tb_frame.f_code
    return f"{source_name(code.co_filename)}:{found.tb_lineno} in {code.co_name}"


def _plumbing(code: CodeType) -> bool:
    """typedcoll's own frames, those it was told to pass over, and the standard library's."""
    return code.co_filename in SKIP_FILES or code in SKIP_CODES or _library(code.co_filename)


_STDLIB = tuple(os.path.realpath(sysconfig.get_paths()[key]) + os.sep
                for key in ("stdlib", "platstdlib"))


@functools.lru_cache(maxsize=4096)
def _library(filename: str) -> bool:
    """The standard library's frames (threading, queue, selectors, frozen modules)."""
    return filename.startswith("<frozen ") or os.path.realpath(filename).startswith(_STDLIB)


def thread_names() -> Dict[int, str]:
    return {t.ident: t.name for t in threading.enumerate() if t.ident is not None}


def all_stacks(owner: Hashable = ..., everyone: bool = True) -> List[ThreadStack]:
    """Every thread's stack (the diagnostics thread's own included: it is writing this)."""
    names = thread_names()
    busy = _busy_threads(protocols(owner, everyone=everyone))
    out = []
    for ident, frame in list(sys._current_frames().items())[:MAX_THREADS]:
        out.append(ThreadStack(ident=ident, name=names.get(ident, "?"), frames=stack_of(frame),
                               collective=busy.get(ident)))
    out.sort(key=lambda t: (t.ident != threading.main_thread().ident, t.name, t.ident))
    return out


def _busy_threads(found: List[Protocol]) -> Dict[int, str]:
    """Thread ident -> the communicator it is inside a collective on."""
    out: Dict[int, str] = {}
    for p in found:
        ident = p.channel.busy[0]
        if ident and (ident not in out or _in_flight(p)):
            out[ident] = comm_id(p)
    return out


def _in_flight(p: Protocol) -> bool:
    return p.recorder is not None and p.recorder.in_flight


# --- a rank's state ----------------------------------------------------------------------------
def last_entry(p: Protocol) -> Optional[RecordEntry]:
    """``p``'s newest recorded collective (None without a recorder), read from another thread."""
    if p.recorder is None:
        return None
    try:
        return p.recorder.last()
    except Exception:  # written concurrently by the rank's own thread: skip the entry
        return None


def comm_state(p: Protocol) -> CommState:
    last = last_entry(p)
    return CommState(id=comm_id(p), name=p.name, instance=p.instance, rank=p.rank, size=p.size,
                     seq=p.seq, step=None if p.step == NO_STEP else p.step, last=last,
                     notes=list(p.decisions()))


def _focus(channel: Channel, asked: Optional[Protocol],
           busy: Dict[int, str]) -> int:
    """The thread that says where a rank is: the one inside a collective (on ``channel`` first,
    else on any of the rank's channels), else the communicator's creator (0: it has ended)."""
    ident = channel.busy[0] or next(iter(busy), 0)
    if ident:
        return int(ident)
    creator = register(asked).creator if asked is not None else threading.main_thread().ident
    return creator if creator in sys._current_frames() else 0


def where_now(p: Protocol) -> str:
    """``file.py:LINE in function`` of the thread that says where ``p``'s rank is now."""
    busy = _busy_threads(protocols(owner_key(p.transport)))
    ident = _focus(p.channel, p, busy)
    return where_of(sys._current_frames().get(ident), ident)


def rank_status(channel: Channel, instance: int, *, stack: bool = True) -> RankStatus:
    """This rank's answer to "where are you?" about communicator ``instance`` of ``channel``."""
    found = protocols(owner_key(channel.transport))
    asked = next((p for p in found if p.channel is channel and p.instance == instance), None)
    busy = _busy_threads(found)
    ident = _focus(channel, asked, busy)
    frame = sys._current_frames().get(ident)
    ranks = world_ranks(channel)
    rank = channel.transport.rank
    return RankStatus(
        rank=ranks[rank] if ranks is not None and rank < len(ranks) else rank,
        host=HOST, pid=os.getpid(), time_ns=time.time_ns(), where=where_of(frame, ident),
        thread=thread_names().get(ident, f"ident {ident}") if ident else "",
        collective=busy.get(ident),
        stack=stack_of(frame) if stack else [],
        comm=comm_state(asked) if asked is not None else None,
        comms=[comm_state(p) for p in found])


register_internal(__file__)
