"""The envelope and the agreement block: the bytes every rank sends in every typed collective.

Header (little-endian; format version 2), at the start of every rank's slot::

    off size field                                            compared across ranks?
      0   1  magic, 0xC2 (format version 2)                   yes
      1   1  op code (OPS)                                    yes
      2   1  reduce-op code (REDUCE_OPS; 0: none)             yes
      3   1  log2 of the slot size (rounded down)             yes
      4   4  root (int32; NO_ROOT: the op has none)           yes
      8   8  seq: the call's number on its communicator       yes
     16   8  step (int64; NO_STEP: none given)                yes
     24   8  schema fingerprint                               yes
     32   8  array fingerprint (dtype and shape; zeros)       yes
     40   8  call identity: its name=, else its call site     yes
     48   4  communicator instance (several TypedComms may share one private channel)  yes
     52   4  slot size in bytes (uint32)                      yes
     56   1  flags (FLAG_*)                                   no
     57   3  reserved, 0                                      no
     60   4  payload length in bytes (uint32)                 no
     64   ~  inline payload, up to slot size - 64 bytes

The first ``CHECKED`` bytes must be byte-identical on every rank; everything a rank may
legitimately differ in (its payload, whether it failed) sits after them.

Agreement block (``AGREE_SIZE`` bytes): the bitwise OR, over every rank, of::

      0  56  the checked header
     56  56  the complement of the checked header
    112   1  flags
    116   4  payload length

All checked headers are equal exactly when the two ORs are complements of each other (a bit that
differs between two ranks is 1 in both), so a tree of ORs decides agreement for every rank at
once without gathering every header, and every rank reads the same block, hence the same verdict.
``fold`` builds it from gathered slots; the MPI transport builds it along its exchange.
"""

from __future__ import annotations

import struct
import sys
from typing import Dict, Union

MAGIC = 0xC2
HEADER = struct.Struct("<BBBBiQq8s8s8sIIB3xI")
HEADER_SIZE = 64
CHECKED = 56
FLAGS_OFFSET = 56
LENGTH_OFFSET = 60
SEQ_OFFSET = 8
ARRAY_FP_OFFSET = 32
NO_STEP = -(2 ** 63)
NO_ROOT = -1
MAX_PAYLOAD = 2 ** 32 - 1
assert HEADER.size == HEADER_SIZE

AGREE_SIZE = 128
AGREE_FLAGS = 112
AGREE_LENGTH = 116

# Reading the length field through a memoryview cast costs ~40 ns against ~150 ns for
# struct.unpack_from; the cast reads native order, so it is only used on little-endian hosts.
NATIVE_LITTLE = sys.byteorder == "little"

FLAG_LOCAL_ERROR = 1  # the rank failed to produce its value; the payload is the error text
FLAG_OVERFLOW = 2  # the payload did not fit the slot; it travels in the second phase
FLAG_WILD_SCHEMA = 4  # the rank named no schema and takes the root's: its fingerprint is not
#                       compared (it counts as neither 0 nor 1 in the agreement block)
FLAG_SPLIT_ARRAY = 8  # the inline bytes are an array's dtype and shape; phase 2 moves its data
FLAG_GUESSED = 16  # the rank named no schema and sent, as if named, the root's class it took at
#                    this call last time (core/guesses.py); headers that differ where any rank
#                    guessed are exchanged once more, the guessers taking the root's by name
FLAG_ROLE = 32  # the rank sent, in place of its call site, the role identity it learned where
#                 this call proved one rooted collective in a role branch's two arms
#                 (core/roles.py); headers that differ where any rank did are exchanged once
#                 more with the call sites
FLAG_DECODE_HOOK = 64  # the rank's schema runs user code when decoding (codecs/hooks.py), which
#                         may judge a payload differently on another rank: every rank settles
#                         the call's decoding with one more exchange (core/settle.py)
FLAG_RECEIVERS_ARM = 128  # set with the call site again (core/roles.py's unrole) by a rank that
#                           learned this site as the receivers' arm of a role branch: headers
#                           that then agree put the root in its receivers' arm (a DesyncError)
SCHEMA_OFFSET = 24
IDENTITY_OFFSET = 40

# Every collective starts with one exchange of this shape (the transport's ``exchange``):
GATHER = 1  # every rank ends with every rank's slot
REDUCE = 0  # every rank ends with the OR of every slot: the agreement, and a root's payload

OPS: Dict[str, int] = {
    "allgather": 1, "gather": 2, "bcast": 3, "allreduce": 4, "barrier": 5, "split": 6, "dup": 7,
    "flush": 8, "all_gather_tensor": 9, "all_reduce_tensor": 10, "broadcast_tensor": 11,
    "reduce_scatter_tensor": 12, "create": 13, "scatter": 14, "alltoall": 15, "reduce": 16,
    "reduce_scatter": 17, "free": 18, "settle": 19, "reduce_tensor": 20, "gather_tensor": 21,
    "scatter_tensor": 22, "all_to_all_tensor": 23,
}
OP_NAMES = {code: name for name, code in OPS.items()}
ROOTED_OPS = frozenset({"gather", "bcast", "broadcast_tensor", "scatter", "reduce",
                        "reduce_tensor", "gather_tensor", "scatter_tensor"})
REDUCING_OPS = frozenset({"allreduce", "all_reduce_tensor", "reduce_scatter_tensor", "reduce",
                          "reduce_scatter", "reduce_tensor"})
# Ops whose payload is typedcoll's own (a communicator's settings), not the caller's: a message
# names the op alone.
INTERNAL_PAYLOADS = frozenset({"create", "split", "free"})

REDUCE_OPS = {"sum": 1, "max": 2, "min": 3, "prod": 4, "land": 5, "lor": 6, "lxor": 7,
              "band": 8, "bor": 9, "bxor": 10}
REDUCE_OP_NAMES = {code: name for name, code in REDUCE_OPS.items()}


def op_name(code: int) -> str:
    return OP_NAMES.get(code, f"op#{code}")


def reduce_op_name(code: int) -> str:
    return REDUCE_OP_NAMES.get(code, f"redop#{code}")


# --- the agreement block ---------------------------------------------------------------------
_MASK = (1 << (8 * CHECKED)) - 1


def own_block(slot: Union[bytes, bytearray], block: bytearray) -> None:
    """This rank's own agreement block: what the OR starts from."""
    header = int.from_bytes(slot[:CHECKED], "little")
    block[:CHECKED] = slot[:CHECKED]
    block[CHECKED:2 * CHECKED] = (header ^ _MASK).to_bytes(CHECKED, "little")
    block[2 * CHECKED:AGREE_SIZE] = bytes(AGREE_SIZE - 2 * CHECKED)
    if slot[FLAGS_OFFSET] & FLAG_WILD_SCHEMA:
        block[SCHEMA_OFFSET:SCHEMA_OFFSET + 8] = bytes(8)
        block[CHECKED + SCHEMA_OFFSET:CHECKED + SCHEMA_OFFSET + 8] = bytes(8)
    block[AGREE_FLAGS] = slot[FLAGS_OFFSET]
    block[AGREE_LENGTH:AGREE_LENGTH + 4] = slot[LENGTH_OFFSET:LENGTH_OFFSET + 4]


def or_into(block: bytearray, other: Union[bytes, bytearray]) -> None:
    """``block |= other`` over ``len(block)`` bytes (Python ints OR at C speed)."""
    n = len(block)
    block[:] = (int.from_bytes(block, "little") | int.from_bytes(other[:n], "little")).to_bytes(
        n, "little")


def fold(recv: bytearray, slot: int, size: int, block: bytearray) -> None:
    """The agreement block of ``size`` gathered slots (transports that gather every slot)."""
    acc = bytearray(AGREE_SIZE)
    mine = bytearray(AGREE_SIZE)
    for r in range(size):
        own_block(recv[r * slot:r * slot + HEADER_SIZE], mine)  # the header: no slot-sized copy
        or_into(acc, mine)
    block[:] = acc


def or_slots(recv: bytearray, slot: int, size: int) -> None:
    """``recv[:slot]`` = the OR of every gathered slot (the REDUCE shape's payload region)."""
    acc = 0
    for r in range(size):
        acc |= int.from_bytes(recv[r * slot:(r + 1) * slot], "little")
    recv[:slot] = acc.to_bytes(slot, "little")


def force_disagreement(block: bytearray) -> None:
    """Make ``block`` say the headers differ (ranks met in exchanges of different shapes).

    Its flags and length are zeroed: each rank heard only part of them, and every rank must
    feed the slot-size rule the same number.
    """
    block[0] |= 1
    block[CHECKED] |= 1
    block[2 * CHECKED:AGREE_SIZE] = bytes(AGREE_SIZE - 2 * CHECKED)


def agreed(block: Union[bytes, bytearray]) -> bool:
    """Every rank's checked header was the same."""
    a = int.from_bytes(block[:CHECKED], "little")
    b = int.from_bytes(block[CHECKED:2 * CHECKED], "little")
    return a & b == 0


INSTANCE_OFFSET = 48


def instances_differ(block: Union[bytes, bytearray]) -> bool:
    """The ranks were on different communicators of one channel (the instance field differs)."""
    a = block[INSTANCE_OFFSET:INSTANCE_OFFSET + 4]
    b = block[CHECKED + INSTANCE_OFFSET:CHECKED + INSTANCE_OFFSET + 4]
    return any(x & y for x, y in zip(a, b))


def block_flags(block: Union[bytes, bytearray]) -> int:
    return block[AGREE_FLAGS]


def block_length(block: Union[bytes, bytearray]) -> int:
    """The OR of every rank's payload length: the length itself where one rank sent one."""
    return int.from_bytes(block[AGREE_LENGTH:AGREE_LENGTH + 4], "little")


# --- slot sizing -------------------------------------------------------------------------------
# Every rank must use the same slot size in every collective, without talking about it. Each rank
# reads the same agreement block in every collective, so all of them can apply the same rule to
# the same number (the OR of the payload lengths, an upper bound of the largest): grow at once to
# fit it (up to the transport's largest slot), and shrink after a window of collectives that
# would all have fit in a smaller slot. The slot size is also in the checked header, so a
# disagreement cannot go unseen.
#
# Up to MAX_SLOT slots are powers of two. A transport whose every operation costs far more than
# the bytes it moves (gloo) may allow larger slots (``max_slot``), so that a payload of up to a
# few MiB repeated call after call travels inline in one operation instead of two. Past MAX_SLOT
# a slot is rounded to a multiple of 1/16 of its power of two (at most ~6% of empty bytes, where
# a power of two would carry up to 2x), and shrinks after a shorter window: every collective,
# a barrier too, moves size x slot bytes while the slot is large.

MIN_SLOT = 128  # RankState-sized records (~60 bytes with the header) fit inline
MAX_SLOT = 4096  # the largest power-of-two slot; MPI's and the in-memory transport's largest
SHRINK_WINDOW = 256
LARGE_SHRINK_WINDOW = 16  # for slots past MAX_SLOT


def slot_log2(size: int) -> int:
    return size.bit_length() - 1


class SlotPolicy:
    """The deterministic slot-size rule, fed the OR of the payload lengths of each collective.

    At the minimum size with everything fitting there is nothing to decide, and ``observe`` keeps
    no state, so a hot path may skip calling it then: every rank skips it in the same collectives.
    """

    __slots__ = ("size", "window_max", "count", "min_slot", "max_slot")

    def __init__(self, min_slot: int = MIN_SLOT, max_slot: int = MAX_SLOT) -> None:
        self.min_slot = min_slot
        # Every slot a whole number of 64-byte units, the largest too: the receive buffer of
        # size x slot bytes is read as uint32s (Protocol._alloc).
        self.max_slot = max(min_slot, max_slot - max_slot % 64)
        self.size = min_slot
        self.window_max = 0
        self.count = 0

    def observe(self, largest_payload: int) -> None:
        need = HEADER_SIZE + largest_payload
        # A payload that overflows even the largest slot travels in phase 2 whatever the slot:
        # it neither grows the slot nor keeps a large one from shrinking.
        past_every_slot = need > self.max_slot
        if need > self.size and not past_every_slot:
            self.size = self._fit(need)
            self.window_max = self.count = 0
            return
        if self.size == self.min_slot:
            return
        if largest_payload > self.window_max and not past_every_slot:
            self.window_max = largest_payload
        self.count += 1
        if self.count >= (SHRINK_WINDOW if self.size <= MAX_SLOT else LARGE_SHRINK_WINDOW):
            self.size = self._fit(HEADER_SIZE + self.window_max)
            self.window_max = self.count = 0

    def _fit(self, need: int) -> int:
        """The slot for ``need`` bytes (at most ``max_slot``; callers check ``need`` against it)."""
        if need > MAX_SLOT:
            step = 1 << (need.bit_length() - 5)  # 1/16 to 1/32 of need
            return min(-(-need // step) * step, self.max_slot)
        size = self.min_slot
        while size < need and size < self.max_slot:
            size *= 2
        return size
