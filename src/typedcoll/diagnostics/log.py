"""Structured logs on the ``typedcoll`` logger: one JSON object per line, ready for ``jq``.

Every line carries ``ts`` (ISO 8601, UTC, microseconds), ``level``, ``event``, ``host``,
``pid``, ``rank`` (the world rank) and, where one is concerned, ``comm`` (the communicator's
cross-rank id) and ``comm_rank``. Events, by the level that shows them:

* ``error``: ``collective_error``, one line per rank per CollectiveError, with every field of
  the error (``seq``, ``kinds``, ``groups``, ``decisions``, ``missing``, ...) and its message;
* ``info``: also ``comm_created`` (one per communicator), ``dump_written`` (path, reason) and
  ``side_query`` (a peer asked this rank where it is);
* ``debug``: also ``collective``, one per completed collective (op, schema, site, step,
  microseconds). Only then is a communicator's observer set, which turns its C fast path off:
  the other levels cost collectives nothing.

``TYPEDCOLL_LOG`` (``off``, ``error``, ``info``, ``debug``) attaches a stderr handler printing the
bare lines at that level (``off``: typedcoll logs nothing); any other value is refused with a line
on stderr. Unset, the logger is left to the application's logging configuration (Python's
last-resort handler prints the error lines on stderr).
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import time
from typing import Any, Dict, Optional

import msgspec

from ..core.plumbing import register_internal
from ..core.protocol import Protocol
from . import state

LOGGER = logging.getLogger("typedcoll")
ENV = "TYPEDCOLL_LOG"
LEVELS = {"off": logging.CRITICAL + 1, "error": logging.ERROR, "info": logging.INFO,
          "debug": logging.DEBUG}
_NAMES = {logging.ERROR: "error", logging.INFO: "info", logging.DEBUG: "debug"}
_BY_NAME = {"error": logging.ERROR, "info": logging.INFO, "debug": logging.DEBUG}


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.value
    return repr(obj)


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (pytest swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure() -> Optional[str]:
    """Apply ``TYPEDCOLL_LOG``; returns the refusal text for a value it does not know."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw:
        return None
    level = LEVELS.get(raw)
    if level is None:
        text = (f"{ENV}: expected one of {', '.join(LEVELS)}, got {raw!r}; the setting is "
                f"ignored")
        print(f"typedcoll diagnostics: {text}", file=sys.stderr, flush=True)
        return text
    LOGGER.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in LOGGER.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.propagate = False
    return None


def timestamp(ns: Optional[int] = None) -> str:
    """``2026-12-01T09:30:00.123456Z``."""
    ns = time.time_ns() if ns is None else ns
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}Z"


def _line(level: int, event: str, p: Optional[Protocol], fields: Dict[str, Any]) -> str:
    doc: Dict[str, Any] = {"ts": timestamp(), "level": _NAMES[level], "event": event,
                           "host": state.HOST, "pid": os.getpid()}
    rank = state.world_rank_of(p) if p is not None else state.process_world_rank()
    doc["rank"] = rank
    if p is not None:
        doc.update(comm=state.comm_id(p), comm_rank=p.rank, comm_size=p.size)
    doc.update(fields)
    try:
        return _ENCODER.encode(doc).decode()
    except Exception as exc:  # a field msgspec cannot encode must not cost the whole line
        doc = {k: v for k, v in doc.items() if isinstance(v, (str, int, float, type(None)))}
        doc["encode_error"] = f"{type(exc).__name__}: {exc}"
        return _ENCODER.encode(doc).decode()


def event(level: str, kind: str, p: Optional[Protocol] = None, **fields: Any) -> None:
    """Log one ``kind`` line at ``level`` ("error", "info" or "debug") if that level is on."""
    number = _BY_NAME[level]
    if LOGGER.isEnabledFor(number):
        LOGGER.log(number, _line(number, kind, p, fields))


def error_fields(exc: BaseException) -> Dict[str, Any]:
    """Every public attribute of ``exc``, its class and its message."""
    fields: Dict[str, Any] = {"error": type(exc).__name__}
    for key, value in vars(exc).items():
        if not key.startswith("_") and key not in ("comm",):
            fields[key] = value
    fields["message"] = str(exc)
    return fields


def log_error(p: Protocol, exc: BaseException) -> None:
    if LOGGER.isEnabledFor(logging.ERROR):
        LOGGER.error(_line(logging.ERROR, "collective_error", p, error_fields(exc)))


def attach(p: Protocol) -> None:
    """At creation: the ``comm_created`` line, and per-collective lines when debug is on."""
    event("info", "comm_created", p, name=p.name, transport=p.transport.kind,
          timeout=p.timeout)
    if LOGGER.isEnabledFor(logging.DEBUG) and p.observer is None:
        p.observer = _log_collective
        p.refresh_fast()


def _log_collective(p: Protocol) -> None:
    recorder = p.recorder
    entry = recorder.last() if recorder is not None else None
    if p.seq == 0 or (entry is not None and entry.op == "create"):
        return  # the creation exchange: the comm_created line covers it
    fields: Dict[str, Any] = {"seq": p.seq - 1}
    if entry is not None and entry.seq == p.seq - 1:
        fields.update(op=entry.op, schema=entry.schema, site=entry.site, name=entry.name,
                      step=entry.step, bytes=entry.bytes,
                      us=round(((entry.t_end_ns or time.time_ns()) - entry.t_start_ns) / 1e3, 1))
    event("debug", "collective", p, **fields)


register_internal(__file__)
