"""typedcoll.executor: conditional messages, drained on every rank by one symmetric flush.

:class:`SymmetricFlush` is the tool: code under a rank-local condition posts typed messages to
named channels (local, no communication), and one ``flush`` collective, reached the same number
of times on every rank, drains every channel at once; :class:`Delivery` is what a flush
delivered. The control-plane messages of an attention-DP serving engine are Structs defined here
(:class:`RankState`, :class:`KvStatus`, :class:`TimeoutFlag`, :class:`IterStats` and the
records nested in it). The engine model that ``typedcoll demo`` runs lives in
``typedcoll.demo``.
"""

from .flush import Delivery, SymmetricFlush
from .messages import (InflightBatchingStats, IterStats, KvCacheStats, KvStatus, RankState,
                       SpecDecodingStats, StaticBatchingStats, TimeoutFlag)

__all__ = [
    "Delivery",
    "InflightBatchingStats",
    "IterStats",
    "KvCacheStats",
    "KvStatus",
    "RankState",
    "SpecDecodingStats",
    "StaticBatchingStats",
    "SymmetricFlush",
    "TimeoutFlag",
]
