"""The protocol's promises, rank by rank, over in-process ranks (``typedcoll.testing``).

Every case of the call-identity issue at 2 and 4 ranks: calls identical on the wire told apart
by their identity, skips caught by the step clock or surfacing as a timeout, one verdict on every
rank whatever its stack, argument errors agreed on in band, messages pinned. The same cases run
under mpiexec in tests/spmd/core_errors.py; CI runs both with and without the C fast path.
"""

from __future__ import annotations

import re

import concurrent.futures
import contextlib
import enum
import functools
import math
import os
import subprocess
import sys
import threading
import time
from typing import Annotated, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import msgspec
import numpy as np
import pytest

import typedcoll as tc
from typedcoll.testing import run

FILE = "test_core_semantics.py"


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int = 0
    num_active_tokens: int = 0


def errors_of(n: int, fn: Callable[..., Any], *args: Any,
              timeout: Optional[float] = None) -> List[BaseException]:
    """Every rank's exception, in rank order; fails unless every rank raised."""
    with pytest.raises(BaseExceptionGroup) as info:
        run(n, fn, *args, timeout=timeout)
    by_rank = {int(str(e.__notes__[-1]).split()[1]): e for e in info.value.exceptions}
    assert sorted(by_rank) == list(range(n)), f"not every rank raised: {info.value.exceptions}"
    return [by_rank[r] for r in range(n)]


def wrapper_text(fn: Callable[..., Any]) -> str:
    """How messages name a thin wrapper: its qualified name and the line of its ``def``."""
    return f"{fn.__qualname__} ({FILE}:{fn.__code__.co_firstlineno})"


def line_of(fn: Callable[..., Any], marker: str) -> int:
    """The line in this file holding ``marker`` inside ``fn`` (sites named in messages)."""
    import inspect
    lines, start = inspect.getsourcelines(fn)
    for i, text in enumerate(lines):
        if marker in text:
            return start + i
    raise AssertionError(marker)


# --- identity ------------------------------------------------------------------------------
def wire_identical_votes(comm: tc.TypedComm) -> List[Any]:
    out = []
    for it in range(3):
        if not (comm.rank == comm.size - 1 and it == 1):
            comm.allgather(np.array([it], dtype=np.int64))  # batch-size vote
        out.append(comm.allgather(np.array([10 + it], dtype=np.int64)))  # timeout vote
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_wire_identical_votes_raise_at_the_first_misaligned_call(n):
    errors = errors_of(n, wire_identical_votes)
    first = line_of(wire_identical_votes, "batch-size vote")
    second = line_of(wire_identical_votes, "timeout vote")
    others = "ranks 0-2:" if n == 4 else "rank 0:"
    last = f"rank {n - 1}:"
    width = max(len(others), len(last))
    expected = "\n".join([
        "collective #2 on WORLD diverged (call site):",
        f"  {others:<{width}} allgather[ndarray] shape=(1,) dtype=int64 at {FILE}:{first}, "
        f"its 2nd call",
        f"  {last:<{width}} allgather[ndarray] shape=(1,) dtype=int64 at {FILE}:{second}, "
        f"its 2nd call",
        "  only the call sites differ: if these are the same collective called from different "
        "places, give every rank's call the same name=",
    ])
    for e in errors:
        assert type(e) is tc.DesyncError
        assert str(e) == expected
        assert e.seq == 2 and e.kinds == (tc.MismatchKind.CALL,)
        assert [g.ranks for g in e.groups] == [tuple(range(n - 1)), (n - 1,)]


def two_packages(tmp_path: Any, monkeypatch: Any) -> Any:
    """Two packages, each with a ``utils.py`` whose collective sits on the same line (in a
    function whose two arms call, so that the line is the call site, not its caller's)."""
    for package, fn in (("typedcoll_t_a", "vote_timeout"), ("typedcoll_t_b", "num_waiting")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "utils.py").write_text(
            f"def {fn}(comm, value):\n"
            "    return comm.allgather(value) if value else comm.allgather(-1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [name for name in sys.modules if name.startswith("typedcoll_t_")]:
        del sys.modules[name]  # an earlier test's packages, in another directory
    import importlib
    return (importlib.import_module("typedcoll_t_a.utils"),
            importlib.import_module("typedcoll_t_b.utils"))


def test_files_of_one_basename_in_two_packages_are_two_sites(tmp_path, monkeypatch):
    # Engines hold many utils.py: a rank that skips a vote in one must not be paired with a
    # call on the same line of another.
    a, b = two_packages(tmp_path, monkeypatch)

    def program(comm: tc.TypedComm) -> Any:
        if comm.rank != 1:
            a.vote_timeout(comm, 0)
        return b.num_waiting(comm, 1000 + comm.rank)

    for e in errors_of(3, program, timeout=10):  # a timeout: unseen, ranks 0 and 2 would wait
        assert type(e) is tc.DesyncError and e.seq == 0, e
        # (each function picks one of two calls: its caller is named too)
        assert "allgather[int] at typedcoll_t_a/utils.py:2 called from" in str(e), e
        assert "allgather[int] at typedcoll_t_b/utils.py:2 called from" in str(e), e


def _loaded_by_path(path: Any, name: str = "hooks", keep: bool = False) -> Any:
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    if keep:  # a plugin registry's way: under a name of its own
        sys.modules[name] = module
    spec.loader.exec_module(module)  # a plugin loader's way: never in sys.modules
    return module


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("on_path", [True, False])
def test_files_of_one_basename_loaded_by_path_are_two_sites(tmp_path, monkeypatch, keep,
                                                            on_path):
    # Two plugins laid out alike, each hooks.py executed by path, hold one vote on one line.
    # Named by basename they were one wrapper: a rank that skipped one plugin's vote was handed
    # another plugin's, without an error; so were plugins kept in sys.modules under names of
    # their own (plugin_0, plugin_1), and plugins outside every import path entry.
    plugins = ("plugins_a", "plugins_b")
    for tag, plugin in enumerate(plugins):
        (tmp_path / plugin).mkdir()
        (tmp_path / plugin / "hooks.py").write_text(  # one template, configured by a constant
            f"TAG = {tag}\ndef vote(comm, x):\n    return comm.allgather(x + TAG)\n")
    if on_path:
        monkeypatch.syspath_prepend(str(tmp_path))  # the script's folder, `python engine.py`
    votes = []
    for n, plugin in enumerate(plugins):
        if keep:
            monkeypatch.delitem(sys.modules, f"plugin_{n}", raising=False)
        votes.append(_loaded_by_path(tmp_path / plugin / "hooks.py", f"plugin_{n}", keep).vote)
    from typedcoll.core.sites import code_source
    names = [code_source(vote.__code__) for vote in votes]
    if on_path:
        assert names == ["plugins_a/hooks.py", "plugins_b/hooks.py"]
    else:  # outside every import path entry: the basename and a digest of the file's bytes
        assert all(re.fullmatch(r"hooks\.py#[0-9a-f]{8}", name) for name in names), names
        assert names[0] != names[1]

    def program(comm: tc.TypedComm) -> None:
        for vote in votes[1:] if comm.rank == 1 else votes:
            vote(comm, comm.rank)
    for e in errors_of(3, program, timeout=10):
        assert type(e) is tc.DesyncError and e.seq == 0, e
        assert names[0] in str(e) and names[1] in str(e), e


def test_functions_made_from_one_template_by_exec_are_two_sites():
    # exec of one template with two constants: two functions named vote at <string>:1, reached
    # from one line. A rank that skipped the first was handed the second, without an error.
    def made(tag: str) -> Any:
        namespace: dict = {}
        exec(f"def vote(comm, x):\n    return comm.allgather(({tag!r}, x))\n", namespace)
        return namespace["vote"]
    votes = [made("batch_size"), made("timeout")]

    def program(comm: tc.TypedComm) -> None:
        for vote in votes[1:] if comm.rank == 1 else votes:
            vote(comm, comm.rank)
    for e in errors_of(3, program, timeout=10):
        assert type(e) is tc.DesyncError and e.seq == 0, e
        assert re.search(r"vote \(<string>#[0-9a-f]{8}:1\)", str(e)), e
    from typedcoll.core.sites import code_source
    assert code_source(made("timeout").__code__) == code_source(votes[1].__code__)


def test_a_script_in_a_package_is_named_as_its_importers_name_it(tmp_path, monkeypatch):
    # A driver that runs pkg/engine.py as its script and workers that import pkg.engine make one
    # program: named engine.py on the driver and pkg/engine.py on the workers, every rank raised
    # DesyncError when they created their communicator.
    package = tmp_path / "typedcoll_t_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "engine.py").write_text("")
    from typedcoll.core import sites
    assert sites._name_of_source(str(package / "engine.py")) == "typedcoll_t_pkg/engine.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    importlib.import_module("typedcoll_t_pkg.engine")
    try:
        assert sites._name_of_source(str(package / "engine.py")) == "typedcoll_t_pkg/engine.py"
    finally:
        for name in ("typedcoll_t_pkg.engine", "typedcoll_t_pkg"):
            sys.modules.pop(name, None)


def test_sites_name_files_by_module_not_by_path(tmp_path, monkeypatch):
    from typedcoll.core import sites
    from typedcoll.core.identity import source_name
    a, _ = two_packages(tmp_path, monkeypatch)
    assert source_name(a.__file__) == "typedcoll_t_a/utils.py"
    assert source_name(sys.modules["typedcoll_t_a"].__file__) == "typedcoll_t_a/__init__.py"
    # A file nothing imports: from the import path entry holding it, else its basename.
    assert source_name(str(tmp_path / "nowhere" / "script.py")) == "nowhere/script.py"
    assert source_name("/typedcoll_t_nowhere/script.py") == "script.py"
    # Imported twice (as its package's and as a top-level module): the qualified name.
    monkeypatch.syspath_prepend(str(tmp_path / "typedcoll_t_b"))
    import importlib
    twice = importlib.import_module("utils")
    assert twice.__file__ == sys.modules["typedcoll_t_b.utils"].__file__
    assert sites._name_of_source(twice.__file__) == "typedcoll_t_b/utils.py"
    monkeypatch.delitem(sys.modules, "utils")
    assert source_name("<string>") == "<string>"
    # A lazy module is not asked for attributes it lacks (its __getattr__ may import or raise).
    import types

    class Lazy(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(f"lazy import of {name}")

    monkeypatch.setitem(sys.modules, "typedcoll_t_lazy", Lazy("typedcoll_t_lazy"))
    assert sites._name_of_source(str(tmp_path / "lazy.py")) == "lazy.py"


def extra_call(comm: tc.TypedComm) -> List[Any]:
    if comm.rank == 0:
        comm.allgather(10)  # the extra call
    return [comm.allgather(comm.rank * 100), comm.allgather(3)]


@pytest.mark.parametrize("n", [2, 4])
def test_an_extra_call_raises_desync_on_every_rank(n):
    errors = errors_of(n, extra_call)
    extra, first = line_of(extra_call, "the extra call"), line_of(extra_call, "rank * 100")
    for e in errors:
        assert type(e) is tc.DesyncError and e.seq == 0
        lines = str(e).splitlines()
        assert lines[0] == "collective #0 on WORLD diverged (call site):"
        assert lines[1].endswith(f"allgather[int] at {FILE}:{extra}, its 1st call")
        assert lines[2].endswith(f"allgather[int] at {FILE}:{first}, its 1st call")


def same_site_skip(comm: tc.TypedComm, clock: bool) -> List[Any]:
    out = []
    for it in range(4):
        if clock:
            comm.set_step(it)
        if comm.rank == 1 and it == 1:
            continue  # this rank has nothing to report this iteration
        out.append(comm.allgather(RankState(comm.rank, it)))
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_a_same_site_skip_with_the_step_clock_raises_desync(n):
    errors = errors_of(n, same_site_skip, True)
    site = line_of(same_site_skip, "RankState(comm.rank, it)")
    for e in errors:
        assert type(e) is tc.DesyncError and e.kinds == (tc.MismatchKind.STEP,)
        lines = str(e).splitlines()
        assert lines[0] == "collective #1 on WORLD diverged (step):"
        assert lines[1].split(":", 1)[1].strip() == \
            f"allgather[RankState] at {FILE}:{site}, its 2nd call, step 1"
        assert lines[2].split(":", 1)[1].strip() == \
            f"allgather[RankState] at {FILE}:{site}, its 2nd call, step 2"
        assert lines[-1].startswith("  the ranks are at different steps of the same call")


def test_a_same_site_skip_without_a_clock_is_a_timeout_never_data():
    """Nothing in the calls tells them apart: the short rank surfaces when the others time out,
    and no rank returns a result built from another iteration's data."""
    with pytest.raises(BaseExceptionGroup) as info:
        run(2, same_site_skip, False, timeout=1.0)
    errors = info.value.exceptions
    assert len(errors) == 1 and type(errors[0]) is tc.CollectiveTimeout
    assert errors[0].__notes__ == ["(rank 0 of 2)"]
    assert str(errors[0]).splitlines()[0].startswith(
        "collective #3 on WORLD: allgather[RankState] at ")


def named_roles(comm: tc.TypedComm) -> Any:
    if comm.rank == 0:
        return comm.bcast(RankState(0, 7), root=0, name="schedule")  # the root's line
    return comm.bcast(None, root=0, schema=RankState, name="schedule")  # everyone else's


def test_the_same_name_matches_from_any_line():
    assert run(3, named_roles) == [RankState(0, 7)] * 3


def unnamed_roles(comm: tc.TypedComm) -> Any:
    if comm.rank == 0:
        return comm.bcast(RankState(0, 7), root=0)
    return comm.bcast(None, root=0, schema=RankState)


def test_a_root_and_its_receivers_in_a_role_branch_match_without_a_name():
    assert run(3, unnamed_roles) == [RankState(0, 7)] * 3


def send_schedule(comm: tc.TypedComm) -> Any:
    return comm.bcast(RankState(0, 7), root=0)


def receive_schedule(comm: tc.TypedComm) -> Any:
    return comm.bcast(None, root=0, schema=RankState)


def roles_in_two_functions(comm: tc.TypedComm) -> Any:
    if comm.rank == 0:
        return send_schedule(comm)
    return receive_schedule(comm)


def test_roles_on_different_lines_without_a_name_raise_with_advice():
    for e in errors_of(2, roles_in_two_functions):
        assert type(e) is tc.DesyncError and e.kinds == (tc.MismatchKind.CALL,)
        assert "give every rank's call the same name=" in str(e)


@tc.transparent
def vote(comm: tc.TypedComm, value: int) -> List[int]:
    return comm.allgather(value)


def votes_through_a_wrapper(comm: tc.TypedComm) -> List[Any]:
    if comm.rank == 0:
        vote(comm, 1)  # the vote only rank 0 takes
    return vote(comm, 2)  # the vote every rank takes


def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A timer-style decorator: its own frame runs at one line for every function it wraps."""
    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)
    return inner


@tc.transparent
@timed
def timed_vote(comm: tc.TypedComm, value: int) -> List[int]:
    return comm.allgather(value)


def votes_through_a_decorated_wrapper(comm: tc.TypedComm) -> List[Any]:
    if comm.rank == 0:
        timed_vote(comm, 1)  # the vote only rank 0 takes
    return timed_vote(comm, 2)  # the vote every rank takes


@pytest.mark.parametrize("program,marked", [
    (votes_through_a_wrapper, [vote.__code__]),
    (votes_through_a_decorated_wrapper, [timed_vote.__code__,  # the decorator's frame
                                         timed_vote.__wrapped__.__code__])])
def test_a_transparent_wrapper_keeps_its_callers_sites(program, marked):
    # Over a functools.wraps decorator: marking only the function beneath left the decorator's
    # frame as the call site of both votes, one identity, and rank 1's vote took rank 0's
    # other vote silently. The marked functions are wrappers the call passed, as thin ones are.
    errors = errors_of(2, program)
    only, every = line_of(program, "only rank 0"), line_of(program, "every rank takes")
    through = " through ".join(f"{getattr(code, 'co_qualname', code.co_name)} ({FILE}:"
                               f"{code.co_firstlineno})"
                               for code in marked)
    for e in errors:
        assert type(e) is tc.DesyncError, e
        assert f"at {FILE}:{only} through {through}, its 1st call" in str(e).splitlines()[1]
        assert f"at {FILE}:{every} through {through}, its 1st call" in str(e).splitlines()[2]


def test_a_decorator_applied_on_one_rank_alone_leaves_the_calls_alike():
    # A timer wrapped around the votes on rank 0 only (a profiler on the driver): a decorator's
    # wrapper hands its arguments on to the function it wraps, which is the next wrapper passed,
    # so it is left out of the identity; kept, it parted rank 0's votes from its peers'.
    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            wrapper.spent += time.perf_counter() - started  # type: ignore[attr-defined]
            return out
        wrapper.spent = 0.0  # type: ignore[attr-defined]
        return wrapper

    def program(comm: tc.TypedComm) -> Any:
        votes = Votes2(comm)
        batch, timeout = votes.shared_batch, votes.shared_timeout
        if comm.rank == 0:
            batch, timeout = timed(batch), timed(timeout)
        return [(batch(it), timeout(-it)) for it in range(2)]

    for out in run(3, program):
        assert out == [([it] * 3, [-it] * 3) for it in range(2)]


class Votes2:
    """Two votes, thin over one shared thin wrapper, under a retry decorator marked transparent
    (it loops and adds an argument of its own: not passed over unmarked)."""

    def __init__(self, comm: tc.TypedComm) -> None:
        self.comm = comm

    def _gathered(self, value: int) -> List[Any]:
        return self.comm.allgather(value)

    @staticmethod
    def retried(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def again(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(3):
                try:
                    return fn(*args, **kwargs)
                except ConnectionError:  # a transient failure of its own
                    args = args[:1] + (args[1] + attempt,)
            raise RuntimeError("gave up")
        return tc.transparent(again)

    @retried
    def batch_vote(self, value: int) -> List[Any]:
        return self._gathered(value)

    def shared_batch(self, value: int) -> List[Any]:  # unmarked, thin
        return self._gathered(value)

    def shared_timeout(self, value: int) -> List[Any]:
        return self._gathered(value)

    @retried
    def timeout_vote(self, value: int) -> List[Any]:
        return self._gathered(value)


def test_functions_marked_transparent_count_among_the_wrappers_passed():
    # The mark reaches the functions a decorator wraps; leaving marked frames out of the chain
    # made both votes "_gathered" alone, called from one dispatch line, and the last rank's
    # timeout vote took its peers' batch-size votes without an error.
    def program(comm: tc.TypedComm) -> Any:
        votes, out = Votes2(comm), []
        for it in range(2):
            for op in ("batch_vote", "timeout_vote"):
                if not (op == "batch_vote" and it == 1 and comm.rank == comm.size - 1):
                    out.append(getattr(votes, op)(10 * it))  # one line for both votes
        return out

    for e in errors_of(3, program):
        assert type(e) is tc.DesyncError and e.kinds == (tc.MismatchKind.CALL,), e
        lines = str(e).splitlines()
        assert "through Votes2.retried.<locals>.again" in lines[1], e
        assert "through Votes2.batch_vote" in lines[1] and "Votes2.timeout_vote" in lines[2], e


MULTI_DEVICE = True


class Distributed:
    """An engine's wrapper class, unmarked: each method makes its one call or none."""

    def __init__(self, comm: tc.TypedComm) -> None:
        self.comm = comm

    def tp_allgather(self, obj: Any) -> List[Any]:
        return self.comm.allgather(obj)

    def vote(self, obj: Any) -> List[Any]:  # a thin wrapper over another
        return self.tp_allgather(obj)

    def guarded_allgather(self, obj: Any) -> List[Any]:
        if self.comm.size == 1:  # a shortcut that makes no call: still thin
            return [obj]
        return self.comm.allgather(obj)

    def group(self) -> tc.TypedComm:
        return self.comm

    def flagged_allgather(self, obj: Any) -> List[Any]:  # TensorRT-LLM's mpi_allgather's shape
        return self.group().allgather(obj) if MULTI_DEVICE else [obj]


def skipped_vote_through(method: str) -> Callable[[tc.TypedComm], Any]:
    def program(comm: tc.TypedComm) -> Any:
        dist = Distributed(comm)
        call = getattr(dist, method)
        out = [call(100)]  # iteration 0: every rank votes twice
        out.append(call(0))
        if comm.rank != comm.size - 1:
            out.append(call(101))  # the batch-size vote the last rank skips
        out.append(call(0))  # the timeout vote
        return out
    return program


@pytest.mark.parametrize("method,passed", [
    ("tp_allgather", [Distributed.tp_allgather]),
    ("vote", [Distributed.vote, Distributed.tp_allgather]),
    ("guarded_allgather", [Distributed.guarded_allgather]),
    ("flagged_allgather", [Distributed.flagged_allgather])])
def test_an_unmarked_thin_wrapper_keeps_its_callers_sites(method, passed):
    # The engine's crash: the last rank skipped the batch-size vote, so its timeout vote met
    # its peers' batch-size vote through one wrapper line, and returned their payloads. A
    # wrapper with a size-1 shortcut was a site of its own until its shortcut, which makes no
    # call, counted as a branch of no consequence.
    program = skipped_vote_through(method)
    errors = errors_of(3, program)
    skipped = line_of(skipped_vote_through, "the last rank skips")
    taken = line_of(skipped_vote_through, "the timeout vote")
    for e in errors:
        assert type(e) is tc.DesyncError and e.kinds == (tc.MismatchKind.CALL,), e
        lines = str(e).splitlines()
        wrapper = " through ".join(map(wrapper_text, passed))  # outermost first
        assert f"at {FILE}:{skipped} through {wrapper}, its 1st call" in lines[1], e
        assert f"at {FILE}:{taken} through {wrapper}, its 1st call" in lines[2], e
        assert lines[3] == (f"  only the callers of {wrapper} differ: a call "
                            "through a thin wrapper is its caller's, so a rank skipped or added "
                            "a call before this one, or these are one collective reached from "
                            "two places: then give this use a name= of its own, passed down "
                            f"to the call in {wrapper_text(passed[-1])} (a name= written in "
                            f"{wrapper_text(passed[-1])} itself makes every call through it one "
                            "call)")


def with_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator whose frame holds a ``with`` (``torch.no_grad()``'s shape): not thin itself,
    so its one line calls every function it wraps."""
    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        with contextlib.nullcontext():
            return fn(*args, **kwargs)
    return inner


class Votes:
    """Two thin wrappers, reached through lines they share: a decorator's frame, a ``getattr``
    dispatcher, a thread pool's worker (the standard library's plumbing: each vote its own site)."""

    def __init__(self, comm: tc.TypedComm) -> None:
        self.comm = comm

    def batch_vote(self, value: int) -> List[Any]:
        return self.comm.allgather(value)

    def timeout_vote(self, value: int) -> List[Any]:
        return self.comm.allgather(value)

    decorated_batch_vote = with_context(batch_vote)
    decorated_timeout_vote = with_context(timeout_vote)

    def _gathered(self, value: int) -> List[Any]:
        return self.comm.allgather(value)

    def shared_batch_vote(self, value: int) -> List[Any]:  # thin over a thin wrapper
        return self._gathered(value)

    def shared_timeout_vote(self, value: int) -> List[Any]:
        return self._gathered(value)

    def dispatch(self, op: str, value: int) -> List[Any]:
        return getattr(self, op)(value)  # thin too: its two calls always run together

    def in_pool(self, op: str, value: int) -> List[Any]:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(getattr(self, op), value).result()  # type: ignore[no-any-return]


def skipped_vote_by(way: str) -> Callable[[tc.TypedComm], Any]:
    def program(comm: tc.TypedComm) -> Any:
        votes = Votes(comm)
        if way in ("decorator", "shared"):
            prefix = "decorated_" if way == "decorator" else "shared_"

            def call(op: str, value: int) -> List[Any]:
                return getattr(votes, prefix + op)(value)  # type: ignore[no-any-return]
        else:
            def call(op: str, value: int) -> List[Any]:
                return getattr(votes, way)(op, value)  # type: ignore[no-any-return]
        out = []
        for it in range(2):
            plan = [("batch_vote", 100 + it), ("timeout_vote", 0)]
            if it == 1 and comm.rank == comm.size - 1:
                plan = plan[1:]  # the batch-size vote the last rank skips
            for op, value in plan:
                out.append(call(op, value))  # one line for both votes
        return out
    return program


def recorded_wrappers(comm: tc.TypedComm) -> List[Any]:
    votes = Votes(comm)
    for op in ("batch_vote", "timeout_vote"):
        votes.dispatch(op, comm.rank)
    comm.allgather(0, name="direct")
    return [(e.site, e.via) for e in comm._p.recorder.snapshot() if e.op == "allgather"]


def test_the_flight_recorder_keeps_the_thin_wrapper_for_the_trace_analysis():
    # The loop's one line is both votes' site (the dispatcher is thin too: its two calls run
    # together): offline, only the wrappers passed, outermost first, tell them apart.
    site = f"{FILE}:{line_of(recorded_wrappers, 'votes.dispatch')}"
    dispatch = wrapper_text(Votes.dispatch)
    assert run(2, recorded_wrappers) == [[
        (site, f"{dispatch} through {wrapper_text(Votes.batch_vote)}"),
        (site, f"{dispatch} through {wrapper_text(Votes.timeout_vote)}"),
        (f"{FILE}:{line_of(recorded_wrappers, 'direct')}", None)]] * 2


@pytest.mark.parametrize("way", ["decorator", "dispatch", "in_pool", "shared"])
def test_two_thin_wrappers_reached_from_one_line_stay_two_calls(way):
    # The wrapper is part of the identity: with its caller's line alone, the decorator's, the
    # dispatcher's or the pool's one line would make both votes one call, and the last rank's
    # timeout vote would take its peers' batch-size votes without an error. (A pool's worker
    # is the standard library's plumbing: there each thin vote is its own site.) Every wrapper
    # passed counts, not only the innermost: two votes over one shared wrapper, "shared",
    # returned each other's payloads when the innermost alone was kept.
    for e in errors_of(3, skipped_vote_by(way)):
        assert type(e) is tc.DesyncError and e.kinds == (tc.MismatchKind.CALL,), e
        lines = str(e).splitlines()
        if way == "in_pool":
            for line, vote in zip(lines[1:3], (Votes.batch_vote, Votes.timeout_vote)):
                assert line.endswith(f"at {FILE}:{line_of(vote, 'return')}, its 2nd call"), e
            assert lines[3].startswith("  only the call sites differ"), e
            continue
        batch, timeout = wrapper_text(Votes.batch_vote), wrapper_text(Votes.timeout_vote)
        if way == "dispatch":
            batch, timeout = (f"{wrapper_text(Votes.dispatch)} through {vote}"
                              for vote in (batch, timeout))
        elif way == "shared":
            batch, timeout = (f"{wrapper_text(vote)} through {wrapper_text(Votes._gathered)}"
                              for vote in (Votes.shared_batch_vote, Votes.shared_timeout_vote))
        assert lines[1].endswith(f"through {batch}, its 2nd call"), e
        assert lines[2].endswith(f"through {timeout}, its 2nd call"), e
        assert lines[3].startswith("  only the thin wrappers differ: the ranks reached this "
                                   "line through different ones"), e


class Broadcaster:
    """An engine's broadcast and barrier wrappers, thin."""

    def __init__(self, comm: tc.TypedComm) -> None:
        self.comm = comm

    def tp_broadcast(self, obj: Any) -> Any:
        return self.comm.bcast(obj, root=0, schema=RankState)

    def guarded_broadcast(self, obj: Any, src: int = 0) -> Any:  # vLLM's shape
        if self.comm.size == 1:
            return obj
        return self.comm.bcast(obj, root=src, schema=RankState)

    def barrier(self) -> None:
        self.comm.barrier()

    def named_barrier(self) -> None:
        self.comm.barrier(name="sync")


def broadcasts_in_a_role_branch(comm: tc.TypedComm, method: str) -> List[Any]:
    dist, out = Broadcaster(comm), []
    broadcast = getattr(dist, method)
    for it in range(3):
        if comm.rank == 0:
            out.append(broadcast(RankState(0, it)))
        else:
            out.append(broadcast(None))
    return out


@pytest.mark.parametrize("method", ["tp_broadcast", "guarded_broadcast"])
def test_a_role_branch_around_a_thin_wrapper_is_one_call(method):
    # Its first run is judged from the envelopes, the later ones from the role it proved. A
    # size-1 shortcut leaves the wrapper thin: the branch around it is still the caller's.
    assert run(3, broadcasts_in_a_role_branch, method) == [
        [RankState(0, it) for it in range(3)]] * 3


def in_role_branch(comm: tc.TypedComm, broadcast: Callable[[Any], Any], value: Any) -> Any:
    if comm.rank == 0:
        return broadcast(value)
    return broadcast(None)


def two_wrappers_through_one_role_branch(comm: tc.TypedComm) -> List[Any]:
    dist, out = Sizes(comm), []
    for it in range(3):
        # From one line, so that the wrappers alone tell the calls apart (not the callers of
        # the role branch: core.callers).
        for send, value in ((dist.bcast_size, 100 + it), (dist.bcast_flag, 0)):
            if send == dist.bcast_size and it == 1 and comm.rank == 1:
                continue  # rank 1 skips the size in iteration 1
            out.append(in_role_branch(comm, send, value))
    return out


class Sizes:
    def __init__(self, comm: tc.TypedComm) -> None:
        self.comm = comm

    def bcast_size(self, value: Any) -> Any:
        return self.comm.bcast(value, root=0)

    def bcast_flag(self, value: Any) -> Any:
        return self.comm.bcast(value, root=0)


def test_a_role_branch_pairs_calls_through_one_wrapper_only():
    # One role branch reaching two wrappers is two calls: paired, rank 1's flag would take the
    # root's size without an error.
    for e in errors_of(3, two_wrappers_through_one_role_branch):
        assert type(e) is tc.DesyncError and e.seq == 2, e
        flag = wrapper_text(Sizes.bcast_flag)
        assert "rank 1: bcast[int] root=0" in str(e) and \
            re.search(rf"through {re.escape(flag)} called from [^ ]+:\d+, its 2nd", str(e)), e
        assert len(set(re.findall(r"called from (\S+:\d+)", str(e)))) == 1, e


# One class written into two modules: two wrappers of one qualified name, ``Sizes.bcast``.
SIZES_SOURCE = """
class Sizes:
    def __init__(self, comm):
        self.comm = comm

    def bcast(self, value):
        return self.comm.bcast(value, root=0)
"""


def sizes_class_of(filename: str) -> Any:
    namespace: dict = {}
    exec(compile(SIZES_SOURCE, filename, "exec"), namespace)
    return namespace["Sizes"]


SIZE_SENDER, FLAG_SENDER = sizes_class_of("sizes_a.py"), sizes_class_of("sizes_b.py")


def like_named_wrappers_through_one_role_branch(comm: tc.TypedComm) -> List[Any]:
    size, flag, out = SIZE_SENDER(comm), FLAG_SENDER(comm), []
    for it in range(3):
        for send, value in ((size.bcast, 100 + it), (flag.bcast, 0)):  # from one line
            if send == size.bcast and it == 1 and comm.rank == 1:
                continue  # rank 1 skips the size in iteration 1
            out.append(in_role_branch(comm, send, value))
    return out


def test_a_role_branch_tells_apart_like_named_wrappers_of_two_modules():
    # Ranks compare the wrapper by its name and where it is defined: by its name alone, rank
    # 1's flag would take the root's size without an error.
    for e in errors_of(3, like_named_wrappers_through_one_role_branch, timeout=10):
        assert type(e) is tc.DesyncError and e.seq == 2, e
        assert "rank 1: bcast[int] root=0" in str(e), e
        line = FLAG_SENDER.bcast.__code__.co_firstlineno
        assert re.search(rf"through Sizes.bcast \(sizes_b.py:{line}\) called from [^ ]+, its "
                         rf"2nd call", str(e)), e
        assert len(set(re.findall(r"called from (\S+:\d+)", str(e)))) == 1, e


def barriers_in_two_arms(comm: tc.TypedComm, method: str) -> None:
    dist = Broadcaster(comm)
    if comm.rank == 0:
        getattr(dist, method)()  # the root's arm
    else:
        getattr(dist, method)()  # everyone else's


def test_one_thin_wrapper_called_from_two_lines_is_one_call_only_by_name():
    # Unrooted calls in two arms are two calls, through a thin wrapper as written out; the
    # error says to name the wrapper's call, and so named they pair.
    for e in errors_of(2, barriers_in_two_arms, "barrier"):
        assert type(e) is tc.DesyncError and e.kinds == (tc.MismatchKind.CALL,), e
        assert str(e).splitlines()[-1] == (
            f"  only the callers of {wrapper_text(Broadcaster.barrier)} differ: a call through "
            "a thin wrapper is its caller's, so a rank skipped or added a call before this "
            "one, or these are one collective reached from two places: then give this use a "
            f"name= of its own, passed down to the call in {wrapper_text(Broadcaster.barrier)} "
            f"(a name= written in {wrapper_text(Broadcaster.barrier)} itself makes every call "
            "through it one call)")
    assert run(2, barriers_in_two_arms, "named_barrier") == [None, None]


def test_what_counts_as_a_thin_wrapper():
    from typedcoll.core.identity import is_forwarder

    class Cases:
        def one_call(self, obj): return self.c.allgather(obj)  # noqa: E704
        def no_argument(self): self.c.barrier()  # noqa: E704

        def out_list(self, obj):
            objs = [None] * self.n
            self.c.all_gather_object(objs, obj)
            return objs

        # Thin: every execution that makes one of its calls makes all of them, on one line.
        def chained(self, obj): return self.group().allgather(obj)  # noqa: E704

        def shortcut(self, obj):
            if self.n == 1:
                return [obj]
            return self.c.allgather(obj)

        def flag(self, obj): return self.c.allgather(obj) if self.on else [obj]  # noqa: E704

        def picks_argument(self, obj):  # one call, though 3.12 compiles a copy into each arm
            return self.c.allgather(obj, timeout=6 if self.on else 5)

        def checks_result(self, obj):
            out = self.c.allgather(obj)
            if not out:
                raise ValueError(out)
            return out

        # Not thin: a branch picks which of its calls run, it calls on two lines (a function
        # of several statements keeps its lines in messages), loops, catches or suspends.
        def logs_first(self, obj):
            print(obj)
            return self.c.allgather(obj)

        def alternatives(self, obj):
            return self.c.allgather(obj) if obj else self.c.barrier()

        def guard_that_calls(self, obj):
            if not self.ready():
                return None
            return self.c.allgather(obj)

        def loops(self, objs): return [self.c.allgather(o) for o in objs]  # noqa: E704

        def guarded(self, obj):
            with self.lock:
                return self.c.allgather(obj)

        def catches(self, obj):
            try:
                return self.c.allgather(obj)
            except ValueError:
                return None

        def suspends(self, obj): yield self.c.allgather(obj)  # noqa: E704
        def no_call(self, obj): return obj  # noqa: E704

    thin = {name: is_forwarder(getattr(Cases, name).__code__) for name in vars(Cases)
            if not name.startswith("_")}
    assert thin == {"one_call": True, "no_argument": True, "out_list": True, "logs_first": False,
                    "chained": True, "shortcut": True, "flag": True, "picks_argument": True,
                    "checks_result": True,
                    "alternatives": False, "guard_that_calls": False, "loops": False,
                    "guarded": False, "catches": False, "suspends": False, "no_call": False}
    # An assert's message is no call of the wrapper's (compiled here: pytest rewrites the
    # asserts of a test module into calls of its own).
    scope: dict = {}
    exec(compile("def checks_src(self, obj, src=0):\n"
                 "    assert src < self.n, 'bad src %s' % repr(src)\n"
                 "    return self.c.bcast(obj, root=src)\n", "cases.py", "exec"), scope)
    assert is_forwarder(scope["checks_src"].__code__)
    assert is_forwarder((lambda obj: obj.allgather(1)).__code__)
    assert is_forwarder((lambda obj: obj.allgather(1) if obj else None).__code__)
    assert not is_forwarder((lambda obj: obj.allgather(1) if obj else obj.barrier()).__code__)


def test_a_function_is_thin_at_its_pass_through_call():
    import dis
    from typedcoll.core.identity import forwarding

    def passes_at(fn: Callable[..., Any]) -> Any:
        """forwarding's answer, with offsets as the opcodes found there (an answer holds a
        call's inline caches too, where a frame inside the call reports its offset); a
        decorator's wrapper, handing on to the function it closes over, answers them in a
        1-tuple (left out of the wrappers a call passed)."""
        answer = forwarding(fn.__code__)
        if isinstance(answer, tuple):
            return ("decorator", passes_at_offsets(fn, answer[0]))
        if not isinstance(answer, frozenset):
            return answer
        return passes_at_offsets(fn, answer)

    def passes_at_offsets(fn: Callable[..., Any], answer: Any) -> Any:
        names = {ins.offset: ins.opname for ins in dis.get_instructions(fn.__code__)}
        # 3.11: the call's PRECALL is held too, where a warm frame stands (test_core_warm)
        return sorted(names[offset] for offset in answer
                      if offset in names and names[offset] != "PRECALL")

    def logs(func, enable_log=False):
        def wrapper(*args, **kwargs):
            if enable_log:
                print(f"{func.__name__} enter: {args[1:]}")
            ret = func(*args, **kwargs)
            if enable_log:
                print(f"{func.__name__} exit: {ret}")
            return ret
        return wrapper

    def in_context(func, lock):
        def decorate_context(*args, **kwargs):
            with lock:
                return func(*args, **kwargs)
        return decorate_context

    def retries(func):
        def wrapper(*args, **kwargs):
            for _ in range(3):
                out = func(*args, **kwargs)
                if out is not None:
                    return out
            return None
        return wrapper

    def catches(func):
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except ValueError:
                return None
        return wrapper

    def cleans_up(func, done):
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            finally:
                done()
        return wrapper

    def retry_method(func):
        def wrapper(self, *args, **kwargs):
            for _ in range(3):
                try:
                    return func(self, *args, **kwargs)
                except TimeoutError:
                    pass
            raise TimeoutError
        return wrapper

    def retries_adding(func):
        def wrapper(*args, **kwargs):
            for attempt in range(3):
                out = func(*args, attempt=attempt, **kwargs)
                if out is not None:
                    return out
            return None
        return wrapper

    def retries_shifted(func):
        def wrapper(*args, **kwargs):
            for _ in range(3):
                args = args[1:]
                out = func(*args, **kwargs)
                if out is not None:
                    return out
            return None
        return wrapper

    def every_handler(*args):
        for handler in (print, repr):
            handler(*args)

    def twice(func):
        def wrapper(*args, **kwargs):
            func(*args, **kwargs)
            return func(*args, **kwargs)
        return wrapper

    def picks(func, other, flag):
        def wrapper(*args, **kwargs):
            return func(*args, **kwargs) if flag else other(*args, **kwargs)
        return wrapper

    def guarded(func, ready):
        def wrapper(*args, **kwargs):
            if not ready():
                return None
            return func(*args, **kwargs)
        return wrapper

    def no_unpacking(func):
        def wrapper(obj, *rest):
            print(obj)
            return func(obj)
        return wrapper

    class Methods:
        def log_line(self, obj):
            print(obj)
            return self.c.allgather(obj)

        def asymmetric_role(self, obj, src=0):
            if self.rank == src:
                return self.c.bcast(obj, root=src)
            recv = [None]
            self.c.broadcast_object_list(recv, src=src)
            return recv[0]

    f = print
    # Thin at the call that hands its arguments on or whose result it returns, and there
    # alone: a log line under a flag or not, a with block (torch.no_grad()'s decorator), a try,
    # a guard that returns before it; any other call keeps its own site.
    decorator = ("decorator", ["CALL_FUNCTION_EX"])
    for fn in (logs(f), in_context(f, threading.Lock()), guarded(f, f), catches(f),
               cleans_up(f, f)):
        assert passes_at(fn) == decorator, fn.__code__.co_name
    for fn in (no_unpacking(f), Methods.log_line):  # before 3.11: CALL_FUNCTION, CALL_METHOD
        assert passes_at(fn) in (["CALL"], ["CALL_FUNCTION"], ["CALL_METHOD"]), fn
    # A call that hands on the function's own arguments as they came is its caller's in a
    # loop too (a retry decorator): the wrapper's line would make every use one call.
    assert passes_at(retries(f)) == decorator
    assert passes_at(call_with_retry) == ["CALL_FUNCTION_EX"]  # its callee is a parameter
    assert passes_at(retry_method(f)) == decorator
    # What the wrapper adds to them (an attempt number) is its own, the same for every use.
    assert passes_at(retries_adding(f)) == decorator
    # Not thin: a branch that picks among pass-through calls, two of them on two lines, an
    # arm that makes a call of its own in their place (a role branch whose root returns its
    # call's result: the receivers' arm would no longer pair with it); and in a loop, a call
    # that hands on arguments the wrapper changed, or calls a local.
    for fn in (twice(f), picks(f, f, True), Methods.asymmetric_role, retries_shifted(f),
               every_handler):
        assert passes_at(fn) is False, fn.__code__.co_name
    # A thin wrapper stays True, whatever its parameters, but for one handing them on to a
    # function it closes over: a decorator's.
    assert forwarding((lambda *a: print(*a)).__code__) is True
    assert passes_at(lambda *a: f(*a)) == decorator


def call_with_retry(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    for _ in range(3):
        try:
            return func(*args, **kwargs)
        except TimeoutError:
            continue
    raise TimeoutError


def vote_through_wrappers(comm: tc.TypedComm, shape: str) -> List[Any]:
    def decorate(func):
        def logged(*args, **kwargs):
            if comm.rank < 0:
                print("never")
            return func(*args, **kwargs)

        def in_context(*args, **kwargs):
            with contextlib.nullcontext():
                return func(*args, **kwargs)

        def retried(*args, **kwargs):
            return call_with_retry(func, *args, **kwargs)

        def retried_with_attempt(*args, **kwargs):  # adds an argument of its own
            for attempt in range(3):
                try:
                    return func(*args, attempt=attempt, **kwargs)
                except TimeoutError:
                    continue
            raise TimeoutError
        chosen = {"with": in_context, "retry": retried,
                  "retry attempt": retried_with_attempt}.get(shape, logged)
        return functools.wraps(func)(chosen)

    if shape in ("logged", "with", "retry", "retry attempt"):
        @decorate
        def vote(v, attempt=0):
            return comm.allgather(v)
    elif shape == "log line":
        def vote(v):
            print(end="")
            return comm.allgather(v)
    else:
        def vote(v):
            try:
                return comm.allgather(v)
            except KeyError:
                raise

    out = [vote(1)]
    if comm.rank != comm.size - 1:
        out.append(vote(100))  # SKIPPED-BY-LAST: the batch-size vote
    out.append(vote(0))  # TIMEOUT-VOTE: the timeout vote
    return out


@pytest.mark.parametrize("timeout", [None, 10])  # the C fast path, the Python steps
@pytest.mark.parametrize("shape", ["logged", "with", "log line", "try", "retry",
                                   "retry attempt"])
def test_a_skipped_vote_through_a_wrapper_that_does_more_raises(shape, timeout):
    # Before, the decorator's frame (or the wrapper, for a log line or a try; the retry loop
    # for a retry decorator) was the site of every call through it: the last rank's timeout
    # vote took its peers' batch-size votes without an error.
    skipped = line_of(vote_through_wrappers, "# SKIPPED-BY-LAST")
    timeout_vote = line_of(vote_through_wrappers, "# TIMEOUT-VOTE")
    from test_core_review import outcomes  # bounded: a silent pairing would hang untimed ranks
    for e in outcomes(3, vote_through_wrappers, shape, timeout=timeout):
        assert type(e) is tc.DesyncError and e.kinds == (tc.MismatchKind.CALL,), e
        lines = str(e).splitlines()
        assert f"at {FILE}:{skipped}:" in lines[1] or f"at {FILE}:{skipped} " in lines[1], e
        assert f"at {FILE}:{timeout_vote}" in lines[2], e
        assert "through vote_through_wrappers.<locals>.vote (" in lines[1], e


def skipped_vote_through_lambdas(comm: tc.TypedComm, one_line: bool) -> List[Any]:
    # Two lambdas written on one line, called from their own lines or from one shared line.
    batch, timeout = (lambda v: comm.allgather(v)), (lambda v: comm.allgather(v))
    out = []
    for it in range(2):
        plan = [(batch, 100 + it), (timeout, 0)]
        if it == 1 and comm.rank == comm.size - 1:
            plan = plan[1:]  # the batch-size vote the last rank skips
        if one_line:
            out.extend(fn(v) for fn, v in plan)
        else:
            if len(plan) == 2:
                out.append(batch(100 + it))
            out.append(timeout(0))
    return out


@pytest.mark.parametrize("one_line", [False, True])
def test_a_skipped_vote_through_a_lambda_raises(one_line):
    # A lambda is a thin wrapper as a def is: its caller's line is the site, and two lambdas
    # written on one line stay two wrappers (each named by where its body starts).
    for e in errors_of(3, skipped_vote_through_lambdas, one_line, timeout=10):
        assert type(e) is tc.DesyncError and e.kinds == (tc.MismatchKind.CALL,), e
        lines = str(e).splitlines()
        assert "through skipped_vote_through_lambdas.<locals>.<lambda> (" in lines[1], e
        if one_line:  # the columns where the two bodies start tell the wrappers apart
            assert lines[1].split("(")[-1] != lines[2].split("(")[-1], e


def test_transparent_marks_functions_modules_and_module_names():
    import types
    module = types.ModuleType("wrapper_module")
    module.__file__ = "/nowhere/wrapper_module.py"
    assert tc.transparent(module) is module
    with pytest.raises(ValueError, match="expected the name of an imported module, got 'no_such"):
        tc.transparent("no_such_module_here")
    with pytest.raises(TypeError, match="expected a function, method, module or module name"):
        tc.transparent(42)  # type: ignore[arg-type]


# --- one verdict on every rank ------------------------------------------------------------------
def deep_caller(comm: tc.TypedComm, nesting: int) -> int:
    value: Any = 0
    for _ in range(nesting):
        value = [value]

    def at_depth(n: int) -> List[Any]:  # one call, made at two depths: named so
        return at_depth(n - 1) if n else comm.allgather(value, schema=list, name="deep")
    return len(at_depth(sys.getrecursionlimit() - 80 if comm.rank == 1 else 0))


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_decoding_does_not_depend_on_the_callers_stack(timeout):
    assert run(2, deep_caller, 100, timeout=timeout) == [2, 2]


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_too_deep_a_value_fails_alike_on_every_rank(timeout):
    errors = errors_of(2, deep_caller, 200, timeout=timeout)
    assert [type(e) for e in errors] == [tc.EncodeError, tc.EncodeError]
    for e in errors:
        assert str(e).endswith(": expected a value nested at most 128 deep, got one nested "
                               "deeper")


class Picky(msgspec.Struct):
    x: int

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError("expected x >= 0")


def picky(comm: tc.TypedComm) -> Any:
    value = Picky(1)
    if comm.rank == 1:
        msgspec.structs.force_setattr(value, "x", -1)
    return comm.allgather(value)


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_user_type_that_rejects_a_value_raises_typedcoll_errors(timeout):
    site = line_of(picky, "return comm.allgather(value)")
    e0, e1 = errors_of(2, picky, timeout=timeout)
    assert type(e0) is tc.DecodeError and e0.source == 1
    assert str(e0) == (f"collective #0 on WORLD: payload from rank 1 does not decode as Picky "
                       f"(allgather[Picky] at {FILE}:{site}): expected x >= 0")
    assert type(e1) is tc.EncodeError
    assert str(e1) == (f"collective #0 on WORLD: rank 1 could not send its allgather[Picky] "
                       f"contribution at {FILE}:{site}: expected Picky: expected x >= 0")


class Counted(msgspec.Struct):
    count: int = 0


def misfit(comm: tc.TypedComm, op: str) -> Any:
    """Rank 1's value encodes (a Struct does not check its fields) but fails its schema."""
    value = Counted("x" if comm.rank == 1 else 0)
    if op == "allgather":
        return comm.allgather(value)
    if op == "bcast":
        return comm.bcast(value, root=1, schema=Counted)
    if op == "gather":
        return comm.gather(value, root=0)
    if op == "scatter":
        return comm.scatter([value] * comm.size if comm.rank == 1 else None, root=1,
                            schema=Counted)
    return comm.alltoall([value] * comm.size)


@pytest.mark.parametrize("op,peers", [("allgather", tc.DecodeError), ("bcast", tc.DecodeError),
                                      ("gather", tc.PeerError), ("scatter", tc.PeerError),
                                      ("alltoall", tc.PeerError)])
def test_a_value_that_fails_its_schema_raises_on_every_rank_as_the_readme_says(op, peers):
    # Where every rank decodes the value from the exchange, its peers find it; where only its
    # receivers would, its rank checks it before sending and its peers are told.
    errors = errors_of(3, misfit, op)
    assert [type(e) for e in errors] == [peers, tc.EncodeError, peers]
    assert str(errors[1]).startswith(f"collective #0 on WORLD: rank 1 could not send its {op}"
                                     f"[Counted] contribution at {FILE}:")
    for e in (errors[0], errors[2]):
        assert ("payload from rank 1 does not decode as Counted" if peers is tc.DecodeError
                else f"rank 1 failed its {op}[Counted] contribution") in str(e)
        assert str(e).endswith("Expected `int`, got `str` - at `$.count`")


def bad_value(comm: tc.TypedComm) -> Any:
    return comm.allgather({"rank": 1} if comm.rank == 1 else RankState(0), schema=RankState)


def test_a_bad_value_names_its_site_and_what_was_expected():
    site = line_of(bad_value, "return comm.allgather")
    e0, e1 = errors_of(2, bad_value)
    assert str(e1) == (f"collective #0 on WORLD: rank 1 could not send its allgather[RankState] "
                       f"contribution at {FILE}:{site}: expected RankState, got dict")
    assert type(e0) is tc.PeerError and e0.ranks == (1,) and e0.error_type == "TypeError"
    assert str(e0) == (f"collective #0 on WORLD: rank 1 failed its allgather[RankState] "
                       f"contribution at {FILE}:{site}: expected RankState, got dict")


class EmptyState(msgspec.Struct):
    """An idle rank's record: a RankState's rank, without its counts."""
    rank: int
    idle: bool = True


class Routed(msgspec.Struct):
    """A record whose field holds another: the walk follows it."""
    state: Optional[RankState] = None


class Level(enum.IntEnum):
    HIGH = 1


def another_record_inside(comm: tc.TypedComm, schema: Any, good: Any, bad: Any) -> Any:
    return comm.allgather(bad if comm.rank == 1 else good, schema=schema)


@pytest.mark.parametrize("schema, good, bad, expected", [
    (Optional[RankState], RankState(0), EmptyState(1), "Optional[RankState], got EmptyState"),
    (Optional[RankState], None, {"rank": 1, "idle": True}, "Optional[RankState], got dict"),
    (List[RankState], [RankState(0)], [RankState(1), EmptyState(1)],
     "list[RankState], got EmptyState at [1]"),
    (Dict[str, RankState], {}, {"dp0": EmptyState(1)},
     "dict[str, RankState], got EmptyState at ['dp0']"),
    (Tuple[RankState, int], (RankState(0), 0), (EmptyState(1), 1),
     "tuple[RankState, int], got EmptyState at [0]"),
    (Optional[List[RankState]], None, [EmptyState(1)],
     "Optional[list[RankState]], got EmptyState at [0]"),
    (Dict[str, List[RankState]], {}, {"dp0": [EmptyState(1)]},
     "dict[str, list[RankState]], got EmptyState at ['dp0'][0]"),
    (Sequence[RankState], [RankState(0)], [EmptyState(1)],
     "list[RankState], got EmptyState at [0]"),
    (Optional[Annotated[RankState, msgspec.Meta(title="state")]], None, EmptyState(1),
     "Optional[RankState], got EmptyState"),
    (Routed, Routed(RankState(0)), Routed(EmptyState(1)), "Routed, got EmptyState at .state"),
])
def test_a_record_of_another_class_inside_the_schema_is_refused_not_converted(
        schema, good, bad, expected):
    # msgspec decodes a record's fields into the schema's class: rank 1's EmptyState arrived on
    # every rank as RankState(rank=1, num_active_requests=0), its own field dropped, no error.
    site = line_of(another_record_inside, "return comm")
    e0, e1 = errors_of(2, another_record_inside, schema, good, bad)
    assert type(e0) is tc.PeerError and e0.ranks == (1,) and type(e1) is tc.EncodeError
    for e in (e0, e1):
        assert str(e).endswith(f" contribution at {FILE}:{site}: expected {expected}"), str(e)


def test_records_inside_the_schema_that_fit_pass_both_paths():
    def fits(comm: tc.TypedComm) -> Any:
        return (comm.allgather(None if comm.rank else RankState(0), schema=Optional[RankState]),
                comm.allgather({"r": [RankState(comm.rank)]}, schema=Dict[str, List[RankState]]),
                comm.allgather(3, schema=Union[RankState, int]),
                # a member another part of the union takes as it is: an IntEnum's is an int
                comm.allgather(Level.HIGH, schema=Union[RankState, int]))
    assert run(2, fits)[1] == ([RankState(0), None], [{"r": [RankState(0)]},
                                                      {"r": [RankState(1)]}], [3, 3], [1, 1])


def test_a_union_written_in_another_order_on_one_rank_is_the_same_schema():
    # Its fingerprint followed the order written: "schema mismatch" on every rank, with the
    # advice to give one schema that admits them all, which both did.
    def unions(comm: tc.TypedComm) -> Any:
        mine = Union[int, str, None] if comm.rank == 0 else Union[None, str, int]
        return comm.allgather("s" if comm.rank == 0 else 1, schema=mine)
    assert run(2, unions) == [["s", 1], ["s", 1]]


def bad_root_on_one_rank(comm: tc.TypedComm) -> Any:
    # The root names its payload's schema, the receivers none, rank 1 a root that is no rank.
    return comm.bcast(7 if comm.rank == 0 else None, root=5 if comm.rank == 1 else 0)


def test_a_failed_rank_is_described_alike_on_every_rank():
    # Each rank used to describe rank 1's call by its own call: "bcast[int]" on the root,
    # "bcast" on the receivers. It is rank 1's call: every peer's text is the same.
    site = line_of(bad_root_on_one_rank, "return comm.bcast")
    e0, e1, e2 = errors_of(3, bad_root_on_one_rank)
    expected = (f"collective #0 on WORLD: rank 1 failed its bcast contribution at "
                f"{FILE}:{site}: expected root in 0..2, got 5")
    assert type(e0) is type(e2) is tc.PeerError and str(e0) == str(e2) == expected
    assert type(e1) is tc.EncodeError and str(e1) == (
        f"collective #0 on WORLD: rank 1 could not send its bcast contribution at "
        f"{FILE}:{site}: expected root in 0..2, got 5")


def scatter_of_two_types(comm: tc.TypedComm) -> Any:
    plans = [None, RankState(1), None, RankState(3)][:comm.size]
    return comm.scatter(plans if comm.rank == 0 else None, root=0)


def test_a_scatter_of_values_of_two_types_without_a_schema_says_why():
    # The schema of a root that names none is its value 0's type: say so, and what to pass.
    site = line_of(scatter_of_two_types, "return comm.scatter")
    errors = errors_of(2, scatter_of_two_types)
    assert type(errors[0]) is tc.EncodeError and type(errors[1]) is tc.PeerError
    assert str(errors[1]) == (
        f"collective #0 on WORLD: rank 0 failed its scatter[None] contribution at "
        f"{FILE}:{site}: value 1: Expected `null`, got `object` (no schema= was given, so every "
        f"value must be of value 0's type, NoneType, and value 1 is a RankState: pass a schema= "
        f"that admits both, Optional[...] where some are None)")
    assert run(2, lambda comm: comm.scatter(
        [None, RankState(1)] if comm.rank == 0 else None, root=0,
        schema=Optional[RankState])) == [None, RankState(1)]


def unencodable(comm: tc.TypedComm) -> Any:
    return comm.allgather(object() if comm.rank == 0 else 1, schema=int)


def test_a_value_msgspec_cannot_encode_says_what_to_do():
    e0, e1 = errors_of(2, unencodable)
    assert type(e0) is tc.EncodeError and type(e1) is tc.PeerError
    assert "expected int, got object: msgspec cannot encode it" in str(e0)
    assert "give the value a type msgspec supports" in str(e0)


# --- argument errors on one rank --------------------------------------------------------------
ARGUMENTS = {
    "root": (lambda c: c.bcast(1, root=c.size if c.rank == 1 else 0),
             "ValueError: expected root in 0..1, got 2"),
    "op": (lambda c: c.allreduce(1, op="avg" if c.rank == 1 else "sum"),
           "ValueError: expected op to be one of"),
    "step": (lambda c: c.allgather(1, step=2 ** 63 if c.rank == 1 else 0),
             "TypeError: expected step to be None or a 64-bit int, got 9223372036854775808"),
    # -2**63 is a 64-bit int, but the wire's mark for "no step".
    "step_reserved": (lambda c: c.allgather(1, step=-2 ** 63 if c.rank == 1 else 0),
                      "ValueError: expected step to be None or an int in -2**63+1..2**63-1, "
                      "got -9223372036854775808"),
    "set_step": (lambda c: (c.set_step("x" if c.rank == 1 else 0), c.allgather(1)),
                 "TypeError: expected step to be None or a 64-bit int, got 'x' (given to set_step)"),
    "name": (lambda c: c.allgather(1, name="" if c.rank == 1 else "x"),
             "TypeError: expected name to be None or a str of 1 to 256 characters, got ''"),
    "schema": (lambda c: c.allgather(1, schema=object() if c.rank == 1 else int),
               "TypeError: expected a schema msgspec can decode"),
    "color": (lambda c: c.split(2 ** 31 if c.rank == 1 else 0),
              "ValueError: expected color to be None or an int in 0..2**31-1, got 2147483648"),
    "key": (lambda c: c.split(0, key=2 ** 40 if c.rank == 1 else 0),
            "ValueError: expected key to be an int in -2**31..2**31-1, got 1099511627776"),
}


@pytest.mark.parametrize("which", sorted(ARGUMENTS))
def test_a_bad_argument_on_one_rank_raises_on_every_rank(which):
    call, text = ARGUMENTS[which]
    e0, e1 = errors_of(2, call, timeout=5.0)
    assert type(e1) is tc.EncodeError and type(e0) is tc.PeerError
    assert e0.ranks == (1,)
    kind, _, detail = text.partition(": ")
    assert e0.error_type == kind and e0.detail.startswith(detail)
    assert f": {detail}" in str(e1)


@pytest.mark.parametrize("bad", [0, math.nan, "5", -1.0, True])
def test_a_bad_timeout_on_one_rank_raises_on_every_rank(bad):
    from typedcoll.transports.memory import World
    from typedcoll._comm import _created
    from typedcoll.core.channel import Channel

    transports = World(2).transports()
    outcomes: List[Any] = [None, None]

    def make(r: int) -> None:
        try:
            _created(Channel(transports[r], "WORLD"), bad if r == 1 else 5.0, None)
        except tc.CollectiveError as exc:
            outcomes[r] = exc

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a rank hung at creation"
    assert type(outcomes[1]) is tc.EncodeError and type(outcomes[0]) is tc.PeerError
    assert f"expected timeout None or seconds > 0, got {bad!r}" in str(outcomes[1])


def test_different_timeouts_raise_a_desync_of_settings():
    from typedcoll.transports.memory import World
    from typedcoll._comm import _created
    from typedcoll.core.channel import Channel

    transports = World(2).transports()
    outcomes: List[Any] = [None, None]

    def make(r: int) -> None:
        try:
            _created(Channel(transports[r], "WORLD"), 5.0 if r else None, None)
        except tc.CollectiveError as exc:
            outcomes[r] = exc

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for e in outcomes:
        assert type(e) is tc.DesyncError and e.kinds == (tc.MismatchKind.SETTINGS,)
        assert e.seq == -1  # the creation, not its number on the wire
        assert str(e).splitlines()[0] == "creation on WORLD diverged (settings):"
        assert "create timeout=None at " in str(e) and "create timeout=5 at " in str(e)


# --- smaller items -----------------------------------------------------------------------------
def barrier_steps(comm: tc.TypedComm) -> None:
    comm.barrier(step=1 if comm.rank == 0 else 2)


def test_barrier_takes_a_step():
    for e in errors_of(2, barrier_steps):
        assert type(e) is tc.DesyncError and e.kinds == (tc.MismatchKind.STEP,)


def big_endian(comm: tc.TypedComm) -> Any:
    values = (np.arange(2000) * (comm.rank + 1)).astype(">i8")
    return comm.allreduce(values), comm.allreduce(np.arange(3, dtype=">f4"), op="max")


def test_non_native_byte_order_in_allreduce():
    (total, top), _ = run(2, big_endian)
    assert total.dtype == np.dtype(">i8") and total.tolist() == (np.arange(2000) * 3).tolist()
    assert top.dtype == np.dtype(">f4") and top.tolist() == [0.0, 1.0, 2.0]


def nan_holder(comm: tc.TypedComm, holder: int, op: str) -> Any:
    return comm.allreduce(math.nan if comm.rank == holder else 1.0, op=op)


@pytest.mark.parametrize("op", ["max", "min"])
@pytest.mark.parametrize("holder", [0, 1, 2])
def test_nan_wins_max_and_min_whichever_rank_holds_it(op, holder):
    assert all(math.isnan(v) for v in run(3, nan_holder, holder, op))


def lifetime(comm: tc.TypedComm) -> Any:
    with comm.dup() as twin:
        out = twin.allgather(comm.rank)
    with pytest.raises(tc.CollectiveError, match=r"allgather refused: the communicator was freed"):
        twin.allgather(1)
    twin.free()  # idempotent
    return out


def test_context_manager_and_free():
    assert run(2, lifetime) == [[0, 1], [0, 1]]


def rooted_at_scale(comm: tc.TypedComm) -> Any:
    r = comm.rank
    return (comm.gather(RankState(r), root=3), comm.reduce(r, "sum", root=5),
            comm.gather(b"x" * (5000 if r == 7 else 10), root=0),
            comm.scatter([RankState(i) for i in range(comm.size)] if r == 2 else None, 2),
            comm.alltoall([r * 100 + j for j in range(comm.size)]))


def test_rooted_collectives_past_the_direct_gather_size():
    """Beyond 16 ranks gather and reduce take a REDUCE exchange and a rooted backend gather."""
    n = 18
    out = run(n, rooted_at_scale)
    for r, (gathered, total, big, mine, alltoall) in enumerate(out):
        assert gathered == ([RankState(i) for i in range(n)] if r == 3 else None)
        assert total == (sum(range(n)) if r == 5 else None)
        assert big == ([b"x" * (5000 if i == 7 else 10) for i in range(n)] if r == 0 else None)
        assert mine == RankState(r)
        assert alltoall == [j * 100 + r for j in range(n)]


def bad_value_at_scale(comm: tc.TypedComm) -> Any:
    return comm.gather({"rank": 1} if comm.rank == 9 else RankState(0), root=0,
                       schema=RankState)


def test_a_bad_value_past_the_direct_gather_size_raises_on_every_rank():
    errors = errors_of(18, bad_value_at_scale)
    assert type(errors[9]) is tc.EncodeError
    assert all(type(e) is tc.PeerError and e.ranks == (9,) for r, e in enumerate(errors) if r != 9)


# --- hints: how to declare what differs on purpose -------------------------------------------------
def types_that_differ(comm: tc.TypedComm) -> List[Any]:
    out: List[Any] = []
    calls = (lambda: comm.allgather(None if comm.rank == 1 else RankState(comm.rank)),
             lambda: comm.allreduce(0 if comm.rank == 1 else 1.5),
             lambda: comm.allreduce(True, op="land"),
             lambda: comm.allreduce(np.bool_(comm.rank != 1), op="land"),
             lambda: comm.allgather(None if comm.rank == 1 else RankState(comm.rank),
                                    schema=Optional[RankState]),
             # an idle rank's literal beside its peers' numpy scalar (``arr.sum()``)
             lambda: comm.allreduce(0 if comm.rank == 1 else np.int64(comm.rank)))
    for call in calls:
        try:
            out.append(call())
        except tc.CollectiveError as exc:
            out.append(exc)
    return out


def test_types_that_differ_say_how_to_declare_them():
    for rank, got in enumerate(run(3, types_that_differ)):
        gather, reduce, flag, numpy_flag, declared, numpy_sum = got
        assert type(gather) is tc.DesyncError and str(gather).endswith(
            "\n  only the schemas differ (None and RankState): if ranks may send different types "
            "here, give every rank's call one schema= that admits them all (Optional[X] where a "
            "rank has nothing to send, or a Union)"), gather
        assert type(reduce) is tc.DesyncError and str(reduce).endswith(
            "\n  only the value types differ (float and int): a reduction takes each value's own "
            "type, so give every rank's value one type (int(x), float(x) or one numpy dtype)")
        assert type(flag) is tc.EncodeError and str(flag).endswith(
            "expected an int, float, numpy scalar or numpy array, got bool (send int(flag) or "
            "numpy.bool_(flag))"), flag
        assert numpy_flag == np.False_
        assert declared == [RankState(0), None, RankState(2)]
        assert type(numpy_sum) is tc.DesyncError and str(numpy_sum).endswith(
            "\n  ranks 0,2 sent a numpy scalar (dtype int64), rank 1 a Python int: a numpy scalar "
            "travels as a 0-d array, so give every rank's value one type (int(x) or float(x) on "
            "every rank, or a numpy scalar on every rank)"), numpy_sum


def two_builds_of_one_record(comm, omit_defaults: bool, older_default: Any) -> Any:
    """Rank 1 runs an older build of RankState: its max_batch defaults to ``older_default``.
    Every rank sends max_batch=8, the newer default, so a sender that omits defaults leaves it
    out and rank 1 would fill in its own."""
    class RankState(msgspec.Struct, omit_defaults=omit_defaults):
        rank: int
        max_batch: Any = older_default if comm.rank == 1 else 8
    try:
        return [(s.rank, s.max_batch) for s in comm.allgather(RankState(comm.rank, 8))]
    except tc.CollectiveError as exc:
        return exc


@pytest.mark.parametrize("older_default", [16, msgspec.UNSET], ids=["16", "UNSET"])
def test_two_builds_whose_defaults_a_receiver_fills_in_differ_are_refused(older_default):
    """Never rank 1 decoding its peers' max_batch as its own default: the defaults a receiver
    fills in are part of the schema's fingerprint, so every rank raises."""
    texts = set()
    for got in run(3, two_builds_of_one_record, True, older_default):
        assert type(got) is tc.DesyncError and [k.value for k in got.kinds] == ["schema"], got
        assert str(got).endswith(
            "\n  the ranks' RankState differ in structure (fields, their types, or the defaults "
            "a receiver fills in for fields a sender leaves out): define it alike on every rank "
            "(one version of the code, and defaults that do not depend on the rank or its "
            "environment)"), got
        texts.add(str(got))
    assert len(texts) == 1, texts


def test_two_builds_whose_defaults_differ_agree_where_every_value_is_sent():
    """No false alarm: without omit_defaults every field goes on the wire, a default decides
    nothing, and the builds meet."""
    for got in run(3, two_builds_of_one_record, False, 16):
        assert got == [(0, 8), (1, 8), (2, 8)], got


def records_with_a_per_rank_factory(comm, made: List[int]) -> Any:
    """A request id from a counter that differs by rank: a factory msgspec never leaves out."""
    def next_id() -> str:
        made.append(comm.rank)
        return f"req-{comm.rank}-{len(made)}"

    class Request(msgspec.Struct, omit_defaults=True):
        rank: int
        request_id: str = msgspec.field(default_factory=next_id)
        tags: list = msgspec.field(default_factory=list)
    mine = Request(comm.rank, request_id=f"req-{comm.rank}")
    return [(r.rank, r.request_id, r.tags) for r in comm.allgather(mine)]


def test_a_factory_default_is_never_called_and_meets_across_ranks():
    """No false alarm and no user code run: a factory's field (other than an empty builtin
    collection's) is always sent, so its default stays out of the fingerprint, uncalled."""
    made: List[int] = []
    for got in run(3, records_with_a_per_rank_factory, made):
        assert got == [(r, f"req-{r}", []) for r in range(3)], got
    assert made == [], made


class Opaque:
    """A value msgspec cannot encode."""


def fails_at_another_call(comm) -> Any:
    """Rank 2 skipped the state allgather and fails to encode its stats."""
    try:
        if comm.rank == 2:
            return comm.allgather(Opaque(), name="stats")
        return comm.allgather(comm.rank, name="state")
    except tc.CollectiveError as exc:
        return exc


def fails_in_a_role_branch(comm) -> Any:
    """The root of a bcast written in a role branch fails to encode: one call on two lines."""
    try:
        if comm.rank == 0:
            return comm.bcast(Opaque(), root=0)
        return comm.bcast(None, root=0, schema=int)
    except tc.CollectiveError as exc:
        return exc


def test_a_rank_failing_at_another_call_is_also_named_out_of_step():
    """Its failure is the verdict (a failed rank is compared with nobody), and its text says
    the ranks are out of step, the same words on every rank."""
    got = run(3, fails_at_another_call)
    assert [type(e) for e in got] == [tc.PeerError, tc.PeerError, tc.EncodeError], got
    tail = (" (and rank 2 made another call than the others, so the ranks are out of step too: "
            "ranks 0-1: allgather name='state' at ")
    assert all(tail in str(e) and "; rank 2: allgather name='stats' at " in str(e)
               for e in got), got


def fails_in_an_elif(comm) -> Any:
    """The root of a bcast written in three arms (if/elif/else) fails to encode at its first
    run: one call on three lines, the receivers' two arms never paired before."""
    try:
        if comm.rank == 0:
            return comm.bcast(Opaque(), root=0)
        elif comm.rank == 1:
            return comm.bcast(None, root=0, schema=int)
        else:
            return comm.bcast(None, root=0, schema=int)
    except tc.CollectiveError as exc:
        return exc


@pytest.mark.parametrize("body", [fails_in_a_role_branch, fails_in_an_elif],
                         ids=["if-else", "elif"])
def test_a_root_failing_in_a_role_branch_is_its_failure_not_out_of_step(body):
    """The failed root still says where it called, so the arms pair: its own EncodeError and
    PeerError elsewhere (an elif's receivers on two lines had read as a call-site desync)."""
    got = run(3, body)
    assert [type(e) for e in got] == [tc.EncodeError, tc.PeerError, tc.PeerError], got
    assert not any("out of step" in str(e) for e in got), got
    assert len({str(e) for e in got[1:]}) == 1, got


def two_builds_of_one_enum(comm, swapped: bool) -> Any:
    """Rank 1's Mode lists its members in another order (``swapped``: with enum.auto(), so
    its names map to the other values)."""
    import enum
    if comm.rank == 1 and swapped:
        Mode = enum.Enum("Mode", ["DECODE", "PREFILL"])
    elif comm.rank == 1:
        Mode = enum.Enum("Mode", [("DECODE", 2), ("PREFILL", 1)])
    else:
        Mode = enum.Enum("Mode", ["PREFILL", "DECODE"])
    try:
        return [m.name for m in comm.allgather(Mode.PREFILL)]
    except tc.CollectiveError as exc:
        return exc


def test_an_enum_whose_names_map_to_other_values_on_a_rank_is_refused():
    """The wire holds the value: rank 1 would read its peers' PREFILL (1) as DECODE."""
    got = run(3, two_builds_of_one_enum, True)
    assert all(type(e) is tc.DesyncError and [k.value for k in e.kinds] == ["schema"]
               for e in got), got
    assert len({str(e) for e in got}) == 1


def test_an_enum_listed_in_another_order_meets():
    """No false alarm: every name maps to the same value, whatever the order of the class."""
    for got in run(3, two_builds_of_one_enum, False):
        assert got == ["PREFILL"] * 3, got


def test_a_default_in_the_fingerprint_is_the_same_in_every_process():
    """Defaults enter the fingerprint as deterministic msgpack (sets sorted), not as repr,
    which follows the process's hash seed."""
    program = ("import msgspec\nfrom typedcoll.codecs import resolve\n"
               "class Tags(msgspec.Struct, omit_defaults=True):\n"
               "    names: frozenset = frozenset('abcdefgh')\n"
               "print(resolve(Tags).fingerprint.hex())")
    prints = {subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                             check=True, env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout
              for seed in (1, 2, 3)}
    assert len(prints) == 1 and len(prints.pop().strip()) == 16, prints
