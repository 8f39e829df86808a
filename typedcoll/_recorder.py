"""The flight recorder's ring buffer: the last N collectives of one communicator.

Recording sits on the hot path of every collective, so an entry is a plain list written once at
the start and patched (state, end time) at the end; formatting (call site text, schema name)
happens only when someone reads the buffer. ``TYPEDCOLL_TRACE_BUFFER`` sets N (default 2000;
0 turns recording off).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator, List, Optional

from ._callsite import format_site

STARTED = "started"
COMPLETED = "completed"
FAILED = "failed"

DEFAULT_CAPACITY = 2000

# Entry layout (a list, patched in place).
SEQ, OP, SCHEMA, CODE, LINENO, STEP, NBYTES, STATE, T_START, T_END, ERROR = range(11)


def capacity_from_env() -> int:
    raw = os.environ.get("TYPEDCOLL_TRACE_BUFFER", "")
    if not raw:
        return DEFAULT_CAPACITY
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"TYPEDCOLL_TRACE_BUFFER: expected a non-negative integer, got {raw!r}")
    if value < 0:
        raise ValueError(f"TYPEDCOLL_TRACE_BUFFER: expected a non-negative integer, got {raw!r}")
    return value


class FlightRecorder:
    """A fixed-size ring of collective records for one communicator."""

    __slots__ = ("capacity", "_ring", "_count")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ring: List[Optional[list]] = [None] * capacity
        self._count = 0

    def start(self, seq: int, op: str, schema: Any, code: Any, lineno: int, step: int,
              nbytes: int) -> list:
        entry = [seq, op, schema, code, lineno, step, nbytes, STARTED, time.time_ns(), 0, None]
        self._ring[self._count % self.capacity] = entry
        self._count += 1
        return entry

    def __len__(self) -> int:
        return min(self._count, self.capacity)

    @property
    def total(self) -> int:
        """Collectives recorded since creation, including those the ring has dropped."""
        return self._count

    def entries(self) -> Iterator[list]:
        """Raw entries, oldest first."""
        n = len(self)
        first = self._count - n
        for i in range(first, self._count):
            entry = self._ring[i % self.capacity]
            if entry is not None:
                yield entry

    def last(self) -> Optional[list]:
        if self._count == 0:
            return None
        return self._ring[(self._count - 1) % self.capacity]


def finish(entry: Optional[list], state: str, error: Optional[str] = None) -> None:
    if entry is not None:
        entry[STATE] = state
        entry[T_END] = time.time_ns()
        if error is not None:
            entry[ERROR] = error


def entry_site(entry: list) -> str:
    return format_site(entry[CODE], entry[LINENO])
