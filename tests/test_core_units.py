"""Pure logic of the core, no communicator: the agreement block, nesting, mismatch analysis.

The nesting scanner has a C twin; both must give the same answer for any bytes.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
import weakref

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import typedcoll as tc
from typedcoll.testing import run
from typedcoll.codecs.nesting import MAX_NESTING, nesting_ok, python_nesting_ok
from typedcoll.core import fast
from typedcoll.core.desync import desync_message, failed_elsewhere
from typedcoll.core.mismatch import (EnvelopeInfo, Note, compact_ranks, describe, group_envelopes,
                                     mismatch_kinds)
from typedcoll.core.wire import (AGREE_SIZE, CHECKED, FLAG_WILD_SCHEMA, HEADER, HEADER_SIZE,
                                 LARGE_SHRINK_WINDOW, MAGIC, MIN_SLOT, NO_ROOT, NO_STEP,
                                 SlotPolicy, agreed, block_length,
                                 fold, or_into)


def header(**fields) -> bytearray:
    values = dict(op=1, redop=0, slot=7, root=NO_ROOT, seq=0, step=NO_STEP, schema=b"S" * 8,
                  array=bytes(8), identity=b"I" * 8, instance=1, slot_size=128, flags=0,
                  length=0)
    values.update(fields)
    slot = bytearray(128)
    HEADER.pack_into(slot, 0, MAGIC, values["op"], values["redop"], values["slot"],
                     values["root"], values["seq"], values["step"], values["schema"],
                     values["array"], values["identity"], values["instance"],
                     values["slot_size"], values["flags"], values["length"])
    return slot


def agreement(*slots: bytearray) -> bytearray:
    recv = b"".join(slots)
    block = bytearray(AGREE_SIZE)
    fold(bytearray(recv), 128, len(slots), block)
    return block


def test_the_header_is_64_bytes_and_its_checked_part_56():
    assert HEADER.size == HEADER_SIZE == 64 and CHECKED == 56


def test_equal_headers_agree_and_any_difference_disagrees():
    assert agreed(agreement(header(), header(), header()))
    for field, value in [("op", 2), ("root", 0), ("seq", 1), ("step", 3), ("schema", b"T" * 8),
                         ("identity", b"J" * 8), ("instance", 2), ("slot", 8), ("redop", 1),
                         ("slot_size", 69_632)]:
        assert not agreed(agreement(header(), header(**{field: value}), header())), field


def test_flags_and_lengths_are_ored_but_not_compared():
    block = agreement(header(length=3, flags=0), header(length=64, flags=2))
    assert agreed(block) and block_length(block) == 67 and block[112] == 2


def test_a_rank_without_a_schema_takes_part_without_its_fingerprint():
    wild = header(schema=bytes(8), flags=FLAG_WILD_SCHEMA)
    assert agreed(agreement(header(), wild))
    assert not agreed(agreement(header(), wild, header(schema=b"T" * 8)))


def test_or_into_is_bytewise_or():
    block = bytearray(b"\x01\x00\xf0")
    or_into(block, b"\x02\x80\x0f")
    assert block == bytearray(b"\x03\x80\xff")


def test_the_slot_policy_grows_at_once_and_shrinks_after_a_window():
    policy = SlotPolicy()
    policy.observe(500)
    assert policy.size == 1024
    for _ in range(255):
        policy.observe(10)
    assert policy.size == 1024
    policy.observe(10)
    assert policy.size == 128
    policy.observe(10 ** 6)  # past the largest slot: it travels in phase 2, no growth
    assert policy.size == 128


def test_slots_past_max_slot_fit_within_a_sixteenth_and_shrink_sooner():
    policy = SlotPolicy(max_slot=4 << 20)
    for payload in (5000, 8155, 65_536 + 40, 1 << 20, (1 << 20) + 40, 3 << 20):
        policy.observe(payload)
        need = HEADER_SIZE + payload
        assert need <= policy.size <= need * 17 // 16, (payload, policy.size)
        for _ in range(LARGE_SHRINK_WINDOW):  # the same payload: the slot it has is the fit
            before = policy.size
            policy.observe(payload)
            assert policy.size == before
    policy.observe(5 << 20)  # past this policy's largest slot: no growth
    assert policy.size < 4 << 20
    for _ in range(LARGE_SHRINK_WINDOW):  # payloads past every slot need no room in one
        policy.observe(5 << 20)
    assert policy.size == MIN_SLOT
    policy.observe(3 << 20)
    for _ in range(LARGE_SHRINK_WINDOW):
        policy.observe(10)
    assert policy.size == MIN_SLOT
    policy.observe((4 << 20) - HEADER_SIZE - 1)  # just within the largest slot
    assert policy.size == 4 << 20


def test_a_largest_slot_off_the_64_byte_grid_is_rounded_down_and_still_works(monkeypatch):
    """A transport's largest slot that is no multiple of 4 once made a receive buffer that
    could not be read as uint32s: the call after the one that grew the slot raised, and the
    communicator stayed claimed."""
    from typedcoll.transports import memory

    assert SlotPolicy(max_slot=5001).max_slot == 4992
    monkeypatch.setattr(memory.MemoryTransport, "max_slot", 5001)

    def program(comm):
        grown = comm.allgather("x" * 4900)  # past 4 KiB: the slot grows to the largest one
        return [len(v) for v in grown], comm._p.policy.size, comm.allgather(comm.rank)

    for rank_result in run(3, program, timeout=20):
        assert rank_result == ([4900] * 3, 4992, [0, 1, 2])


def nested(depth: int) -> bytes:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return msgspec.msgpack.encode(value)


@pytest.mark.parametrize("depth,ok", [(1, True), (MAX_NESTING, True), (MAX_NESTING + 1, False),
                                      (5000, False)])
def test_nesting_is_judged_from_the_bytes(depth, ok):
    data = nested(depth) if depth < 900 else b"\x91" * depth + b"\x00"
    assert nesting_ok(data) is ok and python_nesting_ok(data) is ok


@pytest.mark.skipif(not fast.ENABLED, reason="the C extension is not built or is turned off")
@settings(max_examples=400, derandomize=True, deadline=None)  # a GC pause is not a slow example
@given(st.one_of(st.binary(max_size=400),
                 st.recursive(st.text(max_size=5) | st.binary(max_size=5)
                              | st.none() | st.floats(allow_nan=False)
                              | st.integers(-2 ** 63, 2 ** 64 - 1),
                              lambda inner: st.lists(inner, max_size=3)
                              | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                              max_leaves=300).map(msgspec.msgpack.encode)),
       st.integers(1, MAX_NESTING))
def test_the_c_nesting_scanner_agrees_with_its_python_twin(data, limit):
    assert fast._speedups.nesting_ok(data, limit) == python_nesting_ok(data, limit)
    assert nesting_ok(data, limit) == python_nesting_ok(data, limit)


def env(rank: int, **fields) -> EnvelopeInfo:
    base = dict(rank=rank, seq=14, op="allgather", schema="RankState", fingerprint="ab" * 8,
                comm="tp", site="model.py:143", occurrence=2, step=2)
    base.update(fields)
    return EnvelopeInfo(**base)


def test_a_failure_at_another_call_than_its_peers_says_the_ranks_are_out_of_step():
    """A failed rank is left out of the comparison (it may not know its schema): where its
    call is not one its peers made, the failure's text says so, the same on every rank."""
    failed = env(3, site="model.py:170", name=None, error="bad value", error_type="EncodeError")
    infos = [env(r) for r in range(3)] + [failed]
    assert failed_elsewhere([3], infos) == (
        " (and rank 3 made another call than the others, so the ranks are out of step too: "
        "ranks 0-2: allgather at model.py:143; rank 3: allgather at model.py:170)")
    named = [env(r, name="stats") for r in range(3)] + [env(3, name="state")]
    assert failed_elsewhere([3], named).endswith(
        "ranks 0-2: allgather name='stats' at model.py:143; rank 3: allgather name='state' at "
        "model.py:143)")
    assert failed_elsewhere([3], [env(r) for r in range(4)]) == ""  # one call: a failure alone
    # The two calls of one line (a conditional): told apart by their columns, or the suffix
    # named one group after saying the rank made another call.
    one_line = [env(r, column=40) for r in range(3)] + [env(3, column=8, error="bad value")]
    assert failed_elsewhere([3], one_line).endswith(
        "ranks 0-2: allgather at model.py:143:41; rank 3: allgather at model.py:143:9)")
    assert failed_elsewhere([3], [env(r) for r in range(3)] + [env(3, site="?")]) == ""
    assert failed_elsewhere([0, 1], [env(0, site="a.py:1"), env(1, site="b.py:2")]) == ""
    one_name = [env(r, name="plan", site=f"worker{r}.py:9") for r in range(4)]
    assert failed_elsewhere([3], one_name) == ""  # a name= is one call wherever it is written


def test_desync_message_pinned():
    envelopes = [env(0, schema="IterStats", site="model.py:165", occurrence=3, step=1),
                 env(1, schema="IterStats", site="model.py:165", occurrence=3, step=1),
                 env(2), env(3, schema="IterStats", site="model.py:165", occurrence=3, step=1)]
    kinds = mismatch_kinds(envelopes)
    groups = group_envelopes(envelopes)
    assert desync_message(14, "tp", kinds, groups) == (
        "collective #14 on tp diverged (call site, schema, step):\n"
        "  ranks 0-1,3: allgather[IterStats] at model.py:165, its 3rd call, step 1\n"
        "  rank 2:      allgather[RankState] at model.py:143, its 2nd call, step 2")


def test_decisions_that_differ_are_listed():
    note = lambda v: (Note(key="can_queue", value=v, site="loop.py:12", step=4),)  # noqa: E731
    envelopes = [env(0, notes=note(True)), env(1, site="x.py:1", notes=note(False)),
                 env(2, notes=note(True))]
    text = desync_message(14, "tp", mismatch_kinds(envelopes), group_envelopes(envelopes))
    assert text.endswith("  decisions that differ:\n"
                         "    can_queue at loop.py:12 — ranks 0,2: True; rank 1: False\n"
                         "  only the call sites differ: if these are the same collective called "
                         "from different places, give every rank's call the same name=")


def test_sites_that_differ_through_one_helper_name_the_helper_to_write_the_name_in():
    # vLLM's data-parallel padding vote: busy ranks reach it from execute_model, an idle rank
    # from execute_dummy_batch (a thin wrapper, so its site is its caller's line). A name= in
    # the helper pairs them (and every other use of it); marking a wrapper transparent, as the
    # hint used to offer, leaves the sites apart.
    helper = "Runner.get_dp_padding (runner.py:6)"
    envelopes = [env(0, site="runner.py:23", via=f"Runner.dummy (runner.py:12) through {helper}",
                     occurrence=1),
                 env(1, site="runner.py:10", via=helper, occurrence=1)]
    text = desync_message(14, "dp", mismatch_kinds(envelopes), group_envelopes(envelopes))
    assert text.splitlines()[-1] == (
        "  only the call sites differ: if these are the same collective reached from different "
        f"places, give every rank's call the same name=, passed down to the call in {helper} (a "
        f"name= written in {helper} itself makes every call through it one call: only where it "
        "makes one collective)")
    assert "transparent" not in text


def test_long_chains_of_callers_that_differ_say_where_they_part():
    # An engine whose rank 0 alone runs its entry point under a profiler: the kv-block vote in
    # Engine.__init__ differs four levels up, past rows no reader compares by eye.
    from typedcoll.core.mismatch import Caller
    shared = (Caller("engine.py:40", 9), Caller("engine.py:88", 8, "Engine.start (engine.py:80)"))
    chains = [shared + (Caller("main.py:25", 4), Caller("main.py:30")),
              shared + (Caller("main.py:27", 4), Caller("main.py:30"))]
    envelopes = [env(r, site="engine.py:12", occurrence=1, callers=chains[r > 0])
                 for r in range(3)]
    text = desync_message(0, "WORLD", mismatch_kinds(envelopes), group_envelopes(envelopes))
    assert "  the callers differ:" in text, text
    assert text.splitlines()[-1] == ("  the callers agree up to the 2nd and part at the 3rd: "
                                     "rank 0: main.py:25; ranks 1-2: main.py:27"), text
    shorter = [env(0, site="engine.py:12", occurrence=1, callers=shared),
               env(1, site="engine.py:12", occurrence=1, callers=chains[0])]
    text = desync_message(0, "WORLD", mismatch_kinds(shorter), group_envelopes(shorter))
    assert "part at the 3rd: rank 0: no further caller; rank 1: main.py:25" in text, text
    near = [env(r, site="engine.py:12", occurrence=1, callers=(Caller(f"main.py:{20 + r}"),))
            for r in range(2)]
    text = desync_message(0, "WORLD", mismatch_kinds(near), group_envelopes(near))
    assert "the callers differ:" in text and "part at" not in text, text


def test_sites_that_differ_with_counts_that_differ_say_a_call_was_skipped_or_added():
    # Rank 0 made one call more (its 1st at its line, the others' 3rd at theirs): a name= there
    # would pair rank 0's extra call with the others' and hand them its data.
    envelopes = [env(0, site="engine.py:16", occurrence=1)] + \
        [env(r, site="engine.py:20", occurrence=3) for r in (1, 2)]
    text = desync_message(14, "tp", mismatch_kinds(envelopes), group_envelopes(envelopes))
    assert text.splitlines()[-1] == (
        "  only the call sites differ, and the ranks have made these calls a different number "
        "of times: a rank most likely skipped or added a call before this one (a name= would "
        "then pair it with another call and hand that call its data); only if these are one "
        "collective reached from different places, and called as often on every rank, give "
        "every rank's call the same name=")


def test_decisions_that_differ_within_one_envelope_group_are_listed_by_rank():
    """Ranks 0-2 agree in their envelope but rank 1 decided otherwise: each rank's own
    decision counts, at every site it was noted at; and a rank that noted nothing is shown."""
    note = lambda v, at="loop.py:12": (  # noqa: E731
        Note(key="can_queue", value=v, site=at, step=4),)
    envelopes = [env(0, notes=note(True)), env(1, notes=note(False, "loop.py:14")),
                 env(2, notes=note(True)), env(3, site="x.py:1", notes=note(False)), env(4)]
    groups = group_envelopes(envelopes)
    assert [g.ranks for g in groups] == [(0, 1, 2, 4), (3,)]
    text = desync_message(14, "tp", mismatch_kinds(envelopes), groups)
    assert "  decisions that differ:\n    can_queue at loop.py:12 and loop.py:14 — ranks 0,2: " \
        "True; ranks 1,3: False; rank 4: (not noted)\n" in text, text


def test_the_identity_hint_follows_what_the_identities_are():
    def hint(*envelopes: EnvelopeInfo) -> str:
        kinds = mismatch_kinds(envelopes)
        assert kinds == [tc.MismatchKind.CALL]
        return desync_message(14, "tp", kinds, group_envelopes(envelopes)).splitlines()[-1]

    assert hint(env(0, name="batch"), env(1, name="timeout")) == (
        "  only the names differ: each name= is a collective of its own, so a rank skipped or "
        "added a call before this one, or the ranks named one call differently")
    assert hint(env(0, name="batch"), env(1), env(2)) == (
        "  rank 0 named the call and the others did not: if these are the same collective, give "
        "it the same name= on every rank; else a rank skipped or added a call before this one")


def test_the_step_hint_tells_a_skipped_iteration_from_a_clock_some_ranks_never_set():
    def hint(*envelopes: EnvelopeInfo) -> str:
        kinds = mismatch_kinds(envelopes)
        assert kinds == [tc.MismatchKind.STEP]
        return desync_message(14, "tp", kinds, group_envelopes(envelopes)).splitlines()[-1]

    assert hint(env(0, step=3), env(1, step=4), env(2, step=3)) == (
        "  the ranks are at different steps of the same call: a rank skipped or repeated an "
        "iteration")
    # Before, this read as a skipped iteration too: only the driver's loop set the clock.
    assert hint(env(0, step=0), env(1, step=None), env(2, step=None)) == (
        "  only rank 0 stamped this call with a step: ranks 1-2 never set the step clock on this "
        "communicator (or set it to None); set it on every rank alike (set_step in the loop "
        "each rank runs, or step= on the call)")


def test_the_step_hint_tells_both_a_clock_never_set_and_stamped_ranks_apart():
    # The ranks that set the clock disagree as well: a skipped iteration among them too.
    lines = desync_message(14, "tp", [tc.MismatchKind.STEP], group_envelopes(
        (env(0, step=3), env(1, step=4), env(2, step=None)))).splitlines()[-2:]
    assert lines == [
        "  only ranks 0-1 stamped this call with a step: rank 2 never set the step clock on this "
        "communicator (or set it to None); set it on every rank alike (set_step in the loop "
        "each rank runs, or step= on the call)",
        "  and ranks 0-1 are at different steps of the same call: a rank skipped or repeated "
        "an iteration"], lines


def test_a_record_without_root_or_reduce_op_leaves_them_out():
    # Hang reports and dumps describe recorded calls, which keep neither.
    assert describe(env(0, op="bcast")) == "bcast[RankState] at model.py:143, its 2nd call, step 2"
    assert describe(env(0, op="allreduce", schema="")).startswith("allreduce at model.py:143")
    assert describe(env(0, op="bcast", root=None), [tc.MismatchKind.ROOT]).startswith(
        "bcast[RankState] root=None at")
    assert describe(env(0, schema=""), show_fingerprint=True).startswith("allgather at")
    # An op that takes neither shows neither where the kinds differ: its op differs.
    kinds = [tc.MismatchKind.OP, tc.MismatchKind.ROOT, tc.MismatchKind.REDUCE_OP]
    assert describe(env(0), kinds).startswith("allgather[RankState] at")


def test_describe_shows_what_differs():
    e = env(0, op="bcast", root=0, name="schedule")
    assert describe(e) == ("bcast[RankState] root=0 name='schedule' at model.py:143, "
                           "its 2nd call, step 2")
    assert describe(env(0, comm="tp#2"), [tc.MismatchKind.COMMUNICATOR]).startswith(
        "allgather[RankState] on tp#2 at")


@pytest.mark.parametrize("ranks,text", [([3], "rank 3"), ([0, 1, 2, 4, 5], "ranks 0-2,4-5"),
                                        ([5, 1], "ranks 1,5")])
def test_compact_ranks(ranks, text):
    assert compact_ranks(ranks) == text


def test_the_public_api():
    assert sorted(tc.__all__) == sorted([
        "CollectiveError", "CollectiveTimeout", "ConcurrentCallError", "DecodeError",
        "DesyncError", "EncodeError", "EnvelopeInfo", "Group", "MismatchKind", "Note",
        "PeerError", "TypedComm", "__version__", "compat", "decides_from_fields", "diagnostics",
        "testing", "transparent"])
    for name in ("CollectiveError", "DesyncError", "CollectiveTimeout", "EncodeError",
                 "DecodeError", "PeerError", "ConcurrentCallError", "MismatchKind"):
        assert getattr(tc, name).__module__ == "typedcoll"
    for cls in (tc.DesyncError, tc.CollectiveTimeout, tc.EncodeError, tc.DecodeError,
                tc.PeerError, tc.ConcurrentCallError):
        assert issubclass(cls, tc.CollectiveError)
        doc = cls.__doc__ or ""
        assert "Raised" in doc or "raised" in doc, cls


def _raised(n, body, **kwargs):
    with pytest.raises(BaseExceptionGroup) as info:
        run(n, body, **kwargs)
    return list(info.value.exceptions)


def test_every_error_crosses_a_process_boundary_whole():
    # An engine's worker pipe, or Ray, pickles what a rank raised: a keyword-only field missing
    # from ``args`` made unpickling fail with TypeError instead.
    def skip(comm):
        if comm.rank == 0:
            comm.allgather(1)  # rank 1 votes on another line
        comm.allgather(2)
    errors = _raised(2, skip, timeout=5) + _raised(2, lambda comm: comm.rank or comm.barrier(),
                                                   timeout=0.3)
    assert {type(e) for e in errors} == {tc.DesyncError, tc.CollectiveTimeout}
    for err in errors + [tc.PeerError("m", seq=2 ** 64 - 1, comm="c", ranks=(1,)),
                         tc.DecodeError("m", seq=3, source=1, schema="int")]:
        for twin in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
            assert type(twin) is type(err) and str(twin) == str(err)
            assert vars(twin) == vars(err) and twin.__traceback__ is None


def test_a_broken_channel_keeps_the_error_not_the_frames_of_its_call():
    # A channel lives as long as its parent communicator (torch keeps its channels for the
    # process): an engine that catches the timeout and carries on must get its batch back.
    class Batch:
        pass
    batches, channels = [], {}

    def body(comm):
        batch = Batch()
        batches.append(weakref.ref(batch))
        channels[comm.rank] = comm._p.channel
        if comm.rank == 0:
            comm.allgather(1)  # rank 1 never comes
    assert len(_raised(2, body, timeout=0.3)) == 1
    gc.collect()
    assert isinstance(channels[0].broken, tc.CollectiveTimeout)
    assert channels[0].broken.__traceback__ is None and channels[1].broken is None
    assert [ref() for ref in batches] == [None, None]


def test_importing_typedcoll_installs_nothing():
    import subprocess
    import sys
    # Compared with SIGTERM's disposition before the import: a launcher may hand down another.
    code = ("import sys, signal; before = signal.getsignal(signal.SIGTERM); import typedcoll; "
            "print(sys.excepthook is sys.__excepthook__, "
            "signal.getsignal(signal.SIGTERM) == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""}, timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_a_bad_reduce_op_never_imports_mpi4py():
    """Importing mpi4py initialises MPI, which under an MPI launcher waits for every rank: a
    torch job's one rank with a bad op would hang there instead of raising."""
    import subprocess
    import sys
    code = ("import sys; from typedcoll.core.args import check_reduce_op; "
            "print(check_reduce_op('avg')[1]); print(check_reduce_op(object())[0]); "
            "print('mpi4py.MPI' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ValueError: expected op to be one of 'sum'") and \
        lines[0].endswith("got 'avg'"), out
    assert lines[1:] == ["0", "False"], out


def test_an_unsupported_mpi_op_is_named_not_shown_by_address():
    from mpi4py import MPI

    from typedcoll.core.args import check_reduce_op
    assert check_reduce_op(MPI.MAXLOC)[1].endswith("got MPI.MAXLOC")  # type: ignore[union-attr]
    assert check_reduce_op(MPI.MAX)[1] is None


def test_the_numpy_scalar_hint_names_python_scalars_alone():
    def info(rank: int, schema: str, shape: object = None, dtype: object = None) -> EnvelopeInfo:
        return EnvelopeInfo(rank=rank, seq=1, op="allgather", schema=schema, site="m.py:3",
                            shape=shape, dtype=dtype)
    kinds = [tc.MismatchKind.SCHEMA, tc.MismatchKind.SHAPE, tc.MismatchKind.DTYPE]
    scalar = info(0, "bool", (), "bool")
    text = desync_message(1, "WORLD", kinds, group_envelopes([scalar, info(1, "bool")]))
    assert text.endswith("rank 0 sent a numpy scalar (dtype bool), rank 1 a Python bool: a "
                         "numpy scalar travels as a 0-d array, so give every rank's value one "
                         "type (int(x), float(x) or bool(x) on every rank, or a numpy scalar on "
                         "every rank)"), text
    for other in (info(1, "list[int]"), info(1, "NoneType"), info(1, "")):
        text = desync_message(1, "WORLD", kinds, group_envelopes([scalar, other]))
        assert "numpy scalar" not in text, text
