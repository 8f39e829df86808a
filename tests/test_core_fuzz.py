"""Hostile peers: whatever bytes they send, only typedcoll's own errors come out.

One real rank runs the protocol over a transport whose peers are attackers: their slots, their
agreement-block contributions, their phase-2 payloads and their envelope descriptions are random
or mutations of what an honest peer would send (deep nesting, lying lengths, strange flags). A
collective must return or raise a ``typedcoll.CollectiveError``: never msgspec's errors,
RecursionError, IndexError, struct.error, UnicodeDecodeError, numpy's. Run with and without a
timeout, and in CI's pure-Python leg. Seeds are fixed.
"""

from __future__ import annotations

import random
from typing import Any, List, Optional

import msgspec
import numpy as np
import pytest

import typedcoll as tc
from typedcoll._comm import TypedComm
from typedcoll.core.channel import Channel
from typedcoll.core.transport import finish_gathered
from typedcoll.core.wire import FLAGS_OFFSET, HEADER_SIZE, LENGTH_OFFSET, MAX_SLOT

MAX_CLAIM = 1 << 16  # lengths a peer announces stay allocatable: decoding is under test


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int = 0


def nasty(rng: random.Random, n: int) -> bytes:
    """Bytes a hostile peer sends as a payload: noise, deep nesting or lying msgpack."""
    choice = rng.random()
    if choice < 0.3:
        return rng.randbytes(n)
    if choice < 0.5:
        return b"\x91" * n + b"\x00"  # nested as deep as it is long
    if choice < 0.7:
        return b"\xdd\xff\xff\xff\xff" + rng.randbytes(n)  # an array claiming 4 billion items
    if choice < 0.85:
        return b"\xc7" + bytes([255]) + rng.randbytes(n)  # an ext of 255 bytes that are not there
    return msgspec.msgpack.encode({"rank": "x" * n})


class Hostile:
    """Rank 0 is us; ranks 1.. echo our header, then lie."""

    kind = "hostile"
    max_slot = MAX_SLOT

    def __init__(self, size: int, seed: int, mode: str) -> None:
        self.rank, self.size = 0, size
        self.rng = random.Random(seed)
        self.mode = mode
        self.armed = False  # honest during creation: decoding is under test, not set-up

    def exchange(self, send: bytearray, recv: bytearray, block: bytearray, shape: int,
                 deadline: Optional[float]) -> None:
        slot = len(send)
        for r in range(self.size):
            recv[r * slot:(r + 1) * slot] = send
        if self.armed:
            for r in range(1, self.size):
                self._lie(recv, r * slot, slot)
        finish_gathered(recv, slot, self.size, block, shape)
        if self.armed and self.mode == "block":
            block[:] = self.rng.randbytes(len(block))

    def _lie(self, recv: bytearray, offset: int, slot: int) -> None:
        rng, mode = self.rng, self.mode
        if mode in ("payload", "block"):
            n = rng.randrange(0, slot - HEADER_SIZE + 1)
            data = nasty(rng, n)[:slot - HEADER_SIZE]
            recv[offset + HEADER_SIZE:offset + HEADER_SIZE + len(data)] = data
            recv[offset + LENGTH_OFFSET:offset + HEADER_SIZE] = len(data).to_bytes(4, "little")
        elif mode == "length":
            recv[offset + LENGTH_OFFSET:offset + HEADER_SIZE] = rng.randrange(
                0, MAX_CLAIM).to_bytes(4, "little")
        elif mode == "flags":
            recv[offset + FLAGS_OFFSET] = rng.randrange(256)
        elif mode == "header":
            recv[offset:offset + HEADER_SIZE] = rng.randbytes(HEADER_SIZE)
            recv[offset + LENGTH_OFFSET:offset + HEADER_SIZE] = rng.randrange(
                0, MAX_CLAIM).to_bytes(4, "little")

    def _phase2(self, n: int) -> bytearray:
        k = min(n, MAX_CLAIM)  # the rest stays zero: allocating it is not what is under test
        return bytearray(nasty(self.rng, k)[:k].ljust(n, b"\0"))

    def allgatherv(self, send: bytes, counts: List[int], deadline: Any) -> bytearray:
        out = bytearray(send) if not self.armed else self._phase2(sum(counts) - len(send))
        return bytearray(send) + out if self.armed else out

    def gatherv(self, send: bytes, counts: List[int], root: int, deadline: Any) -> Any:
        return bytearray(send) + self._phase2(sum(counts) - len(send))

    def gather_parts(self, send: bytes, root: int, deadline: Any) -> List[bytes]:
        return [send] + [nasty(self.rng, 40) for _ in range(self.size - 1)]

    def scatter_parts(self, parts: Any, root: int, deadline: Any) -> bytes:
        return nasty(self.rng, 40)

    def alltoall_parts(self, parts: Any, deadline: Any) -> List[bytes]:
        return [nasty(self.rng, 40) for _ in range(self.size)]

    def bcast_bytes(self, buf: bytearray, root: int, deadline: Any) -> None:
        buf[:] = self._phase2(len(buf))

    def allreduce_array(self, array: np.ndarray, op: str, deadline: Any) -> np.ndarray:
        return array.copy()

    def split(self, color: Any, key: Any) -> None:
        return None

    def dup(self) -> "Hostile":
        return self

    def free(self) -> None:
        pass


CALLS = {
    "allgather": lambda c: c.allgather(RankState(0)),
    "allgather big": lambda c: c.allgather(list(range(3000))),
    "allgather array": lambda c: c.allgather(np.arange(4)),
    "allgather array past the slot": lambda c: c.allgather(np.arange(3000)),
    "gather": lambda c: c.gather(RankState(0), 0),
    "bcast": lambda c: c.bcast(RankState(0), 0),
    "bcast without schema": lambda c: c.bcast(None, 1),
    "allreduce": lambda c: c.allreduce(3),
    "allreduce array": lambda c: c.allreduce(np.arange(4)),
    "scatter": lambda c: c.scatter([RankState(r) for r in range(c.size)], 0),
    "scatter from a peer": lambda c: c.scatter(None, 1, schema=RankState),
    "scatter from a peer without schema": lambda c: c.scatter(None, 1),
    "alltoall of strings": lambda c: c.alltoall(["x" * 30] * c.size),
    "alltoall": lambda c: c.alltoall([r for r in range(c.size)]),
    "barrier": lambda c: c.barrier(),
}


@pytest.mark.parametrize("timeout", [None, 30.0])
@pytest.mark.parametrize("mode", ["payload", "length", "flags", "header", "block"])
def test_hostile_peers_only_cause_typedcoll_errors(mode, timeout):
    for seed in range(40):
        transport = Hostile(3, seed, mode)
        comm = TypedComm._over(Channel(transport, "fuzz"), "fuzz", timeout)
        transport.armed = True
        for label, call in CALLS.items():
            try:
                call(comm)
            except tc.CollectiveError:
                pass
            except Exception as exc:  # the failure under test
                raise AssertionError(f"seed {seed}, {mode}, {label}: {type(exc).__name__}: "
                                     f"{exc}") from exc
