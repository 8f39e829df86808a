"""typedcoll.executor: symmetric flushes, and a faithful model of a serving engine's loops.

:class:`SymmetricFlush` is the public tool: code under a rank-local condition posts typed messages
to named channels, and one ``flush`` collective, reached the same number of times on every rank,
drains them all. The messages of an attention-DP executor's control plane (:class:`RankState`,
:class:`TimeoutFlag`, :class:`IterStats`, :class:`KvStatus`) are Structs defined here.
:class:`ExecutorModel` and :class:`FaultPlan` drive ``typedcoll demo``.
"""

from ._backends import ConservationError
from ._flush import Delivery, SymmetricFlush
from ._messages import IterStats, KvStatus, RankState, TimeoutFlag
from ._model import ExecutorModel
from ._plan import FaultPlan

__all__ = [
    "ConservationError",
    "Delivery",
    "ExecutorModel",
    "FaultPlan",
    "IterStats",
    "KvStatus",
    "RankState",
    "SymmetricFlush",
    "TimeoutFlag",
]
