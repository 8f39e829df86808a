"""The walk of records inside a schema (``codecs/records.py``), without a communicator: the
compiled test and the check it stands in for reach the same verdict on every value.

The test is what runs on every call (the C path's ``isinstance``); the check is what says what
was found where. A test that said "fits" where the check finds another record class would let
that record be decoded into the schema's class on every peer: silently wrong data.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import msgspec
import pytest

from typedcoll import codecs
from typedcoll.codecs import records


class RankState(msgspec.Struct, frozen=True):
    rank: int
    num_active_requests: int = 0


class EmptyState(msgspec.Struct, frozen=True):
    rank: int
    idle: bool = True


class SubState(RankState, frozen=True):
    extra: int = 0


class Routed(msgspec.Struct):
    state: Optional[RankState] = None
    history: List[RankState] = []


class Stats(msgspec.Struct):
    """Like the executor's IterStats: fields that hold records, and many that do not."""
    iteration: int
    kv: Optional[RankState] = None
    routed: Optional[Routed] = None
    tags: Dict[str, RankState] = {}


class Tagged(msgspec.Struct, tag=True):
    rank: int = 0


class Other(msgspec.Struct, tag=True):
    idle: bool = True


class Holder(msgspec.Struct, tag=True):
    state: Optional[RankState] = None


@dataclasses.dataclass
class Slot:
    state: RankState
    late: Optional[RankState] = dataclasses.field(init=False)  # missing until set


class Level(enum.IntEnum):
    HIGH = 1


@dataclasses.dataclass
class Point:
    x: int = 0


class Batch(msgspec.Struct, frozen=True, array_like=True):
    """A flush's batch: one tuple of messages per channel."""
    rank_state: Tuple[RankState, ...] = ()
    stats: Tuple[Stats, ...] = ()


SCHEMAS = [
    Optional[RankState], List[RankState], Dict[str, RankState], Tuple[RankState, int],
    Optional[List[RankState]], Dict[str, List[RankState]], Sequence[RankState],
    FrozenSet[RankState], Union[Tagged, Other, None], Union[RankState, int],
    Union[Tagged, Holder, None], Routed, Stats, Optional[Stats], Batch, List[Stats], Slot,
    Tuple[Optional[Routed], ...], List[Level], Dict[str, Point], Optional[Point],
]


def _slot(late: Any) -> Slot:
    slot = Slot(RankState(0))
    if late is not None:
        slot.late = late
    return slot


VALUES = [
    None, 0, 3, "s", Level.HIGH, {"rank": 1}, RankState(0), SubState(1), EmptyState(1),
    [RankState(0)], [RankState(0), EmptyState(1)], (RankState(0), 0), (EmptyState(1), 1),
    [SubState(2), None], frozenset({RankState(0)}), frozenset({EmptyState(0)}),
    {"a": RankState(0)}, {"a": EmptyState(0)},
    {"a": [RankState(0)]}, {"a": [EmptyState(0)]}, Routed(RankState(0)), Routed(EmptyState(0)),
    Routed(None, [RankState(0), EmptyState(1)]), Stats(0), Stats(1, kv=EmptyState(1)),
    Stats(2, routed=Routed(EmptyState(0))), Stats(3, tags={"x": EmptyState(0)}),
    Stats(4, kv=SubState(1), routed=Routed(RankState(0), [SubState(0)])),
    Batch(), Batch((RankState(0),), (Stats(0),)), Batch((EmptyState(0),)),
    Batch((RankState(0),), (Stats(1, kv=EmptyState(0)),)), [Stats(0), Stats(1, kv=EmptyState(0))],
    _slot(None), _slot(RankState(1)), _slot(EmptyState(1)), Slot(EmptyState(0)),  # type: ignore
    (Routed(), None), (Routed(), Routed(EmptyState(0))), (Routed(), RankState(0)),
    Tagged(), Other(), Holder(RankState(0)), Holder(EmptyState(0)), [Holder(SubState(0))],
    [Level.HIGH], [Level.HIGH, 1], Point(), [Point()], {"p": Point()}, {"p": RankState(0)},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=str)
def test_the_compiled_test_and_the_check_agree_on_every_value(schema):
    fits_class = codecs.resolve(schema).record_class
    assert fits_class is not None and isinstance(fits_class.check, records._Node)
    for value in VALUES:
        found = fits_class.check(value)
        try:
            said_fits = fits_class.test(value)
        except AttributeError:  # a field never set: the check decides
            said_fits = False
        # The test may defer to the check (an int where a record may be), never overrule it.
        assert not (said_fits and found is not None), (schema, value, found)
        assert isinstance(value, fits_class) is (found is None), (schema, value, found)


@pytest.mark.parametrize("schema, value, expected", [
    (Optional[RankState], EmptyState(1), "EmptyState"),
    (List[RankState], [RankState(0), EmptyState(1)], "EmptyState at [1]"),
    (Dict[str, List[RankState]], {"a": [EmptyState(0)]}, "EmptyState at ['a'][0]"),
    (Stats, Stats(2, routed=Routed(EmptyState(0))), "EmptyState at .routed.state"),
    (Batch, Batch((RankState(0),), (Stats(1, kv=EmptyState(0)),)),
     "EmptyState at .stats[0].kv"),
    (Slot, _slot(EmptyState(1)), "EmptyState at .late"),
    (Tuple[RankState, int], (EmptyState(1), 1), "EmptyState at [0]"),
])
def test_the_check_names_what_it_found_and_where(schema, value, expected):
    fits_class = codecs.resolve(schema).record_class
    assert fits_class.check(value) == expected
    assert not isinstance(value, fits_class)


def test_the_common_shapes_are_answered_by_the_test_alone():
    # What makes the walk cheap on a hot call: these never fall to the check.
    cases = [(Optional[RankState], RankState(0)), (Optional[RankState], None),
             (List[RankState], [RankState(0), SubState(1)]), (Stats, Stats(0)),
             (Batch, Batch((RankState(0),), (Stats(0, kv=RankState(1)),))),
             (Dict[str, RankState], {"a": RankState(0)}), (Optional[Stats], Stats(1))]
    for schema, value in cases:
        assert codecs.resolve(schema).record_class.test(value) is True, schema
