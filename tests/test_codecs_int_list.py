"""The C decoder of lists of ints (``codecs/_ints.c``) held to msgspec's results and errors.

The C decoder parses a msgpack array of integers and hands every other buffer to msgspec's
decoder of the same schema; whatever it returns or raises must be exactly what msgspec alone
returns or raises. These tests import the extension directly, so they run on both CI legs
(``TYPEDCOLL_PURE_PYTHON=1`` only stops the codecs from using it).
"""

from __future__ import annotations

import enum
import os
import random
import struct
from typing import Annotated, Any, Callable, List, Tuple

import msgspec
import pytest

from typedcoll.codecs import int_list, resolve

_ints = pytest.importorskip("typedcoll.codecs._ints")

BOUNDARIES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
              2**63 - 1, 2**63, 2**64 - 1, -1, -31, -32, -33, -127, -128, -129, -32768, -32769,
              -2**31, -2**31 - 1, -2**63]


def outcome(decode: Callable[[Any], Any], buf: Any) -> Tuple[str, Any]:
    """What ``decode(buf)`` gives: ("value", v) or ("error", (type name, message))."""
    try:
        return "value", decode(buf)
    except Exception as exc:  # noqa: BLE001 - the outcome compared is the exception itself
        return "error", (type(exc).__name__, str(exc))


def comparable(result: Tuple[str, Any]) -> Any:
    """A value as its msgpack bytes and item types: items only the fallback decodes (a NaN, an
    Ext) do not compare equal to themselves."""
    kind, value = result
    if kind == "error":
        return result
    types = [type(v) for v in value] if isinstance(value, list) else type(value)
    return kind, msgspec.msgpack.encode(value), types


SCHEMAS = [List[int], Any]


@pytest.fixture(params=SCHEMAS, ids=["list[int]", "Any"])
def decoders(request: Any) -> Tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(the C decoder falling back to msgspec, msgspec alone) for one schema."""
    msgspec_decode = msgspec.msgpack.Decoder(request.param).decode
    return _ints.int_list_decoder(msgspec_decode), msgspec_decode


def same(decoders: Tuple[Callable[[Any], Any], Callable[[Any], Any]], buf: Any) -> Any:
    c_decode, msgspec_decode = decoders
    got, expected = outcome(c_decode, buf), outcome(msgspec_decode, buf)
    assert comparable(got) == comparable(expected), f"buffer {bytes(buf)[:40].hex()}: C {got!r}, msgspec {expected!r}"
    return got


def test_every_integer_width_and_boundary(decoders: Any) -> None:
    buf = msgspec.msgpack.encode(BOUNDARIES)
    assert same(decoders, buf) == ("value", BOUNDARIES)


def test_encodings_wider_than_needed() -> None:
    """msgpack allows any integer encoding wide enough; msgspec accepts all of them."""
    items = [b"\xcc\x05", b"\xcd\x00\x05", b"\xce\x00\x00\x00\x05", b"\xcf" + struct.pack(">Q", 5),
             b"\xd0\xfb", b"\xd1\xff\xfb", b"\xd2" + struct.pack(">i", -5),
             b"\xd3" + struct.pack(">q", -5), b"\xd3" + struct.pack(">q", 5), b"\xd0\x05"]
    for header in (bytes((0x90 | len(items),)), b"\xdc" + struct.pack(">H", len(items)),
                   b"\xdd" + struct.pack(">I", len(items))):
        buf = header + b"".join(items)
        for pair in _pairs():
            assert same(pair, buf) == ("value", [5, 5, 5, 5, -5, -5, -5, -5, 5, 5])


@pytest.mark.parametrize("n", [0, 1, 15, 16, 2048, 65535, 65536])
def test_every_array_header(decoders: Any, n: int) -> None:
    rng = random.Random(n)
    values = [rng.choice(BOUNDARIES) if rng.random() < 0.1 else rng.randrange(-10**6, 10**6)
              for _ in range(n)]
    assert same(decoders, msgspec.msgpack.encode(values)) == ("value", values)


NOT_INT_LISTS = [
    b"", b"\x91", b"\x92\x01", b"\xdc\x00", b"\xdd\x00\x00\x00", b"\x91\xcd\x01",
    b"\x91\xcf\x00\x00", b"\x92\x01\x02\x03",            # cut short, or trailing bytes
    b"\xdd\xff\xff\xff\xff\x01",                          # a count past the buffer
    b"\x05", b"\x80", b"\xa1a", b"\xc0",                  # not an array
    b"\x91\xc3", b"\x91\xc0", b"\x91\xa1a", b"\x91\x90",  # bool, None, str, a nested list
    b"\x92\x01\xcb" + struct.pack(">d", 2.5),             # a float
    b"\x91\xc1",                                          # never used in msgpack
]


@pytest.mark.parametrize("buf", NOT_INT_LISTS, ids=lambda b: b.hex() or "empty")
def test_anything_else_is_msgspecs(decoders: Any, buf: bytes) -> None:
    same(decoders, buf)


def test_any_buffer_type_and_non_buffers(decoders: Any) -> None:
    buf = msgspec.msgpack.encode([1, -2, 2**40])
    for view in (buf, bytearray(buf), memoryview(buf), memoryview(b"xx" + buf)[2:]):
        assert same(decoders, view) == ("value", [1, -2, 2**40])
    assert same(decoders, "not bytes")[0] == "error"
    assert same(decoders, None)[0] == "error"


def test_random_mutations_match_msgspec() -> None:
    rng = random.Random(7)
    pairs = list(_pairs())
    for trial in range(3000):
        values = [rng.choice(BOUNDARIES) for _ in range(rng.randrange(0, 40))]
        buf = bytearray(msgspec.msgpack.encode(values))
        for _ in range(rng.randrange(1, 4)):
            if buf and rng.random() < 0.7:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif buf:
                del buf[rng.randrange(len(buf)):]
        for pair in pairs:
            same(pair, bytes(buf))


class Colour(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize("schema", [List[int], list[int], Any])
def test_schemas_of_plain_int_lists_use_it(schema: Any) -> None:
    info = resolve(schema)
    assert (info.decode != info.decoder.decode) == int_list.ENABLED
    assert int_list.ENABLED == (_ints is not None and not os.environ.get("TYPEDCOLL_PURE_PYTHON"))
    assert info.decode(msgspec.msgpack.encode([3, -4])) == [3, -4]


@pytest.mark.parametrize("schema", [
    List[Annotated[int, msgspec.Meta(ge=0)]], Annotated[List[int], msgspec.Meta(max_length=2)],
    List[bool], List[Colour], Tuple[int, ...], List[float], List[List[int]]])
def test_schemas_whose_results_differ_keep_msgspec(schema: Any) -> None:
    info = resolve(schema)
    assert info.decode == info.decoder.decode
    if schema != List[List[int]]:
        # A constraint or a type the C decoder would not have applied (-1 >= 0, 3 items).
        buf = msgspec.msgpack.encode([1, -1, 0] if schema is not List[bool] else [1])
        assert outcome(info.decode, buf) == outcome(info.decoder.decode, buf)


def _pairs() -> Any:
    for schema in SCHEMAS:
        decode = msgspec.msgpack.Decoder(schema).decode
        yield _ints.int_list_decoder(decode), decode
