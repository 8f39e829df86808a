"""Allgather of numpy arrays on the C fast path (``core/array_slots.py``) and the Python steps.

The C path serves arrays whose payload fits the slot, and runs the exchange of arrays past the
slot (their dtype and shape inline) before phase 2 moves their data; arrays of one dtype and
shape on every rank are decoded from one buffer. Everything else is the Python steps'. These
tests hold both to the same results: values, dtype and byte order, shapes that differ by rank,
a dtype that differs (the same DesyncError on every rank), results that are independent and
writable, and that the C path does serve the steady state (C leg, no timeout).
"""

from __future__ import annotations

import threading
from typing import Any, List, Set

import numpy as np
import pytest

import typedcoll as tc
from typedcoll.core import array_slots, fast
from typedcoll.core.wire import HEADER_SIZE, LENGTH_OFFSET
from typedcoll.testing import observe

from test_core_review import C_PATH, TIMEOUTS, outcomes

BIG = 3000  # int64 elements: 24,000 bytes, past the largest slot


def contributions(r: int) -> List[Any]:
    """What rank ``r`` contributes to each allgather, in order."""
    return [
        np.arange(4, dtype=np.int64) + r,                         # inline, one shape
        np.arange(4, dtype=np.int64) + 10 * r,                    # the same, again
        (np.arange(6, dtype=">f4") + r).reshape(2, 3),            # big-endian, 2-d
        np.asfortranarray(np.arange(6).reshape(2, 3) + r),        # Fortran order
        (np.arange(12) + r)[::3],                                 # not contiguous
        np.arange(r + 1, dtype=np.int32),                         # shapes differ by rank
        np.full(BIG, r, dtype=np.int64),                          # past the slot, one shape
        np.full(BIG + r, r, dtype=np.int64),                      # past the slot, shapes differ
        np.full(BIG if r == 0 else 2, r, dtype=np.int64),         # one rank past the slot
        np.array(7.5 + r),                                        # 0-d
        np.zeros((0, 3), dtype=np.float64),                       # empty
    ]


def allgathers(comm: tc.TypedComm) -> Any:
    comm.allgather(np.arange(4, dtype=np.int64))  # the first call of a schema fills caches
    out = [comm.allgather(value) for value in contributions(comm.rank)]
    seen = [[x.copy() for x in rows] for rows in out]
    out[0][0][0] = -1  # results are writable and independent of each other and of later calls
    return seen, [list(a) for a in out[0]], [list(a) for a in out[1]]


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_allgather_of_arrays_returns_every_rank_s_array_on_either_path(timeout, monkeypatch):
    served: List[Any] = []
    original = fast.allgather

    def after(seq: int, out: Any, p: Any, value: Any, *args: Any) -> None:
        # seq: this call's number: 0 is the warm-up, 1.. the contributions in order
        served.append((seq, value.shape, out.__class__ is list))
    monkeypatch.setattr(fast, "allgather", observe(original, after, lambda p, *args: p.seq))
    n = 3
    got = outcomes(n, allgathers, timeout=timeout)
    for r, result in enumerate(got):
        assert not isinstance(result, BaseException), f"rank {r}: {result!r}"
        out, first, again = result
        for k, rows in enumerate(out):
            want = [contributions(j)[k] for j in range(n)]
            assert len(rows) == n
            for x, y in zip(rows, want):
                assert type(x) is np.ndarray and x.dtype.str == y.dtype.str, (k, x, y)
                assert x.shape == y.shape and np.array_equal(x, y), (k, x, y)
                assert first == [[-1, 1, 2, 3]] + [list(np.arange(4) + j) for j in range(1, n)]
        assert again == [list(np.arange(4) + 10 * j) for j in range(n)]
    if C_PATH and timeout is None:
        # The C path returns the result itself for the warm-up call and the five contributions
        # that fit the slot with one dtype and shape on every rank; in-process ranks have no
        # C engine, so arrays past the slot finish on the Python steps.
        steady = {seq for seq, _, ok in served if ok}
        assert steady >= {0, 1, 2, 3, 4, 5}, served
        assert not steady & {7, 8, 9}, served


def dtype_differs(comm: tc.TypedComm) -> Any:
    comm.allgather(np.arange(4, dtype=np.int64))
    size = BIG if comm.rank == 2 else 4
    return comm.allgather(np.arange(size, dtype=np.float32 if comm.rank == 1 else np.int64))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_dtype_that_differs_raises_the_same_desync_error_on_every_rank(timeout):
    got = outcomes(3, dtype_differs, timeout=timeout)
    assert all(isinstance(g, tc.DesyncError) for g in got), got
    assert len({str(g) for g in got}) == 1, got
    assert "rank 1" in str(got[0]), str(got[0])


def test_encode_writes_what_the_python_steps_write():
    """The C path's inline payload is ``encode_array``'s; past the slot, the prefix alone."""
    from typedcoll.codecs.array import array_fingerprint, encode_array, encode_array_split
    for arr in (np.arange(5, dtype=">i2"), np.asfortranarray(np.ones((2, 3))),
                np.arange(10)[::2]):
        inline, fp, decode, split = array_slots.encode(arr, 1000)
        assert (inline, fp, split) == (encode_array(arr), array_fingerprint(arr.dtype.str, None),
                                       None)
        want, data = encode_array_split(arr)
        prefix, fp2, decode2, split = array_slots.encode(arr, len(want))
        assert (prefix, fp2, decode2, bytes(split)) == (want, fp, decode, bytes(data))
    assert array_slots.encode(np.array([object()]), 1000) is None  # the Python steps flag it
    edge = np.arange(10, dtype=np.int64)  # fits alone, not with its prefix: the Python steps'
    assert array_slots.encode(edge, edge.nbytes) is None


def test_decode_equal_refuses_what_it_would_not_decode_as_the_python_steps_do():
    from typedcoll.codecs.array import array_prefix
    prefix = array_prefix("<i8", (3,))
    data = bytearray(np.arange(6, dtype=np.int64).tobytes())
    rows = array_slots.decode_equal("<i8", prefix, data, 2)
    assert rows is not None and [list(x) for x in rows] == [[0, 1, 2], [3, 4, 5]]
    assert array_slots.decode_equal("<i8", prefix, data, 3) is None  # lengths disagree
    assert array_slots.decode_equal("<f8", prefix, data, 2) is None  # the envelope's dtype
    assert array_slots.decode_equal("<i8", array_prefix("<i8", ()), data, 6) is None  # 0-d
    with pytest.raises(ValueError):  # a prefix that is not one: the Python steps say whose
        array_slots.decode_equal("<i8", b"\x02\x00\x92\xa1", data, 2)


def first_slot(comm: tc.TypedComm, value: np.ndarray) -> bytes:
    """What this rank wrote into its slot for ``allgather(value)`` on a fresh communicator: the
    header without its sequence number and instance (which differ between communicators), then
    the inline bytes."""
    with comm.dup() as fresh:
        fresh.allgather(value)
        send = bytes(fresh._p.send)
    n = int.from_bytes(send[LENGTH_OFFSET:HEADER_SIZE], "little")
    inline = send[HEADER_SIZE:HEADER_SIZE + min(n, len(send) - HEADER_SIZE)]
    return send[:8] + send[16:48] + send[52:HEADER_SIZE] + inline


BOUNDARY = ([np.arange(n, dtype=np.int8) for n in range(40, 72)]  # inline, overflow, split
            + [np.arange(100).reshape((1,) * 55 + (100,)),  # a prefix longer than the slot
               np.arange(40).reshape(5, 8).T])  # not contiguous, past the slot


def slots(comm: tc.TypedComm) -> List[bytes]:
    return [first_slot(comm, value) for value in BOUNDARY]


def test_the_c_path_writes_the_slot_the_python_steps_write(monkeypatch):
    """Around the slot's edge (payloads that fit, prefix and data that overflow together, data
    past the slot, a prefix longer than the slot), the header flags, length, fingerprints and
    inline bytes of the C path's call are those of the Python steps'."""
    c_path = outcomes(2, slots)
    monkeypatch.setattr(fast, "allgather", lambda *args: fast.TAKE_PY)
    python = outcomes(2, slots)
    for r, (mine, theirs) in enumerate(zip(c_path, python)):
        assert not isinstance(mine, BaseException), f"rank {r}: {mine!r}"
        assert not isinstance(theirs, BaseException), f"rank {r}: {theirs!r}"
        for value, a, b in zip(BOUNDARY, mine, theirs):
            assert a == b, (value.shape, value.dtype, a.hex(), b.hex())


FAILING_THREADS: Set[int] = set()


def failing_on_rank_1(comm: tc.TypedComm) -> Any:
    if comm.rank == 1:
        FAILING_THREADS.add(threading.get_ident())
    return comm.allgather(np.full(3000, comm.rank, dtype=np.int64))


def test_a_failure_before_the_c_call_leaves_the_call_to_the_python_steps(monkeypatch):
    """The array could not be prepared for the C path on one rank: nothing was sent, so the
    Python steps run that rank's call, the others' C path meets them, and every rank gets
    every array."""
    original = array_slots.encode

    def encode(arr: Any, cap: int) -> Any:
        if threading.get_ident() in FAILING_THREADS:
            raise MemoryError("no room for the C-order copy")
        return original(arr, cap)
    monkeypatch.setattr(array_slots, "encode", encode)
    got = outcomes(3, failing_on_rank_1)
    FAILING_THREADS.clear()
    for r, out in enumerate(got):
        assert not isinstance(out, BaseException), f"rank {r}: {out!r}"
        assert [int(x[0]) for x in out] == [0, 1, 2] and all(len(x) == 3000 for x in out)


def test_a_dtype_whose_string_reads_back_as_another_is_the_python_steps():
    """numpy's user dtypes can print a string that reads back as another dtype ('<V8' as
    '|V8'): the C path, which decodes only after its phase 2, leaves such arrays to the Python
    steps, so every rank reaches their verdict."""
    rational = pytest.importorskip("numpy._core._rational_tests").rational
    assert array_slots.encode(np.zeros(4, dtype=rational), 1000) is None
    assert array_slots.encode(np.zeros(3000, dtype=rational), 1000) is None


def zero_d_past_the_slot(comm: tc.TypedComm) -> Any:
    comm.allgather(np.arange(3))
    return comm.allgather(np.zeros((), dtype=f"V{5000 + comm.rank % 2}"))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_0d_array_past_the_slot_is_the_python_steps(timeout):
    """A 0-d array of a large void dtype passes the slot with no shape to split by: the C path
    leaves it to the Python steps, which return every rank's, or raise one DesyncError for
    dtypes that differ, on every rank."""
    assert array_slots.encode(np.zeros((), dtype="V5000"), 1000) is None
    got = outcomes(3, zero_d_past_the_slot, timeout=timeout)
    assert all(isinstance(g, tc.DesyncError) for g in got), got
    assert len({str(g) for g in got}) == 1, got
