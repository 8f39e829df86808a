"""Diagnostics that need no setup: hang reports over the transport, dumps, logs, the analyzer.

``install()`` sets up everything process-wide, once; ``import typedcoll`` installs nothing.

  hang.py    the report a CollectiveTimeout carries: every peer asked where it is
  side.py    the side channel each transport offers for those questions
  watcher.py the thread that answers them (and receives signals)
  state.py   a rank's state, built only when asked; communicator ids; stacks
  dumps.py   post-mortem dump files (TYPEDCOLL_TRACE_DIR), signals, the excepthook
  ending.py  a rank that ends normally while its peers wait for it without a timeout
  log.py     JSON-lines logs (TYPEDCOLL_LOG)
  model.py   the Structs the side channel, dumps and the analyzer share (the dump format)
  trace.py   ``typedcoll trace DIR``: reading dumps within bounds; analysis.py: the analysis

``docs/diagnostics.md`` is the user's guide and the format reference.
"""

from __future__ import annotations

import atexit
import threading
from typing import List, Tuple

from ..core.channel import CLOSE_HOOKS, Channel
from ..core.plumbing import register_internal
from ..core.protocol import ERROR_HOOKS, GONE_HOOKS, LIVE, NEW_PROTOCOL_HOOKS, Protocol
from . import dumps, ending, hang, log, side, state, watcher
from .dumps import dump_traces
from .model import RankStatus

__all__ = ["dump_traces", "install"]


class _Installed:
    hooks = False
    signals = False
    lock = threading.Lock()
    requested_dumps: List[Tuple[str, str]] = []  # (reason, message)


def install() -> None:
    """Install the process-wide diagnostics. Idempotent: later calls cost a flag check.

    From then on, every communicator (those already live too) gets a cross-rank id and a hang
    reporter, so that a CollectiveTimeout names the ranks that never arrived and where each is
    now, asked over the job's own transport (no environment variable, no shared filesystem),
    and its side channel is served by one daemon thread per process. Every CollectiveError is
    logged as one JSON line (``TYPEDCOLL_LOG``) and, with ``TYPEDCOLL_TRACE_DIR``, dumped.
    ``sys.excepthook`` ends the job after an uncaught CollectiveTimeout, whose backend call is
    still pending (MPI_Finalize could wait forever). With ``TYPEDCOLL_TRACE_DIR``, SIGTERM,
    SIGINT and SIGUSR1 dump first; signal handlers can only be installed from the main thread,
    so a first call from another thread leaves them to the next call from the main thread.
    """
    if _Installed.hooks and (_Installed.signals or
                             threading.current_thread() is not threading.main_thread()):
        return
    with _Installed.lock:
        if not _Installed.hooks:
            log.configure()
            wakeup = watcher.start(_answer, dumps.on_signal, _after_poll)
            atexit.register(watcher.stop)  # before mpi4py's MPI_Finalize (registered earlier)
            atexit.register(ending.at_exit)  # and this one before the watcher stops
            ending.watch_exit()
            dumps.install_excepthook()
            NEW_PROTOCOL_HOOKS.append(_on_new_protocol)
            ERROR_HOOKS.append(dumps.on_error)
            CLOSE_HOOKS.append(watcher.forget)
            GONE_HOOKS.append(ending.on_gone)
            for p in sorted(list(LIVE), key=lambda p: (p.name, p.instance)):
                _on_new_protocol(p)
            _Installed.hooks = True
        else:
            wakeup = watcher.start(_answer, dumps.on_signal, _after_poll)
        if threading.current_thread() is threading.main_thread() and not _Installed.signals:
            dumps.install_signals(wakeup)
            _Installed.signals = True


def _on_new_protocol(p: Protocol) -> None:
    try:  # nothing here may break communicator creation
        state.register(p)
        p.hang_reporter = hang.hang_report
        watcher.attach(p.channel)
        log.attach(p)
        if p.transport.kind == "mpi":
            ending.watch_finalize()
    except Exception as exc:
        watcher.warn(f"diagnostics not attached to {p.name}: {type(exc).__name__}: {exc}")


def _answer(channel: Channel, query: side.Query) -> RankStatus:
    """On the watcher thread: a peer asked where this rank is."""
    status = state.rank_status(channel, query.instance)
    ranks = state.world_ranks(channel)
    world = ranks[query.asker] if ranks and 0 <= query.asker < len(ranks) else None
    if query.dump and state.trace_dir() is not None:
        # After the answer is sent: the asker is waiting for it, not for our file. Dumps are
        # listed by world rank: a sub-communicator's rank says which world rank it is.
        asker = f"rank {query.asker}" + (f" (world rank {world})" if world not in (
            None, query.asker) else "")
        _Installed.requested_dumps.append((f"request from {asker}", query.reason))
    log.event("info", "side_query", None, rank=status.rank,
              comm=status.comm.id if status.comm is not None else None,
              comm_rank=channel.transport.rank, asker=query.asker, asker_world_rank=world,
              seq=query.seq)
    return status


def _after_poll() -> None:
    ending.check()
    while _Installed.requested_dumps:
        reason, message = _Installed.requested_dumps.pop(0)
        dump_traces(reason, message)


register_internal(__file__)
