"""The device path's verdict on a broadcast written in a role branch (``core.arms``), on
hand-built envelope blocks (no GPU): the root's side in one arm of an ``if``, the receivers' in
the other, is one call there as on the host path; any other split raises on every rank.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, List

import pytest

torch = pytest.importorskip("torch")

from typedcoll.core.wire import CHECKED  # noqa: E402
from typedcoll.tensor import device  # noqa: E402
from typedcoll.tensor.envelope import (BLOCK, META_DECODER, META_MAX, DeviceBranch,  # noqa: E402
                                       DeviceMeta, encode_meta)

from test_core_review import one_desync  # noqa: E402
from test_torch import _FakeProtocol, _blocks, _device_call  # noqa: E402


def role_branch(p: Any, root: int, in_roots_arm: Callable[[int], bool]) -> Any:
    t = torch.zeros(3)
    leader = in_roots_arm(p.rank)  # a role's name: only a test of roles pairs the arms
    if leader:
        return _device_call(p, "broadcast_tensor", t, 4, root=root)
    else:
        return _device_call(p, "broadcast_tensor", t, 4, root=root)


def two_votes(p: Any) -> Any:
    t = torch.zeros(3)
    if p.rank == 0:
        return _device_call(p, "all_reduce_tensor", t, 4, reduce_op="sum")
    else:
        return _device_call(p, "all_reduce_tensor", t, 4, reduce_op="sum")


def verdicts(calls_of: Callable[[Any], Any], size: int = 3) -> List[Any]:
    ps = [_FakeProtocol(r, size) for r in range(size)]
    calls = [calls_of(p) for p in ps]
    blocks = _blocks(ps, calls)
    return [device.check(ps[r], calls[r], blocks, blocks[r * BLOCK:r * BLOCK + CHECKED],
                         "deferred") for r in range(size)]


def test_the_root_alone_in_its_arm_is_one_call():
    assert verdicts(lambda p: role_branch(p, 0, lambda r: r == 0)) == [None] * 3
    assert verdicts(lambda p: role_branch(p, 2, lambda r: r == 2), 4) == [None] * 4


@pytest.mark.parametrize("case", ["receiver in the root's arm", "root in the receivers' arm",
                                  "two votes"])
def test_any_other_split_raises_on_every_rank(case: str):
    calls_of = {
        "receiver in the root's arm": lambda p: role_branch(p, 0, lambda r: r < 2),
        "root in the receivers' arm": lambda p: role_branch(p, 1, lambda r: r == 0),
        "two votes": two_votes,
    }[case]
    assert "diverged (call site)" in str(one_desync(verdicts(calls_of, 4)))


def test_a_long_envelope_keeps_its_branch_within_the_block():
    branch = DeviceBranch("0123456789abcdef", 1)
    meta = DeviceMeta("n" * 256, "complex128", "cuda", tuple(range(1, 40)), "s" * 300, 2 ** 40,
                      "c" * 99, "e" * 500, 4000, branch)
    payload = encode_meta(meta)
    assert len(payload) <= META_MAX
    assert META_DECODER.decode(payload).branch == branch


@pytest.mark.parametrize("wide", [False, True])
def test_a_cut_envelope_keeps_two_thin_wrappers_apart(wide):
    # Ranks compare the wrapper's text (a role branch pairs calls through one wrapper only):
    # cut to fit, two wrappers whose texts differ in one character must still differ.
    char = "\U0001F600" if wide else "s"
    metas = [DeviceMeta("n" * 256, "float32", "cuda", (4,), char * 300, 7, "c" * 99, "e" * 500,
                        40, DeviceBranch("0123456789abcdef", 0),
                        f"{char * 100}{module}{char * 100}.bcast (pkg/m.py:12)") for module in "ab"]
    cut = [META_DECODER.decode(encode_meta(meta)) for meta in metas]
    assert all(len(encode_meta(meta)) <= META_MAX for meta in metas)
    assert cut[0].via != cut[1].via and None not in (cut[0].via, cut[1].via)
    assert cut[0].branch == cut[1].branch == metas[0].branch


def test_an_envelope_of_wide_characters_fits_the_block():
    wide = "\U0001F600"
    meta = DeviceMeta(wide * 99, "float32", "cuda", (4,), wide * 300, 2 ** 40, wide * 99,
                      wide * 500, 4000, DeviceBranch("0123456789abcdef", 0))
    payload = encode_meta(meta)
    assert len(payload) <= META_MAX
    cut = META_DECODER.decode(payload)
    assert (cut.branch, cut.occurrence, cut.column) == (meta.branch, 2 ** 40, 4000)


# --- the callers of a role wrapper (core.callers) ---------------------------------------------

def _site_call(p: Any, tensor: Any) -> Any:
    """A device call at its caller's line, with the callers found there (core.callers)."""
    from typedcoll.core.callers import callers_of
    from typedcoll.tensor.envelope import tensor_call
    call = tensor_call(p, "broadcast_tensor", tensor, "", None, root=0)
    frame = sys._getframe(1)
    call.code, call.lasti, call.seq, call.occurrence = frame.f_code, frame.f_lasti, 4, 1
    call.callers = callers_of(frame)
    return call


def _wrapped_call(p: Any, tensor: Any) -> Any:
    if p.rank == 0:  # an engine's broadcast_object, made for its caller's line
        return _site_call(p, tensor)
    else:
        return _site_call(p, tensor)


def requests_then_control(p: Any, skipper: int) -> Any:
    has_work = p.rank != skipper  # a decision of the rank's own, not a test of its role
    if has_work:
        return _wrapped_call(p, torch.zeros(3))  # the work requests
    return _wrapped_call(p, torch.zeros(3))  # the control requests, the skipper's next call


def test_a_role_wrapper_made_for_two_lines_raises_on_the_device_path():
    assert verdicts(lambda p: requests_then_control(p, -1), 4) == [None] * 4
    for skipper in (0, 2):
        error = one_desync(verdicts(lambda p: requests_then_control(p, skipper), 4))
        assert "called from test_torch_device_roles.py:" in str(error), error


def test_a_cut_envelope_keeps_two_callers_apart():
    metas = [DeviceMeta("n" * 256, "float32", "cuda", (4,), "s" * 300, 7, "c" * 99, "e" * 500,
                        40, DeviceBranch("0123456789abcdef", 0), None,
                        ((f"{'p' * 200}/{line}.py:12:5", None),))
             for line in "ab"]
    cut = [META_DECODER.decode(encode_meta(meta)) for meta in metas]
    assert all(len(encode_meta(meta)) <= META_MAX for meta in metas)
    assert cut[0].callers != cut[1].callers and len(cut[0].callers) == 1


def _nest(inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def nest(p: Any, tensor: Any) -> Any:
        if p.rank == 0:
            return inner(p, tensor)
        else:
            return inner(p, tensor)
    return nest


def test_role_wrappers_nested_three_deep_pair_within_the_block():
    three = _nest(_nest(_nest(_wrapped_call)))
    assert verdicts(lambda p: three(p, torch.zeros(3)), 4) == [None] * 4


def test_an_envelope_never_outgrows_its_block():
    """A branch with many enclosing candidates and eight callers with theirs: what lets calls
    pair is given up (a false alarm at worst), never the block's bound."""
    branch = DeviceBranch("0123456789abcdef", 1, tuple((f"{k:016x}", 1) for k in range(7)))
    callers = tuple((f"{'p' * 90}/m.py:{k}:5", branch) for k in range(8))
    meta = DeviceMeta("n" * 256, "float32", "cuda", (4,), "s" * 300, 2 ** 40, "c" * 99,
                      "e" * 500, 4000, branch, "v" * 200, callers)
    payload = encode_meta(meta)
    assert len(payload) <= META_MAX
    assert META_DECODER.decode(payload).occurrence == 2 ** 40



def bad_receiver(p: Any, bad: int) -> Any:
    t = torch.zeros(3)
    leader = p.rank == 0
    if leader:
        return _device_call(p, "broadcast_tensor", t, 4, root=0)
    else:
        return _device_call(p, "broadcast_tensor", t, 4, root=7 if p.rank == bad else 0)


@pytest.mark.parametrize("bad", [1, 3])
def test_a_receivers_bad_root_in_a_role_branch_is_its_error_not_a_desync(bad: int):
    # The failed rank sent no root: the others' two arms still pair, and name its argument.
    got = verdicts(lambda p: bad_receiver(p, bad), 4)
    assert got[bad] is None  # deferred: it raised its own EncodeError when it made the call
    for r, error in enumerate(got):
        if r != bad:
            assert type(error).__name__ == "PeerError", error
            site = f"test_torch_device_roles.py:{bad_receiver.__code__.co_firstlineno + 6}"
            assert str(error) == (f"collective #4 on WORLD: rank {bad} failed its "
                                  f"broadcast_tensor contribution at {site}: expected root in "
                                  "0..3, got 7"), error
