"""The public surface (rule 7): the export list and the exception tree. No communicator."""

from __future__ import annotations

import pytest

import typedcoll as tc


def test_all_is_exactly_the_public_api():
    assert tc.__all__ == [
        "CollectiveError",
        "CollectiveTimeout",
        "DecodeError",
        "DesyncError",
        "EncodeError",
        "EnvelopeInfo",
        "Group",
        "MismatchKind",
        "PeerError",
        "TypedComm",
        "dump_traces",
    ]
    for name in tc.__all__:
        assert getattr(tc, name) is not None


ERRORS = [tc.DesyncError, tc.CollectiveTimeout, tc.DecodeError, tc.EncodeError, tc.PeerError]


def test_one_tree_rooted_at_collective_error():
    assert issubclass(tc.CollectiveError, Exception)
    for cls in ERRORS:
        assert cls.__bases__ == (tc.CollectiveError,), cls
    # The five cover the rule 7: desync, timeout, decode, encode, a peer's failure.
    assert {c.__name__ for c in tc.CollectiveError.__subclasses__()} >= {c.__name__ for c in ERRORS}


@pytest.mark.parametrize("cls", [tc.CollectiveError, *ERRORS, tc.MismatchKind])
def test_public_classes_report_the_package_module(cls):
    assert cls.__module__ == "typedcoll"
    assert cls.__doc__ and cls.__doc__.strip()


def test_every_error_carries_seq_and_comm():
    for cls in [tc.CollectiveError, *ERRORS]:
        err = cls("collective #7 on COMM_WORLD: x", seq=7, comm="COMM_WORLD")
        assert (err.seq, err.comm, str(err)) == (7, "COMM_WORLD", "collective #7 on COMM_WORLD: x")
        assert isinstance(err, tc.CollectiveError)
    with pytest.raises(TypeError, match="seq"):
        tc.CollectiveError("no seq")  # type: ignore[call-arg]


def test_error_attributes():
    desync = tc.DesyncError("m", seq=1, kinds=[tc.MismatchKind.OP], groups=[])
    assert (desync.kinds, desync.groups) == ((tc.MismatchKind.OP,), ())
    timeout = tc.CollectiveTimeout("m", seq=2, op="allgather", schema="int", site="a.py:3",
                                   timeout=0.5, missing=[3])
    assert (timeout.op, timeout.schema, timeout.site, timeout.timeout, timeout.missing) == (
        "allgather", "int", "a.py:3", 0.5, (3,))
    assert tc.CollectiveTimeout("m", seq=2).missing is None
    decode = tc.DecodeError("m", seq=3, source=1, schema="RankState")
    assert (decode.source, decode.schema) == (1, "RankState")
    peer = tc.PeerError("m", seq=4, ranks=[1, 2], error_type="TypeError", detail="bad")
    assert (peer.ranks, peer.error_type, peer.detail) == ((1, 2), "TypeError", "bad")


def test_catchable_as_the_base():
    with pytest.raises(tc.CollectiveError, match=r"^collective #3 on W: boom$"):
        raise tc.PeerError("collective #3 on W: boom", seq=3, comm="W")
