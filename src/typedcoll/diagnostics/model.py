"""The diagnostics data model: what a rank says about itself, on the side channel and in dumps.

One set of msgspec Structs serves the live side channel (a peer's answer to "where are you?"),
the post-mortem dump files and the trace analyzer, so what is written is what is read. Entries
are :class:`~typedcoll.core.recorder.RecordEntry`, the flight recorder's own model; decisions are
:class:`~typedcoll.Note`. ``docs/diagnostics.md`` documents every field.

Dump format history: version 1 had no stacks, notes or peers, and no ``t_end_ns`` for completed
entries; version 2 (this one) adds them. Readers accept version 2 only and ignore unknown keys;
a change that breaks readers bumps ``VERSION``.
"""

from __future__ import annotations

from typing import List, Optional

import msgspec

from ..core.plumbing import register_internal
from ..core.mismatch import Note
from ..core.recorder import RecordEntry

FORMAT = "typedcoll-trace"
VERSION = 2
REPORT_FORMAT = "typedcoll-trace-report"
REPORT_VERSION = 2


class ThreadStack(msgspec.Struct, kw_only=True):
    """One thread's Python stack, outermost frame first (``path:LINE in function``)."""

    ident: int
    name: str
    frames: List[str] = []
    collective: Optional[str] = None  # the channel it is inside a collective on, if any


class CommState(msgspec.Struct, kw_only=True):
    """One communicator as its rank sees it: its position, newest record and decisions."""

    id: str  # the same on every member: the name, plus #k for the k-th of that name
    name: str
    instance: int
    rank: int
    size: int
    seq: int  # collectives issued: the number of the next one
    step: Optional[int] = None
    last: Optional[RecordEntry] = None  # the newest flight-recorder entry
    notes: List[Note] = []


class RankStatus(msgspec.Struct, kw_only=True):
    """A rank's answer on the side channel: where it is now, and its communicators."""

    rank: int  # world rank
    host: str = ""
    pid: int = 0
    time_ns: int = 0
    where: str = "?"  # file.py:LINE in function, of the thread below
    thread: str = ""  # inside a collective if one is, else the communicator's creator thread
    # ("": that thread has ended)
    collective: Optional[str] = None  # the channel that thread is inside a collective on
    stack: List[str] = []  # that thread's stack, outermost first
    comm: Optional[CommState] = None  # the communicator the question was about
    comms: List[CommState] = []  # every live communicator of the rank


class PeerSeen(msgspec.Struct, kw_only=True):
    """A peer as this rank last heard of it over the side channel."""

    rank: int  # the peer's rank in the communicator
    answered: bool  # whether it answered the last question
    asked_ns: int = 0
    seen_ns: int = 0  # when ``status`` arrived (0: never)
    status: Optional[RankStatus] = None  # its latest answer, possibly to an earlier question


class CommDump(msgspec.Struct, kw_only=True):
    """One communicator's part of a rank's dump."""

    id: str
    rank: int
    size: int
    seq: int
    name: str = ""
    instance: int = 1
    world_ranks: Optional[List[int]] = None
    transport: str = ""
    step: Optional[int] = None
    timeout: Optional[float] = None
    where: str = "?"  # file.py:LINE in function: where the rank's thread was at dump time
    capacity: int = 0
    recorded: int = 0
    entries: List[RecordEntry] = []
    notes: List[Note] = []
    peers: List[PeerSeen] = []


class Dump(msgspec.Struct, kw_only=True):
    """One process's dump file, ``rank<R>.json``."""

    format: str
    version: int
    rank: int
    world_size: Optional[int] = None
    host: str = ""
    pid: int = 0
    time_ns: int = 0
    reason: str = ""
    message: str = ""
    events: List[str] = []
    threads: List[ThreadStack] = []
    comms: List[CommDump] = []


class DumpHeader(msgspec.Struct):
    """The two keys read before the rest, to refuse foreign or future files by name."""

    format: Optional[str] = None
    version: Optional[int] = None


register_internal(__file__)
