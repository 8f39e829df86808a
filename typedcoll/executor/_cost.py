"""Control-plane cost per iteration: one collective per channel against one coalesced flush.

Both sides move the same messages with typed collectives, so the difference is the coalescing
alone: the per-channel fix (field notes §1: "no new collectives; the fix still costs one
collective per drained channel per iteration") gathers the router's rank states, the timeouts and
the iteration stats in three ``allgather`` calls (None where a rank has nothing); the
SymmetricFlush posts all three and drains them in one ``flush``. Every rank posts every message,
the largest payload an iteration can have.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

from .._comm import TypedComm
from ._flush import SymmetricFlush
from ._messages import IterStats, RankState, TimeoutFlag

CHANNELS = {"rank_state": RankState, "timeouts": TimeoutFlag, "iter_stats": IterStats}


def _messages(rank: int, it: int):
    return (RankState(rank, 5 + rank, 311 + rank),
            TimeoutFlag(rank=rank, iteration=it, request_ids=(it * 1000 + 901, it * 1000 + 902)),
            IterStats(iteration=it, iter_latency_ms=13.75, gpu_mem_usage_bytes=43 << 30,
                      cpu_mem_usage_bytes=6 << 30, num_active_requests=5 + rank,
                      num_scheduled_requests=5, num_generation_requests=5, num_gen_tokens=5,
                      max_batch_size=8, max_num_tokens=8192, max_num_blocks=4096,
                      free_num_blocks=4000, used_num_blocks=96, tokens_per_block=32,
                      avg_decoded_tokens_per_iter=1.0))


def methods(comm: TypedComm) -> Dict[str, Callable[[int], None]]:
    """``{"per_channel": f, "flush": g}``: each call does one iteration's control plane."""
    flush = SymmetricFlush(comm, CHANNELS)
    state, flag, stats = _messages(comm.rank, 0)

    def per_channel(it: int) -> None:
        comm.allgather(state, step=it)
        comm.allgather(flag, schema=Optional[TimeoutFlag], step=it)
        comm.allgather(stats, schema=Optional[IterStats], step=it)

    def coalesced(it: int) -> None:
        flush.post("rank_state", state)
        flush.post("timeouts", flag)
        flush.post("iter_stats", stats)
        flush.flush(step=it)

    return {"per_channel": per_channel, "flush": coalesced}


def measure(comm: TypedComm, rounds: int = 7, iters: int = 300,
            warmup: int = 50) -> Dict[str, float]:
    """Medians over interleaved rounds of each round's mean µs per iteration, slowest rank."""
    fns = methods(comm)
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
    out["per_channel_collectives"] = 3
    out["flush_collectives"] = 1
    return out
