"""The flight recorder: the last N collectives of one communicator, in a ring.

Recording sits on the hot path of every collective, so an entry allocates nothing: its numbers
are written in place into a byte array (``ENTRY`` below; the C fast path writes the same bytes,
and ``fast`` checks the layout at import) and its object references (schema info, code object,
name) into a list. Both start small and double, in place, until they hold ``capacity`` entries,
so thousands of communicators that hardly communicate cost little memory. Nothing is formatted
until someone reads the ring:
:meth:`FlightRecorder.snapshot` gives :class:`RecordEntry` Structs, the one model that dumps
write and the trace analyzer reads. ``TYPEDCOLL_TRACE_BUFFER`` sets N (default 2000; 0 turns
recording off).
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any, Dict, List, Optional, Tuple

import msgspec

from .arms import branch_of
from .callers import describe as describe_callers
from .site_walk import via_name
from .sites import column_of, format_site
from .mismatch import Branch, Caller
from .call import Call
from .wire import NO_ROOT, NO_STEP, OPS, REDUCE_OP_NAMES, REDUCING_OPS, ROOTED_OPS, op_name

DEFAULT_CAPACITY = 2000
INITIAL_ENTRIES = 8
STARTED, COMPLETED, FAILED = 0, 1, 2
STATE_NAMES = ("started", "completed", "failed")

# An entry's numbers, little-endian: seq, step, start and end time (ns since the epoch; end 0
# while started), payload bytes, bytecode offset of the call site, occurrence, op code, state,
# reduce-op code (0: none), root (NO_ROOT: none). Root and reduce op are kept because a call
# that differs in nothing else is a divergence the analyzer must see.
ENTRY = struct.Struct("<QqQQIiIBBBxi4x")
OBJECTS_PER_ENTRY = 4  # schema info, code object, name, thin wrapper's code object


class RecordEntry(msgspec.Struct, kw_only=True):
    """One recorded collective, as dumps hold it and the analyzer reads it."""

    seq: int
    op: str
    schema: str = ""
    fingerprint: str = ""
    site: str = "?"
    column: Optional[int] = None  # where on the site's line the call starts, 0-based
    name: Optional[str] = None
    occurrence: int = 0
    step: Optional[int] = None
    bytes: int = 0
    root: Optional[int] = None  # of a rooted op
    reduce_op: Optional[str] = None  # of a reducing op
    state: str = "completed"
    t_start_ns: int = 0
    t_end_ns: Optional[int] = None
    error: Optional[str] = None
    branch: Optional[Branch] = None  # the role branch of an unnamed rooted call (core.arms)
    via: Optional[str] = None  # the thin wrapper an unnamed call went through (core.identity)
    callers: Tuple[Caller, ...] = ()  # of an unnamed call in a role branch (core.callers)


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
        first = min(INITIAL_ENTRIES, capacity)
        self.numbers = bytearray(ENTRY.size * first)
        self.objects: List[Any] = [None] * (OBJECTS_PER_ENTRY * first)
        # [entries recorded since creation (dropped ones included), newest still in flight]:
        # a list, so the C fast path updates it without attribute lookups.
        self.state: List[int] = [0, False]
        self.failures: Dict[int, str] = {}  # entry count -> error text

    @property
    def count(self) -> int:
        return int(self.state[0])

    @property
    def in_flight(self) -> bool:
        return bool(self.state[1])

    @property
    def allocated(self) -> int:
        return len(self.numbers) // ENTRY.size

    def _offset(self) -> int:
        return ((self.state[0] - 1) % self.allocated) * ENTRY.size

    def _grow(self) -> None:
        """Double in place (the C path holds these very objects); only before the first wrap,
        so every entry keeps its index."""
        more = min(self.allocated, self.capacity - self.allocated)
        self.numbers.extend(bytes(ENTRY.size * more))
        self.objects.extend([None] * (OBJECTS_PER_ENTRY * more))

    def start(self, call: Call) -> None:
        """Record ``call`` as started; its payload's size comes later (``set_bytes``)."""
        state = self.state
        if state[0] == self.allocated < self.capacity:
            self._grow()
        index = state[0] % self.allocated
        ENTRY.pack_into(self.numbers, index * ENTRY.size, call.seq & (2 ** 64 - 1),
                        call.wire_step, time.time_ns(), 0, 0, call.lasti, call.occurrence,
                        OPS[call.op], STARTED, call.reduce_op, call.root)
        base = OBJECTS_PER_ENTRY * index
        self.objects[base] = call.info
        self.objects[base + 1] = call.code
        self.objects[base + 2] = call.name
        # A call made for its callers keeps them beside its wrapper (the C path does the same).
        self.objects[base + 3] = (call.via, call.callers) if call.callers else call.via
        state[0] += 1
        state[1] = True

    def set_bytes(self, nbytes: int) -> None:
        struct.pack_into("<I", self.numbers, self._offset() + 32, nbytes)

    def complete(self) -> None:
        if self.state[1]:
            offset = self._offset()
            struct.pack_into("<Q", self.numbers, offset + 24, time.time_ns())
            self.numbers[offset + 45] = COMPLETED
            self.state[1] = False

    def fail(self, error: str) -> None:
        offset = self._offset()
        struct.pack_into("<Q", self.numbers, offset + 24, time.time_ns())
        self.numbers[offset + 45] = FAILED
        self.failures[self.state[0]] = error
        if len(self.failures) > self.capacity:
            self.failures.pop(next(iter(self.failures)))
        self.state[1] = False

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def entry(self, number: int) -> RecordEntry:
        """The ``number``-th entry recorded (1-based count since creation), read back."""
        index = (number - 1) % self.allocated
        (seq, step, t_start, t_end, nbytes, lasti, occurrence, op, state, reduce_op,
         root) = ENTRY.unpack_from(self.numbers, index * ENTRY.size)
        info, code, name, via = self.objects[OBJECTS_PER_ENTRY * index:
                                        OBJECTS_PER_ENTRY * (index + 1)]
        via, callers = via if isinstance(via, tuple) else (via, ())
        op_text = op_name(op)
        return RecordEntry(
            seq=seq, op=op_text, schema=info.name if info is not None else "",
            fingerprint=info.fingerprint.hex() if info is not None else "",
            site=format_site(code, lasti), column=column_of(code, lasti), name=name,
            occurrence=occurrence,
            step=None if step == NO_STEP else step, bytes=nbytes,
            root=root if op_text in ROOTED_OPS and root != NO_ROOT else None,
            reduce_op=REDUCE_OP_NAMES.get(reduce_op) if op_text in REDUCING_OPS else None,
            state=STATE_NAMES[state] if state < len(STATE_NAMES) else "started",
            t_start_ns=t_start, t_end_ns=t_end or None, error=self.failures.get(number),
            branch=branch_of(code, lasti) if name is None and op_text in ROOTED_OPS else None,
            via=via_name(via) if name is None else None,
            callers=describe_callers(callers) if name is None else ())

    def last(self) -> Optional[RecordEntry]:
        return self.entry(self.count) if self.count else None

    def newest_alone(self) -> Optional["FlightRecorder"]:
        """The newest entry, copied into a recorder of its own and read back (``entry(1)``) only
        when asked. A finalizer keeps this: reading an entry back describes its call, which may
        parse a source file under a lock that the thread the collector interrupted holds."""
        count = self.count
        if not count:
            return None
        one = FlightRecorder(1)
        index = (count - 1) % self.allocated
        one.numbers[:] = self.numbers[index * ENTRY.size:(index + 1) * ENTRY.size]
        one.objects[:] = self.objects[OBJECTS_PER_ENTRY * index:OBJECTS_PER_ENTRY * (index + 1)]
        one.state[0] = 1
        error = self.failures.get(count)
        if error is not None:
            one.failures[1] = error
        return one

    def snapshot(self) -> List[RecordEntry]:
        """The recorded collectives, oldest first."""
        count = self.count
        return [self.entry(number) for number in range(count - len(self) + 1, count + 1)]
