"""A role wrapper's callers are part of its calls' identity (core/callers.py).

An engine's ``broadcast_object`` writes the root's and the receivers' side of one broadcast in
the two arms of ``if rank == src``; called from two lines of its caller (requests, then control
messages), a rank that skips the first must not be handed the second's payload. The verdict's
level-by-level pairing is pure logic, tested on hand-built envelopes; the rest on in-process
ranks, over the C fast path (timeout None) and the Python steps (timeout 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional

import msgspec
import pytest

import typedcoll as tc
from typedcoll.core.mismatch import Branch, Caller, EnvelopeInfo, split_levels

from test_core_arms import engine_broadcast_pyobj
from test_core_review import TIMEOUTS, a_skipped_vote_raises, one_desync, outcomes, slot_state


class Reqs(msgspec.Struct):
    items: List[str]


# --- the wrappers, shaped as engines write them -------------------------------------------------

def broadcast_object(comm: tc.TypedComm, obj: Any, src: int = 0) -> Any:
    if comm.rank == src:  # vLLM's GroupCoordinator.broadcast_object
        comm.bcast(obj, root=src, schema=Reqs)
        return obj
    else:
        return comm.bcast(None, root=src, schema=Reqs)


def broadcast_dict(comm: tc.TypedComm, d: Any, src: int = 0) -> Any:
    if comm.rank == src:  # vLLM's broadcast_tensor_dict: its metadata through broadcast_object
        broadcast_object(comm, Reqs(sorted(d)), src=src)
        return d
    else:
        keys = broadcast_object(comm, None, src=src)
        return {k: None for k in keys.items}


def receive_requests(comm: tc.TypedComm, step: int, skip_work_on: Optional[int]) -> Any:
    """Work requests, then control requests, each through the wrapper from its own line."""
    work = Reqs([f"work {step}"]) if comm.rank == 0 else None
    control = Reqs([f"abort {step}"]) if comm.rank == 0 else None
    got = []
    if comm.rank != skip_work_on:
        got.append(broadcast_object(comm, work))
    got.append(broadcast_object(comm, control))
    return got


# --- in-process ranks ---------------------------------------------------------------------------

@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_role_wrapper_called_from_two_lines_serves_both_calls(
        timeout: Optional[float]) -> None:
    def body(comm: tc.TypedComm) -> Any:
        got = [receive_requests(comm, step, None) for step in range(3)]
        # SGLang's broadcast_pyobj: a size, then the data unless empty
        pyobj = [(engine_broadcast_pyobj(comm, [f"a{s}"] * s if comm.rank == 0 else [], 0),
                  engine_broadcast_pyobj(comm, ["b"] if comm.rank == 0 else [], 0))
                 for s in range(3)]
        # the flight recorder keeps each call's callers, for dumps and the trace analyzer
        recorded = [e.callers for e in comm._p.recorder.snapshot() if e.op == "bcast"][:6]
        return got, pyobj, slot_state(comm), recorded

    results = outcomes(4, body, timeout=timeout)
    head = receive_requests.__code__.co_firstlineno
    for result in results:
        assert not isinstance(result, BaseException), result
        got, pyobj, _, recorded = result
        assert got == [[Reqs([f"work {s}"]), Reqs([f"abort {s}"])] for s in range(3)]
        assert pyobj == [([f"a{s}"] * s, ["b"]) for s in range(3)]
        # receive_requests has no loop: its caller (the comprehension's line) is kept too
        assert [[c.site for c in callers] for callers in recorded] == \
            [[f"test_core_callers.py:{head + 6}", f"test_core_callers.py:{head + 17}"],
             [f"test_core_callers.py:{head + 7}", f"test_core_callers.py:{head + 17}"]] * 3
    assert len({repr(r[2]) for r in results}) == 1


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("skipper", [0, 2])
@pytest.mark.parametrize("warm", [False, True])
def test_a_rank_that_skips_one_call_of_a_role_wrapper_raises_everywhere(
        skipper: int, warm: bool, timeout: Optional[float]) -> None:
    """Without the callers, the skipped call's peers would take the next call's payload (the
    control requests as work), the steady state's role identity as much as a first run."""
    def body(comm: tc.TypedComm) -> Any:
        if warm:  # both calls proved their role branch: the steady state sends role identities
            for step in range(2):
                receive_requests(comm, step, None)
        return receive_requests(comm, 9, skipper)

    error = one_desync(outcomes(4, body, timeout=timeout))
    assert list(error.kinds) == [tc.MismatchKind.CALL]
    assert "called from test_core_callers.py:" in str(error)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_root_that_skips_a_call_of_sglangs_broadcast_pyobj_raises(
        timeout: Optional[float]) -> None:
    def body(comm: tc.TypedComm, skip: bool) -> Any:
        work = ["w"] if comm.rank == 0 else []
        control = ["c"] if comm.rank == 0 else []
        out = []
        for step in range(3):
            if not (skip and step == 2 and comm.rank == 0):
                out.append(engine_broadcast_pyobj(comm, work, 0))
            out.append(engine_broadcast_pyobj(comm, control, 0))
        return out

    assert outcomes(3, body, False, timeout=timeout) == [[["w"], ["c"]] * 3] * 3
    one_desync(outcomes(3, body, True, timeout=timeout))


def retried(func: Any) -> Any:
    """A retry decorator: its wrapper calls the function in a loop and catches."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for _ in range(3):
            try:
                return func(*args, **kwargs)
            except TimeoutError:
                continue
        raise TimeoutError(func.__name__)
    return wrapper


retried_broadcast_object = retried(broadcast_object)


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("skip", [False, True])
def test_a_retry_decorator_around_a_role_wrapper_keeps_its_callers(
        skip: bool, timeout: Optional[float]) -> None:
    """The decorator's wrapper hands on its caller's arguments: the line that called it is
    the caller, not the wrapper's loop (the same line for every use, where the last rank's
    control call would take the work requests). It hands them on to the function it wraps, so
    it is left out of the wrappers the call passed."""
    def body(comm: tc.TypedComm) -> Any:
        work = Reqs(["work"]) if comm.rank == 0 else None
        control = Reqs(["abort"]) if comm.rank == 0 else None
        got = []
        if not (skip and comm.rank == comm.size - 1):
            got.append(retried_broadcast_object(comm, work))
        got.append(retried_broadcast_object(comm, control))
        return got

    results = outcomes(4, body, timeout=timeout)
    if not skip:
        assert results == [[Reqs(["work"]), Reqs(["abort"])]] * 4
        return
    error = one_desync(results)
    assert list(error.kinds) == [tc.MismatchKind.CALL]
    assert "the callers differ" in str(error) and "retried" not in str(error), error


class Coordinator:
    """vLLM's GroupCoordinator: a flag picks the route to one collective, and the function
    returns its result (``all_reduce``: the custom op, or the out-of-place call)."""

    def __init__(self, comm: tc.TypedComm, use_custom_op: bool) -> None:
        self.comm, self.use_custom_op, self.world_size = comm, use_custom_op, comm.size

    def all_gather(self, value: Any, dim: int = -1) -> Any:
        if self.world_size == 1:
            return [value]
        assert -1 <= dim < 1, f"invalid dim ({dim}) for {type(value).__name__}"
        if self.use_custom_op:
            return self._custom(int(value))
        else:
            return self._out_place(value)

    def _custom(self, value: Any) -> Any:
        return self.comm.allgather(value)

    def _out_place(self, value: Any) -> Any:
        return self.comm.allgather(value)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        if self.use_custom_op:
            return self.comm.bcast(obj, root=src, schema=Reqs)
        return self.comm.bcast(obj, root=src, schema=Reqs)


def two_votes(comm: tc.TypedComm, custom: bool, skipper: Optional[int]) -> Any:
    group = Coordinator(comm, custom)
    got = []
    if comm.rank != skipper:
        got.append(group.all_gather(100 + comm.rank))  # the batch-size vote
    got.append(group.all_gather(comm.rank))  # the timeout vote
    return got


def two_broadcasts(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    group = Coordinator(comm, comm.size > 2)
    got = []
    if comm.rank != skipper:
        got.append(group.broadcast(Reqs(["work"]) if comm.rank == 0 else None))
    got.append(group.broadcast(Reqs(["abort"]) if comm.rank == 0 else None))
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("custom", [True, False])
def test_a_call_that_its_function_picks_carries_its_callers(
        custom: bool, timeout: Optional[float]) -> None:
    """The route a function picks is the same line for every use: without the callers, the
    last rank's timeout vote would take its peers' batch-size votes without an error."""
    assert outcomes(4, two_votes, custom, None, timeout=timeout) == \
        [[[100, 101, 102, 103], [0, 1, 2, 3]]] * 4
    error = one_desync(outcomes(4, two_votes, custom, 3, timeout=timeout))
    assert list(error.kinds) == [tc.MismatchKind.CALL]
    head = two_votes.__code__.co_firstlineno
    text = str(error)
    assert f"called from test_core_callers.py:{head + 4}" in text, text
    assert f"called from test_core_callers.py:{head + 5}" in text, text
    assert "the callers differ" in text and "picks between" in text, text


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("skipper", [0, 2])
def test_a_rooted_call_that_its_function_picks_carries_its_callers(
        skipper: int, timeout: Optional[float]) -> None:
    assert outcomes(4, two_broadcasts, None, timeout=timeout) == \
        [[Reqs(["work"]), Reqs(["abort"])]] * 4
    error = one_desync(outcomes(4, two_broadcasts, skipper, timeout=timeout))
    assert list(error.kinds)[0] == tc.MismatchKind.CALL


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_ranks_that_pick_two_routes_still_raise(timeout: Optional[float]) -> None:
    """The routes keep their own sites: a rank-local flag that sends one rank down the other
    route is two calls, as before."""
    def body(comm: tc.TypedComm) -> Any:
        return Coordinator(comm, comm.rank == 0).all_gather(comm.rank)

    error = one_desync(outcomes(3, body, timeout=timeout))
    assert list(error.kinds) == [tc.MismatchKind.CALL]
    assert "Coordinator._custom" in str(error) and "Coordinator._out_place" in str(error)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_role_wrappers_nested_in_role_branches_pair_level_by_level(
        timeout: Optional[float]) -> None:
    def body(comm: tc.TypedComm) -> Any:
        got = [broadcast_dict(comm, {f"k{s}": 1} if comm.rank == 0 else None)
               for s in range(3)]
        return got, len(comm._p.roles), slot_state(comm)

    results = outcomes(3, body, timeout=timeout)
    for result in results:
        assert not isinstance(result, BaseException), result
        assert [sorted(d) for d in result[0]] == [["k0"], ["k1"], ["k2"]]
        assert result[1] == 1  # learned once: one site, one caller
    assert len({repr(r[2]) for r in results}) == 1


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_driver_and_its_workers_calling_a_role_wrapper_from_two_methods_raise(
        timeout: Optional[float]) -> None:
    """Two lines that are not a role branch's two arms are two calls: nothing tells them from
    a skip. A name= makes them one call."""
    def driver(comm: tc.TypedComm) -> Any:
        return broadcast_object(comm, Reqs(["plan"]))

    def worker(comm: tc.TypedComm) -> Any:
        return broadcast_object(comm, None)

    def named(comm: tc.TypedComm) -> Any:
        if comm.rank == 0:
            return comm.bcast(Reqs(["plan"]), root=0, name="plan")
        return comm.bcast(None, root=0, schema=Reqs, name="plan")

    def body(comm: tc.TypedComm, how: str) -> Any:
        if how == "named":
            return named(comm)
        return driver(comm) if comm.rank == 0 else worker(comm)

    one_desync(outcomes(3, body, "methods", timeout=timeout))
    assert outcomes(3, body, "named", timeout=timeout) == [Reqs(["plan"])] * 3


# --- the verdict's pairing, pure logic ----------------------------------------------------------

def _info(rank: int, arm: int, callers: tuple = ()) -> EnvelopeInfo:
    return EnvelopeInfo(rank=rank, seq=1, op="bcast", root=0, site=f"w.py:{3 if arm == 0 else 6}",
                        branch=Branch("w.py:2:4 bcast #1", arm), callers=callers)


def test_split_levels_pairs_each_level_or_names_one_site() -> None:
    line = (Caller("engine.py:40"),)
    infos = [_info(0, 0, line), _info(1, 1, line), _info(2, 1, line)]
    assert split_levels(infos, 0) == ["w.py:2:4 bcast #1", None]
    # a caller of another line on one rank: no pairing at that level
    other = (Caller("engine.py:41"),)
    assert split_levels([_info(0, 0, line), _info(1, 1, other), _info(2, 1, line)], 0) is None
    # two levels split by two role branches, the root alone in its arm at each
    key = "dict.py:10:4 broadcast_object #1"
    runner = Caller("runner.py:7")
    nested = [_info(0, 0, (Caller("dict.py:12", branch=Branch(key, 0)), runner)),
              _info(1, 1, (Caller("dict.py:15", branch=Branch(key, 1)), runner))]
    assert split_levels(nested, 0) == ["w.py:2:4 bcast #1", key, None]
    # the root not alone in its arm at the callers' level
    assert split_levels(nested + [_info(2, 1, (Caller("dict.py:12", branch=Branch(key, 0)),
                                               runner))], 0) is None
    # chains of different lengths, and a named call, never pair
    assert split_levels([_info(0, 0, line), _info(1, 1)], 0) is None
    named = msgspec.structs.replace(_info(1, 1, line), name="x")
    assert split_levels([_info(0, 0, line), named], 0) is None
    # every level alike: nothing to pair (the headers differ elsewhere)
    assert split_levels([_info(1, 1, line), _info(2, 1, line)], 0) is None


# --- deep chains, comprehensions, a caller's arms that hold the root with others ----------------

def nest_0(comm: tc.TypedComm, obj: Any) -> Any:
    if comm.rank == 0:
        comm.bcast(obj, root=0, schema=Reqs)
        return obj
    else:
        return comm.bcast(None, root=0, schema=Reqs)


def _nested(inner: Any) -> Any:
    def nest(comm: tc.TypedComm, obj: Any) -> Any:
        if comm.rank == 0:
            return inner(comm, obj)
        else:
            return inner(comm, None)
    return nest


NESTS = [nest_0]  # each nest a code object of its own: a level of its own
for depth in range(1, 11):
    _nest = _nested(NESTS[-1])
    _nest.__code__ = _nest.__code__.replace(co_name=f"nest_{depth}")
    NESTS.append(_nest)
SAME_CODE_NESTS = [nest_0]  # closures of one factory: one code object, calls of itself
for _ in range(10):
    SAME_CODE_NESTS.append(_nested(SAME_CODE_NESTS[-1]))


def nested_requests(comm: tc.TypedComm, depth: int, skip_work_on: Optional[int],
                    nests: List[Any] = NESTS) -> Any:
    top = nests[depth]
    got = []
    if comm.rank != skip_work_on:
        got.append(top(comm, Reqs(["work"])))
    got.append(top(comm, Reqs(["control"])))
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_callers_of_role_wrappers_nested_five_deep_still_tell_calls_apart(
        timeout: Optional[float]) -> None:
    assert outcomes(3, nested_requests, 5, None, timeout=timeout) == \
        [[Reqs(["work"]), Reqs(["control"])]] * 3
    one_desync(outcomes(3, nested_requests, 5, 2, timeout=timeout))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_callers_past_those_kept_never_pair(timeout: Optional[float]) -> None:
    """Nine role wrappers deep, the line that tells the calls apart is past the eight callers
    kept: such a call raises (a false alarm, never another call's payload)."""
    one_desync(outcomes(3, nested_requests, 9, None, timeout=timeout))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_role_wrappers_calls_of_itself_pair_by_role_level_by_level(
        timeout: Optional[float]) -> None:
    """Closures of one factory nested run one code object, whose calls of itself are callers
    like any other's: five deep, the root's arm and its receivers' pair at each level, and the
    line that tells the calls apart is kept; nine deep, past the eight callers kept, such a
    call raises (a false alarm, never another call's payload)."""
    assert outcomes(3, nested_requests, 5, None, SAME_CODE_NESTS, timeout=timeout) == \
        [[Reqs(["work"]), Reqs(["control"])]] * 3
    one_desync(outcomes(3, nested_requests, 5, 2, SAME_CODE_NESTS, timeout=timeout))
    one_desync(outcomes(3, nested_requests, 9, None, SAME_CODE_NESTS, timeout=timeout))


def recursive_vote(comm: tc.TypedComm, skip: bool, name: Optional[str] = None) -> Any:
    def at_depth(n: int, value: int) -> Any:
        return at_depth(n - 1, value) if n else comm.allgather(value, name=name)
    depth = 3 * comm.rank  # each rank recurses to a depth of its own
    got = []
    if not (skip and comm.rank == comm.size - 1):
        got.append(at_depth(depth, 100 + comm.rank))  # the batch-size vote
    got.append(at_depth(depth, comm.rank))  # the timeout vote
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_ranks_that_recurse_to_different_depths_for_one_call_name_it(
        timeout: Optional[float]) -> None:
    """Recursion is a caller like any other (a walk that votes at each node must tell its
    nodes apart by depth): ranks that recurse to different depths before one call are two
    calls and raise, alike on every rank; a name= declares them one call."""
    error = one_desync(outcomes(3, recursive_vote, False, timeout=timeout))
    assert str(error).endswith("\n  a function's calls of itself are callers too (a walk that "
                               "calls at each node tells its nodes apart by depth): ranks that "
                               "recurse to different depths before one collective are two "
                               "calls unless it has a name="), error
    assert outcomes(3, recursive_vote, False, "vote", timeout=timeout) == \
        [[[100, 101, 102], [0, 1, 2]]] * 3
    one_desync(outcomes(3, recursive_vote, True, timeout=timeout))


def bisection(comm: tc.TypedComm, one_line: bool, name: Optional[str] = None) -> Any:
    """A recursive bisection over the ranks: every rank votes at each level, then descends into
    the half that holds it, by a test of its rank (a role branch's arms)."""
    def split(lo: int, hi: int, xs: List[int]) -> List[Any]:
        if hi - lo == 1:
            return xs
        mid = (lo + hi) // 2
        pivot = comm.allreduce(sum(xs), name=name) // comm.size
        if one_line:
            return split(lo, mid, xs + [pivot]) if comm.rank < mid else split(mid, hi, xs + [pivot])
        if comm.rank < mid:
            return split(lo, mid, xs + [pivot])
        return split(mid, hi, xs + [pivot])
    return split(0, comm.size, [comm.rank])


@pytest.mark.parametrize("one_line", [False, True])
@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_calls_of_itself_in_a_role_branchs_arms_are_callers_too(
        timeout: Optional[float], one_line: bool) -> None:
    """An arm may recurse into data of its own (twice, or a level less where its data ran
    out), so each level is a caller: a bisection whose ranks take different halves at one
    depth names its vote; unnamed, it raises on every rank."""
    assert outcomes(4, bisection, one_line, "pivot", timeout=timeout) == \
        [[0, 1, 2], [1, 1, 2], [2, 1, 2], [3, 1, 2]]
    one_desync(outcomes(4, bisection, one_line, None, timeout=timeout))


def tokens_then_total(comm: tc.TypedComm) -> Any:
    """A generator that streams a rank's tokens and returns the vote of their count from its
    loop; the consumer takes the first by next() and drains the rest with a for loop, so which
    line resumed it last is its data's (none, or three tokens)."""
    def stream(tokens: List[int]) -> Iterator[Any]:
        i = 0
        while True:
            if i == len(tokens):
                return comm.allreduce(len(tokens))
            yield tokens[i]
            i += 1
    gen = stream([1, 2, 3] if comm.rank else [])
    got = []
    try:
        got.append(next(gen))
        for token in gen:
            got.append(token)
    except StopIteration as stop:
        return got, stop.value
    return got, None


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_generators_return_from_its_loop_stays_its_own_call(timeout: Optional[float]) -> None:
    # rank 1's for loop ends the generator, and keeps no return value
    assert outcomes(2, tokens_then_total, timeout=timeout) == [([], 3), ([1, 2, 3], None)]


def stats_tree(comm: tc.TypedComm, post_order: bool) -> Any:
    """A stats tree synced node by node, a vote at each node and recursion from two lines (the
    draft child, then the target child); rank 1 has no draft child."""
    def sync(node: Any) -> Dict[str, Any]:
        tokens, draft, target = node
        out: Dict[str, Any] = {}
        if not post_order:
            out["total"] = comm.allreduce(tokens)
        if draft is not None:
            out["draft"] = sync(draft)
        if target is not None:
            out["target"] = sync(target)
        if post_order:
            out["total"] = comm.allreduce(tokens)
        return out
    leaf = (comm.rank + 1, None, None)
    nested = (10, leaf, None)  # a draft child with a draft child of its own
    return sync((1, nested if comm.rank != 1 else None, leaf))


@pytest.mark.parametrize("post_order", [False, True])
@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_tree_walk_that_recurses_from_two_lines_tells_its_nodes_apart(
        timeout: Optional[float], post_order: bool) -> None:
    # Before, a function's calls of itself were one level: rank 1's target vote took its
    # peers' draft vote, and in post order the deepest draft leaf's took a child's.
    one_desync(outcomes(3, stats_tree, post_order, timeout=timeout))


def in_comprehensions(comm: tc.TypedComm) -> Any:
    if comm.rank == 0:
        return [broadcast_object(comm, Reqs([str(i)])) for i in range(3)]
    else:
        return [broadcast_object(comm, None) for _ in range(3)]


def last_stage_apart(comm: tc.TypedComm) -> Any:
    if comm.rank == comm.size - 1:
        return broadcast_object(comm, None)
    else:
        return broadcast_object(comm, Reqs(["plan"]) if comm.rank == 0 else None)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_comprehension_in_each_arm_is_its_functions_caller(timeout: Optional[float]) -> None:
    assert outcomes(3, in_comprehensions, timeout=timeout) == [[Reqs(["0"]), Reqs(["1"]),
                                                                 Reqs(["2"])]] * 3


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_callers_arms_that_hold_the_root_with_others_raise(timeout: Optional[float]) -> None:
    """As at the call's own site, a caller's two arms pair when the root is alone in its arm:
    nothing else tells them from a rank that leaves out one call of two by its role."""
    error = one_desync(outcomes(3, last_stage_apart, timeout=timeout))
    assert "call it from one line on every rank" in str(error)


# --- helpers: functions without a loop ---------------------------------------------------------

def any_rank(comm: tc.TypedComm, flag: bool) -> bool:
    flags = comm.allgather(flag)  # on a line of its own: no thin wrapper
    return any(flags)


def max_over_ranks(comm: tc.TypedComm, value: int) -> int:
    out = comm.allreduce(value, op="max")
    print(end="")  # a call of its own after the collective
    return int(out)


def votes_through_helpers(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    """Two votes identical on the wire through one helper, from two lines; ``skipper`` leaves
    out the first (an idle rank's has-work vote), as an engine's iteration does."""
    got = []
    if comm.rank != skipper:
        got.append((any_rank(comm, comm.rank == 0), max_over_ranks(comm, 100 + comm.rank)))
    got.append((any_rank(comm, False), max_over_ranks(comm, comm.rank)))
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("skipper", [0, 2])
def test_a_skipped_vote_through_a_helper_without_a_loop_raises(
        skipper: int, timeout: Optional[float]) -> None:
    """Before, the helper's own line was the site of both votes: the skipper's timeout vote
    took its peers' has-work votes (``True`` where every rank voted ``False``) without an
    error, and its peers hung. The line that called the helper is part of the identity now."""
    assert outcomes(3, votes_through_helpers, None, timeout=timeout) == \
        [[(True, 102), (False, 2)]] * 3
    error = one_desync(outcomes(3, votes_through_helpers, skipper, timeout=timeout))
    assert list(error.kinds) == [tc.MismatchKind.CALL]
    first = votes_through_helpers.__code__.co_firstlineno
    rows = str(error).splitlines()[1:3]
    site = f"test_core_callers.py:{any_rank.__code__.co_firstlineno + 1}"
    assert all(f"allgather[bool] at {site} called from test_core_callers.py:" in r
               for r in rows), error
    assert {r.split("called from ")[1].split()[0].rstrip(",") for r in rows} == \
        {f"test_core_callers.py:{first + 5}", f"test_core_callers.py:{first + 6}"}, error
    assert "the callers differ" in str(error)


# An async engine's vote helper: a coroutine, whose every ``await`` compiles to a loop of
# SEND and a backward jump, none of them a loop of the helper's own.
async def any_rank_awaiting(comm: tc.TypedComm, flag: bool) -> bool:
    await asyncio.sleep(0)  # yields to the event loop (a lock, a queue) before voting
    flags = comm.allgather(flag)
    return any(flags)


async def async_votes(comm: tc.TypedComm, skipper: Optional[int],
                      helper: Any = any_rank_awaiting) -> Any:
    """Two votes identical on the wire through one awaitable helper, from two lines of a
    coroutine; ``skipper`` leaves out the first, as an idle rank's iteration does."""
    got = []
    if comm.rank != skipper:
        got.append(await helper(comm, comm.rank == 0))
    got.append(await helper(comm, False))
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("skipper", [0, 2])
def test_a_skipped_vote_through_an_async_helper_raises(
        skipper: int, timeout: Optional[float]) -> None:
    """Before, a coroutine counted as a function with a loop (its awaits' jumps back), so it
    carried no callers: both votes were the helper's one line, and the skipper's second vote
    took its peers' first (``True`` where every rank voted ``False``) without an error, the
    step clock set or not; its peers timed out."""
    def run_votes(comm: tc.TypedComm, skip: Optional[int]) -> Any:
        comm.set_step(7)
        return asyncio.run(async_votes(comm, skip))

    first = async_votes.__code__.co_firstlineno
    error = a_skipped_vote_raises(run_votes, f"test_core_callers.py:{first + 6}",
                                  f"test_core_callers.py:{first + 7}", skipper=skipper,
                                  timeout=timeout)
    rows = str(error).splitlines()[1:3]
    assert {r.split("called from ")[1].split()[0].rstrip(",") for r in rows} == \
        {f"test_core_callers.py:{first + 6}", f"test_core_callers.py:{first + 7}"}, error


def any_rank_retrying(comm: tc.TypedComm, flag: bool, loop: str) -> bool:
    """A vote helper that retries its one call on a transient error: in a ``for`` loop, a
    ``while`` loop, a loop it leaves by ``break`` to return after it, or from its handler."""
    if loop == "for":
        for _ in range(3):
            try:
                return any(comm.allgather(flag))
            except ConnectionError:
                pass
    elif loop == "while":
        while True:
            try:
                return any(comm.allgather(flag))
            except ConnectionError:
                continue
    elif loop in ("break", "break, then a loop"):
        flags: List[bool] = []
        for _ in range(3):
            try:
                flags = comm.allgather(flag)
                break
            except ConnectionError:
                continue
        if loop == "break":
            return any(flags)
        count = 0
        for voted in flags:  # a loop after the call's: it never gets back to the call
            count += voted
        return count > 0
    else:
        try:
            raise ConnectionError
        except ConnectionError:
            return any(comm.allgather(flag))
    raise RuntimeError("gave up")


def retried_sync_votes(comm: tc.TypedComm, loop: str, skipper: Optional[int]) -> Any:
    comm.set_step(7)  # both votes in one iteration: the step clock cannot tell them apart
    got = []
    if comm.rank != skipper:
        got.append(any_rank_retrying(comm, comm.rank == 0, loop))
    got.append(any_rank_retrying(comm, False, loop))
    return got


@pytest.mark.parametrize("loop", ["for", "while", "break", "break, then a loop", "handler"])
@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_skipped_vote_through_a_retry_loop_that_returns_its_call_raises(
        timeout: Optional[float], loop: str) -> None:
    """Before, a call in a loop carried no callers: both votes were the helper's one line, and
    the skipper's timeout vote took its peers' has-work vote without an error. A call whose
    result the function returns at once runs once per call of the function, loop or not."""
    first = retried_sync_votes.__code__.co_firstlineno
    a_skipped_vote_raises(retried_sync_votes, f"test_core_callers.py:{first + 4}",
                          f"test_core_callers.py:{first + 5}", loop, skipper=2,
                          timeout=timeout)


# A context manager that votes on entry: a generator with no loop, resumed by the ``with``.
@contextlib.contextmanager
def voted(comm: tc.TypedComm, flag: bool) -> Iterator[bool]:
    flags = comm.allgather(flag)
    yield any(flags)


def votes_on_entry(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    """Two votes identical on the wire, each entered by a ``with`` of its own line; ``skipper``
    leaves out the first."""
    comm.set_step(3)
    got = []
    if comm.rank != skipper:
        with voted(comm, comm.rank == 0) as busy:
            got.append(busy)
    with voted(comm, False) as timed_out:
        got.append(timed_out)
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("skipper", [0, 2])
def test_a_skipped_vote_through_a_context_manager_raises(
        skipper: int, timeout: Optional[float]) -> None:
    """Before, a generator counted as a function with a loop, so a ``contextmanager`` voting
    on entry carried no callers: both votes were its one line, and the skipper's second vote
    took its peers' first (``True`` where every rank voted ``False``) without an error, the
    step clock set; its peers timed out."""
    first = votes_on_entry.__code__.co_firstlineno
    error = a_skipped_vote_raises(votes_on_entry, f"test_core_callers.py:{first + 6}",
                                  f"test_core_callers.py:{first + 8}", skipper=skipper,
                                  timeout=timeout)
    rows = str(error).splitlines()[1:3]
    assert all(f"at test_core_callers.py:{voted.__wrapped__.__code__.co_firstlineno + 2}"
               in r for r in rows), error



# An async engine's context manager that votes on entry: an async generator with no loop,
# resumed by the ``async with``.
@contextlib.asynccontextmanager
async def voted_async(comm: tc.TypedComm, flag: bool) -> AsyncIterator[bool]:
    flags = comm.allgather(flag)
    yield any(flags)


async def votes_on_async_entry(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    """``votes_on_entry`` through an ``async with``."""
    comm.set_step(3)
    got = []
    if comm.rank != skipper:
        async with voted_async(comm, comm.rank == 0) as busy:
            got.append(busy)
    async with voted_async(comm, False) as timed_out:
        got.append(timed_out)
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("skipper", [0, 2])
def test_a_skipped_vote_through_an_async_context_manager_raises(
        skipper: int, timeout: Optional[float]) -> None:
    """Before, an async generator counted as a function with a loop, so an
    ``asynccontextmanager`` voting on entry carried no callers: both votes were its one line,
    and the skipper's second vote took its peers' first (``True`` where every rank voted
    ``False``) without an error; its peers timed out, or waited for ever without a timeout."""
    def run_votes(comm: tc.TypedComm, skip: Optional[int]) -> Any:
        return asyncio.run(votes_on_async_entry(comm, skip))

    first = votes_on_async_entry.__code__.co_firstlineno
    error = a_skipped_vote_raises(run_votes, f"test_core_callers.py:{first + 5}",
                                  f"test_core_callers.py:{first + 7}", skipper=skipper,
                                  timeout=timeout, limit=30)
    rows = str(error).splitlines()[1:3]
    vote = voted_async.__wrapped__.__code__.co_firstlineno + 2
    assert all(f"at test_core_callers.py:{vote}" in r for r in rows), error



# A context manager that votes on every exit, the way the ranks agree whether any body failed.
@contextlib.contextmanager
def agreed(comm: tc.TypedComm, box: List[Any]) -> Iterator[None]:
    failed = True
    try:
        yield
        failed = False
    finally:
        box.append(comm.allgather(failed))


def one_rank_raises_inside(comm: tc.TypedComm, raiser: int) -> Any:
    """Every rank enters and leaves once; ``raiser`` leaves by an exception it handles."""
    box: List[Any] = []
    try:
        with agreed(comm, box):
            if comm.rank == raiser:
                raise Transient(f"rank {raiser}'s own work")
    except Transient:
        pass
    return box


@contextlib.asynccontextmanager
async def agreed_async(comm: tc.TypedComm, box: List[Any]) -> AsyncIterator[None]:
    failed = True
    try:
        yield
        failed = False
    finally:
        box.append(comm.allgather(failed))


async def one_rank_raises_inside_async(comm: tc.TypedComm, raiser: int) -> Any:
    box: List[Any] = []
    try:
        async with agreed_async(comm, box):
            if comm.rank == raiser:
                raise Transient(f"rank {raiser}'s own work")
    except Transient:
        pass
    return box


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("kind", ["with", "async with"])
def test_a_context_manager_voting_on_exit_by_an_exception_is_one_call(
        kind: str, timeout: Optional[float]) -> None:
    """Before, the exit's vote carried contextlib's frame as a caller: ``next(self.gen)`` for
    a rank leaving normally, ``self.gen.throw(...)`` for one leaving by an exception, two
    lines, so every rank raised a DesyncError (the callers differ) on a correct program."""
    def program(comm: tc.TypedComm, raiser: int) -> Any:
        if kind == "with":
            return one_rank_raises_inside(comm, raiser)
        return asyncio.run(one_rank_raises_inside_async(comm, raiser))

    assert outcomes(3, program, 1, timeout=timeout) == [[[False, True, False]]] * 3



def exit_stack_raises_inside(comm: tc.TypedComm, raiser: int) -> Any:
    """``one_rank_raises_inside`` with the context manager entered through an ExitStack."""
    box: List[Any] = []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(agreed(comm, box))
            if comm.rank == raiser:
                raise Transient(f"rank {raiser}'s own work")
    except Transient:
        pass
    return box


def decorated_raises_inside(comm: tc.TypedComm, raiser: int) -> Any:
    """``one_rank_raises_inside`` with the context manager as a decorator."""
    box: List[Any] = []

    @agreed(comm, box)
    def work() -> None:
        if comm.rank == raiser:
            raise Transient(f"rank {raiser}'s own work")

    try:
        work()
    except Transient:
        pass
    return box


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("program", [exit_stack_raises_inside, decorated_raises_inside])
def test_an_exit_vote_through_contextlib_is_one_call(program: Any,
                                                     timeout: Optional[float]) -> None:
    """The exit vote of a context manager entered by an ExitStack or used as a decorator, one
    rank leaving by an exception it handles: one call (a DesyncError on every rank before)."""
    assert outcomes(3, program, 1, timeout=timeout) == [[[False, True, False]]] * 3


def stacked_callbacks(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    """Two votes, each an ExitStack's callback, the stacks on two lines; ``skipper`` leaves out
    the first."""
    got: List[Any] = []

    def vote(tag: str) -> None:
        got.append(comm.allgather((tag, comm.rank)))

    if comm.rank != skipper:
        with contextlib.ExitStack() as first:
            first.callback(vote, "bs")
    with contextlib.ExitStack() as second:
        second.callback(vote, "to")
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_skipped_exit_stack_callback_raises(timeout: Optional[float]) -> None:
    """Before, a callback's caller was ExitStack.__exit__'s one line (a loop), so votes from two
    stacks were one call: the skipper returned its peers' batch sizes as its timeout vote
    without an error. contextlib's frames are plumbing: each stack's ``with`` line calls it."""
    assert outcomes(3, stacked_callbacks, None, timeout=timeout) == \
        [[[("bs", 0), ("bs", 1), ("bs", 2)], [("to", 0), ("to", 1), ("to", 2)]]] * 3
    error = one_desync(outcomes(3, stacked_callbacks, 2, timeout=timeout, limit=30))
    assert list(error.kinds) == [tc.MismatchKind.CALL]


class Transient(Exception):
    pass


async def with_retry_async(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """An async ``call_with_retry``: hands on its caller's arguments whole, in a loop."""
    for attempt in range(3):
        try:
            return await fn(*args, **kwargs)
        except Transient:
            await asyncio.sleep(0)


async def retried_votes(comm: tc.TypedComm, skipper: Optional[int], retry: Any) -> Any:
    got = []
    if comm.rank != skipper:
        got.append(await retry(any_rank_awaiting, comm, comm.rank == 0))
    got.append(await retry(any_rank_awaiting, comm, False))
    return got


async def with_retry_and_timeout(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``with_retry_async`` awaiting its callee under a timeout."""
    for attempt in range(3):
        try:
            return await asyncio.wait_for(fn(*args, **kwargs), timeout=60)
        except Transient:
            await asyncio.sleep(0)


# 3.11's wait_for runs its coroutine as a Task, stepped by the event loop: the helper's frame
# is not on its stack (README: a Task is its own caller).
@pytest.mark.skipif(sys.version_info < (3, 12), reason="wait_for makes a Task before 3.12")
@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_skipped_vote_through_an_async_retry_helper_with_a_timeout_raises(
        timeout: Optional[float]) -> None:
    """Before, the helper was passed over only at ``await fn(*args, **kwargs)``: under
    ``wait_for`` its frame stood at another await, so it was the site (a loop: no callers) and
    the skipper's second vote took its peers' first without an error."""
    def run_votes(comm: tc.TypedComm, skip: Optional[int]) -> Any:
        return asyncio.run(retried_votes(comm, skip, with_retry_and_timeout))

    first = retried_votes.__code__.co_firstlineno
    a_skipped_vote_raises(run_votes, f"test_core_callers.py:{first + 3}",
                          f"test_core_callers.py:{first + 4}", timeout=timeout, limit=30)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_skipped_vote_through_an_async_retry_helper_raises(timeout: Optional[float]) -> None:
    """An async retry helper is passed over at its ``await fn(*args, **kwargs)`` as a sync one
    is at ``fn(*args, **kwargs)``. Before, it was a site with a loop, the same line for both
    votes: the skipper's second vote took its peers' first without an error."""
    def run_votes(comm: tc.TypedComm, skip: Optional[int]) -> Any:
        comm.set_step(3)
        return asyncio.run(retried_votes(comm, skip, with_retry_async))

    first = retried_votes.__code__.co_firstlineno
    error = a_skipped_vote_raises(run_votes, f"test_core_callers.py:{first + 3}",
                                  f"test_core_callers.py:{first + 4}", timeout=timeout)
    rows = str(error).splitlines()[1:3]
    assert {r.split("called from ")[1].split()[0] for r in rows} == \
        {f"test_core_callers.py:{first + 3}", f"test_core_callers.py:{first + 4}"}, error
    assert all("through with_retry_async" in r for r in rows), error


# Vote helpers around a block: Python 3.12 and later place an exception handler after the
# function's code and jump back from it to the code after the block (3.12: a ``with`` of two
# context managers; 3.13: any ``with``, an ``except`` that goes on), no loop of the helper's.
def any_rank_holding(comm: tc.TypedComm, flag: bool) -> bool:
    with contextlib.nullcontext(), contextlib.suppress(KeyError):
        flags = comm.allgather(flag)
    return any(flags)


def any_rank_or_none(comm: tc.TypedComm, flag: bool) -> bool:
    try:
        flags = comm.allgather(flag)
    except KeyError:
        flags = []
    return any(flags)


def votes_in_a_block(comm: tc.TypedComm, helper: Any, skipper: Optional[int]) -> Any:
    """Two votes identical on the wire through ``helper``, from two lines; ``skipper`` leaves
    out the first."""
    got = []
    if comm.rank != skipper:
        got.append(helper(comm, comm.rank == 0))
    got.append(helper(comm, False))
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("helper", [any_rank_holding, any_rank_or_none])
def test_a_skipped_vote_through_a_helper_around_a_block_raises(
        helper: Any, timeout: Optional[float]) -> None:
    """Before, on 3.12 and 3.13, the handler's jump back read as a loop: the helper carried no
    callers, and the skipper's second vote took its peers' first (``True`` where every rank
    voted ``False``) without an error; its peers hung."""
    first = votes_in_a_block.__code__.co_firstlineno
    error = a_skipped_vote_raises(votes_in_a_block, f"test_core_callers.py:{first + 5}",
                                  f"test_core_callers.py:{first + 6}", helper, timeout=timeout)
    rows = str(error).splitlines()[1:3]
    assert {r.split("called from ")[1].split()[0].rstrip(",") for r in rows} == \
        {f"test_core_callers.py:{first + 5}", f"test_core_callers.py:{first + 6}"}, error


def test_which_functions_carry_their_callers() -> None:
    """Every call of a function or generator outside its loops carries its callers: a helper
    that sums in a loop and then votes is one call per line that uses it. A call in a loop (a
    worker's loop is one site per line, a retry), in a comprehension, or in a module's code
    carries none."""
    import dis
    from types import CodeType

    from typedcoll.core.callers import PICKED, role_site
    from typedcoll.core.loops import loop_spans

    def carried(code: CodeType, callee: str) -> bool:
        """Whether the calls of ``callee`` in ``code`` carry their callers (all alike)."""
        found = set()
        name = None
        for ins in dis.get_instructions(code):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_ATTR", "LOAD_METHOD"):
                name = ins.argval
            elif ins.opname in ("CALL", "CALL_KW", "CALL_FUNCTION_EX"):
                if name == callee:
                    found.add(bool(role_site(code, ins.offset) & PICKED))
                name = None
        assert len(found) == 1, (code.co_name, callee, found)
        return found.pop()

    def with_loop(comm: Any) -> None:
        for _ in range(2):
            comm.barrier()

    def sums_then_votes(comm: Any, counts: Any) -> Any:
        total = 0
        for count in counts:
            total += abs(count)
        return comm.allreduce(total)

    def generator(comm: Any) -> Any:  # a context manager's, say: resumed once per use
        yield comm.barrier()

    def generator_with_loop(comm: Any) -> Any:
        for _ in range(2):
            yield comm.barrier()

    # A comprehension is no loop of the function's, inlined (3.12+) or not: a vote helper that
    # reads its votes with one was one call for every use on 3.12 (silent, as without callers).
    def comprehending(comm: Any, flag: bool) -> bool:
        flags = comm.allgather(flag)
        truths = [bool(f) for f in flags] + [{f: g for f in flags for g in flags}]
        return any(truths)

    def loop_around_a_comprehension(comm: Any) -> None:
        while [r for r in range(comm.size)]:
            comm.barrier()

    assert carried(comprehending.__code__, "allgather")
    assert not carried(loop_around_a_comprehension.__code__, "barrier")
    assert carried(any_rank.__code__, "allgather")
    assert carried(Coordinator.all_gather.__code__, "_out_place")  # picks a route by a flag
    assert not carried(with_loop.__code__, "barrier")
    assert carried(sums_then_votes.__code__, "allreduce")
    assert not carried(sums_then_votes.__code__, "abs")
    assert not carried(generator_with_loop.__code__, "barrier")
    assert carried(generator.__code__, "barrier")

    async def async_generator(comm: Any) -> Any:  # an async context manager's
        yield comm.barrier()

    async def async_generator_with_loop(comm: Any, source: Any) -> Any:
        async for item in source:
            yield comm.bcast(item)

    assert carried(async_generator.__code__, "barrier")
    assert not carried(async_generator_with_loop.__code__, "bcast")

    async def async_loop(comm: Any, source: Any) -> None:
        async for _ in source:  # a loop, beside the await it compiles to
            comm.barrier()

    assert loop_spans(any_rank_awaiting.__code__) == [] and not carried(async_loop.__code__,
                                                                        "barrier")

    def retry(comm: Any, flag: bool) -> Any:
        while True:  # a retry whose only way back is its handler's
            try:
                flags = comm.allgather(flag)
                break
            except KeyError:
                continue
        return flags

    assert loop_spans(any_rank_holding.__code__) == [] and loop_spans(
        any_rank_or_none.__code__) == []
    # its one way on from the call is to the return: once per call of the function
    assert carried(retry.__code__, "allgather")

    async def serve(comm: Any, handle: Any, source: Any) -> None:
        while True:  # a server's loop: an await after the call, then back to it
            request = comm.bcast(None, root=0)
            await handle(request)

    async def serve_streams(comm: Any, handle: Any, source: Any) -> None:
        while True:  # an async for after the call, which leaves by a handler
            request = comm.bcast(None, root=0)
            async for _ in source:
                handle(request)

    assert not carried(serve.__code__, "bcast")
    assert not carried(serve_streams.__code__, "bcast")
    assert loop_spans(compile("x = 1", "<module>", "exec")) is None
    assert role_site(any_rank.__code__, 0) & PICKED
    # The vote is made for the helper's caller; the calls in its comprehensions are not, as
    # on 3.11, where a comprehension runs in a frame of its own (3.12 inlines it).
    made_for_caller = set()
    for code in (comprehending.__code__, *(c for c in comprehending.__code__.co_consts
                                           if isinstance(c, CodeType))):
        callee = None  # (3.11 calls the comprehension's function too: no name loaded)
        for ins in dis.get_instructions(code):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_ATTR", "LOAD_METHOD"):
                callee = ins.argval
            elif ins.opname == "CALL":
                if callee is not None:
                    made_for_caller.add((callee, bool(role_site(code, ins.offset) & PICKED)))
                callee = None
    assert made_for_caller == {("allgather", True), ("bool", False), ("any", True)}


def counted_vote(comm: tc.TypedComm, counts: List[int]) -> bool:
    """A vote helper that sums in a loop, then votes once, after it."""
    total = 0
    for count in counts:
        total += count
    return any(comm.allgather(total > 0))


def sums_then_votes_twice(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    got = []
    if comm.rank != skipper:
        got.append(counted_vote(comm, [int(comm.rank == 0)]))
    got.append(counted_vote(comm, [0, 0]))
    return got


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_skipped_vote_through_a_helper_that_loops_first_raises(
        timeout: Optional[float]) -> None:
    """Before, a function with a loop anywhere carried no callers: the has-work vote and the
    next one through a helper that counts in a loop were its one line, and the skipper took
    its peers' second vote as its first without an error. Its vote is after its loop."""
    first = sums_then_votes_twice.__code__.co_firstlineno
    a_skipped_vote_raises(sums_then_votes_twice, f"test_core_callers.py:{first + 3}",
                          f"test_core_callers.py:{first + 4}", timeout=timeout)


def _chain(depth: int) -> Callable[[tc.TypedComm, bool], List[bool]]:
    """``depth`` helpers, none thin (each logs on a line of its own) and none with a loop,
    between the caller and its vote: each made from one source, so each has code of its own."""
    namespace: Dict[str, Any] = {}
    source = ["def level0(comm, flag):", "    flags = comm.allgather(flag)", "    return flags"]
    for k in range(1, depth):
        source += [f"def level{k}(comm, flag):", f"    got = level{k - 1}(comm, flag)",
                   f"    LOG.append({k})", "    return list(got)"]
    exec(compile("\n".join(source), "deep_chain.py", "exec"), {"LOG": []}, namespace)
    top = namespace[f"level{depth - 1}"]
    for fn in namespace.values():
        fn.__globals__.update(namespace)
    return top  # type: ignore[no-any-return]


DEEP = _chain(12)  # past the eight callers that messages name one by one


def deep_votes(comm: tc.TypedComm, skipper: Optional[int]) -> Any:
    got = []
    if comm.rank != skipper:
        got.append(any(DEEP(comm, comm.rank == 0)))
    got.append(any(DEEP(comm, False)))
    return got


def test_a_skipped_vote_twelve_callers_deep_raises_alike_on_both_paths() -> None:
    """Before, callers past the eighth were one marker, the same for every chain: two votes
    whose chains parted only there were one call, and the skipper took its peers' second vote
    as its first without an error. Those callers are now one digest, which tells the chains
    apart and is the same on the C path and in the Python steps."""
    digests = []
    for timeout in TIMEOUTS:
        assert outcomes(3, deep_votes, None, timeout=timeout) == [[True, False]] * 3
        error = one_desync(outcomes(3, deep_votes, 2, timeout=timeout))
        assert list(error.kinds) == [tc.MismatchKind.CALL], error
        rows = str(error).splitlines()[1:3]
        assert all(row.count("called from deep_chain.py:") == 8 for row in rows), error
        marks = [row.split("(more callers: ")[1][:8] for row in rows]
        assert marks[0] != marks[1], error
        digests.append(marks)
    assert digests[0] == digests[1]


def test_receivers_without_a_schema_leave_the_callers_hint() -> None:
    """A driver and its workers reaching a role wrapper from two methods, the receivers naming
    no schema (they take the root's): the schemas differ only by that, so the hint says how to
    make the two places one call, as where the receivers name it."""
    from typedcoll.core.desync import desync_message
    from typedcoll.core.mismatch import group_envelopes, mismatch_kinds

    def envelope(rank: int, schema: str) -> EnvelopeInfo:
        arm = 0 if rank == 0 else 1
        return msgspec.structs.replace(
            _info(rank, arm, (Caller(f"engine.py:{20 if rank == 0 else 30}"),)), schema=schema)

    for receivers in ("", "Reqs"):
        envelopes = [envelope(0, "Reqs")] + [envelope(r, receivers) for r in (1, 2)]
        kinds = mismatch_kinds(envelopes)
        text = desync_message(1, "WORLD", kinds, group_envelopes(envelopes))
        assert "the callers differ" in text and "pass each use a name=" in text, text
