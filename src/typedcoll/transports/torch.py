"""The torch.distributed transport: byte operations over a private gloo group.

Channels. ``channel_for_group(group)`` returns the group's private channel, made once per group
and shared by every TypedComm built over it (constructing thousands costs one gloo group), and
freed with the last TypedComm that frees it. The private group is a gloo backend that this
module constructs itself over a store prefix of its own, not a ``dist.new_group``: that one would
name its store keys after how many groups the process already holds (which differs between
ranks once a split left some of them out, and repeats after a group is destroyed), and would
join torch's registry of groups, which the caller's own later ``new_group`` calls depend on.
The prefix is ``typedcoll/<group name>/<n>``, ``n`` counted in the store itself: every member
adds 1 before it connects, and no member connects the next group before every member has
added for this one, so all read the same ``n``. ``split`` and ``dup`` derive their prefixes
from their parent's (the derived groups are made in the same order on every rank).

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
import math
import weakref

import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (AllgatherOptions, AllreduceOptions, AllToAllOptions,
                                        BroadcastOptions, GatherOptions, ReduceScatterOptions,
                                        ScatterOptions)
from torch.distributed import distributed_c10d as c10d

from ..codecs.reduce import reduce_values
from ..core.channel import Channel
from ..core.identity import register_internal
from ..core.transport import finish_gathered
from ..core.wire import MAX_SLOT
from .gloo import (EMPTY, connect_bound, group_name, make_gloo, make_nccl, options, post, u8,
                   wait_work)

# torch 2.13 renamed the fused-tensor collectives and deprecates the old names with a
# FutureWarning; torch 2.11 has only the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


TORCH_OPS = {"sum": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT, "max": dist.ReduceOp.MAX,
             "min": dist.ReduceOp.MIN, "band": dist.ReduceOp.BAND, "bor": dist.ReduceOp.BOR,
             "bxor": dist.ReduceOp.BXOR}
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


STORE_LOST_S = 1.0  # how long the store may fail to answer before a waiting rank gives up


class TorchTransport:
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

    # --- tensors (the tensor layer's host path) ------------------------------------------------
    def all_gather_tensor(self, out: torch.Tensor, src: torch.Tensor,
                          deadline: Optional[float]) -> None:
        self._wait(self.control._allgather_base(_bytes_of(out), _bytes_of(src),
                                               options(AllgatherOptions, deadline)),
                  deadline)

    def all_reduce_tensor(self, tensor: torch.Tensor, op: str,
                          deadline: Optional[float]) -> None:
        opts = options(AllreduceOptions, deadline)
        opts.reduceOp = TORCH_OPS[op]
        target = torch.view_as_real(tensor) if tensor.is_complex() else tensor
        self._wait(self.control.allreduce([target], opts), deadline)

    def broadcast_tensor(self, tensor: torch.Tensor, root: int,
                         deadline: Optional[float]) -> None:
        opts = options(BroadcastOptions, deadline)
        opts.rootRank = root
        self._wait(self.control.broadcast([_bytes_of(tensor)], opts), deadline)

    def reduce_scatter_tensor(self, out: torch.Tensor, src: torch.Tensor, op: str,
                              deadline: Optional[float]) -> None:
        opts = options(ReduceScatterOptions, deadline)
        opts.reduceOp = TORCH_OPS[op]
        if src.is_complex():
            out, src = torch.view_as_real(out), torch.view_as_real(src)
        self._wait(self.control._reduce_scatter_base(out, src, opts), deadline)

    def all_to_all_tensor(self, out: torch.Tensor, src: torch.Tensor,
                          deadline: Optional[float], receives: Optional[List[int]] = None,
                          sends: Optional[List[int]] = None) -> None:
        """Block j of ``src`` to rank j, rank j's block for this rank into block j of ``out``:
        equal blocks along dim 0, or ``sends``/``receives`` rows to and from each rank."""
        row = math.prod(src.shape[1:]) * src.element_size()
        counts = ([], []) if sends is None or receives is None else \
            ([n * row for n in receives], [n * row for n in sends])
        self._wait(self.control.alltoall_base(_bytes_of(out), _bytes_of(src), counts[0],
                                              counts[1], options(AllToAllOptions, deadline)),
                   deadline)

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
        wait_work(post(self.control.recv, [length], source, tag), deadline)
        buf = bytearray(int(length[0]))
        if buf:
            self._last_work = post(self.control.recv, [u8(buf)], source, tag)
            wait_work(self._last_work, deadline)
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
        return TorchTransport(make_gloo(self.base_store, prefix, rank, size, self.connect_s, tag),
                              [self.ranks[r] for r in members], self.base_store, prefix, device,
                              owns_device_group=device is not None, connect_s=self.connect_s)

    def abort(self, code: int = 1) -> None:
        # torch.distributed has no job-wide abort: exiting non-zero makes torchrun (or any
        # launcher watching its children) end the other ranks.
        os._exit(code)

    def world_ranks(self) -> Optional[List[int]]:
        return list(self.ranks)

    # Giving up. A gloo operation that timed out closes its connections, so a late rank cannot
    # complete it: it fails in the backend instead, and there is no notice to look for after a
    # completed call. A failure of the backend is reported to the peers through the channel's
    # store (the counter "failed", then "failed/<rank>": what this rank's backend said), which
    # every collective waiting on this channel reads between slices of its wait (``_wait``).
    #
    # A timeout is not reported to the waits (each rank reports its own, naming whom it waited
    # for), but its notice ("gave_up/<rank>": the call number) is kept: a slow peer that arrives
    # later finds its call failed by the closed connections, as if this rank had died, and the
    # notice tells it that this rank gave up instead (``given_up``, read when a call ends unmet).
    def give_up(self, seq: int, failure: str) -> None:
        try:
            if not failure:
                self.store.set(f"gave_up/{self.rank}", str(seq))
                return
            self.store.set(f"failed/{self.rank}", f"collective #{seq}: {failure}")
            self.store.add("failed", 1)
        except Exception:  # the store died with its rank: the peers' own waits end theirs
            pass

    def given_up(self) -> List[Tuple[int, int]]:
        found = []
        try:
            for peer in range(self.size):
                key = f"gave_up/{peer}"
                if peer != self.rank and self.store.check([key]):
                    found.append((peer, int(self.store.get(key))))
        except Exception:  # the store is gone: no notice can be read, the failure stands
            pass
        return found

    def _peer_failure(self) -> str:
        try:
            failed = int(self.store.add("failed", 0))
            self._store_lost_at = None
            if failed == 0:
                return ""
            for peer in range(self.size):
                key = f"failed/{peer}"
                if peer != self.rank and self.store.check([key]):
                    return f"rank {peer} reported {self.store.get(key).decode(errors='replace')}"
        except Exception as exc:
            # The store died with the rank that hosted it (tcp:// and env:// host it on rank
            # 0). gloo fails a call only on the ranks that exchange with the dead one; a rank
            # whose neighbours are alive would wait for them until they exit: a store that
            # stays unreachable is that failure.
            now = time.monotonic()
            if self._store_lost_at is None:
                self._store_lost_at = now
            elif now - self._store_lost_at >= STORE_LOST_S:
                return (f"the job's store has not answered for {now - self._store_lost_at:.1f} s "
                        f"(the rank that hosted it, rank 0 under tcp:// or env://, is gone?): "
                        f"{type(exc).__name__}: {exc}")
        return ""

    def _wait(self, work: Any, deadline: Optional[float]) -> None:
        wait_work(work, deadline, self._peer_failure)
        self._last_work = work

    def free(self) -> None:
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


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as flat uint8: moving bytes works for every dtype."""
    return tensor.reshape(-1).view(torch.uint8)


_CHANNELS: Dict[int, Tuple[Any, Channel]] = {}


def channel_for_group(group: Any = None, timeout: Optional[float] = None) -> Channel:
    """The private channel of ``group`` (None: the world): made by the first TypedComm over
    it (connecting within ``connect_bound(timeout, group)``), then shared until its last user
    frees."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expected an initialised torch.distributed process group "
                           "(call torch.distributed.init_process_group first)")
    pg = dist.group.WORLD if group is None else group
    if pg is None or pg is dist.GroupMember.NON_GROUP_MEMBER or dist.get_rank(pg) < 0:
        raise ValueError(f"expected a group this process (global rank {dist.get_rank()}) is a "
                         f"member of, got {group!r}")
    cached = _CHANNELS.get(id(pg))
    if cached is not None and cached[0] is pg and cached[1].users > 0:
        return cached[1]
    store = c10d._get_default_store()
    size = dist.get_world_size(pg)
    count = store.add(f"typedcoll/{pg.group_name}/channels", 1)
    prefix = f"typedcoll/{pg.group_name}/{(count - 1) // size}"
    has_cuda = "nccl" in str(dist.get_backend(pg))
    connect_s = connect_bound(timeout, group)
    transport = TorchTransport(make_gloo(store, prefix, dist.get_rank(pg), size, connect_s,
                                     group_name(pg)),
                               dist.get_process_group_ranks(pg), store, prefix,
                               pg if has_cuda else None, owns_device_group=False,
                               connect_s=connect_s)
    channel = Channel(transport, group_name(pg))
    _CHANNELS[id(pg)] = (pg, channel)
    return channel


register_internal(__file__)
