"""The executor's control-plane messages, as msgspec Structs.

These are what an attention-DP serving engine exchanges between ranks once per iteration: each
rank's load for the request router, the KV-transfer timeouts of disaggregated serving, and the
per-rank iteration statistics. Hot and fixed-shape, so ``array_like`` (encoded as msgpack arrays,
no field names on the wire).
"""

from __future__ import annotations

from typing import Optional, Tuple

import msgspec


class RankState(msgspec.Struct, frozen=True, array_like=True):
    """One rank's load, gathered by the attention-DP router before it assigns new requests."""

    rank: int
    num_active_requests: int = 0
    num_active_tokens: int = 0


class TimeoutFlag(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """The requests whose KV-cache transfer timed out on ``rank`` since its last report."""

    rank: int
    iteration: int
    request_ids: Tuple[int, ...] = ()


class KvStatus(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A rank's vote in disaggregated serving: requests blocked on KV transfer, or an error."""

    num_blocked: int = 0
    error: Optional[str] = None


class IterStats(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Per-rank statistics of one executor iteration: the 26 keys the engine's stats dict had."""

    iteration: int
    iter_latency_ms: float = 0.0
    gpu_mem_usage_bytes: int = 0
    cpu_mem_usage_bytes: int = 0
    pinned_mem_usage_bytes: int = 0
    num_active_requests: int = 0
    num_queued_requests: int = 0
    num_completed_requests: int = 0
    max_num_active_requests: int = 0
    max_batch_size: int = 0
    max_num_tokens: int = 0
    num_scheduled_requests: int = 0
    num_context_requests: int = 0
    num_generation_requests: int = 0
    num_paused_requests: int = 0
    num_ctx_tokens: int = 0
    num_gen_tokens: int = 0
    avg_decoded_tokens_per_iter: float = 0.0
    max_num_blocks: int = 0
    free_num_blocks: int = 0
    used_num_blocks: int = 0
    tokens_per_block: int = 0
    alloc_total_blocks: int = 0
    alloc_new_blocks: int = 0
    reused_blocks: int = 0
    kv_cache_hit_rate: float = 0.0
