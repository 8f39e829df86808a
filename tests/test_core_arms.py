"""Role branches (``core/arms.py``): a rooted collective written once in each arm of an ``if``.

``if rank == root: comm.bcast(x)`` / ``else: comm.bcast(None)`` is one collective on two lines:
the verdict accepts it when every rank wrote it in the same branch and the root alone is in its
arm. What must stay an error: a receiver in the root's arm, two arms' calls of different ops or
names, unrooted calls in two arms (two votes look alike), a named call. The branch reading is
pure logic, tested on source text; the verdict on in-process ranks, on the C path
(``timeout=None``) and the Python steps (``timeout=10``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import msgspec
import pytest

import typedcoll as tc
from typedcoll.core.arms import branch_calls
from typedcoll.core.mismatch import Branch, EnvelopeInfo
from typedcoll.core.verdict import role_branch

from test_core_review import TIMEOUTS, one_desync, outcomes, slot_state
from test_core_semantics import line_of


class Plan(msgspec.Struct):
    step: int
    names: List[str]


SOURCE = '''
def if_else(comm, x):
    if comm.rank == 0:
        comm.bcast(x, root=0)
        return x
    else:
        return comm.bcast(None, root=0)

def early_return(comm, x):
    if comm.rank == 0:
        comm.bcast(x)
        return x
    return comm.bcast(None)

def two_each(comm):
    if comm.rank == 0:
        comm.bcast(1); comm.bcast(2)
    else:
        a = comm.bcast(None)
        b = comm.bcast(None)

def conditional(comm, x):
    return comm.bcast(x) if comm.rank == 0 else comm.bcast(None)

def one_arm(comm):
    if comm.rank == 0:
        comm.bcast(1)
    comm.bcast(2)

def other_names(comm):
    if comm.rank == 0:
        comm.bcast(1)
    else:
        comm.gather(2)

def nested_function(comm):
    if comm.rank == 0:
        comm.bcast(1)
    else:
        def later():
            comm.bcast(None)

def in_lambdas(comm, run):
    if comm.rank == 0:
        run(lambda: comm.bcast(1))
    else:
        x = run(lambda: comm.bcast(None))
'''


def _branches() -> Dict[int, List[Tuple[int, int, str, int]]]:
    found = branch_calls(SOURCE)
    assert found is not None
    by_line: Dict[int, List[Tuple[int, int, str, int]]] = {}
    for (line, _, _, _), hits in sorted(found.items()):
        by_line.setdefault(line, []).append(hits[0])  # the innermost candidate
    return by_line


def test_the_arms_of_an_if_pair_their_kth_calls_of_one_name() -> None:
    b = _branches()
    assert b[4] == [(3, 4, 0, "bcast", 0)] and b[7] == [(3, 4, 0, "bcast", 1)]  # if / else
    assert b[11] == [(10, 4, 0, "bcast", 0)] and b[13] == [(10, 4, 0, "bcast", 1)]  # early return
    assert b[17] == [(16, 4, 0, "bcast", 0), (16, 4, 1, "bcast", 0)]  # two calls on one line
    assert b[19] == [(16, 4, 0, "bcast", 1)] and b[20] == [(16, 4, 1, "bcast", 1)]
    assert b[23] == [(23, 11, 0, "bcast", 0), (23, 11, 0, "bcast", 1)]  # conditional expression
    assert (44, 4, 0, "bcast", 0) in b[45] and (44, 4, 0, "bcast", 1) in b[47]  # in lambdas


def test_calls_without_a_partner_in_the_other_arm_are_no_branchs() -> None:
    b = _branches()
    for line in (27, 28, 32, 34, 38, 41):  # one arm only, other names, a nested function
        assert line not in b, line


def early_return_in_a_with_block(comm: tc.TypedComm, obj: Any, roots: Any = (0,)) -> Any:
    import threading
    lock = threading.Lock()
    if comm.rank in roots:  # the root's arm leaves from inside a with block
        with lock:
            return comm.bcast(obj, root=0)
    return comm.bcast(None, root=0)


def early_return_in_a_with_block_that_raises(comm: tc.TypedComm, obj: Any) -> Any:
    import contextlib
    if comm.rank == 0:  # a context manager that swallows the raise: the root goes on
        with contextlib.suppress(KeyError):
            comm.bcast(obj, root=0)
            raise KeyError(obj)
    return comm.bcast(None, root=0)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_an_arm_that_returns_from_inside_a_with_block_leaves_it(
        timeout: Optional[float]) -> None:
    assert outcomes(3, early_return_in_a_with_block, "plan", timeout=timeout) == ["plan"] * 3
    # a raise under a with is no leaving: the root's two calls are not its receivers' one
    one_desync(outcomes(3, early_return_in_a_with_block_that_raises, "plan", timeout=timeout))
    # and a receiver in the root's arm still raises
    one_desync(outcomes(3, early_return_in_a_with_block, "plan", (0, 1), timeout=timeout))


def two_conditionals_from_one_line(comm: tc.TypedComm, ready: bool) -> Any:
    b, r = comm.bcast, comm.rank
    return (b("plan") if r == 0 else b(None)) if ready else (b("flag") if r == 0 else
                                                              b(None))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_two_conditionals_that_start_on_one_line_are_two_branches(
        timeout: Optional[float]) -> None:
    assert outcomes(3, two_conditionals_from_one_line, True, timeout=timeout) == ["plan"] * 3

    def body(comm: tc.TypedComm) -> Any:  # the root ready, its receivers not: another call
        return two_conditionals_from_one_line(comm, comm.rank == 0)

    results = outcomes(3, body, timeout=timeout)
    one_desync(results)


def test_source_that_does_not_parse_has_no_branches() -> None:
    assert branch_calls("def f(:\n") is None


def _info(rank: int, arm: Optional[int], *, op: str = "bcast", root: int = 0,
          key: str = "m.py:3 bcast #1", name: Optional[str] = None) -> EnvelopeInfo:
    return EnvelopeInfo(rank=rank, seq=5, op=op, root=root, site=f"m.py:{4 + 3 * (arm or 0)}",
                        name=name, branch=None if arm is None else Branch(key, arm))


def _header(identity: int, root: int = 0) -> bytes:
    return bytes([0xC2, 3, 0, 8]) + root.to_bytes(4, "little") + bytes(32) + \
        identity.to_bytes(8, "little") + bytes(16)


def test_role_branch_needs_the_root_alone_in_its_arm() -> None:
    headers = [_header(1), _header(2), _header(2), _header(2)]
    ok = [_info(0, 0), _info(1, 1), _info(2, 1), _info(3, 1)]
    assert role_branch(headers, ok)
    assert not role_branch(headers, [_info(0, 0), _info(1, 0), _info(2, 1), _info(3, 1)])
    assert not role_branch(headers, [_info(0, 0), _info(1, 1), _info(2, None), _info(3, 1)])
    other_key = [_info(0, 0), _info(1, 1), _info(2, 1, key="m.py:9 bcast #1"), _info(3, 1)]
    assert not role_branch(headers, other_key)
    named = [_info(0, 0), _info(1, 1, name="plan"), _info(2, 1), _info(3, 1)]
    assert not role_branch(headers, named)
    votes = [_info(r, int(r > 0), op="allreduce", root=None) for r in range(4)]  # type: ignore
    assert not role_branch(headers, votes)


def test_role_branch_needs_every_other_header_field_equal() -> None:
    ok = [_info(0, 0), _info(1, 1)]
    assert role_branch([_header(1), _header(2)], ok)
    assert not role_branch([_header(1), _header(2, root=1)], ok)


# --- the verdict on in-process ranks -------------------------------------------------------

def broadcast_object(comm: tc.TypedComm, obj: Any, src: int = 0) -> Any:
    if comm.rank == src:
        comm.bcast(obj, root=src, schema=Plan)
        return obj
    else:
        return comm.bcast(None, root=src, schema=Plan)


def broadcast_early(comm: tc.TypedComm, obj: Any, src: int = 0) -> Any:
    if comm.rank == src:
        comm.bcast(obj, root=src)
        return obj
    return comm.bcast(None, root=src)


def gather_sides(comm: tc.TypedComm) -> Any:
    if comm.rank == 1:
        return comm.gather(comm.rank * 10, root=1)
    else:
        return comm.gather(comm.rank * 10, root=1)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_the_root_and_its_receivers_in_two_arms_are_one_call(timeout: Optional[float]) -> None:
    def body(comm: tc.TypedComm) -> Any:
        got = []
        for step in range(3):
            got.append(broadcast_object(comm, Plan(step, ["a"]) if comm.rank == 0 else None))
            got.append(broadcast_early(comm, {"step": step} if comm.rank == 0 else None))
            got.append(gather_sides(comm))
        got.append(comm.allgather(comm.rank))  # the numbering and slot rule still agree
        recorded = [e.branch for e in comm._p.recorder.snapshot() if e.op == "bcast"]
        return got, slot_state(comm), recorded

    results = outcomes(4, body, timeout=timeout)
    for rank, result in enumerate(results):
        assert not isinstance(result, BaseException), result
        got, _, recorded = result
        # the flight recorder keeps each call's branch, for the trace analysis
        assert [b.arm if b else None for b in recorded] == [0 if rank == 0 else 1] * 6
        for step in range(3):
            assert got[3 * step] == Plan(step, ["a"])
            assert got[3 * step + 1] == {"step": step}
            assert got[3 * step + 2] == ([0, 10, 20, 30] if rank == 1 else None)
        assert got[-1] == [0, 1, 2, 3]
    assert len({repr(r[1]) for r in results}) == 1


def wrong_arm(comm: tc.TypedComm) -> Any:
    if comm.rank in (0, 2):  # rank 2 takes the root's arm: its call sends, it does not receive
        return comm.bcast(comm.rank, root=0, schema=int)
    else:
        return comm.bcast(None, root=0, schema=int)


def two_votes(comm: tc.TypedComm) -> Any:
    if comm.rank == 2:  # a local timeout on rank 2: its vote looks like the others' on the wire
        return comm.allreduce(1, op="max")
    else:
        return comm.allreduce(0, op="max")


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("fn", [wrong_arm, two_votes])
def test_anything_else_in_two_arms_raises_one_desync_everywhere(fn: Any,
                                                                timeout: Optional[float]) -> None:
    results = outcomes(4, fn, timeout=timeout)
    one_desync(results)
    assert list(results[0].kinds) == [tc.MismatchKind.CALL]


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_the_mpi4py_drop_in_in_a_wrapper_that_branches_on_its_role(
        timeout: Optional[float]) -> None:
    class Coordinator:  # the shape of an engine's broadcast_object
        def __init__(self, comm: tc.TypedComm) -> None:
            self.comm = tc.compat.mpi4py(comm)
            self.rank = self.comm.Get_rank()

        def broadcast_object(self, obj: Any, src: int = 0) -> Any:
            if self.rank == src:
                self.comm.bcast(obj, root=src)
                return obj
            else:
                return self.comm.bcast(None, root=src)

    def body(comm: tc.TypedComm) -> Any:
        c = Coordinator(comm)
        return [c.broadcast_object({"reqs": [step]} if c.rank == 0 else None)
                for step in range(3)]

    results = outcomes(3, body, timeout=timeout)
    assert results == [[{"reqs": [0]}, {"reqs": [1]}, {"reqs": [2]}]] * 3


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_the_torch_drop_in_and_scatter_in_role_branches(timeout: Optional[float]) -> None:
    def broadcast_object(dist: Any, rank: int, obj: Any, src: int = 0) -> Any:
        if rank == src:  # an engine's broadcast_object over torch.distributed's object list
            dist.broadcast_object_list([obj], src=src)
            return obj
        else:
            recv = [None]
            dist.broadcast_object_list(recv, src=src)
            return recv[0]

    def scatter_work(comm: tc.TypedComm) -> Any:
        if comm.rank == 2:
            return comm.scatter([f"part {r}" for r in range(comm.size)], root=2)
        return comm.scatter(None, root=2)

    def body(comm: tc.TypedComm) -> Any:
        dist = tc.compat.torch(comm)
        got = [(broadcast_object(dist, comm.rank, {"step": s} if comm.rank == 0 else None),
                scatter_work(comm)) for s in range(2)]
        return got, slot_state(comm)

    results = outcomes(3, body, timeout=timeout)
    for rank, result in enumerate(results):
        assert not isinstance(result, BaseException), result
        assert result[0] == [({"step": s}, f"part {rank}") for s in range(2)]
    assert len({repr(r[1]) for r in results}) == 1


def test_arms_with_unequal_counts_pair_nothing() -> None:
    source = '''
def root_skips(comm, plan):
    if comm.rank == 0:
        comm.bcast(7)
    else:
        p = comm.bcast(None)
        f = comm.bcast(None)
'''
    refused: Dict[Any, Any] = {}
    assert branch_calls(source, None, refused) == {}
    assert sorted(refused.values()) == [(3, "make 1 and 2 bcast calls (one makes a call the "
                                            "other lacks), so they pair none")] * 3
    # A method call whose name is on a later line is found where the interpreter places it.
    refused.clear()
    branch_calls('''
def root_skips(comm, plan):
    if comm.rank == 0:
        (comm
         .bcast(7))
    else:
        p = comm.bcast(None)
        f = comm.bcast(None)
''', None, refused)
    assert (5, 5, 10, 18) in refused and len(refused) == 4


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_arms_that_pair_nothing_are_named_and_no_name_is_advised(
        timeout: Optional[float]) -> None:
    # The root alone may make a second call (under a condition of its own, false here): the
    # arms pair nothing, and a name= on their calls would hand that call's data to the
    # receivers' next one. The hint says where the branch is and what to do instead.
    def body(comm: tc.TypedComm, cancel: List[int]) -> Any:
        if comm.rank == 0:
            reqs = comm.bcast(["a"], root=0)
            if cancel:
                comm.bcast(cancel, root=0)
        else:
            reqs = comm.bcast(None, root=0)
        return reqs

    error = one_desync(outcomes(3, body, [], timeout=timeout))
    line = body.__code__.co_firstlineno + 1
    assert str(error).splitlines()[-1] == (
        f"  these calls are in the arms of the role branch at test_core_arms.py:{line}, whose "
        f"arms make 2 and 1 bcast calls (one makes a call the other lacks), so they pair none: "
        f"a rank in one arm meets another call of the other. Make both arms issue the same "
        f"calls in the same order (a call only the root makes, under a condition of its own: "
        f"broadcast the condition first so that every rank makes it, or post it to a "
        f"SymmetricFlush); a name= would pair such a call with the other arm's next one and "
        f"hand it this call's data")


NESTED = '''
def broadcast_pyobj(comm, data, src):
    if comm.rank == src:
        if len(data) == 0:
            comm.bcast(0, root=src)
        else:
            comm.bcast(len(data), root=src)
            comm.bcast(data, root=src)
        return data
    else:
        size = comm.bcast(None, root=src)
        if size == 0:
            return []
        return comm.bcast(None, root=src)

def three_arms(comm):
    if comm.rank == 0:
        return comm.bcast("plan")
    elif comm.rank == comm.size - 1:
        return comm.bcast(None)
    else:
        return comm.bcast(None)

def under_a_setting(comm, fast):
    if fast:
        if comm.rank == 0:
            comm.bcast(1)
        else:
            comm.bcast(None)
    else:
        comm.bcast(2) if comm.rank == 0 else comm.bcast(None)
'''


def test_calls_pair_along_a_path_and_every_enclosing_branch_is_a_candidate() -> None:
    found = branch_calls(NESTED)
    assert found is not None
    by_line = {line: hits for (line, _, _, _), hits in found.items()}
    # The root's two size calls are each the first of their path; the data call the second.
    assert (3, 4, 0, "bcast", 0) in by_line[5] and (3, 4, 0, "bcast", 0) in by_line[7]
    assert (3, 4, 1, "bcast", 0) in by_line[8]
    assert by_line[11] == [(3, 4, 0, "bcast", 1)] and by_line[14] == [(3, 4, 1, "bcast", 1)]
    # elif: the receivers' two arms pair with the root's through the outer if.
    assert by_line[18] == [(17, 4, 0, "bcast", 0)]
    assert by_line[20][-1] == (17, 4, 0, "bcast", 1) == by_line[22][-1]
    # A role branch under a setting every rank shares: the inner if first.
    assert by_line[27][0] == (26, 8, 0, "bcast", 0) and by_line[29][0] == (26, 8, 0, "bcast", 1)


def engine_broadcast_pyobj(comm: tc.TypedComm, data: List[Any], src: int) -> Any:
    if comm.rank == src:
        if len(data) == 0:
            comm.bcast(0, root=src)  # the size alone
        else:
            comm.bcast(len(data), root=src)
            comm.bcast(data, root=src)
        return data
    else:
        size = comm.bcast(None, root=src)
        if size == 0:
            return []
        return comm.bcast(None, root=src)


def three_arms(comm: tc.TypedComm, step: int) -> Any:
    if comm.rank == 0:
        return comm.bcast({"step": step})
    elif comm.rank == comm.size - 1:
        return comm.bcast(None)
    else:
        return comm.bcast(None)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_nested_arms_and_elif_receivers_are_one_call(timeout: Optional[float]) -> None:
    def body(comm: tc.TypedComm) -> Any:
        got = []
        for step in range(4):  # empty and full in turn: both root paths, learned roles after
            data = [] if step % 2 else [f"req{step}"]
            got.append(engine_broadcast_pyobj(comm, data, 0))
            got.append(three_arms(comm, step))
        return got

    expected = [x for s in range(4) for x in ([] if s % 2 else [f"req{s}"], {"step": s})]
    assert outcomes(4, body, timeout=timeout) == [expected] * 4

    def wrong(comm: tc.TypedComm) -> Any:  # rank 1 in the root's arm: two roots
        if comm.rank in (0, 1):
            return comm.bcast("plan")
        elif comm.rank == comm.size - 1:
            return comm.bcast(None)
        else:
            return comm.bcast(None)

    one_desync(outcomes(4, wrong, timeout=timeout))


def send_request(comm: tc.TypedComm, cached: bool) -> Any:
    """Both arms choose among their calls by a flag each rank holds: a rank whose flag differs
    must raise, never take the header as its body."""
    if comm.rank == 0:
        if cached:
            comm.bcast("BODY", root=0)
        else:
            comm.bcast("HEADER", root=0)
            comm.bcast("BODY", root=0)
        return None
    else:
        if cached:
            return comm.bcast(None, root=0)
        else:
            return comm.bcast(None, root=0), comm.bcast(None, root=0)


def stream(comm: tc.TypedComm, items: List[Any]) -> Any:
    """A loop's ``else`` runs after iterations that ``continue``: not exclusive with them."""
    got = []
    if comm.rank == 0:
        for i, item in enumerate(items):
            if item is None:
                comm.bcast(("skip", i), root=0)
                continue
        else:
            comm.bcast(("end",), root=0)
        return None
    else:
        for item in items:
            if item is None:
                got.append(comm.bcast(None, root=0))
                continue
        else:
            got.append(comm.bcast(None, root=0))
        return got


def early_return_in_the_roots_arm(comm: tc.TypedComm, data: List[Any]) -> Any:
    if comm.rank == 0:
        if not data:
            comm.bcast(0, root=0)
            return data
        comm.bcast(len(data), root=0)
        comm.bcast(data, root=0)
        return data
    size = comm.bcast(None, root=0)
    if size == 0:
        return []
    return comm.bcast(None, root=0)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_arms_that_both_branch_pair_as_written_and_exits_leave_their_block_only(
        timeout: Optional[float]) -> None:
    assert outcomes(3, send_request, True, timeout=timeout) == [None, "BODY", "BODY"]
    assert outcomes(3, send_request, False, timeout=timeout) == [None] + [("HEADER", "BODY")] * 2
    for wrong in (2, 0):  # a receiver's flag differs; the root's does
        one_desync(outcomes(3, lambda c: send_request(c, c.rank == wrong), timeout=timeout))
    assert outcomes(3, stream, [None, None], timeout=timeout) == \
        [None] + [[("skip", 0), ("skip", 1), ("end",)]] * 2
    one_desync(outcomes(3, lambda c: stream(c, [None] * (1 if c.rank == 2 else 2)),
                        timeout=timeout))

    def body(comm: tc.TypedComm) -> Any:
        return [early_return_in_the_roots_arm(comm, [] if s % 2 else ["a"]) for s in range(3)]

    assert outcomes(3, body, timeout=timeout) == [[["a"], [], ["a"]]] * 3


def plan_or_flag(comm: tc.TypedComm, ready: bool) -> Any:
    """An ``if`` on a flag of the rank's own is no role branch, whoever takes which arm."""
    if ready:
        return "plan", comm.bcast("PLAN" if comm.rank == 0 else None, root=0)
    else:
        return "flag", comm.bcast("FLAG" if comm.rank == 0 else None, root=0)


def header_then_body(comm: tc.TypedComm, cached: bool) -> Any:
    """The root sends both; a receiver that believes the header cached reads one call. Its
    receivers choose how many calls to read by a flag of their own, with no exit between the
    root's calls: the shape is refused whatever the flags (a receiver whose flag differs would
    take the header as its body); ``name=`` on each call declares it."""
    if comm.rank == 0:
        comm.bcast("HEADER", root=0)
        comm.bcast("BODY", root=0)
        return None
    elif cached:
        return comm.bcast(None, root=0)
    else:
        return comm.bcast(None, root=0), comm.bcast(None, root=0)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_flag_of_the_ranks_own_and_a_receiver_that_reads_less_raise(
        timeout: Optional[float]) -> None:
    assert outcomes(3, plan_or_flag, True, timeout=timeout) == [("plan", "PLAN")] * 3
    one_desync(outcomes(3, lambda c: plan_or_flag(c, c.rank != 0), timeout=timeout))
    one_desync(outcomes(3, header_then_body, False, timeout=timeout))
    one_desync(outcomes(3, lambda c: header_then_body(c, c.rank == 1), timeout=timeout))


class Msg(msgspec.Struct):
    tag: str


def nested_roles(comm: tc.TypedComm, src: int, is_receiver_rank: bool, inner_rank: bool) -> Any:
    mine = (lambda tag: Msg(tag) if comm.rank == src else None)
    if is_receiver_rank:
        if inner_rank:
            return comm.bcast(mine("A"), root=src, schema=Msg)
        else:
            return comm.bcast(mine("B"), root=src, schema=Msg)
    else:
        return comm.bcast(mine("C"), root=src, schema=Msg)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_the_steady_state_accepts_no_more_than_a_first_run(timeout: Optional[float]) -> None:
    # A root whose innermost branch is an inner one raises on a first run; having learned the
    # outer branch at that site as a receiver must not make it pass later.
    def swapped(comm: tc.TypedComm) -> Any:
        return nested_roles(comm, 0, comm.rank == 0, True)

    def learn(comm: tc.TypedComm) -> Any:
        for src in range(comm.size):  # every rank the root once, in the outer else
            assert nested_roles(comm, src, comm.rank != src, True).tag == "C"
        return True

    def learned_then_swapped(comm: tc.TypedComm) -> Any:
        learn(comm)
        return swapped(comm)

    assert outcomes(3, learn, timeout=timeout) == [True] * 3
    one_desync(outcomes(3, swapped, timeout=timeout))
    one_desync(outcomes(3, learned_then_swapped, timeout=timeout))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_root_that_skips_a_call_in_its_arm_raises_everywhere(timeout: Optional[float]) -> None:
    def body(comm: tc.TypedComm, has_plan: bool) -> Any:
        if comm.rank == 0:
            if has_plan:
                comm.bcast([1, 2], root=0)
            comm.bcast(7, root=0)
            return None
        else:
            plan = comm.bcast(None, root=0)
            flag = comm.bcast(None, root=0)
            return plan, flag

    assert outcomes(3, body, True, timeout=timeout) == [None, ([1, 2], 7), ([1, 2], 7)]
    results = outcomes(3, body, False, timeout=timeout)
    one_desync(results)


# --- the steady state: a proved role branch sends its role identity (core/roles.py) ----------

def broadcast_any(comm: tc.TypedComm, obj: Any, src: int) -> Any:
    if comm.rank == src:  # an engine's broadcast_pyobj: the root may move between calls
        comm.bcast(obj, root=src)
        return obj
    else:
        return comm.bcast(None, root=src)


def _count_envelope_exchanges(monkeypatch: Any) -> Dict[int, int]:
    from typedcoll.core import verdict
    counts: Dict[int, int] = {}
    real = verdict.exchange_infos

    def counting(p: Any, *args: Any) -> Any:
        counts[p.rank] = counts.get(p.rank, 0) + 1
        return real(p, *args)

    monkeypatch.setattr(verdict, "exchange_infos", counting)
    return counts


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_proved_role_branch_needs_no_envelope_exchange_again(
        monkeypatch: Any, timeout: Optional[float]) -> None:
    counts = _count_envelope_exchanges(monkeypatch)

    def body(comm: tc.TypedComm) -> Any:
        got = [broadcast_object(comm, Plan(step, ["a"]) if comm.rank == 0 else None)
               for step in range(6)]
        got.append(comm.allgather(comm.rank))
        return got, len(comm._p.roles), slot_state(comm)

    results = outcomes(4, body, timeout=timeout)
    for result in results:
        assert not isinstance(result, BaseException), result
        got, roles, _ = result
        assert got[:6] == [Plan(step, ["a"]) for step in range(6)]
        assert got[6] == [0, 1, 2, 3]
        assert roles == 1
    assert len({repr(r[2]) for r in results}) == 1
    assert counts == {0: 1, 1: 1, 2: 1, 3: 1}  # the first call's, only


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_root_that_moves_is_learned_at_each_site(timeout: Optional[float]) -> None:
    def body(comm: tc.TypedComm) -> Any:
        return [broadcast_any(comm, {"step": s, "by": comm.rank} if comm.rank == s % 3 else None,
                              s % 3) for s in range(9)], slot_state(comm)

    results = outcomes(3, body, timeout=timeout)
    for result in results:
        assert not isinstance(result, BaseException), result
        assert result[0] == [{"step": s, "by": s % 3} for s in range(9)]
    assert len({repr(r[1]) for r in results}) == 1


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("fault", ["receiver_in_root_arm", "root_skips", "root_differs"])
def test_a_learned_role_that_no_longer_holds_raises_as_at_a_first_run(
        fault: str, timeout: Optional[float]) -> None:
    def body(comm: tc.TypedComm) -> Any:
        got = []
        for step in range(4):
            faulty = step == 3
            if faulty and fault == "receiver_in_root_arm" and comm.rank == 2:
                got.append(comm.bcast(step, root=0))  # rank 2 believes it is the root
                continue
            if faulty and fault == "root_skips" and comm.rank == 0:
                got.append(comm.allgather(step))  # the root goes on to the next call
                continue
            root = 1 if faulty and fault == "root_differs" and comm.rank == 3 else 0
            if comm.rank == root:
                comm.bcast(step, root=root)
                got.append(step)
            else:
                got.append(comm.bcast(None, root=root))
        return got

    results = outcomes(4, body, timeout=timeout)
    one_desync(results)
    assert results[0].seq == 3


def plans_by_a_driver_flag(comm: tc.TypedComm, wrong_at: int) -> Any:
    last: Any = {"step": -1}
    for step in range(5):
        comm.set_step(step)
        is_driver = comm.rank == 0 and step != wrong_at  # read as a role: named like one
        if is_driver:
            last = comm.bcast({"step": step}, root=0)
        else:
            last = comm.bcast(last, root=0)  # the receivers' placeholder: the previous plan
    return last


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_root_in_its_receivers_arm_of_a_proved_branch_raises_everywhere(
        timeout: Optional[float]) -> None:
    # At step 3 the root took the receivers' arm: every rank called from one line, and every
    # rank took the root's placeholder, step 2's plan, as step 3's with no error.
    assert outcomes(3, plans_by_a_driver_flag, -1, timeout=timeout) == [{"step": 4}] * 3
    error = one_desync(outcomes(3, plans_by_a_driver_flag, 3, timeout=timeout))
    line = line_of(plans_by_a_driver_flag, "last = comm.bcast(last")
    assert error.seq == 3 and error.kinds == (tc.MismatchKind.CALL,)
    assert [g.ranks for g in error.groups] == [(0,), (1, 2)]
    assert str(error).startswith(
        f"collective #3 on WORLD: rank 0, the root, called bcast[dict[Any, Any]] at "
        f"test_core_arms.py:{line}, in the arm of a role branch where its receivers call it:\n")
    assert "give the call in both arms one name=" in str(error)


def method_chains_across_lines(comm: tc.TypedComm, x: Any) -> Any:
    if comm.rank == 0:
        return (comm
                .bcast(x, root=0))
    else:
        return (comm
                .bcast(None, root=0))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_method_call_whose_name_is_on_a_later_line_is_in_its_branch(
        timeout: Optional[float]) -> None:
    """The interpreter places such a call from its name on (where tracebacks point), not where
    the expression starts: the branch is found there too."""
    assert outcomes(3, method_chains_across_lines, "plan", timeout=timeout) == ["plan"] * 3


@pytest.mark.parametrize("test, role", [
    ("rank == src", True), ("self.rank_in_group == 0", True), ("dist.get_rank() == root", True),
    ("is_driver_worker", True), ("self.is_first_rank", True), ("not rank", True),
    ("comm.Get_rank() in (0, 1)", True), ("tp_rank == 0 and pp_rank == 0", True),
    ("rank % self.tp_size == 0", True), ("r == 0", True), ("is_main_process()", True),
    # a value of the rank's own beside the role, or a name that merely contains a role word
    ("rank == 0 and has_update", False), ("resources_ok", False), ("pending[rank]", False),
    ("rank_has_stats", False), ("rank_ready", False), ("ready", False),
    ("rank == 0 or timed_out", False), ("len(queue) > rank", False),
    ("rank == owner_of(request)", False),
])
def test_only_a_test_built_of_roles_splits_ranks_by_role(test: str, role: bool) -> None:
    import ast

    from typedcoll.core.role_test import tests_a_role
    assert tests_a_role(ast.parse(test, mode="eval").body) is role


def update_or_plan(comm: tc.TypedComm, it: int, has_update: bool) -> Any:
    """The root alone sends an update when it has one; its receivers cannot know."""
    if comm.rank == 0 and has_update:
        comm.bcast({"update": it}, root=0)
        return "sent-update"
    return comm.bcast({"plan": it} if comm.rank == 0 else None, root=0)


def by_own_flags(comm: tc.TypedComm, which: str) -> Any:
    pending = {0: ["req"]}  # only rank 0 holds work
    resources_ok = rank_has_stats = comm.rank == 0
    if which == "resources":
        if resources_ok:
            return comm.bcast("schedule" if comm.rank == 0 else None, root=0)
        return comm.bcast("heartbeat" if comm.rank == 0 else None, root=0)
    if which == "indexed":
        if pending.get(comm.rank):
            return comm.bcast("prefill" if comm.rank == 0 else None, root=0)
        return comm.bcast("decode" if comm.rank == 0 else None, root=0)
    drop_in = tc.compat.mpi4py(comm)
    if rank_has_stats:
        return drop_in.gather({"stats": comm.rank}, root=0)
    return drop_in.gather(["responses", comm.rank], root=0)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_root_deciding_by_its_own_flag_beside_its_role_raises(timeout: Optional[float]) -> None:
    def loop(comm: tc.TypedComm) -> Any:
        return [update_or_plan(comm, it, has_update=(it == 1)) for it in range(3)]

    assert outcomes(3, lambda c: update_or_plan(c, 0, False), timeout=timeout) == \
        [{"plan": 0}] * 3
    one_desync(outcomes(3, loop, timeout=timeout))
    for which in ("resources", "indexed", "gather"):
        one_desync(outcomes(3, by_own_flags, which, timeout=timeout))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_a_receivers_bad_root_in_a_role_branch_is_its_error_not_a_desync(
        timeout: Optional[float]) -> None:
    # A receiver that passes a root out of range fails before it knows the root: its peers'
    # two arms must still pair, so that every rank names that rank's bad argument.
    def body(comm: tc.TypedComm, bad: int) -> Any:
        return broadcast_any(comm, {"x": 1} if comm.rank == 0 else None,
                             7 if comm.rank == bad else 0)

    # the receivers' arm keeps others, or this rank alone; or the root is left alone
    for size, bad in ((4, 1), (4, 3), (2, 1)):
        results = outcomes(size, body, bad, timeout=timeout)
        detail = f"expected root in 0..{size - 1}, got 7"
        at = f"test_core_arms.py:{broadcast_any.__code__.co_firstlineno + 5}"
        for rank, result in enumerate(results):
            assert type(result) is (tc.EncodeError if rank == bad else tc.PeerError), result
            verb = "could not send its" if rank == bad else "failed its"
            assert str(result) == f"collective #0 on WORLD: rank {bad} {verb} bcast " \
                                  f"contribution at {at}: {detail}"
