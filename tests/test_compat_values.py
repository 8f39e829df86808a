"""The drop-ins' self-describing values, without communication: round trips equal pickle's,
refusals say what and where, malformed markers never pass for values."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import math
import pickle
import sys
import uuid
from typing import Any, NamedTuple, Optional, TypedDict

import msgspec
import numpy as np
import pytest
from msgspec.msgpack import Ext

from typedcoll.codecs import ENCODER, resolve
from typedcoll.compat import values as tagged

ANY = resolve(Any)


@dataclasses.dataclass
class Stats:
    rank: int
    sizes: list[int]
    span: tuple[int, int] = (0, 0)
    note: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Key:
    a: int


class Request(msgspec.Struct):
    id: int
    embedding: np.ndarray


class Span(NamedTuple):
    start: int
    stop: int


class Totals(TypedDict):
    count: int


class Phase(enum.IntEnum):
    PREFILL = 1


class Mode(enum.Enum):
    FAST = "fast"


Pair = collections.namedtuple("Pair", "a b")


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, Request):
        return a.id == b.id and same(a.embedding, b.embedding)
    return a == b


def round_trip(value: Any) -> Any:
    tree, _ = tagged.encode(value)
    return tagged.decode(ANY.decoder.decode(ENCODER.encode(tree)))


PAYLOADS = [
    None, True, 0, -2 ** 63, 2 ** 64 - 1, 2 ** 64, -(2 ** 200), 1.5, float("nan"), -0.0, "s",
    b"b", bytearray(b"ba"), 1 + 2j, [], {}, (), [1, [2, [3]]], (1, (2, "x")), [1, (2,)],
    {1, 2}, frozenset({"a"}), {"k": (1, 2)}, {1: "int key", 2.5: "float key", None: 0},
    {(1, (2, None)): "tuple key"}, {frozenset({1}): "frozenset key"}, {Key(1): "class key"},
    Stats(1, [2], (3, 4)), Key(2), Request(1, np.arange(3.0)), Span(1, 2), Pair(1, 2),
    Totals(count=3), Phase.PREFILL, Mode.FAST, np.arange(6).reshape(2, 3),
    np.arange(3, dtype=">i4"), np.zeros((0, 2)), np.array(5, dtype=np.uint16), np.float32(1.5),
    np.int64(-3),
    np.bool_(True), np.datetime64("2026-01-01"), [np.arange(2), "after an array"],
    Ext(5, b"user ext"), [Ext(1, b"")], datetime.date(2026, 1, 2),
    datetime.timedelta(seconds=3), uuid.UUID(int=7), decimal.Decimal("1.25"), msgspec.Raw(b"\x01"),
    {"nested": [Stats(0, []), {"deeper": (Key(3), np.float64(2.0))}]},
]


@pytest.mark.parametrize("value", PAYLOADS, ids=lambda v: type(v).__name__)
def test_round_trip_equals_pickle(value):
    # mpi4py pickles with the highest protocol (5 keeps a byte-swapped dtype; 4 does not)
    assert same(round_trip(value), pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL)))


def test_plain_values_travel_as_they_are():
    for value in [None, 1, "s", [1, "a", None], {"a": [1.5, {"b": b"x"}], 3: True}]:
        assert tagged.encode(value) == (value, 0)


def test_flags_say_whether_a_value_holds_classes():
    assert tagged.encode((1, 2))[1] == 0
    tree, flags = tagged.encode([Stats(1, [])])
    assert flags == tagged.HAS_CLASSES
    assert tagged.flags_of(tree) == tagged.HAS_CLASSES
    assert tagged.flags_of_bytes(ENCODER.encode(tree)) == tagged.HAS_CLASSES
    stamped, flags = tagged.encode(1, tagged.CALL_HAS_CLASSES)
    assert flags == tagged.CALL_HAS_CLASSES and tagged.decode(stamped) == 1
    assert tagged.flags_of_bytes(ENCODER.encode([1, 2])) == 0


def test_decimal_nans_travel_and_aware_datetimes_keep_their_offset_or_are_refused():
    # Decimal('NaN') != Decimal('NaN'): the check that a value arrives as it was sent refused
    # it, with a text about declared fields. An aware datetime travels in UTC: one in another
    # offset compared equal (the same instant) and arrived with another hour and tzinfo.
    for value in (decimal.Decimal("NaN"), decimal.Decimal("-sNaN"), decimal.Decimal("1.00")):
        assert round_trip(value).compare_total(value) == 0
    utc = datetime.datetime(2026, 1, 1, 12, tzinfo=datetime.timezone.utc)
    assert round_trip(utc) == utc and round_trip(utc).utcoffset() == datetime.timedelta(0)
    local = datetime.datetime(2026, 1, 1, 12,
                              tzinfo=datetime.timezone(datetime.timedelta(hours=5)))
    assert refusal(local) == (
        "ValueError: expected a datetime that arrives as it was sent, got one that would not: $ "
        "2026-01-01T12:00:00+05:00 would arrive as 2026-01-01T07:00:00+00:00 (the same instant: "
        "an aware datetime travels in UTC; send it in UTC, or its isoformat())")


def test_dataclass_fields_follow_their_annotations():
    # Declared types come back exactly; a field annotated Any follows msgspec (tuple -> list).
    @dataclasses.dataclass
    class Loose:
        value: Any

    assert round_trip(Stats(1, [2], (3, 4))).span == (3, 4)
    module = sys.modules[__name__]
    module.Loose = Loose  # type: ignore[attr-defined]
    Loose.__qualname__ = "Loose"
    try:
        assert round_trip(Loose((1, 2))).value == [1, 2]
        # A nested instance there would come back as a dict: refused, saying what to declare.
        assert refusal(Loose(Key(1))) == (
            "ValueError: expected a Loose that arrives as it was sent, got one that would not: "
            "$.value is a Key and would arrive as a dict (the field's declared type does not "
            "rebuild it: declare the field with its class); pickle would rebuild it, msgspec "
            "rebuilds declared fields by their declared types")
    finally:
        del module.Loose  # type: ignore[attr-defined]


# --- refusals: what, where, and what to do ------------------------------------------------------
class Opaque:
    pass


SUPPORTED = ("builtins, dataclasses, msgspec Structs, NamedTuple, TypedDict, Enum, numpy arrays "
             "and scalars")


def refusal(value: Any) -> str:
    with pytest.raises(tagged.Refused) as info:
        tagged.encode(value)
    return info.value.text()


def test_refuses_an_arbitrary_class_naming_where_it_is():
    assert refusal({"k": [1, Opaque()]}) == (
        f"TypeError: expected a value the drop-ins can send without pickle ({SUPPORTED}), got "
        f"Opaque at $['k'][1]: make it a msgspec Struct or a dataclass, or convert it to one of "
        f"those before the call")


def test_refuses_a_class_defined_in_a_function():
    @dataclasses.dataclass
    class Local:
        a: int

    assert refusal((Local(1),)) == (
        "TypeError: expected a class receivers can find by module and name, got Local at $[0], "
        "defined inside a function; define it at module level")


def test_refuses_a_field_msgspec_cannot_encode():
    assert refusal(Stats(1, [Opaque()])) == (  # type: ignore[list-item]
        f"TypeError: expected a Stats whose fields msgspec can encode, got Opaque at "
        f"$.sizes[0], declared int (Encoding objects of type Opaque is unsupported); give its "
        f"fields types from "
        f"{SUPPORTED}")


TensorMetadata = collections.namedtuple("TensorMetadata", ["device", "dtype", "size"])


def test_torch_dtypes_and_sizes_travel_in_an_engines_tensor_metadata():
    # vLLM's broadcast_tensor_dict broadcasts (key, TensorMetadata(device, dtype, size)) pairs.
    torch = pytest.importorskip("torch")
    metadata = [("input_ids", TensorMetadata("cpu", torch.int64, torch.Size([3, 4]))),
                ("scale", TensorMetadata("cuda", torch.bfloat16, torch.Size([])))]
    back = round_trip(metadata)
    assert back == metadata
    assert type(back[0][1]) is TensorMetadata and type(back[0][1].size) is torch.Size
    assert round_trip({"dtypes": (torch.float8_e4m3fn, torch.complex64)}) == {
        "dtypes": (torch.float8_e4m3fn, torch.complex64)}
    assert tagged.flags_of(tagged.encode(metadata)[0]) == tagged.HAS_CLASSES
    # Decoded by each rank's own torch: the ranks settle whether every rank could.
    assert tagged.flags_of(tagged.encode([torch.int8])[0]) == tagged.HAS_CLASSES


def test_a_namedtuple_of_what_msgspec_cannot_encode_names_the_item():
    assert refusal(Pair(1, Opaque())) == (
        f"TypeError: expected a value the drop-ins can send without pickle ({SUPPORTED}), got "
        f"Opaque at $[1]: make it a msgspec Struct or a dataclass, or convert it to one of "
        f"those before the call")


@pytest.mark.parametrize("array, dtype", [
    (np.array([object()]), "object"), (np.zeros(2, dtype=[("a", "i4")]), "[('a', '<i4')]")])
def test_refuses_arrays_of_objects_or_records(array, dtype):
    assert refusal([array]) == (f"TypeError: expected a numpy array of plain numbers, got dtype "
                                f"{dtype} at $[0]; convert it before the call")


def test_refuses_nesting_beyond_the_limit():
    value: Any = []
    for _ in range(200):
        value = [value]
    assert refusal((value,)).startswith(
        "ValueError: expected a value nested at most 128 deep, got one nested deeper at $[0]")


def test_encodes_on_a_fresh_stack_when_the_caller_is_deep():
    value: Any = (1,)
    for _ in range(100):
        value = (value,)

    def deep(n: int) -> Any:
        return deep(n - 1) if n else tagged.encode(value)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    try:
        tree, _ = deep(150)
    finally:
        sys.setrecursionlimit(limit)
    assert tagged.decode(ANY.decoder.decode(ENCODER.encode(tree))) == value


# --- decoding what a peer sent ------------------------------------------------------------------
def tagged_tree(tree: Any) -> Any:
    return [Ext(tagged.ROOT, b"\x00"), tree]


@pytest.mark.parametrize("tree, message", [
    ([Ext(tagged.DICT, b""), 1], "expected key, value pairs in a dict marker, got an odd count"),
    ([Ext(tagged.CLASS, b""), "x"], "expected [path, fingerprint, payload] after a class marker"),
    ([Ext(tagged.EXT, b""), "x", 1], "expected [code, data] after an Ext marker"),
    (Ext(99, b""), "expected a value marker, got extension code 99"),
    (Ext(tagged.COMPLEX, b"12"), "expected 16 bytes of a complex, got 2"),
    (Ext(tagged.ARRAY, b"\x00\x00"), "truncated"),
    ([Ext(tagged.NAMED_TUPLE, b""), 1], "expected a class path and field names after a "
                                        "namedtuple marker"),
])
def test_malformed_markers_raise_value_errors(tree, message):
    with pytest.raises((ValueError, msgspec.DecodeError), match=message.replace("[", r"\[")):
        tagged.decode(tagged_tree(tree))


def test_malformed_torch_leaves_and_namedtuples_of_other_shapes():
    torch = pytest.importorskip("torch")
    assert torch is not None
    with pytest.raises(ValueError, match="expected a torch.Size of 8-byte ints, got 3 bytes"):
        tagged.decode(tagged_tree(Ext(tagged.TORCH_SIZE, b"123")))
    with pytest.raises(tagged.Unresolved, match="expected a torch dtype this rank's torch has, "
                                                "got 'torch.no_such'"):
        tagged.decode(tagged_tree(Ext(tagged.TORCH_DTYPE, b"torch.no_such")))
    for fields in (["a", "b", "c"], ["b", "a"]):  # another count; the same count reordered
        tree = [Ext(tagged.NAMED_TUPLE, b""), f"{__name__}:Pair", fields, *range(len(fields))]
        with pytest.raises(tagged.Unresolved, match=rf"with the sender's fields \['{fields[0]}'"):
            tagged.decode(tagged_tree(tree))
    import time
    start = time.monotonic()  # a wire name is looked up, never imported (torch._dynamo: seconds)
    with pytest.raises(tagged.Unresolved, match="got 'torch._dynamo'"):
        tagged.decode(tagged_tree(Ext(tagged.TORCH_DTYPE, b"torch._dynamo")))
    assert "torch._dynamo" not in sys.modules or time.monotonic() - start < 1


def test_unknown_class_is_unresolved():
    tree = [Ext(tagged.CLASS, b""), "no_such_module:Thing", b"\x00" * 8, b"\x90"]
    with pytest.raises(tagged.Unresolved, match="expected the class no_such_module:Thing in an "
                                                "imported module, got no module"):
        tagged.decode(tagged_tree(tree))


def test_class_of_another_structure_is_unresolved():
    tree, _ = tagged.encode(Key(1))
    tree[1][2] = b"\xff" * 8
    with pytest.raises(tagged.Unresolved, match=r"expected test_compat_values:Key with the "
                                                r"sender's structure \(ffffffff\), got a class "
                                                r"of another structure"):
        tagged.decode(ANY.decoder.decode(ENCODER.encode(tree)))


def test_payload_its_class_rejects_is_unresolved():
    tree = [Ext(tagged.CLASS, b""), f"{__name__}:Key", resolve(Key).fingerprint,
            ENCODER.encode({"a": "not an int"})]
    with pytest.raises(tagged.Unresolved, match=r"expected a valid Key, got one its class "
                                                r"rejects: ValidationError: Expected `int`, got "
                                                r"`str` - at `\$.a`"):
        tagged.decode(tagged_tree(tree))


def test_flags_of_slots_reads_what_flags_of_bytes_reads():
    """The scan a gather's non-roots run over the exchange's slots gives the OR of the flags
    of each slot's payload, as decoding them would: tagged, plain, empty and 3-byte payloads."""
    import random

    from typedcoll.compat.values import encode, flags_of_bytes, flags_of_slots
    from typedcoll.core.wire import HEADER_SIZE, LENGTH_OFFSET

    rng = random.Random(7)
    slot = 128
    payloads = [msgspec.msgpack.encode(encode(v)[0]) for v in
                ([1, 2], Stats(3, [1]), {"a": Key(1)}, None, "text", [Stats(2, [])], (1, 2),
                 {4, 5})]
    payloads += [b"", bytes([0x92, 0xD4]), payloads[1][:3]]
    for _ in range(200):
        chosen = [rng.choice(payloads) for _ in range(rng.randint(1, 6))]
        recv = bytearray(len(chosen) * slot)
        for r, data in enumerate(chosen):
            recv[r * slot + LENGTH_OFFSET:r * slot + HEADER_SIZE] = len(data).to_bytes(4, "little")
            recv[r * slot + HEADER_SIZE:r * slot + HEADER_SIZE + len(data)] = data
        want = 0
        for data in chosen:
            want |= flags_of_bytes(data)
        assert flags_of_slots(recv, slot, len(chosen), HEADER_SIZE) == want, chosen
    assert any(flags_of_bytes(data) for data in payloads)  # the scan saw flagged payloads


# --- instances that would not arrive as sent ------------------------------------------------------
class ConnectorMeta(msgspec.Struct):
    pass


class NixlMeta(ConnectorMeta):
    reqs: dict[str, list[int]] = {}


class SchedulerOut(msgspec.Struct):
    step: int
    meta: Optional[ConnectorMeta] = None


@dataclasses.dataclass
class RequestState:
    req_id: str
    computed: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.computed = 0  # the engine advances it later


@dataclasses.dataclass
class Loads:
    phase: int
    sizes: list[int]
    mean: float


def test_refuses_an_instance_that_would_not_arrive_as_sent():
    """pickle rebuilds an object as it was; msgspec by its declared fields and types. Where the
    two differ the sender refuses (a silent difference would be another value on every
    receiver); where they agree in value, it sends."""
    assert refusal(SchedulerOut(7, NixlMeta({"r": [1]}))) == (
        "ValueError: expected a SchedulerOut that arrives as it was sent, got one that would "
        "not: $.meta is a NixlMeta and would arrive as a ConnectorMeta (the field's declared "
        "class: the subclass's fields are lost); pickle would rebuild it, msgspec rebuilds "
        "declared fields by their declared types")
    advanced = RequestState("a")
    advanced.computed = 3
    assert "$[0].computed 3 would arrive as 0 (RequestState.__post_init__ runs again on every " \
        "receiver)" in refusal([advanced])
    tagged_on = Loads(1, [2], 0.5)
    tagged_on.owner = 3  # type: ignore[attr-defined]
    assert "$[0] carries attributes outside its declared fields (owner)" in refusal([tagged_on])
    # Equal in value: an IntEnum in an int field, a tuple in a list field, NaN, arrays.
    for value in (Loads(Phase.PREFILL, (1, 2), math.nan), Request(1, np.array([math.nan])),
                  SchedulerOut(1, ConnectorMeta()), RequestState("b")):
        back = round_trip(value)
        assert type(back) is type(value)
