"""Schemas: display names and structural fingerprints (no communicator)."""

from __future__ import annotations

import enum
from typing import Literal, Optional, Union

import msgspec
import numpy as np
import pytest

from typedcoll.codecs import KIND_ARRAY, KIND_MSGSPEC, KIND_NUMPY_SCALAR, resolve


def define(namespace_tag, extra_field=False, frozen=False, tag=None):
    """A Struct named RankState, defined afresh (its own namespace) on each call."""
    ns: dict = {}
    fields = ("    rank: int\n    num_active_requests: int\n    num_active_tokens: int\n"
              + ("    num_paused: int = 0\n" if extra_field else ""))
    options = ", frozen=True" if frozen else ""
    options += f", tag={tag!r}" if tag else ""
    exec(f"import msgspec\nclass RankState(msgspec.Struct{options}):\n{fields}", ns)
    return ns["RankState"]


def fp(schema):
    return resolve(schema).fingerprint


def test_identical_definitions_share_a_fingerprint():
    a, b = define("a"), define("b")
    assert a is not b
    assert fp(a) == fp(b)
    assert len(fp(a)) == 8
    assert resolve(a).name == resolve(b).name == "RankState"


@pytest.mark.parametrize("change", [dict(extra_field=True), dict(tag="v2")])
def test_two_versions_of_a_struct_differ(change):
    assert fp(define("old")) != fp(define("new", **change))


def test_field_type_and_name_changes_differ():
    class A(msgspec.Struct):
        x: int

    def other_a():
        class A(msgspec.Struct):
            x: str
        return A

    def renamed_a():
        class A(msgspec.Struct):
            y: int
        return A

    def renamed_on_wire():
        class A(msgspec.Struct, rename="camel"):
            x_y: int
        return A

    def optional_a():
        class A(msgspec.Struct):
            x: int = 0
        return A

    prints = {fp(A), fp(other_a()), fp(renamed_a()), fp(optional_a()), fp(renamed_on_wire())}
    assert len(prints) == 5


def test_fingerprint_is_stable_across_processes():
    # blake2b of a canonical text, not Python's salted hash: pinned so a change is deliberate.
    assert fp(int) == resolve(int).fingerprint
    import subprocess
    import sys
    code = ("from typedcoll.codecs import resolve\n"
            "from typing import Optional\n"
            "print(resolve(Optional[list[int]]).fingerprint.hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}, check=True).stdout
            for seed in ("1", "2")}
    assert outs == {fp(Optional[list[int]]).hex() + "\n"}


class Color(enum.Enum):
    RED = 1


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int
    num_active_tokens: int


class Node(msgspec.Struct):
    value: int
    children: "list[Node]" = []


@pytest.mark.parametrize("schema, name", [
    (RankState, "RankState"),
    (Optional[RankState], "Optional[RankState]"),
    (list[int], "list[int]"),
    (dict[str, int], "dict[str, int]"),
    (Optional[list[RankState]], "Optional[list[RankState]]"),
    (tuple[int, str], "tuple[int, str]"),
    (tuple[int, ...], "tuple[int, ...]"),
    (set[str], "set[str]"),
    (frozenset[int], "frozenset[int]"),
    (Union[int, str], "int | str"),
    (Union[int, str, None], "int | str | None"),
    (Literal["a", "b"], "Literal['a', 'b']"),
    (int, "int"),
    (float, "float"),
    (str, "str"),
    (bytes, "bytes"),
    (bool, "bool"),
    (type(None), "None"),
    (Color, "Color"),
    (Node, "Node"),
    (np.ndarray, "ndarray"),
    (np.float32, "float32"),
    (np.int64, "int64"),
])
def test_names(schema, name):
    assert resolve(schema).name == name


def test_kinds_and_decoders():
    assert resolve(RankState).kind == KIND_MSGSPEC
    assert resolve(np.ndarray).kind == KIND_ARRAY
    assert resolve(np.int16).kind == KIND_NUMPY_SCALAR
    info = resolve(Optional[RankState])
    assert info.decoder.decode(msgspec.msgpack.encode(None)) is None
    # Built once: the same info (and decoder) on every call.
    assert resolve(Optional[RankState]) is info


def test_distinct_schemas_distinct_fingerprints():
    schemas = [int, float, str, bytes, bool, list[int], list[str], dict[str, int],
               dict[int, str], Optional[int], RankState, Optional[RankState], tuple[int, str],
               tuple[str, int], np.ndarray, np.int64, np.float64, Node, Color]
    assert len({fp(s) for s in schemas}) == len(schemas)


def test_recursive_struct_resolves():
    assert len(fp(Node)) == 8


def test_unsupported_schema_raises_type_error_naming_it():
    with pytest.raises(TypeError, match=r"^expected a schema msgspec can decode or "
                                        r"numpy\.ndarray, got 42: "):
        resolve(42)
