"""The messages and payloads the benchmarks move, built from the rank alone.

Every rank can rebuild what every other rank sent, so each method's result is checked before it
is timed. Each payload exists in three forms:

  typed   what typedcoll sends: a msgspec Struct, a list of ints, or a numpy array
  native  what executors send through pickle today: the same fields as a dict (lists and
          arrays as they are)
  floor   the bytes a raw ``Allgather`` moves for it: the array's own bytes, else the msgpack
          encoding of the typed value, so the floor moves what typedcoll's payload holds
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional

import msgspec
import msgspec.inspect as mi
import numpy as np


class RankState(msgspec.Struct):
    """The router's per-rank load: the 3-field record every small-message figure gathers.

    A plain (map-encoded) Struct, as an engine would first declare it; the executor's own
    ``typedcoll.executor.RankState`` is ``array_like``.
    """

    rank: int
    num_active_requests: int
    num_active_tokens: int


def rank_state(rank: int) -> RankState:
    return RankState(rank, 3 + rank, 17 * rank)


def example(name: str, t: Any, rank: int) -> Any:
    """A live-looking value for field ``name`` of type ``t`` on ``rank``.

    Magnitudes follow a serving engine's (memory in tens of GB, block counts in the thousands),
    so msgpack and pickle sizes are those of real messages rather than of one-byte ints.
    """
    if isinstance(t, mi.Metadata):
        return example(name, t.type, rank)
    if isinstance(t, mi.IntType):
        if "iter" in name:
            return 451_000 + rank
        if "bytes" in name or "mem" in name:
            return 61_000_000_000 + 1_000_003 * rank
        if "block" in name or "tokens" in name:
            return 27_655 - rank
        return 64 + rank
    if isinstance(t, mi.FloatType):
        return 37.25 + rank + len(name) / 64
    if isinstance(t, mi.BoolType):
        return rank % 2 == 1
    if isinstance(t, mi.StrType):
        return "12-01-2026 17:03:12.%06d" % rank
    if isinstance(t, mi.UnionType) and any(isinstance(x, mi.NoneType) for x in t.types):
        return None  # optional fields (an error text, say) are absent in the steady state
    if isinstance(t, (mi.VarTupleType, mi.ListType)):
        return () if isinstance(t, mi.VarTupleType) else []
    raise TypeError(f"no example value for field {name!r} of type {t!r}")


def iter_stats(rank: int) -> Any:
    """The executor's 26-field ``IterStats``, every field filled."""
    from typedcoll.executor import IterStats

    fields = mi.type_info(IterStats).fields  # type: ignore[attr-defined]
    return IterStats(**{f.name: example(f.name, f.type, rank) for f in fields})


def int_list(rank: int, n: int = 2048) -> List[int]:
    """``n`` token ids (below 2**17, as a vocabulary's): msgpack 1-5 bytes each."""
    return np.random.default_rng(1000 + rank).integers(0, 1 << 17, n).tolist()


def array(rank: int, nbytes: int) -> np.ndarray:
    """A float64 array of ``nbytes`` bytes, distinct per rank."""
    return np.random.default_rng(rank).standard_normal(max(1, nbytes // 8))


def same(a: Any, b: Any) -> bool:
    """Equal values, arrays compared element-wise with dtype and shape."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and bool(np.array_equal(a, b)))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def problem(got: Any, expected: List[Any], what: str) -> Optional[str]:
    """None when ``got`` equals ``expected`` (every rank's value, in rank order)."""
    if got is not None and same(list(got), expected):
        return None
    return f"{what}: expected every rank's {len(expected)} values, got {str(got)[:120]}"


class Payload(NamedTuple):
    """One payload kind: its name, how each rank builds its typed value, and the schema typed
    calls name (None: the value's own type)."""

    name: str
    build: Callable[[int], Any]
    schema: Any = None

    def typed(self, rank: int) -> Any:
        return self.build(rank)

    def native(self, rank: int) -> Any:
        value = self.build(rank)
        return msgspec.structs.asdict(value) if isinstance(value, msgspec.Struct) else value

    def floor(self, rank: int) -> bytes:
        value = self.build(rank)
        if isinstance(value, np.ndarray):
            return value.tobytes()
        return msgspec.msgpack.encode(value)


def _sized(nbytes: int) -> Callable[[int], np.ndarray]:
    return lambda rank: array(rank, nbytes)


PAYLOADS: List[Payload] = [
    Payload("RankState", rank_state),
    Payload("IterStats", iter_stats),
    Payload("2,048 ints", int_list, List[int]),
    Payload("8 B", _sized(8)),
    Payload("64 B", _sized(64)),
    Payload("512 B", _sized(512)),
    Payload("4 KiB", _sized(4 << 10)),
    Payload("64 KiB", _sized(64 << 10)),
    Payload("1 MiB", _sized(1 << 20)),
]
BY_NAME: Dict[str, Payload] = {p.name: p for p in PAYLOADS}
