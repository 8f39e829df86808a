"""The torch.distributed transport: byte operations over a private gloo group.

Its channels, one per torch.distributed group, are made in ``torch_channels``; its tensor
operations are ``torch_tensors``'s, its waits and failure reports ``torch_failures``'s.

Gloo even when the caller's group is NCCL: object payloads are CPU bytes, and a detour through
the GPU would cost two copies and a host sync per call. CPU tensor payloads travel here too.
CUDA tensor payloads and their envelopes travel on ``device_group``: the caller's group when it
has an NCCL backend (a derived communicator gets a private NCCL backend of its own).

The exchange. Phase 1 of every typed collective is ONE all-gather of every rank's fixed-size
slot on the private group, for both shapes: ranks that disagree about the shape (one in an
allgather, its peer in a bcast) still meet in the same gloo operation, and every rank then
folds the same gathered slots into the agreement block (``core.transport.finish_gathered``).
Gloo has no cheaper OR-reduction of bytes to offer for the REDUCE shape, so nothing is lost.

Deadlines. ``None`` (and ``math.inf``) wait without a deadline. A finite deadline is passed to
gloo as the operation's own timeout (plus a margin, so gloo abandons the operation soon after
and a process can exit cleanly) and bounds ``Work.wait``, which raises while the operation is
still pending: :class:`TransportTimeout`. Polling ``is_completed()`` was measured slower on a
2-core machine (2.8 ms against 1.1 ms per 256-byte gather): the spinning thread starves gloo's.
"""

from __future__ import annotations

import atexit
import weakref

import os
import time
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (AllgatherOptions, AllreduceOptions, AllToAllOptions,
                                        BroadcastOptions, GatherOptions, ScatterOptions)
from torch.distributed import distributed_c10d as c10d

from ..codecs.reduce import reduce_values
from ..core.plumbing import register_internal
from ..core.transport import TransportTimeout, failure_of, finish_gathered
from ..core.wire import MAX_SLOT
from .gloo import EMPTY, make_gloo, make_nccl, options, post, u8, wait_work
from .torch_tensors import TORCH_OPS, TensorOps

# torch 2.13 renamed the fused-tensor collectives and deprecates the old names with a
# FutureWarning; torch 2.11 has only the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# (numpy kind, itemsize) -> the ops gloo reduces natively with the same result as
# codecs.reduce_values; anything else is gathered and reduced in rank order on every rank
# (logical ops, bools, uint16-64 and int16 that gloo lacks, and float max/min, whose NaN rule
# gloo does not follow).
_INT_OPS = frozenset(TORCH_OPS)
_GLOO_NATIVE = {("i", 1): _INT_OPS, ("u", 1): _INT_OPS, ("i", 4): _INT_OPS, ("i", 8): _INT_OPS,
                ("f", 4): frozenset({"sum", "prod"}), ("f", 8): frozenset({"sum", "prod"})}


# A gloo operation costs hundreds of microseconds however few bytes it moves, so a payload past
# the slot (phase 2: a second operation) costs about twice one that fits. Slots may grow to a few
# MiB here (wire.SlotPolicy), within a budget for the receive buffer of size x slot bytes.
LARGEST_SLOT = 4 << 20
SLOT_BUDGET = 64 << 20


def largest_slot(size: int) -> int:
    """The largest slot of a communicator of ``size`` ranks (the same on every rank), a
    multiple of MAX_SLOT."""
    return max(MAX_SLOT, min(LARGEST_SLOT, SLOT_BUDGET // size) // MAX_SLOT * MAX_SLOT)


class TorchTransport(TensorOps):
    """Byte operations on a private gloo backend (``control``); CUDA tensors on
    ``device_group``; ``store`` is a prefix of the job's c10d store private to this channel
    (diagnostics post and read per-rank status there)."""

    kind = "torch"

    def __init__(self, control: Any, ranks: List[int], base_store: Any, prefix: str,
                 device_group: Any, owns_device_group: bool, connect_s: float) -> None:
        self.control = control
        self.connect_s = connect_s  # how long its derived groups may wait to connect
        self.ranks = ranks  # global ranks, in this communicator's rank order
        self.rank = int(control.rank())
        self.size = int(control.size())
        self.max_slot = largest_slot(self.size)
        self.base_store = base_store
        self.prefix = prefix
        self.store = c10d.PrefixStore(prefix + "/diag/", base_store)
        self.device_group = device_group
        self.owns_device_group = owns_device_group
        self.derived = 0  # splits and dups so far: names their groups alike on every rank
        self._owners: Tuple[Any, Any] = (None, None)
        self._views: Tuple[torch.Tensor, torch.Tensor] = (EMPTY, EMPTY)
        self._gather_opts = options(AllgatherOptions, None)
        # The latest operation waited for, held until the next: the gloo thread that ran it
        # then never holds the last reference to its tensors (``free``).
        self._last_work: Any = None
        self._sends: List[Tuple[Any, torch.Tensor]] = []  # point-to-point sends in flight
        self._last_send: List[Tuple[Any, torch.Tensor]] = []  # the parts of the latest one
        self.freed = False
        self._store_lost_at: Optional[float] = None  # when the store first failed to answer
        _OPEN.add(self)

    # --- the exchange ------------------------------------------------------------------------
    def exchange(self, send: bytearray, recv: bytearray, block: bytearray, shape: int,
                 deadline: Optional[float]) -> None:
        owners = self._owners
        if send is not owners[0] or recv is not owners[1]:
            # The protocol keeps one pair of slot buffers until the slot size changes, each
            # pinned by a memoryview (it cannot be resized under a tensor view of it): views
            # are made once per pair, not per call.
            self._views = (u8(send), u8(recv))
            self._owners = (send, recv)
        send_t, recv_t = self._views
        opts = self._gather_opts if deadline is None else options(AllgatherOptions,
                                                                  deadline)
        self._wait(self.control._allgather_base(recv_t, send_t, opts), deadline)
        finish_gathered(recv, len(send), self.size, block, shape)

    # --- phase 2 and the cold paths ------------------------------------------------------------
    def _gather_padded(self, send: bytes, width: int, deadline: Optional[float]) -> torch.Tensor:
        # Gloo gathers equal sizes only: every contribution is padded to the largest count,
        # which every rank knows (counts come from headers, or lengths, every rank has seen).
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[:len(send)] = u8(send)
        out = torch.empty(width * self.size, dtype=torch.uint8)
        self._wait(self.control._allgather_base(out, padded,
                                               options(AllgatherOptions, deadline)),
                  deadline)
        return out.view(self.size, width)

    def allgatherv(self, send: bytes, counts: List[int],
                   deadline: Optional[float]) -> bytearray:
        width = max(counts)
        if width == 0:
            return bytearray()
        if width == min(counts):
            recv = bytearray(width * self.size)
            self._wait(self.control._allgather_base(u8(recv), u8(send),
                                                   options(AllgatherOptions, deadline)),
                      deadline)
            return recv
        rows = self._gather_padded(send, width, deadline)
        return bytearray(b"".join(rows[r, :c].numpy().tobytes() for r, c in enumerate(counts)))

    def gatherv(self, send: bytes, counts: List[int], root: int,
                deadline: Optional[float]) -> Optional[bytearray]:
        width = max(counts)
        if width == 0:
            return bytearray() if self.rank == root else None
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[:len(send)] = u8(send)
        rows = [torch.empty(width, dtype=torch.uint8) for _ in range(self.size)] \
            if self.rank == root else []
        opts = options(GatherOptions, deadline)
        opts.rootRank = root
        self._wait(self.control.gather([rows] if rows else [], [padded], opts), deadline)
        if not rows:
            return None
        return bytearray(b"".join(rows[r][:c].numpy().tobytes() for r, c in enumerate(counts)))

    def _lengths(self, mine: List[int], deadline: Optional[float]) -> np.ndarray:
        """Every rank's ``mine`` (one int64 per entry), as a (size, len(mine)) table."""
        raw = self.allgatherv(np.array(mine, dtype="<i8").tobytes(), [8 * len(mine)] * self.size,
                              deadline)
        return np.frombuffer(raw, dtype="<i8").reshape(self.size, len(mine))

    def gather_parts(self, send: bytes, root: int,
                     deadline: Optional[float]) -> Optional[List[bytes]]:
        # Lengths first: after a REDUCE exchange only each sender knows its own.
        counts = [int(n) for n in self._lengths([len(send)], deadline)[:, 0]]
        blob = self.gatherv(send, counts, root, deadline)
        if blob is None:
            return None
        out, offset = [], 0
        for c in counts:
            out.append(bytes(blob[offset:offset + c]))
            offset += c
        return out

    def scatter_parts(self, parts: Optional[List[bytes]], root: int,
                      deadline: Optional[float]) -> bytes:
        # Lengths first, from the root to every rank: each pads to the largest.
        is_root = self.rank == root
        lengths = bytearray(np.array([len(x) for x in parts] if is_root and parts is not None
                                     else [0] * self.size, dtype="<i8").tobytes())
        self.bcast_bytes(lengths, root, deadline)
        counts = [int(n) for n in np.frombuffer(lengths, dtype="<i8")]
        width = max(counts)
        if width == 0:
            return b""
        mine = torch.empty(width, dtype=torch.uint8)
        rows = []
        if is_root and parts is not None:
            for part in parts:
                row = torch.zeros(width, dtype=torch.uint8)
                row[:len(part)] = u8(part)
                rows.append(row)
        opts = options(ScatterOptions, deadline)
        opts.rootRank = root
        self._wait(self.control.scatter([mine], [rows] if rows else [], opts), deadline)
        return mine[:counts[self.rank]].numpy().tobytes()

    def alltoall_parts(self, parts: Optional[List[bytes]],
                       deadline: Optional[float]) -> List[bytes]:
        # Every rank's send counts first (the whole table), so every rank knows what it
        # receives and all skip together when nothing moves.
        parts = parts if parts is not None else [b""] * self.size
        table = self._lengths([len(x) for x in parts], deadline)
        send_counts = [int(n) for n in table[self.rank]]
        recv_counts = [int(n) for n in table[:, self.rank]]
        if not table.any():
            return [b""] * self.size
        out = torch.empty(sum(recv_counts), dtype=torch.uint8)
        self._wait(self.control.alltoall_base(out, u8(b"".join(parts)), recv_counts, send_counts,
                                             options(AllToAllOptions, deadline)), deadline)
        blob = out.numpy().tobytes()
        result, offset = [], 0
        for c in recv_counts:
            result.append(blob[offset:offset + c])
            offset += c
        return result

    def bcast_bytes(self, buf: bytearray, root: int, deadline: Optional[float]) -> None:
        if not buf:
            return
        opts = options(BroadcastOptions, deadline)
        opts.rootRank = root
        self._wait(self.control.broadcast([u8(buf)], opts), deadline)

    def allreduce_array(self, array: np.ndarray, op: str,
                        deadline: Optional[float]) -> np.ndarray:
        # Gloo reduces native byte order only: reduce a native copy, hand back the caller's.
        native = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
        if native.size and op in _GLOO_NATIVE.get((native.dtype.kind, native.dtype.itemsize),
                                                  ()):
            result = native.copy()
            opts = options(AllreduceOptions, deadline)
            opts.reduceOp = TORCH_OPS[op]
            self._wait(self.control.allreduce([torch.from_numpy(result)], opts), deadline)
        else:
            # Every rank gathers the same bytes and reduces them in rank order: the same
            # result everywhere, at size x the traffic.
            raw = self.allgatherv(native.tobytes(), [native.nbytes] * self.size, deadline)
            parts = np.frombuffer(raw, dtype=native.dtype).reshape((self.size,) + native.shape)
            result = reduce_values(list(parts), op)
        if result.dtype == native.dtype:
            return result.astype(array.dtype, copy=False)
        return result  # the logical ops give bools, as codecs.reduce_values does

    # --- point to point: the length, then the bytes, on the private group ------------------
    def send_bytes(self, data: bytes, dest: int, tag: int, deadline: Optional[float]) -> None:
        # A gloo send completes only once the receiver has posted its receive, so waiting here
        # would deadlock a ring of sends that MPI's buffered small sends complete. The sends are
        # left in flight instead (their buffers held until done; gloo keeps a pair's messages
        # of one tag in order), and the receiver's deadline bounds the exchange.
        self._sends = [sent for sent in self._sends if not sent[0].is_completed()]
        parts = [torch.tensor([len(data)], dtype=torch.int64)] + ([u8(data)] if data else [])
        posted = [(post(self.control.send, [part], dest, tag), part) for part in parts]
        self._sends.extend(posted)
        self._last_send = posted

    def wait_last_send(self, deadline: Optional[float]) -> None:
        """Wait for the message ``send_bytes`` posted last, not for earlier ones to other ranks
        (TransportTimeout, TransportFailure as ``wait_work``)."""
        for work, _ in self._last_send:
            wait_work(work, deadline)

    def recv_bytes(self, source: int, tag: int, deadline: Optional[float]) -> bytes:
        length = torch.zeros(1, dtype=torch.int64)
        try:
            wait_work(post(self.control.recv, [length], source, tag), deadline)
            buf = bytearray(int(length[0]))
            if buf:
                self._last_work = post(self.control.recv, [u8(buf)], source, tag)
                wait_work(self._last_work, deadline)
        except TransportTimeout as exc:
            if not failure_of(exc):  # its own deadline, not a failure: the pair is closed
                self.receive_timed_out(source)
            raise
        return bytes(buf)

    # --- communicators ------------------------------------------------------------------------
    def split(self, color: Optional[int], key: int) -> Optional["TorchTransport"]:
        # Every rank learns every (color, key); the members of each color then connect their
        # own groups, ordered by (key, old rank) as in MPI.
        table = self._lengths([-1 if color is None else color, key], None)
        self.derived += 1
        if color is None:
            return None
        members = sorted((int(table[r, 1]), r) for r in range(self.size)
                         if table[r, 0] == color)
        return self._derived([r for _, r in members], f"split{self.derived}.{color}")

    def dup(self) -> "TorchTransport":
        self.derived += 1
        return self._derived(list(range(self.size)), f"dup{self.derived}")

    def _derived(self, members: List[int], tag: str) -> "TorchTransport":
        prefix = f"{self.prefix}/{tag}"
        rank, size = members.index(self.rank), len(members)
        device = None if self.device_group is None else make_nccl(self.base_store, prefix, rank,
                                                               size)
        ranks = [self.ranks[r] for r in members]
        return TorchTransport(make_gloo(self.base_store, prefix, rank, size, self.connect_s, tag,
                                        ranks),
                              ranks, self.base_store, prefix, device,
                              owns_device_group=device is not None, connect_s=self.connect_s)

    def abort(self, code: int = 1) -> None:
        # torch.distributed has no job-wide abort: exiting non-zero makes torchrun (or any
        # launcher watching its children) end the other ranks.
        os._exit(code)

    def world_ranks(self) -> Optional[List[int]]:
        return list(self.ranks)

    def free(self, settled: bool = True) -> None:
        # Shut down whether settled or not: a later group never receives a shut-down group's
        # messages (each group has its own store prefix and connections).
        if self.freed:
            return
        self.freed = True
        self.control.shutdown()
        if self.owns_device_group:
            self.device_group.shutdown()
        # Dropped only now, on this thread: the tensors over this process's buffers must not
        # lose their last reference on a gloo thread, which needs the interpreter to release
        # the buffer and aborts the process if it is exiting.
        self._sends.clear()
        self._last_send = []
        self._last_work = None
        self._owners = (None, None)
        self._views = (EMPTY, EMPTY)


# Private groups still open when the interpreter exits are shut down first: left to the
# interpreter's teardown, a gloo backend can be destroyed with its threads still joinable, and
# the process aborts ("terminate called without an active exception") after the job finished.
_OPEN: "weakref.WeakSet[TorchTransport]" = weakref.WeakSet()


_EXIT_DRAIN_S = 10.0  # how long an exiting process waits for its sends in flight, at most


def _shut_down_at_exit() -> None:
    # A rank that sends its last message and exits would drop it with its groups (torch's own
    # send waits for it): sends still in flight get a bounded wait first.
    deadline = time.monotonic() + _EXIT_DRAIN_S
    for transport in list(_OPEN):
        for work, _ in transport._sends:
            try:
                wait_work(work, deadline)
            except Exception:  # the receiver is gone or late: nothing left to report to
                break
    for transport in list(_OPEN):
        try:
            transport.free()
        except Exception:  # the process is exiting: nothing left to report to
            pass


atexit.register(_shut_down_at_exit)


register_internal(__file__)
