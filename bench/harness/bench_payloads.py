"""The benchmark's payloads: the executor's control messages and three byte blobs.

Each payload exists in three forms, built deterministically from the rank alone so that every
rank can compute what every other rank must have sent (each method's result is checked before it
is timed):

  typed   what typedcoll sends: the executor's msgspec Struct (or ``bytes`` for the blobs)
  native  what executors send through pickle today: the same fields as a dict (``bytes`` for
          the blobs)
  raw     the byte count of the floor: the msgpack encoding of the typed value, so the raw
          collectives move exactly the bytes typedcoll's payload holds (blobs: their length)

The Structs are the executor's own (``typedcoll.executor._messages``) where that module exists;
otherwise local stand-ins with the fields of field notes §1. Field values are filled from each
field's type and name (``example``), so a renamed or added field in the executor's Structs
changes nothing here.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Tuple

import msgspec
import msgspec.inspect as mi
import numpy as np


class _TimeoutFlag(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Stand-in: the requests whose KV-cache transfer timed out on ``rank``."""

    rank: int
    iteration: int
    request_ids: Tuple[int, ...] = ()


class _RankState(msgspec.Struct, frozen=True, array_like=True):
    """Stand-in: the router's per-rank load (the 3-field record of the core issue)."""

    rank: int
    num_active_requests: int = 0
    num_active_tokens: int = 0


_ITER_STATS_FIELDS = (
    "iteration iter_latency_ms gpu_mem_usage_bytes cpu_mem_usage_bytes pinned_mem_usage_bytes "
    "num_active_requests num_queued_requests num_completed_requests max_num_active_requests "
    "max_batch_size max_num_tokens num_scheduled_requests num_context_requests "
    "num_generation_requests num_paused_requests num_ctx_tokens num_gen_tokens "
    "avg_decoded_tokens_per_iter max_num_blocks free_num_blocks used_num_blocks tokens_per_block "
    "alloc_total_blocks alloc_new_blocks reused_blocks kv_cache_hit_rate timestamp").split()
# Stand-in: the per-rank iteration statistics, 27 keys.
_IterStats = msgspec.defstruct(
    "IterStats",
    [(name, float if name in ("iter_latency_ms", "avg_decoded_tokens_per_iter",
                              "kv_cache_hit_rate") else str if name == "timestamp" else int)
     for name in _ITER_STATS_FIELDS],
    frozen=True, kw_only=True, array_like=True)

def _messages() -> Tuple[Any, Any, Any, str]:
    try:
        from .executor._messages import IterStats, RankState, TimeoutFlag
        return TimeoutFlag, RankState, IterStats, "typedcoll.executor._messages"
    except ImportError:
        # TODO(issue 7): drop the stand-ins once typedcoll.executor ships its messages for good.
        return _TimeoutFlag, _RankState, _IterStats, "local stand-ins (_bench_payloads.py)"


TimeoutFlag, RankState, IterStats, SOURCE = _messages()


def example(name: str, t: mi.Type, rank: int) -> Any:
    """A live-looking value for field ``name`` of type ``t`` on ``rank``.

    Magnitudes follow a serving engine's (memory in tens of GB, block counts in the thousands,
    request counts in the tens), so msgpack and pickle sizes are those of real messages rather
    than of small ints, which encode in one byte.
    """
    if isinstance(t, mi.Metadata):
        return example(name, t.type, rank)
    if isinstance(t, mi.BoolType):
        return rank % 2 == 1
    if isinstance(t, mi.IntType):
        if name == "rank":
            return rank
        if "iter" in name:
            return 451_000 + rank
        if "bytes" in name or "mem" in name:
            return 61_000_000_000 + 1_000_003 * rank
        if "block" in name or "tokens" in name:
            return 27_655 - rank
        return 64 + rank
    if isinstance(t, mi.FloatType):
        return 37.25 + rank + len(name) / 64
    if isinstance(t, mi.StrType):
        return "11-24-2026 17:03:12.%06d" % rank
    if isinstance(t, mi.UnionType) and any(isinstance(x, mi.NoneType) for x in t.types):
        return None  # optional fields (an error text, say) are absent in the steady state
    if isinstance(t, (mi.VarTupleType, mi.ListType)):
        return () if isinstance(t, mi.VarTupleType) else []  # e.g. no timed-out requests
    raise TypeError(f"no example value for field {name!r} of type {t!r}")


def filled(cls: Any) -> Callable[[int], Any]:
    fields = mi.type_info(cls).fields  # type: ignore[attr-defined]  # a StructType

    def build(rank: int) -> Any:
        return cls(**{f.name: example(f.name, f.type, rank) for f in fields})
    return build


def _blob(n: int) -> Callable[[int], bytes]:
    def build(rank: int) -> bytes:
        # Distinct per rank, so the pre-timing check proves each rank's bytes landed in its place.
        return np.random.default_rng(rank).bytes(n)
    return build


def _native(value: Any) -> Any:
    """What an executor pickles today for the same information: a dict of the fields."""
    if isinstance(value, msgspec.Struct):
        return msgspec.structs.asdict(value)
    return value


class Payload(NamedTuple):
    """One payload kind: a name and how each rank builds its typed value."""

    name: str
    build: Callable[[int], Any]

    def typed(self, rank: int) -> Any:
        return self.build(rank)

    def native(self, rank: int) -> Any:
        return _native(self.build(rank))

    def raw_size(self, rank: int) -> int:
        """Bytes of the floor's buffer: the msgpack size of the typed value (blob: its length)."""
        value = self.build(rank)
        return len(value) if isinstance(value, bytes) else len(msgspec.msgpack.encode(value))


PAYLOADS: List[Payload] = [
    Payload("TimeoutFlag", filled(TimeoutFlag)),
    Payload("RankState", filled(RankState)),
    Payload("IterStats", filled(IterStats)),
    Payload("4 KiB", _blob(4 << 10)),
    Payload("64 KiB", _blob(64 << 10)),
    Payload("1 MiB", _blob(1 << 20)),
]
PAYLOAD_NAMES = [p.name for p in PAYLOADS]
BY_NAME: Dict[str, Payload] = {p.name: p for p in PAYLOADS}
