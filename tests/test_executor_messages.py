"""The executor's messages, the engine's dict and positional decoding, and the fault plan: one
process, no communicator."""

from __future__ import annotations

import re

import msgspec
import numpy as np
import pytest

import typedcoll.executor as ex
from typedcoll.demo.backends import RankState as EngineRankState
from typedcoll.demo.backends import engine_dict
from typedcoll.demo.plan import FaultPlan

# The keys of the engine's per-rank statistics dict: its IterationStats JSON, then what the
# executor adds before gathering it.
ENGINE_KEYS = [
    "timestamp", "iter", "iterLatencyMS", "newActiveRequestsQueueLatencyMS",
    "numNewActiveRequests", "numActiveRequests", "numQueuedRequests", "numCompletedRequests",
    "maxNumActiveRequests", "maxBatchSizeStatic", "maxBatchSizeTunerRecommended",
    "maxBatchSizeRuntime", "maxNumTokensStatic", "maxNumTokensTunerRecommended",
    "maxNumTokensRuntime", "gpuMemUsage", "cpuMemUsage", "pinnedMemUsage", "kvCacheStats",
    "staticBatchingStats", "inflightBatchingStats", "specDecodingStats",
    "hostStepTimeMS", "prevDeviceStepTimeMS", "schedulerMode", "rank",
]


def test_public_names():
    assert sorted(ex.__all__) == ["Delivery", "InflightBatchingStats", "IterStats",
                                  "KvCacheStats", "KvStatus", "RankState", "SpecDecodingStats",
                                  "StaticBatchingStats", "SymmetricFlush", "TimeoutFlag"]
    for name in ex.__all__:
        assert getattr(ex, name).__doc__, name


def test_iter_stats_has_the_engine_26_keys():
    assert len(ENGINE_KEYS) == 26
    assert [f.encode_name for f in msgspec.structs.fields(ex.IterStats)] == ENGINE_KEYS
    stats = ex.IterStats(iteration=7, rank=1, kv_cache_stats=ex.KvCacheStats(max_num_blocks=9))
    as_dict = engine_dict(stats)
    assert list(as_dict) == ENGINE_KEYS
    assert as_dict["iter"] == 7 and as_dict["rank"] == 1
    assert as_dict["kvCacheStats"]["maxNumBlocks"] == 9 and as_dict["specDecodingStats"] is None


@pytest.mark.parametrize("received, message", [
    (engine_dict(ex.IterStats(iteration=7, rank=1)),
     "RankState.__init__() takes from 2 to 4 positional arguments but 27 were given"),
    ([], "RankState.__init__() missing 1 required positional argument: 'rank'"),
])
def test_engine_rank_state_decodes_positionally(received, message):
    # The raw mode's class fails with the engine's exact text when handed another call's data.
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        EngineRankState(*received)


def test_messages_round_trip():
    stats = ex.IterStats(
        iteration=3, rank=2, timestamp="t", kv_cache_stats=ex.KvCacheStats(cache_hit_rate=0.5),
        static_batching_stats=ex.StaticBatchingStats(empty_gen_slots=1),
        inflight_batching_stats=ex.InflightBatchingStats(micro_batch_id=1),
        spec_decoding_stats=ex.SpecDecodingStats(num_draft_tokens=4), host_step_time_ms=1.5)
    for msg in (ex.RankState(1, 2, 3), ex.TimeoutFlag(rank=1, iteration=2, request_ids=(5, 6)),
                stats, ex.KvStatus(num_blocked=2, error="boom")):
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=type(msg)) == msg
    # array_like: field names stay off the wire.
    assert msgspec.msgpack.encode(ex.RankState(1, 2, 3)) == b"\x93\x01\x02\x03"


def test_fault_plan_is_reproducible():
    a = FaultPlan.random(5, 4, 100, disaggregated=True)
    b = FaultPlan.random(5, 4, 100, disaggregated=True)
    assert (a.empty == b.empty).all() and (a.timeouts == b.timeouts).all()
    assert (a.metrics == b.metrics).all() and (a.arrivals == b.arrivals).all()
    # Per-rank metrics are a setting of the whole job, as in the engine.
    assert a.metrics.all() and not FaultPlan.random(5, 4, 10, metrics=False).metrics.any()
    assert a.describe().startswith(f"{int(a.empty.sum())} empty batches, ")


def test_fault_plan_checks_its_arguments():
    with pytest.raises(ValueError, match=re.escape(
            "expected loop in ('overlap', 'non_overlap', 'pipeline'), got 'spiral'")):
        FaultPlan.random(5, 4, 10, loop="spiral")
    with pytest.raises(ValueError, match=re.escape("empty: expected shape (2, 3), got (3, 2)")):
        FaultPlan(ranks=2, iterations=3, empty=np.zeros((3, 2), bool),
                  timeouts=np.zeros((2, 3), np.int64), metrics=np.zeros((2, 3), bool),
                  arrivals=np.zeros(3, np.int64))
    scripted = FaultPlan.scripted(2, 4, empty=[(1, 2)], metrics_on=[(0, 3)])
    assert scripted.empty.sum() == 1 and scripted.metrics[0, 3] and scripted.metrics.sum() == 1
    assert scripted.describe() == ("1 empty batches, per-rank metrics on in 12% of "
                                   "rank-iterations, 8 requests arriving")
