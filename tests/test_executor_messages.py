"""Executor messages and the raw path's decoding, in one process (no MPI)."""

from __future__ import annotations

import msgspec
import pytest

import typedcoll.executor as ex
from typedcoll.executor._backends import RankState as EngineRankState
from typedcoll.executor._plan import FaultPlan


def test_public_names():
    assert sorted(ex.__all__) == ["ConservationError", "Delivery", "ExecutorModel", "FaultPlan",
                                  "IterStats", "KvStatus", "RankState", "SymmetricFlush",
                                  "TimeoutFlag"]
    for name in ex.__all__:
        assert getattr(ex, name).__doc__, name


def test_iter_stats_is_the_26_key_dict():
    stats = ex.IterStats(iteration=7)
    as_dict = msgspec.structs.asdict(stats)
    assert len(as_dict) == 26 and list(as_dict)[0] == "iteration"


@pytest.mark.parametrize("received, message", [
    (msgspec.structs.asdict(ex.IterStats(iteration=7)),
     "RankState.__init__() takes from 2 to 4 positional arguments but 27 were given"),
])
def test_engine_rank_state_decodes_positionally(received, message):
    # The raw path's class must fail with the engine's exact text.
    with pytest.raises(TypeError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        EngineRankState(*received)


def test_messages_round_trip():
    for msg in (ex.RankState(1, 2, 3), ex.TimeoutFlag(rank=1, iteration=2, request_ids=(5, 6)),
                ex.IterStats(iteration=3, kv_cache_hit_rate=0.5), ex.KvStatus(num_blocked=2)):
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=type(msg)) == msg


def test_fault_plan_is_reproducible():
    a = FaultPlan.random(5, 4, 100, disaggregated=True)
    b = FaultPlan.random(5, 4, 100, disaggregated=True)
    assert (a.empty == b.empty).all() and (a.timeouts == b.timeouts).all()
    assert (a.metrics == b.metrics).all() and (a.arrivals == b.arrivals).all()
    with pytest.raises(ValueError, match="expected loop in"):
        FaultPlan.random(5, 4, 10, loop="spiral")
