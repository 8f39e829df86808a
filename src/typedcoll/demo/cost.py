"""Control-plane cost per iteration: one collective per channel against one coalesced flush.

Three ways to move one iteration's control plane (the router's rank states, the timeouts and the
iteration stats; every rank posts every message, the largest payload an iteration can have):
  per_channel_pickle  the engine's fix as shipped (it adds no collectives, but still costs one
                      per drained channel per iteration): three mpi4py ``comm.allgather(obj)``
                      calls of pickled Python objects, the rank state as a field list decoded
                      ``RankState(*fields)``, the timeout vote as ``bool(timed_out_requests)``
                      (the engine votes a bool; the other methods carry the request ids), the
                      stats as the engine's 26-key dict
  per_channel         the same three channels over typed collectives (``TypedComm.allgather``,
                      None where a rank has nothing): what is left is the coalescing alone
  flush               three ``SymmetricFlush.post`` calls and one ``flush`` collective
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgspec

from .._comm import TypedComm
from ..executor import SymmetricFlush
from ..executor.messages import InflightBatchingStats, IterStats, KvCacheStats, RankState, \
    TimeoutFlag
from .backends import RankState as EngineRankState
from .backends import engine_dict

CHANNELS = {"rank_state": RankState, "timeouts": TimeoutFlag, "iter_stats": IterStats}


def _messages(rank: int, it: int) -> Tuple[RankState, TimeoutFlag, IterStats]:
    return (RankState(rank, 5 + rank, 311 + rank),
            TimeoutFlag(rank=rank, iteration=it, request_ids=(it * 1000 + 901, it * 1000 + 902)),
            IterStats(timestamp="11-26-2026 10:15:02", iteration=it, iter_latency_ms=13.75,
                      num_active_requests=5 + rank, max_num_active_requests=8,
                      max_batch_size_static=8, max_batch_size_runtime=8,
                      max_num_tokens_static=8192, max_num_tokens_runtime=8192,
                      gpu_mem_usage=43 << 30, cpu_mem_usage=6 << 30, pinned_mem_usage=1 << 30,
                      kv_cache_stats=KvCacheStats(max_num_blocks=4096, free_num_blocks=4000,
                                                  used_num_blocks=96, tokens_per_block=32),
                      inflight_batching_stats=InflightBatchingStats(
                          num_scheduled_requests=5, num_gen_requests=5,
                          avg_num_decoded_tokens_per_iter=1.0),
                      host_step_time_ms=11.0, prev_device_step_time_ms=9.5, rank=rank))


def methods(comm: TypedComm, pickle_comm: Any = None) -> Dict[str, Callable[[int], None]]:
    """``{name: f}``: each call does one iteration's control plane. ``pickle_comm`` (an mpi4py
    communicator) adds the engine's pickle-based fix; without one it is left out."""
    flush = SymmetricFlush(comm, CHANNELS)
    state, flag, stats = _messages(comm.rank, 0)
    state_fields = list(msgspec.structs.astuple(state))
    any_timed_out = bool(flag.request_ids)
    stats_dict = engine_dict(stats)

    def per_channel_pickle(it: int) -> None:
        [EngineRankState(*fields) for fields in pickle_comm.allgather(state_fields)]
        any(pickle_comm.allgather(any_timed_out))
        pickle_comm.allgather(stats_dict)

    def per_channel(it: int) -> None:
        comm.allgather(state, step=it)
        comm.allgather(flag, schema=Optional[TimeoutFlag], step=it)
        comm.allgather(stats, schema=Optional[IterStats], step=it)

    def coalesced(it: int) -> None:
        flush.post("rank_state", state)
        flush.post("timeouts", flag)
        flush.post("iter_stats", stats)
        flush.flush(step=it)

    fns: Dict[str, Callable[[int], None]] = {"per_channel": per_channel, "flush": coalesced}
    if pickle_comm is not None:
        fns = {"per_channel_pickle": per_channel_pickle, **fns}
    return fns


def measure(comm: TypedComm, rounds: int = 7, iters: int = 300, warmup: int = 50,
            pickle_comm: Any = None) -> Dict[str, float]:
    """Medians over interleaved rounds of each round's mean µs per iteration, slowest rank.

    ``ratio`` is flush / per_channel (typed, the coalescing alone); with ``pickle_comm`` also
    ``ratio_pickle``, flush / the engine's pickle-based per-channel fix.
    """
    fns = methods(comm, pickle_comm)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for i in range(warmup):
                fn(i)
            comm.barrier()
            t0 = time.perf_counter()
            for i in range(iters):
                fn(i)
            samples[name].append((time.perf_counter() - t0) / iters * 1e6)
    # The slowest rank's median: a collective costs what its last arrival waits.
    out = {f"{name}_us": max(comm.allgather(statistics.median(v), schema=float))
           for name, v in samples.items()}
    out["ratio"] = out["flush_us"] / out["per_channel_us"]
    if pickle_comm is not None:
        out["ratio_pickle"] = out["flush_us"] / out["per_channel_pickle_us"]
    out["per_channel_collectives"] = 3
    out["flush_collectives"] = 1
    return out
