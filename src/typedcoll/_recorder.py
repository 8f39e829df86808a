"""The flight recorder's ring buffer: the last N collectives of one communicator.

Recording sits on the hot path of every collective, so an entry allocates nothing: its numbers
are written in place into a preallocated byte array (``ENTRY`` below; the C fast path writes the
same bytes) and its two object references (schema info, code object) into a preallocated list.
Nothing is formatted until someone reads the buffer. Collectives on one communicator run one
after another, so an entry's state needs no write of its own: every entry before the newest is
completed unless marked failed, and the newest is "started" while its collective is in flight.
``TYPEDCOLL_TRACE_BUFFER`` sets N (default 2000; 0 turns recording off).
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any, Dict, List, Optional

from ._callsite import format_site
from ._wire import NO_STEP, OPS, op_name

STARTED = "started"
COMPLETED = "completed"
FAILED = "failed"
DEFAULT_CAPACITY = 2000

# An entry's numbers, little-endian (mirrored in _speedups.c): seq, step, start time (ns since the
# epoch), payload bytes, bytecode offset of the call site (see _callsite.line_of), op code.
ENTRY = struct.Struct("<QqQIiB7x")
# The tuple an entry reads back as.
SEQ, OP, INFO, CODE, LASTI, STEP, NBYTES, T_START = range(8)


def capacity_from_env() -> int:
    raw = os.environ.get("TYPEDCOLL_TRACE_BUFFER", "")
    if not raw:
        return DEFAULT_CAPACITY
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"TYPEDCOLL_TRACE_BUFFER: expected a non-negative integer, got {raw!r}")
    return value


class FlightRecorder:
    """A fixed-size ring of collective records for one communicator."""

    __slots__ = ("capacity", "numbers", "objects", "state", "failures")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.numbers = bytearray(ENTRY.size * capacity)
        self.objects: List[Any] = [None] * (2 * capacity)  # per entry: schema info, code object
        # [collectives recorded since creation (dropped ones included), newest still in flight]:
        # a list, so the C fast path updates it without attribute lookups.
        self.state: list = [0, False]
        self.failures: Dict[int, tuple] = {}  # seq -> (end time ns, error text)

    @property
    def count(self) -> int:
        return self.state[0]

    @count.setter
    def count(self, value: int) -> None:
        self.state[0] = value

    @property
    def in_flight(self) -> bool:
        return self.state[1]

    @in_flight.setter
    def in_flight(self, value: bool) -> None:
        self.state[1] = value

    def start(self, seq: int, op: str, info: Any, code: Any, lasti: int, step: int,
              nbytes: int) -> None:
        state = self.state
        index = state[0] % self.capacity
        ENTRY.pack_into(self.numbers, index * ENTRY.size, seq, step, time.time_ns(), nbytes,
                        lasti, OPS[op])
        self.objects[2 * index] = info
        self.objects[2 * index + 1] = code
        state[0] += 1
        state[1] = True

    def entry(self, index: int) -> tuple:
        """Entry ``index`` of the ring (0 .. capacity-1) as a tuple (see SEQ, OP, ...)."""
        seq, step, t_start, nbytes, lasti, op = ENTRY.unpack_from(self.numbers,
                                                                  index * ENTRY.size)
        return (seq, op_name(op), self.objects[2 * index],
                self.objects[2 * index + 1], lasti, step, nbytes, t_start)

    def fail(self, seq: int, error: str) -> None:
        self.failures[seq] = (time.time_ns(), error)
        if len(self.failures) > self.capacity:
            self.failures.pop(next(iter(self.failures)))
        self.in_flight = False

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def last(self) -> Optional[tuple]:
        return self.entry((self.count - 1) % self.capacity) if self.count else None

    def snapshot(self) -> List[Dict[str, Any]]:
        """The recorded collectives, oldest first, as plain dicts (JSON-ready)."""
        n = len(self)
        out = []
        count = self.count
        for i in range(count - n, count):
            entry = self.entry(i % self.capacity)
            out.append(describe_entry(entry, self.state_of(entry, i == count - 1),
                                      self.failures.get(entry[SEQ])))
        return out

    def state_of(self, entry: tuple, newest: bool) -> str:
        if entry[SEQ] in self.failures:
            return FAILED
        return STARTED if newest and self.in_flight else COMPLETED


def describe_entry(entry: tuple, state: str, failure: Optional[tuple] = None) -> Dict[str, Any]:
    info = entry[INFO]
    return {
        "seq": entry[SEQ],
        "op": entry[OP],
        "schema": info.name if info is not None else "",
        "fingerprint": info.fingerprint.hex() if info is not None else "",
        "site": format_site(entry[CODE], entry[LASTI]),
        "step": None if entry[STEP] == NO_STEP else entry[STEP],
        "bytes": entry[NBYTES],
        "state": state,
        "t_start_ns": entry[T_START],
        "t_end_ns": failure[0] if failure else None,
        "error": failure[1] if failure else None,
    }
