"""The torch.distributed transport: raw byte collectives over a private gloo group.

It moves bytes and knows nothing of envelopes (the protocol in ``_protocol`` does the rest), so a
``TypedComm.from_torch`` behaves exactly like one over MPI. Two groups per communicator:

* ``control``: a private gloo group over the same ranks, created here. Every object collective
  and every envelope of a CPU tensor collective travels on it, as uint8 CPU tensors viewed
  zero-copy over the protocol's bytearrays (``torch.frombuffer``): one ``all_gather_single`` per
  typed collective in steady state, never ``all_gather_object``, never pickle. Private, like the
  MPI transport's ``Dup``, so typed traffic never pairs with the caller's own collectives. Gloo
  even when the user's group is NCCL: object payloads are CPU bytes, and copying them to the GPU
  and back would cost two copies and a host sync per call for nothing.
* ``group``: the caller's group (NCCL, gloo, or a mixed "cpu:gloo,cuda:nccl" group). Tensor
  payloads and the device-side envelopes of CUDA tensor collectives (``_tensor``) travel on it.

Deadlines: without one, the blocking torch call; with one, ``async_op=True`` and
``Work.wait(timeout)`` (gloo raises once the time is up and leaves the work pending), raising
:class:`TransportTimeout`. Polling ``is_completed()`` was measured slower on the 2-core dev
machine (2.8 ms against 1.1 ms per 256-byte gather): the spinning thread starves gloo's own.
"""

from __future__ import annotations

import inspect
import os
import socket
import time
from datetime import timedelta
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ._callsite import register_internal
from ._payloads import reduce_values
from ._transport import TransportTimeout

# torch 2.13 renamed the fused-tensor collectives and deprecates the old names with a
# FutureWarning (an error under pytest's filterwarnings); torch 2.11 (the device image) has only
# the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
              "prod": dist.ReduceOp.PRODUCT}
# numpy dtypes gloo reduces natively; others (uint16/32/64) are gathered and reduced in numpy.
_GLOO_REDUCIBLE = frozenset("?bBhilqefdFD") - {"H", "I", "L", "Q"}
_SORT_RANKS = "sort_ranks" in inspect.signature(dist.new_group).parameters
_EMPTY = torch.empty(0, dtype=torch.uint8)


def u8(buf: Any) -> torch.Tensor:
    """A uint8 CPU tensor over ``buf``'s memory: no copy for writable buffers (bytearrays).

    Read-only ones (bytes) are copied first: torch tensors are always writable, and torch warns
    on a read-only view. torch.frombuffer refuses empty buffers.
    """
    if not len(buf):
        return _EMPTY
    if memoryview(buf).readonly:
        buf = bytearray(buf)
    return torch.frombuffer(buf, dtype=torch.uint8)


def wait_work(work: Any, deadline: Optional[float]) -> None:
    """Wait for an async torch collective; TransportTimeout once ``deadline`` has passed."""
    if deadline is None:
        work.wait()
        return
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0 and not work.is_completed():
            raise TransportTimeout()
        work.wait(timeout=timedelta(seconds=max(remaining, 1e-3)))
    except RuntimeError as exc:
        # Gloo reports a timeout as a RuntimeError; anything else (a peer died) is a real error.
        if not work.is_completed() and time.monotonic() >= deadline - 1e-3:
            raise TransportTimeout() from exc
        raise


def group_name(group: Any) -> str:
    """``WORLD`` for the default group, else ``group[0,2,5]`` (its global ranks)."""
    if group is None or group is dist.group.WORLD:
        return "WORLD"
    ranks = dist.get_process_group_ranks(group)
    return "group[" + ",".join(map(str, ranks)) + "]"


def _new_group(ranks: List[int], backend: Optional[str]) -> Any:
    # Local synchronisation: only the members call, so subgroups and splits work without the
    # whole world taking part; unsorted, so a split's key order is the new rank order.
    kwargs = {"sort_ranks": False} if _SORT_RANKS else {}
    return dist.new_group(ranks, backend=backend, use_local_synchronization=True, **kwargs)


class TorchTransport:
    """Byte collectives over a private gloo group; ``group`` carries tensor payloads."""

    kind = "torch"

    def __init__(self, group: Any, control: Any) -> None:
        self.group = group
        self.control = control
        self.rank = dist.get_rank(control)
        self.size = dist.get_world_size(control)
        self.ranks = dist.get_process_group_ranks(control)
        self._owners: Tuple[Any, Any] = (None, None)
        self._views: Tuple[torch.Tensor, torch.Tensor] = (_EMPTY, _EMPTY)

    def _slot_views(self, send: bytearray, recv: bytearray) -> Tuple[torch.Tensor, torch.Tensor]:
        # The protocol keeps one pair of slot bytearrays until the slot size changes, each
        # pinned by a memoryview (so it cannot be resized under a tensor view of it): the views
        # are made once per pair, not per call.
        owners = self._owners
        if send is not owners[0] or recv is not owners[1]:
            self._views = (u8(send), u8(recv))
            self._owners = (send, recv)
        return self._views

    def allgather_slots(self, send: bytearray, recv: bytearray) -> None:
        send_t, recv_t = self._slot_views(send, recv)
        all_gather_single(recv_t, send_t, group=self.control)

    def allgather_slots_until(self, send: bytearray, recv: bytearray, deadline: float) -> None:
        send_t, recv_t = self._slot_views(send, recv)
        wait_work(all_gather_single(recv_t, send_t, group=self.control, async_op=True), deadline)

    def _padded_gather(self, send: bytes, width: int, deadline: Optional[float]) -> torch.Tensor:
        # Gloo gathers equal sizes only: pad every contribution to the largest count, which every
        # rank knows (the counts come from headers all ranks have seen).
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[:len(send)] = u8(send)
        out = torch.empty(width * self.size, dtype=torch.uint8)
        work = all_gather_single(out, padded, group=self.control, async_op=deadline is not None)
        if deadline is not None:
            wait_work(work, deadline)
        return out

    def allgatherv(self, send: bytes, counts: List[int],
                   deadline: Optional[float] = None) -> bytearray:
        width = max(counts)
        if width == 0:
            return bytearray()
        if width == min(counts):
            recv = bytearray(width * self.size)
            work = all_gather_single(u8(recv), u8(send), group=self.control,
                                     async_op=deadline is not None)
            if deadline is not None:
                wait_work(work, deadline)
            return recv
        rows = self._padded_gather(send, width, deadline).view(self.size, width)
        return bytearray(b"".join(rows[r, :c].numpy().tobytes() for r, c in enumerate(counts)))

    def gatherv(self, send: bytes, counts: List[int], root: int,
                deadline: Optional[float] = None) -> Optional[bytearray]:
        width = max(counts)
        if width == 0:
            return bytearray() if self.rank == root else None
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[:len(send)] = u8(send)
        rows = ([torch.empty(width, dtype=torch.uint8) for _ in range(self.size)]
                if self.rank == root else None)
        work = dist.gather(padded, rows, dst=self.ranks[root], group=self.control,
                           async_op=deadline is not None)
        if deadline is not None:
            wait_work(work, deadline)
        if rows is None:
            return None
        return bytearray(b"".join(rows[r][:c].numpy().tobytes() for r, c in enumerate(counts)))

    def bcast_bytes(self, buf: bytearray, root: int, deadline: Optional[float] = None) -> None:
        if not buf:
            return
        work = dist.broadcast(u8(buf), src=self.ranks[root], group=self.control,
                              async_op=deadline is not None)
        if deadline is not None:
            wait_work(work, deadline)

    def allreduce_array(self, arr: np.ndarray, op: str,
                        deadline: Optional[float] = None) -> np.ndarray:
        out = np.ascontiguousarray(arr).copy()
        if out.dtype.char not in _GLOO_REDUCIBLE or out.dtype.byteorder == ">":
            # Every rank gathers the same bytes and reduces them in rank order: the same result
            # everywhere, at the cost of size x the traffic (only dtypes gloo cannot reduce).
            raw = self.allgatherv(out.tobytes(), [out.nbytes] * self.size, deadline)
            parts = np.frombuffer(raw, dtype=out.dtype).reshape((self.size,) + out.shape)
            return reduce_values(list(parts), op)
        work = dist.all_reduce(torch.from_numpy(out), op=REDUCE_OPS[op], group=self.control,
                               async_op=deadline is not None)
        if deadline is not None:
            wait_work(work, deadline)
        return out

    def split(self, color: Optional[int], key: int) -> Optional["TorchTransport"]:
        # Every rank learns every (color, key); the members of each color then create their two
        # groups on their own (local synchronisation), ordered by (key, old rank) as in MPI.
        mine = np.array([-1 if color is None else color, key], dtype=np.int64)
        table = np.frombuffer(self.allgatherv(mine.tobytes(), [16] * self.size),
                              dtype=np.int64).reshape(self.size, 2)
        if color is None:
            return None
        members = sorted((int(table[r, 1]), r) for r in range(self.size)
                         if table[r, 0] == color)
        ranks = [self.ranks[r] for _, r in members]
        return self._derived(ranks)

    def dup(self) -> "TorchTransport":
        return self._derived(list(self.ranks))

    def _derived(self, ranks: List[int]) -> "TorchTransport":
        control = _new_group(ranks, "gloo")
        backend = dist.get_backend(self.group)
        group = control if backend == "gloo" else _new_group(ranks, None if ":" in backend
                                                             else backend)
        return TorchTransport(group, control)

    def abort(self, code: int = 1) -> None:
        # torch.distributed has no job-wide abort: exiting non-zero makes torchrun (or any
        # launcher watching its children) end the other ranks.
        os._exit(code)

    def free(self) -> None:
        if self.group is not self.control and self.group is not dist.group.WORLD:
            dist.destroy_process_group(self.group)
        dist.destroy_process_group(self.control)


def transport_for_group(group: Any = None) -> Tuple[TorchTransport, str]:
    """(transport, default name) for an initialised torch.distributed group (None: world)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expected an initialised torch.distributed process group "
                           "(call torch.distributed.init_process_group first)")
    pg = dist.group.WORLD if group is None else group
    if dist.get_rank(pg) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of "
                         f"{group_name(pg)}")
    ranks = dist.get_process_group_ranks(pg)
    control = _new_group(ranks, "gloo")
    return TorchTransport(pg, control), group_name(pg)


def free_port() -> int:
    """A free localhost TCP port, for launching test and benchmark process groups."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


register_internal(__file__)
