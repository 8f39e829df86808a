"""The control-plane messages of an attention-DP serving engine, as msgspec Structs.

What the ranks of such an engine exchange once per iteration: each rank's load for the request
router, the blocked-request vote and the KV-transfer timeouts of disaggregated serving, and the
per-rank iteration statistics. Hot and fixed-shape, so ``array_like`` (msgpack arrays, no field
names on the wire).

:class:`IterStats` has the 26 keys of the engine's per-rank statistics dict: the 22 keys of its
``IterationStats`` JSON, then the two loop timings, the scheduler mode and the rank that the
executor adds before gathering it (keys it adds only when present, such as per-request stats,
are left out). Each field's ``name`` is the engine's key.
"""

from __future__ import annotations

from typing import Optional, Tuple

import msgspec
from msgspec import field


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


class KvCacheStats(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """The KV-cache block counters of one iteration (the engine's ``kvCacheStats``)."""

    max_num_blocks: int = field(default=0, name="maxNumBlocks")
    free_num_blocks: int = field(default=0, name="freeNumBlocks")
    used_num_blocks: int = field(default=0, name="usedNumBlocks")
    tokens_per_block: int = field(default=0, name="tokensPerBlock")
    alloc_total_blocks: int = field(default=0, name="allocTotalBlocks")
    alloc_new_blocks: int = field(default=0, name="allocNewBlocks")
    reused_blocks: int = field(default=0, name="reusedBlocks")
    missed_blocks: int = field(default=0, name="missedBlocks")
    cache_hit_rate: float = field(default=0.0, name="cacheHitRate")


class StaticBatchingStats(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Static-batching counters of one iteration (the engine's ``staticBatchingStats``)."""

    num_scheduled_requests: int = field(default=0, name="numScheduledRequests")
    num_context_requests: int = field(default=0, name="numContextRequests")
    num_ctx_tokens: int = field(default=0, name="numCtxTokens")
    num_gen_tokens: int = field(default=0, name="numGenTokens")
    empty_gen_slots: int = field(default=0, name="emptyGenSlots")


class InflightBatchingStats(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """In-flight batching counters of one iteration (the engine's ``inflightBatchingStats``)."""

    num_scheduled_requests: int = field(default=0, name="numScheduledRequests")
    num_context_requests: int = field(default=0, name="numContextRequests")
    num_gen_requests: int = field(default=0, name="numGenRequests")
    num_paused_requests: int = field(default=0, name="numPausedRequests")
    num_ctx_tokens: int = field(default=0, name="numCtxTokens")
    micro_batch_id: int = field(default=0, name="microBatchId")
    avg_num_decoded_tokens_per_iter: float = field(default=0.0, name="avgNumDecodedTokensPerIter")


class SpecDecodingStats(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Speculative-decoding counters of one iteration (the engine's ``specDecodingStats``)."""

    num_draft_tokens: int = field(default=0, name="numDraftTokens")
    num_accepted_tokens: int = field(default=0, name="numAcceptedTokens")
    num_requests_with_draft_tokens: int = field(default=0, name="numRequestsWithDraftTokens")
    acceptance_length: float = field(default=0.0, name="acceptanceLength")
    iter_latency_ms: float = field(default=0.0, name="iterLatencyMS")
    draft_overhead: float = field(default=0.0, name="draftOverhead")


class IterStats(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One rank's statistics of one executor iteration: the engine's 26-key per-rank dict."""

    timestamp: str = ""
    iteration: int = field(name="iter")
    iter_latency_ms: float = field(default=0.0, name="iterLatencyMS")
    new_active_requests_queue_latency_ms: float = field(
        default=0.0, name="newActiveRequestsQueueLatencyMS")
    num_new_active_requests: int = field(default=0, name="numNewActiveRequests")
    num_active_requests: int = field(default=0, name="numActiveRequests")
    num_queued_requests: int = field(default=0, name="numQueuedRequests")
    num_completed_requests: int = field(default=0, name="numCompletedRequests")
    max_num_active_requests: int = field(default=0, name="maxNumActiveRequests")
    max_batch_size_static: int = field(default=0, name="maxBatchSizeStatic")
    max_batch_size_tuner_recommended: int = field(default=0, name="maxBatchSizeTunerRecommended")
    max_batch_size_runtime: int = field(default=0, name="maxBatchSizeRuntime")
    max_num_tokens_static: int = field(default=0, name="maxNumTokensStatic")
    max_num_tokens_tuner_recommended: int = field(default=0, name="maxNumTokensTunerRecommended")
    max_num_tokens_runtime: int = field(default=0, name="maxNumTokensRuntime")
    gpu_mem_usage: int = field(default=0, name="gpuMemUsage")
    cpu_mem_usage: int = field(default=0, name="cpuMemUsage")
    pinned_mem_usage: int = field(default=0, name="pinnedMemUsage")
    kv_cache_stats: Optional[KvCacheStats] = field(default=None, name="kvCacheStats")
    static_batching_stats: Optional[StaticBatchingStats] = field(
        default=None, name="staticBatchingStats")
    inflight_batching_stats: Optional[InflightBatchingStats] = field(
        default=None, name="inflightBatchingStats")
    spec_decoding_stats: Optional[SpecDecodingStats] = field(
        default=None, name="specDecodingStats")
    host_step_time_ms: Optional[float] = field(default=None, name="hostStepTimeMS")
    prev_device_step_time_ms: Optional[float] = field(default=None, name="prevDeviceStepTimeMS")
    scheduler_mode: str = field(default="overlap", name="schedulerMode")
    rank: int

