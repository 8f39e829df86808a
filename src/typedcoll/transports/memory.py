"""The in-memory transport: N ranks as threads of one process (``typedcoll.testing.run``).

Every backend operation is a rendezvous: each rank deposits its part under the operation's
number on its communicator and waits until all ranks have deposited, then reads what it needs.
Operations pair by position, exactly as MPI collectives do, so the protocol above behaves as it
does over MPI, errors included; only the speed differs. Point-to-point messages go through
per-(source, destination, tag) queues.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple, cast

import numpy as np

from ..codecs.reduce import reduce_values
from ..core.plumbing import register_internal
from ..core.transport import TransportTimeout, finish_gathered
from ..core.wire import MAX_SLOT


class World:
    """What the ranks of one in-memory job share."""

    _serials = itertools.count(1)  # a job's identity for the process's lifetime (ids get reused)

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"expected at least 1 rank, got {size}")
        self.serial = next(World._serials)
        self.size = size
        self.lock = threading.Condition()
        self.pending: Dict[Tuple[Any, int], Dict[int, Any]] = {}
        self.readers: Dict[Tuple[Any, int], int] = {}
        self.queues: Dict[Tuple[Any, int, int, int], Deque[bytes]] = {}
        self.contexts = itertools.count(1)
        self.aborted: Optional[int] = None
        self.notices: Dict[Any, List[Tuple[int, int]]] = {}  # context -> (rank, seq) given up

    def transports(self) -> List["MemoryTransport"]:
        """One transport per rank over the world communicator."""
        return [MemoryTransport(self, 0, list(range(self.size)), r) for r in range(self.size)]

    def _wait(self, predicate: Any, deadline: Optional[float]) -> None:
        while not predicate():
            if self.aborted is not None:
                raise RuntimeError(f"the job was aborted with code {self.aborted}")
            if deadline is None:
                self.lock.wait(0.5)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportTimeout()
            self.lock.wait(min(left, 0.5))

    def rendezvous(self, context: Any, number: int, rank: int, size: int, part: Any,
                   deadline: Optional[float]) -> Dict[int, Any]:
        """Deposit ``part`` and return every member's part once all ``size`` have deposited."""
        key = (context, number)
        with self.lock:
            parts = self.pending.setdefault(key, {})
            parts[rank] = part
            self.lock.notify_all()
            self._wait(lambda: len(parts) == size, deadline)
            self.readers[key] = self.readers.get(key, 0) + 1
            if self.readers[key] == size:  # the last reader frees the entry
                del self.pending[key]
                del self.readers[key]
            return parts


class MemoryTransport:
    """One rank's view of one in-memory communicator."""

    kind = "memory"
    max_slot = MAX_SLOT

    def __init__(self, world: World, context: Any, members: List[int], rank: int) -> None:
        self.world = world
        self.context = context
        self.members = members  # world ranks, in this communicator's rank order
        self.rank = rank
        self.size = len(members)
        self._number = 0

    def _all(self, part: Any, deadline: Optional[float]) -> Dict[int, Any]:
        number = self._number
        self._number += 1
        return self.world.rendezvous(self.context, number, self.rank, self.size, part, deadline)

    # --- the exchange and the variable-size collectives --------------------------------------
    def exchange(self, send: bytearray, recv: bytearray, block: bytearray, shape: int,
                 deadline: Optional[float]) -> None:
        parts = self._all(bytes(send), deadline)
        if deadline is not None and self.given_up():
            raise TransportTimeout()
        slot = len(send)
        for r in range(self.size):
            part = parts[r]
            # A peer with another slot size (a desync beyond repair) still meets us here; its
            # bytes are cut or padded, and the slot size in its header tells the verdict.
            recv[r * slot:(r + 1) * slot] = part[:slot].ljust(slot, b"\0")
        finish_gathered(recv, slot, self.size, block, shape)

    def allgatherv(self, send: bytes, counts: List[int],
                   deadline: Optional[float]) -> bytearray:
        parts = self._all(bytes(send), deadline)
        return bytearray(b"".join(parts[r][:counts[r]].ljust(counts[r], b"\0")
                                  for r in range(self.size)))

    def gatherv(self, send: bytes, counts: List[int], root: int,
                deadline: Optional[float]) -> Optional[bytearray]:
        parts = self._all(bytes(send), deadline)
        if self.rank != root:
            return None
        return bytearray(b"".join(parts[r][:counts[r]].ljust(counts[r], b"\0")
                                  for r in range(self.size)))

    def gather_parts(self, send: bytes, root: int,
                     deadline: Optional[float]) -> Optional[List[bytes]]:
        parts = self._all(bytes(send), deadline)
        return [parts[r] for r in range(self.size)] if self.rank == root else None

    def scatter_parts(self, parts: Optional[List[bytes]], root: int,
                      deadline: Optional[float]) -> bytes:
        deposited = self._all(list(parts) if self.rank == root and parts is not None else None,
                              deadline)
        sent = deposited[root]
        return bytes(sent[self.rank]) if sent is not None and self.rank < len(sent) else b""

    def alltoall_parts(self, parts: Optional[List[bytes]],
                       deadline: Optional[float]) -> List[bytes]:
        mine = [bytes(x) for x in parts] if parts is not None else [b""] * self.size
        deposited = self._all(mine, deadline)
        return [deposited[r][self.rank] for r in range(self.size)]

    def bcast_bytes(self, buf: bytearray, root: int, deadline: Optional[float]) -> None:
        parts = self._all(bytes(buf) if self.rank == root else None, deadline)
        buf[:] = parts[root][:len(buf)]

    def allreduce_array(self, array: np.ndarray, op: str,
                        deadline: Optional[float]) -> np.ndarray:
        parts = self._all(np.ascontiguousarray(array).copy(), deadline)
        return cast(np.ndarray, reduce_values([parts[r] for r in range(self.size)], op))

    # --- point to point --------------------------------------------------------------------
    def send_bytes(self, data: bytes, dest: int, tag: int,
                   deadline: Optional[float] = None) -> None:
        world = self.world
        with world.lock:
            world.queues.setdefault((self.context, self.rank, dest, tag), deque()).append(
                bytes(data))
            world.lock.notify_all()

    def recv_bytes(self, source: int, tag: int, deadline: Optional[float]) -> bytes:
        world = self.world
        key = (self.context, source, self.rank, tag)
        with world.lock:
            queue = world.queues.setdefault(key, deque())
            world._wait(lambda: bool(queue), deadline)
            return queue.popleft()

    # --- communicators ----------------------------------------------------------------------
    def split(self, color: Optional[int], key: int) -> Optional["MemoryTransport"]:
        number = self._number
        table = self._all((color, key), None)
        if color is None:
            return None
        members = sorted((table[r][1], r) for r in range(self.size) if table[r][0] == color)
        ranks = [r for _, r in members]
        context = (self.context, number, color)
        return MemoryTransport(self.world, context, [self.members[r] for r in ranks],
                               ranks.index(self.rank))

    def dup(self) -> "MemoryTransport":
        number = self._number
        self._all(None, None)
        return MemoryTransport(self.world, (self.context, number, "dup"), self.members,
                               self.rank)

    def abort(self, code: int = 1) -> None:
        with self.world.lock:
            self.world.aborted = code
            self.world.lock.notify_all()
        raise SystemExit(code)

    def free(self, settled: bool = True) -> None:
        pass

    def world_ranks(self) -> Optional[List[int]]:
        return list(self.members)

    # A rank that gave up left its part deposited, so a late rank completes the call from it
    # (as over MPI): it must find the notice and fail the call too.
    def give_up(self, seq: int, failure: str) -> None:
        with self.world.lock:
            self.world.notices.setdefault(self.context, []).append((self.rank, seq))

    def given_up(self) -> List[Tuple[int, int]]:
        with self.world.lock:
            return [n for n in self.world.notices.get(self.context, []) if n[0] != self.rank]

    def failed_in(self) -> List[Tuple[int, int]]:
        return []


register_internal(__file__)
