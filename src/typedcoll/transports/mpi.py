"""The MPI transport: byte operations over private duplicates of an mpi4py intracommunicator.

Channels. ``channel_for(parent)`` returns the parent's private channel, made once per parent
(``MPI_Comm_dup``, three times: collectives, typed point-to-point, and the side channel that
diagnostics use to ask a hung peer where it is) and cached as an MPI attribute
of the parent, so every TypedComm built over it shares it and constructing thousands costs
no communicators. It is freed with the last TypedComm that frees it, or with the parent; a
channel that a rank left alone (a ``with`` block left by an exception) or that a call abandoned
is kept instead, never freed, so that no later communicator is handed its context, and with it
its peers' messages still in flight (``MPITransport.free``).

The exchange. Phase 1 of every typed collective runs one point-to-point schedule, the same for
both shapes, so ranks that disagree about the shape (one in an allgather, its peer in a bcast)
still exchange well-formed messages in the same rounds. Round k (distance d = 2**k,
ceil(log2 N) rounds): send to rank r - d, receive from rank r + d (mod N), on the collective
communicator with one reserved tag. Every message is::

    u8 shape, u8 shapes seen, u16 0, u32 count
    GATHER: count slots (Bruck's allgather: the first min(d, N - d) slots this rank holds, in
            the order rank r, r+1, ...), sent in place
    REDUCE: the agreement block (the OR of every header this rank has heard of so far), then
            count bytes: the OR of the payload regions heard of so far

"Shapes seen" has a bit per shape, ORed along: after the last round every rank has heard, at
first or second hand, of every rank (overlapping coverage when N is not a power of two
changes nothing: OR is idempotent). A GATHER rank then holds every slot and folds their
agreement block itself; a REDUCE rank's block covers every rank. Ranks that saw both shapes
(one in an allgather, its peer in a bcast) all mark their block as disagreeing, so no rank
decodes what it could not have gathered, and every rank enters the same cold path. MPI
delivers messages between two ranks with one tag in order, so consecutive exchanges never
mix. A REDUCE message stays one slot and a block long at any N.

Giving up. A rank whose deadline passes leaves its messages of that exchange posted, and a peer
that arrives after it can still complete the exchange from them: no round's message depends on
its receiver's own. So a rank that gives up on a call tells every peer (``give_up``: the call's
number, 8 bytes, tag ``NOTICE_TAG`` on the collective communicator), and an exchange with a
deadline that completes looks for such a notice (``MPI_Iprobe``) before it returns: one found
fails the call there too (``given_up`` reads them), so the late rank raises with its peers
instead of returning. A notice still in flight when the late rank looks is not seen (it came
within microseconds of the deadline): that rank returns, and its next call times out. Waiting
exchanges do not look: a rank waiting for an absent peer reports that peer at its own deadline.

The C fast path runs this same schedule (``core/_speedups.c``, over MPI's C symbols) with
``MPI_Isend``/``MPI_Irecv`` polled, with or without a deadline: one code path, measured within
3% of blocking ``MPI_Sendrecv`` rounds or faster (docs/bench.md, "The exchange's form"). This
module is its Python twin, and one job may mix both (a blocking ``Sendrecv`` matches a polled
pair).

Everything after the verdict (phase 2, the cold paths) uses MPI's own collectives: every rank
has then agreed which one comes next. MPI never matches a blocking collective with a nonblocking
one, so the form follows the deadline, which the caller makes alike on every rank: ``None``
(phase 2 after an agreed verdict on a communicator without a timeout: the settings were agreed
at creation) takes the blocking form, which MPI libraries tune and which is cheaper to call; a
number, ``math.inf`` included, takes the nonblocking form, waited on. The cold paths pass
``math.inf`` where they have no deadline: ranks whose settings differ (a bad timeout on one
rank, found by the creation exchange itself) must still meet in the exchange that reports it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, List, Optional, Tuple, cast

import numpy as np
from mpi4py import MPI

from ..core.channel import Channel
from ..core.plumbing import register_internal
from ..core.transport import TransportTimeout, displacements
from ..core.wire import (AGREE_SIZE, FLAG_OVERFLOW, FLAGS_OFFSET, GATHER, HEADER_SIZE,
                         LENGTH_OFFSET, MAX_SLOT, fold, force_disagreement, or_into, own_block)
from .mpi_waits import _ABANDONED, _Sending, wait_all

EXCHANGE_TAG = 0x7C31  # the collective communicator carries no other point-to-point traffic
NOTICE_TAG = 0x7C32  # but a rank's notice that it gave up on a call (give_up)
PREFIX = 8
_MPI_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD, "land": MPI.LAND,
            "lor": MPI.LOR, "lxor": MPI.LXOR, "band": MPI.BAND, "bor": MPI.BOR, "bxor": MPI.BXOR}

# How many times a completed exchange with a deadline probes for a peer's notice: MPICH moves
# only part of what waits in its shared-memory queues per probe, so one probe missed notices
# that had arrived seconds before (a late rank returned its result). Open MPI's one probe saw
# them, and costs more (four added about 1 us per timed call at 2 to 16 ranks): one there.
# The C path probes as often.
NOTICE_POLLS = 4 if MPI.Get_library_version().startswith("MPICH") else 1


def comm_name(comm: MPI.Comm) -> str:
    if comm == MPI.COMM_WORLD:
        return "COMM_WORLD"
    if comm == MPI.COMM_SELF:
        return "COMM_SELF"
    name = comm.Get_name()
    return name.removeprefix("MPI_") if name else "comm"


_KEYVAL: Optional[int] = None
# Transports released while peers may still send to them (MPITransport.free): kept for good,
# with their communicators and the C engine's buffers that posted receives may still fill.
_RETIRED: List["MPITransport"] = []


def _on_parent_freed(comm: Any, keyval: int, channel: Any) -> None:
    # The parent is being freed (or MPI finalised): its private channel goes with it.
    try:
        if channel.users > 0:
            channel.close()
    except Exception:  # freeing at teardown must never raise into MPI
        pass


def channel_for(parent: Any) -> Channel:
    """The private channel of ``parent``: made by the first TypedComm over it, then shared."""
    global _KEYVAL
    if not isinstance(parent, MPI.Intracomm) or parent == MPI.COMM_NULL:
        raise TypeError(f"expected an mpi4py intracommunicator, got {parent!r} (for "
                        f"torch.distributed use TypedComm.from_torch)")
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval(delete_fn=_on_parent_freed)
    channel = cast(Optional[Channel], parent.Get_attr(_KEYVAL))
    if channel is None or channel.users <= 0:
        channel = Channel(MPITransport(parent.Dup(), parent.Dup(), parent.Dup()),
                          comm_name(parent))
        parent.Set_attr(_KEYVAL, channel)
    return channel


class MPITransport:
    """Byte operations over private communicators: collectives, point to point, and a side
    channel for diagnostics (only their watcher thread and hang reports use it)."""

    kind = "mpi"
    # Past the slot, phase 2 is one MPI_Allgather(v) whose cost is its bytes: larger slots would
    # only make every exchange carry size x slot bytes.
    max_slot = MAX_SLOT

    def __init__(self, comm: MPI.Intracomm, p2p: MPI.Intracomm, side: MPI.Intracomm) -> None:
        self.comm = comm
        self.p2p = p2p
        self.side = side
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._inbox = bytearray(0)
        self._spare: Optional[np.ndarray] = None
        self.tag = EXCHANGE_TAG
        self.notice_tag = NOTICE_TAG
        self.notice_polls = NOTICE_POLLS
        # The C fast path's binding of the exchange over MPI's own symbols (None: Python's).
        from ..core import fast
        self.engine = fast.mpi_engine(self)

    # --- the exchange ----------------------------------------------------------------------
    def exchange(self, send: bytearray, recv: bytearray, block: bytearray, shape: int,
                 deadline: Optional[float]) -> None:
        engine = self.engine
        if engine is not None:
            from ..core import fast
            if fast.run_engine(engine, send, recv, block, shape, deadline):
                return
            raise TransportTimeout()
        self._exchange(send, recv, block, shape, deadline)

    def _exchange(self, send: bytearray, recv: bytearray, block: bytearray, shape: int,
                  deadline: Optional[float]) -> None:
        n, r, slot = self.size, self.rank, len(send)
        own_block(send, block)
        flags = send[FLAGS_OFFSET]
        length = int.from_bytes(send[LENGTH_OFFSET:HEADER_SIZE], "little")
        region_len = 0 if flags & FLAG_OVERFLOW else min(length, slot - HEADER_SIZE)
        held = bytearray(n * slot)  # GATHER: slots of ranks r, r+1, ... in that order
        have = 1
        if shape == GATHER:
            held[:slot] = send
        region = bytearray(send[HEADER_SIZE:HEADER_SIZE + region_len])
        seen = 2 if shape == GATHER else 1  # the shapes heard of, one bit each
        inbox_size = PREFIX + AGREE_SIZE + max((n + 1) // 2, 1) * slot
        if len(self._inbox) < inbox_size:
            self._inbox = bytearray(inbox_size)
        inbox = self._inbox
        dist = 1
        while dist < n:
            if shape == GATHER:
                count = min(have, dist, n - dist)
                out = bytes((GATHER, seen, 0, 0)) + count.to_bytes(4, "little") + \
                    held[:count * slot]
            else:
                out = (bytes((shape, seen, 0, 0)) + len(region).to_bytes(4, "little") + block
                       + region)
            self._sendrecv(out, (r - dist) % n, inbox, (r + dist) % n, deadline)
            in_gather = inbox[0] == GATHER
            seen |= (inbox[1] & 3) | (2 if in_gather else 1)
            got = int.from_bytes(inbox[4:8], "little")
            if not in_gather:
                or_into(block, inbox[PREFIX:PREFIX + AGREE_SIZE])
                if shape != GATHER:
                    got = min(got, slot - HEADER_SIZE)
                    if got > len(region):
                        region.extend(bytes(got - len(region)))
                    body = PREFIX + AGREE_SIZE
                    acc = int.from_bytes(region[:got], "little") | int.from_bytes(
                        inbox[body:body + got], "little")
                    region[:got] = acc.to_bytes(got, "little")
            elif shape == GATHER:
                got = min(got, dist, n - dist, n - have)
                held[have * slot:(have + got) * slot] = inbox[PREFIX:PREFIX + got * slot]
                have += got
            dist *= 2
        if deadline is not None and any(self.comm.Iprobe(MPI.ANY_SOURCE, NOTICE_TAG)
                                        for _ in range(self.notice_polls)):
            raise TransportTimeout()  # a peer gave up on a call: see the module's docstring
        if seen == 3:  # ranks met in exchanges of both shapes: disagreement, on every rank
            force_disagreement(block)
        elif shape == GATHER:
            for i in range(have):
                owner = (r + i) % n
                recv[owner * slot:(owner + 1) * slot] = held[i * slot:(i + 1) * slot]
            if have == n:
                fold(recv, slot, n, block)
            else:  # a peer sent short: corrupt, never decoded
                force_disagreement(block)
        else:
            recv[HEADER_SIZE:HEADER_SIZE + len(region)] = region
            recv[HEADER_SIZE + len(region):slot] = bytes(slot - HEADER_SIZE - len(region))

    def _sendrecv(self, out: bytes, dest: int, inbox: bytearray, source: int,
                  deadline: Optional[float]) -> None:
        if deadline is None:
            self.comm.Sendrecv([out, MPI.BYTE], dest, EXCHANGE_TAG, [inbox, MPI.BYTE], source,
                               EXCHANGE_TAG)
            return
        requests = [self.comm.Irecv([inbox, MPI.BYTE], source, EXCHANGE_TAG),
                    self.comm.Isend([out, MPI.BYTE], dest, EXCHANGE_TAG)]
        wait_all(requests, deadline)

    # --- phase 2 and the cold paths: MPI's own collectives ------------------------------------
    def _collective(self, name: str, deadline: Optional[float], *args: Any,
                    **kwargs: Any) -> None:
        """``comm.<name>(...)``, blocking for ``deadline`` None, else its nonblocking form
        waited on (the module's docstring: why every rank picks the same form)."""
        if deadline is None:
            getattr(self.comm, name)(*args, **kwargs)
        else:
            wait_all([getattr(self.comm, "I" + name.lower())(*args, **kwargs)], deadline,
                     present=True)

    def _receive_buffer(self, n: int) -> np.ndarray:
        """Phase 2's receive buffer: the previous one when nothing refers to it any more (every
        result viewing it is gone: arrays are decoded as views of it), else a new one, which
        costs a page fault per page when MPI first writes it. Not zeroed: MPI writes every byte
        read."""
        spare = self._spare
        # Three references: the attribute, the local name and getrefcount's argument.
        if spare is not None and spare.nbytes == n and sys.getrefcount(spare) == 3:
            return spare
        self._spare = spare = np.empty(n, dtype=np.uint8)
        return spare

    def allgatherv(self, send: Any, counts: List[int], deadline: Optional[float]) -> Any:
        recv = self._receive_buffer(sum(counts))
        if counts.count(counts[0]) == len(counts):
            # Equal counts (arrays of one shape), the same decision on every rank: MPI's
            # allgather is tuned further than its allgatherv.
            self._collective("Allgather", deadline, [send, len(send), MPI.BYTE],
                             [recv, counts[0], MPI.BYTE])
            return recv
        spec = [recv, (counts, displacements(counts)), MPI.BYTE]
        self._collective("Allgatherv", deadline, [send, len(send), MPI.BYTE], spec)
        return recv

    def gatherv(self, send: bytes, counts: List[int], root: int,
                deadline: Optional[float]) -> Optional[bytearray]:
        recv = bytearray(sum(counts)) if self.rank == root else None
        spec = [recv, (counts, displacements(counts)), MPI.BYTE] if recv is not None else None
        self._collective("Gatherv", deadline, [send, len(send), MPI.BYTE], spec, root=root)
        return recv

    def gather_parts(self, send: bytes, root: int,
                     deadline: Optional[float]) -> Optional[List[bytes]]:
        mine = np.array([len(send)], dtype=np.int64)
        lengths = np.zeros(self.size, dtype=np.int64) if self.rank == root else None
        self._collective("Gather", deadline, mine, lengths, root=root)
        counts = [int(x) for x in lengths] if lengths is not None else [0] * self.size
        blob = self.gatherv(send, counts, root, deadline)
        if blob is None:
            return None
        offsets = displacements(counts)
        return [bytes(blob[o:o + c]) for o, c in zip(offsets, counts)]

    def scatter_parts(self, parts: Optional[List[bytes]], root: int,
                      deadline: Optional[float]) -> bytes:
        is_root = self.rank == root
        counts = [len(x) for x in parts] if is_root and parts is not None else [0] * self.size
        lengths = np.array(counts, dtype=np.int64) if is_root else None
        mine = np.zeros(1, dtype=np.int64)
        self._collective("Scatter", deadline, lengths, mine, root=root)
        out = bytearray(int(mine[0]))
        blob = b"".join(parts) if is_root and parts is not None else b""
        spec = [blob, (counts, displacements(counts)), MPI.BYTE] if is_root else None
        self._collective("Scatterv", deadline, spec, [out, MPI.BYTE], root=root)
        return bytes(out)

    def alltoall_parts(self, parts: Optional[List[bytes]],
                       deadline: Optional[float]) -> List[bytes]:
        parts = parts if parts is not None else [b""] * self.size
        send_counts = np.array([len(x) for x in parts], dtype=np.int64)
        recv_counts = np.zeros(self.size, dtype=np.int64)
        self._collective("Alltoall", deadline, send_counts, recv_counts)
        sc = [int(x) for x in send_counts]
        rc = [int(x) for x in recv_counts]
        out = bytearray(sum(rc))
        blob = b"".join(parts)
        send_spec = [blob, (sc, displacements(sc)), MPI.BYTE]
        recv_spec = [out, (rc, displacements(rc)), MPI.BYTE]
        self._collective("Alltoallv", deadline, send_spec, recv_spec)
        offsets = displacements(rc)
        return [bytes(out[o:o + c]) for o, c in zip(offsets, rc)]

    def bcast_bytes(self, buf: bytearray, root: int, deadline: Optional[float]) -> None:
        self._collective("Bcast", deadline, [buf, len(buf), MPI.BYTE], root=root)

    def allreduce_array(self, arr: np.ndarray, op: str,
                        deadline: Optional[float]) -> np.ndarray:
        # MPI reduces native byte order only: reduce a native copy, hand back the caller's order.
        send = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
        out = np.empty_like(send)
        if op in ("land", "lor", "lxor") and send.dtype.kind in "fc":
            raise TypeError(f"expected integers or bools for op {op!r}, got {send.dtype}")
        self._collective("Allreduce", deadline, send, out, op=_MPI_OPS[op])
        return out.astype(arr.dtype, copy=False)

    def world_ranks(self) -> Optional[List[int]]:
        world = MPI.COMM_WORLD.Get_group()
        mine = self.comm.Get_group()
        try:
            ranks = mine.Translate_ranks(list(range(self.size)), world)
        finally:
            mine.Free()
            world.Free()
        return None if MPI.UNDEFINED in ranks else [int(r) for r in ranks]

    # --- giving up (the module's docstring) -----------------------------------------------
    def give_up(self, seq: int, failure: str) -> None:
        note = seq.to_bytes(8, "little")
        for peer in range(self.size):
            if peer != self.rank:  # never waited on: the channel is unusable after this
                _ABANDONED.append([self.comm.Isend([note, MPI.BYTE], peer, NOTICE_TAG), note])

    def given_up(self) -> List[Tuple[int, int]]:
        found = []
        status = MPI.Status()
        while self.comm.Iprobe(MPI.ANY_SOURCE, NOTICE_TAG, status):
            note = bytearray(8)
            self.comm.Recv([note, MPI.BYTE], status.Get_source(), NOTICE_TAG)
            found.append((status.Get_source(), int.from_bytes(note, "little")))
        return found

    def failed_in(self) -> List[Tuple[int, int]]:
        return []

    # --- point to point --------------------------------------------------------------------
    def send_bytes(self, data: bytes, dest: int, tag: int, deadline: Optional[float]) -> None:
        wait_all([self.p2p.Isend([data, len(data), MPI.BYTE], dest, tag)], deadline)

    def isend_bytes(self, data: bytes, dest: int, tag: int) -> "_Sending":
        """A send left in flight: a large message must not wait for its receiver to be
        matched before this rank can receive (two ranks sending to each other)."""
        return _Sending(self.p2p.Isend([data, len(data), MPI.BYTE], dest, tag), data)

    def recv_bytes(self, source: int, tag: int, deadline: Optional[float]) -> bytes:
        status = MPI.Status()
        if deadline is None:
            self.p2p.Probe(source, tag, status)
        else:
            while not self.p2p.Iprobe(source, tag, status):
                if time.monotonic() >= deadline:
                    raise TransportTimeout()
                time.sleep(1e-4)
        buf = bytearray(status.Get_count(MPI.BYTE))
        self.p2p.Recv([buf, MPI.BYTE], status.Get_source(), status.Get_tag())
        return bytes(buf)

    # --- communicators ----------------------------------------------------------------------
    def split(self, color: Optional[int], key: int) -> Optional["MPITransport"]:
        color_ = MPI.UNDEFINED if color is None else color
        subs = [c.Split(color_, key) for c in (self.comm, self.p2p, self.side)]
        if subs[0] == MPI.COMM_NULL:
            return None
        return MPITransport(*cast(List[MPI.Intracomm], subs))

    def dup(self) -> "MPITransport":
        return MPITransport(self.comm.Dup(), self.p2p.Dup(), self.side.Dup())

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)

    def free(self, settled: bool = True) -> None:
        if not settled:
            # A peer may still send to these communicators (the rounds and give-up notices of a
            # call this rank left, or will never make). MPI hands a freed communicator's context
            # to a later one, and those messages with it: a new channel's exchange would take
            # them for its own. Kept, never freed: MPICH has about 2,000 contexts per process.
            _RETIRED.append(self)
            return
        for comm in (self.comm, self.p2p, self.side):
            if comm not in (MPI.COMM_WORLD, MPI.COMM_SELF, MPI.COMM_NULL):
                comm.Free()


register_internal(__file__)
