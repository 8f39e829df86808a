"""The envelope: a fixed 56-byte header at the start of every rank's slot.

Layout (little-endian; version 1)::

    off size field                                   compared across ranks?
      0   1  magic, 0xC1 (format version 1)          yes
      1   1  op code (OPS)                           yes
      2   1  reduce-op code (REDUCE_OPS; 0: none)    yes
      3   1  reserved, 0                             yes
      4   4  root (int32; -1: the op has no root)    yes
      8   8  seq (uint64)                            yes
     16   8  step (int64; NO_STEP: none given)       yes
     24   8  schema fingerprint                      yes
     32   8  array fingerprint (dtype+shape; zeros)  yes
     40   8  call-site fingerprint (zeros unless the op pins its call site)   yes
     48   1  flags (FLAG_*)                          no
     49   3  reserved, 0                             no
     52   4  payload length in bytes (uint32)        no
     56   ~  inline payload, up to slot size - 56 bytes

The first CHECKED bytes must be byte-identical on every rank: that one comparison is the whole
steady-state check. Everything a rank may legitimately differ in (its payload, whether it is None,
whether it failed) sits after them.
"""

from __future__ import annotations

import struct
import sys

MAGIC = 0xC1
HEADER = struct.Struct("<BBBBiQq8s8s8sB3xI")
HEADER_SIZE = HEADER.size  # 56
CHECKED = 48
FLAGS_OFFSET = 48
LENGTH_OFFSET = 52
NO_STEP = -(2 ** 63)
NO_ROOT = -1
MAX_PAYLOAD = 2 ** 32 - 1

# Reading the length field through a memoryview cast costs ~40 ns against ~150 ns for
# struct.unpack_from; the cast reads native order, so it is only used on little-endian hosts.
NATIVE_LITTLE = sys.byteorder == "little"

FLAG_NONE_VALUE = 1  # the rank contributed None
FLAG_LOCAL_ERROR = 2  # the rank failed to produce its value; the payload is the error text
FLAG_OVERFLOW = 4  # the payload did not fit the slot; it travels in the second phase
FLAG_NO_PAYLOAD = 8  # the rank sends nothing (non-roots of bcast, barrier)

OPS = {
    "allgather": 1, "gather": 2, "bcast": 3, "allreduce": 4, "barrier": 5, "split": 6, "dup": 7,
    "flush": 8, "all_gather_tensor": 9, "all_reduce_tensor": 10, "broadcast_tensor": 11,
    "reduce_scatter_tensor": 12,
}
OP_NAMES = {code: name for name, code in OPS.items()}
ROOTED_OPS = frozenset({"gather", "bcast", "broadcast_tensor"})
REDUCING_OPS = frozenset({"allreduce", "all_reduce_tensor", "reduce_scatter_tensor"})

REDUCE_OPS = {"sum": 1, "max": 2, "min": 3, "prod": 4}
REDUCE_OP_NAMES = {code: name for name, code in REDUCE_OPS.items()}


def op_name(code: int) -> str:
    return OP_NAMES.get(code, f"op#{code}")


def reduce_op_name(code: int) -> str:
    return REDUCE_OP_NAMES.get(code, f"redop#{code}")


# --- slot sizing -------------------------------------------------------------------------------
# Every rank must use the same slot size in every collective, without talking about it. Each rank
# sees every rank's payload length in every collective, so all of them can apply the same rule to
# the same numbers: grow at once to fit the largest payload seen (up to MAX_SLOT), and shrink
# after a window of collectives whose payloads would all have fit in a smaller slot.

MIN_SLOT = 128  # RankState-sized records (~100 bytes with the header) fit inline
MAX_SLOT = 4096
SHRINK_WINDOW = 256


class SlotPolicy:
    """The deterministic slot-size rule, fed the largest payload length of each collective.

    At the minimum size with everything fitting there is nothing to decide, and ``observe`` keeps
    no state, so a hot path may skip calling it then: every rank skips it in the same collectives.
    """

    __slots__ = ("size", "window_max", "count", "min_slot", "max_slot")

    def __init__(self, min_slot: int = MIN_SLOT, max_slot: int = MAX_SLOT) -> None:
        self.min_slot = min_slot
        self.max_slot = max_slot
        self.size = min_slot
        self.window_max = 0
        self.count = 0

    def observe(self, largest_payload: int) -> None:
        need = HEADER_SIZE + largest_payload
        if need > self.size:
            # Grow only for what a slot can hold: a payload that overflows even the largest slot
            # travels in phase 2 anyway, and growing for it would just carry empty slots.
            if need <= self.max_slot:
                self.size = self._fit(need)
                self.window_max = self.count = 0
            return
        if self.size == self.min_slot:
            return
        if largest_payload > self.window_max:
            self.window_max = largest_payload
        self.count += 1
        if self.count >= SHRINK_WINDOW:
            self.size = self._fit(HEADER_SIZE + self.window_max)
            self.window_max = self.count = 0

    def _fit(self, need: int) -> int:
        size = self.min_slot
        while size < need and size < self.max_slot:
            size *= 2
        return size
