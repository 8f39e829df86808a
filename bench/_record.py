"""The record the benchmark scripts gather: the core issue's 3-field RankState.

A plain (map-encoded) Struct, as the core issue's example declares it; the executor's own
``typedcoll.executor.RankState`` is ``array_like`` and is what ``typedcoll bench`` measures.
"""

import msgspec


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int
    num_active_tokens: int
