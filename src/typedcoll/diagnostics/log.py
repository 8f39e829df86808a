"""Structured logs under the ``typedcoll`` logger: one JSON line per rank per error.

Every ``CollectiveError`` is logged at ERROR as one JSON object (every attribute of the error,
plus the rank, host and this rank's own newest flight-recorder entry), so a job's merged log can
be filtered with ``jq``. Without logging configuration Python's last-resort handler prints it on
stderr; ``TYPEDCOLL_LOG`` (``off``, ``error``, ``info``, ``debug``) attaches a stderr handler that
prints the bare JSON lines at that level.

``TYPEDCOLL_LOG=debug`` adds one line per completed collective. It costs nothing when off: only
then is a communicator's ``completed`` method shadowed, per instance, by one that logs.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import sys
import time
import weakref
from typing import Any, Dict

import msgspec

from . import _recorder
from ._callsite import register_internal

LOGGER = logging.getLogger("typedcoll")
LEVELS = {"off": logging.CRITICAL + 1, "error": logging.ERROR, "info": logging.INFO,
          "debug": logging.DEBUG}


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.value
    return repr(obj)


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure() -> None:
    """Apply ``TYPEDCOLL_LOG`` (once, at the first communicator)."""
    raw = os.environ.get("TYPEDCOLL_LOG", "").strip().lower()
    if not raw:
        return
    level = LEVELS.get(raw)
    if level is None:
        print(f"typedcoll diagnostics: TYPEDCOLL_LOG: expected one of {', '.join(LEVELS)}, "
              f"got {raw!r}", file=sys.stderr)
        return
    LOGGER.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in LOGGER.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.propagate = False


def error_fields(p: Any, exc: BaseException, comm_id: str, world_rank: int) -> Dict[str, Any]:
    """Every field of ``exc`` plus where it happened, JSON-ready."""
    fields: Dict[str, Any] = {
        "event": "collective_error", "error": type(exc).__name__, "comm": comm_id,
        "rank": p.rank, "size": p.size, "world_rank": world_rank, "host": socket.gethostname(),
        "pid": os.getpid(), "time_ns": time.time_ns(),
    }
    for key, value in vars(exc).items():
        if not key.startswith("_"):
            fields[key] = value
    fields["comm"] = comm_id  # the cross-rank id, which tells apart same-named communicators
    fields["comm_name"] = p.name
    fields["message"] = str(exc)
    recorder = p.recorder
    entry = recorder.last() if recorder is not None else None
    if entry is not None:
        own = _recorder.describe_entry(entry, recorder.state_of(entry, True))
        fields["own"] = {k: own[k] for k in ("seq", "op", "schema", "site", "step", "bytes")}
    return fields


def log_error(p: Any, exc: BaseException, comm_id: str, world_rank: int) -> None:
    if not LOGGER.isEnabledFor(logging.ERROR):
        return
    try:
        line = _ENCODER.encode(error_fields(p, exc, comm_id, world_rank)).decode()
    except Exception as err:  # a field msgspec cannot encode must not cost the whole line
        line = _ENCODER.encode({"event": "collective_error", "error": type(exc).__name__,
                                "message": str(exc), "encode_error": str(err)}).decode()
    LOGGER.error(line)


_LOGGED: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def _log_newest(p: Any) -> None:
    seq = p.seq - 1
    if seq <= _LOGGED.get(p, -1):
        return
    _LOGGED[p] = seq
    from ._diag import comm_meta
    recorder = p.recorder
    entry = recorder.last() if recorder is not None else None
    fields: Dict[str, Any] = {"event": "collective", "comm": comm_meta(p).id, "rank": p.rank,
                              "seq": seq}
    if entry is not None and entry[_recorder.SEQ] == seq:
        info = entry[_recorder.INFO]
        step = entry[_recorder.STEP]
        fields.update(op=entry[_recorder.OP], schema=info.name if info is not None else "",
                      site=_recorder.format_site(entry[_recorder.CODE], entry[_recorder.LASTI]),
                      step=None if step == _recorder.NO_STEP else step,
                      bytes=entry[_recorder.NBYTES],
                      us=round((time.time_ns() - entry[_recorder.T_START]) / 1e3, 1))
    LOGGER.debug(_ENCODER.encode(fields).decode())


def attach(p: Any) -> None:
    """Make ``p`` log each completed collective, only when debug lines are on.

    Communicators without debug logging pay nothing: the observer is set only here, and the
    protocol then runs its Python paths (the C fast path does not call observers).
    """
    if LOGGER.isEnabledFor(logging.DEBUG):
        p.set_observer(_log_newest)


register_internal(__file__)  # the debug wrappers must not become the reported call site
