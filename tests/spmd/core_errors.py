"""SPMD: every rank raises the same error in the same call, over real MPI (C and Python paths).

Run by tests/test_core_mpi.py at 2 and 4 ranks. The same cases as tests/test_core_semantics.py,
here through the MPI transport's own exchange, plus what only a real backend shows: ranks in
collectives of different exchange shapes meeting, two communicators over one parent used in
different orders, and threads colliding on one communicator.
"""

import contextlib
import functools
import logging
import os
import sys
import threading
import types

import msgspec
import numpy as np
from mpi4py import MPI

import typedcoll as tc
from spmd.harness import WORLD, Checker


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int = 0


FILE = os.path.basename(__file__)  # the launcher runs a copy of this file
chk = Checker("core_errors")
comm = tc.TypedComm(MPI.COMM_WORLD, timeout=20.0)
rank, size = comm.rank, comm.size
last = size - 1
others = "rank 0:" if size == 2 else f"ranks 0-{last - 1}:"
label = f"rank {last}:"
width = max(len(others), len(label))


def lines(err):
    return str(err.error).splitlines()


# Two votes identical on the wire, from two lines; the last rank skips the first one once.
def iteration(it):
    if not (rank == last and it == 1):
        comm.allgather(np.array([it], dtype=np.int64))  # the batch-size vote
    comm.allgather(np.array([10 + it], dtype=np.int64))  # the timeout vote


first_line = iteration.__code__.co_firstlineno
iteration(0)
with chk.expect(tc.DesyncError, "wire-identical votes") as err:
    iteration(1)
votes = lines(err)
chk.eq("votes: head", votes[0], "collective #2 on COMM_WORLD diverged (call site):")
# iteration has no loop: the line that called it is part of each vote's identity
chk.eq("votes: the others", votes[1],
       f"  {others:<{width}} allgather[ndarray] shape=(1,) dtype=int64 at "
       f"{FILE}:{first_line + 2} called from {FILE}:{first_line + 9}, its 1st call")
chk.eq("votes: the skipper", votes[2],
       f"  {label:<{width}} allgather[ndarray] shape=(1,) dtype=int64 at "
       f"{FILE}:{first_line + 3} called from {FILE}:{first_line + 9}, its 1st call")
chk.usable(comm, "after the votes")


# The same two votes through an engine's wrappers, unmarked: a size-1 shortcut and a flag in a
# conditional expression do not make a wrapper the site of every call through it, nor do a log
# line before the call it returns or decorators around it (a log line under a debug flag, a
# context around the call).
MULTI_DEVICE = True
LOG = logging.getLogger("core_errors")


def log_op(func, enable_log=False):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if enable_log:
            print(f"{func.__name__} enter: {args[1:]}")
        ret = func(*args, **kwargs)
        if enable_log:
            print(f"{func.__name__} exit: {ret}")
        return ret
    return wrapper


def in_context(func):
    @functools.wraps(func)
    def decorate_context(*args, **kwargs):
        with contextlib.nullcontext():
            return func(*args, **kwargs)
    return decorate_context


class Dist:
    def __init__(self, typed):
        self.typed = typed

    def group(self):
        return self.typed

    @log_op
    @in_context
    def allgather(self, obj):
        if self.typed.size == 1:
            return [obj]
        LOG.debug("allgather %r", obj)  # a log line: thin still at the call it returns
        return self.flagged(obj)

    def flagged(self, obj):
        return self.group().allgather(obj) if MULTI_DEVICE else [obj]


def wrapped_iteration(dist, it):
    if not (rank == last and it == 1):
        dist.allgather(it)  # the batch-size vote, through the wrapper
    dist.allgather(10 + it)  # the timeout vote, through the wrapper


dist = Dist(comm)
wrapped_iteration(dist, 0)
if size > 1:
    with chk.expect(tc.DesyncError, "votes through wrappers") as err:
        wrapped_iteration(dist, 1)
    head = wrapped_iteration.__code__.co_firstlineno
    # every wrapper passed, outermost first, but the decorators' frames (they hand their
    # arguments on to the function they wrap): Dist's two methods
    via = " through ".join(f"{name} ({FILE}:{line})" for name, line in (
        ("Dist.allgather", Dist.allgather.__wrapped__.__wrapped__.__code__.co_firstlineno),
        ("Dist.flagged", Dist.flagged.__code__.co_firstlineno)))
    chk.eq("wrapped votes: kinds", err.error.kinds, (tc.MismatchKind.CALL,))
    called = f"called from {FILE}:{head + 10}"
    chk.eq("wrapped votes: the others", lines(err)[1],
           f"  {others:<{width}} allgather[int] at {FILE}:{head + 2} through {via} {called}, "
           "its 1st call")
    chk.eq("wrapped votes: the skipper", lines(err)[2],
           f"  {label:<{width}} allgather[int] at {FILE}:{head + 3} through {via} {called}, "
           "its 1st call")
    chk.usable(comm, "after the votes through wrappers")

# Ranks in collectives whose exchanges have different shapes still meet, and all raise.
# (Each pair's two lambdas share a line, not a column: their call sites differ too.)
PAIRS = {
    "bcast/allgather": (lambda: comm.bcast(1, 0), lambda: comm.allgather(1),
                        "op, call site, root"),
    "barrier/allgather": (lambda: comm.barrier(), lambda: comm.allgather(1),
                          "op, call site, schema"),
    "gather/allreduce": (lambda: comm.gather(1, 0), lambda: comm.allreduce(1),
                         "op, call site, root, reduce op"),
    "scatter/barrier": (lambda: comm.scatter([1] * size if rank == 0 else None, 0, schema=int),
                        lambda: comm.barrier(), "op, call site, schema, root"),  # two lines
}
for what, (mine, theirs, kinds) in PAIRS.items():
    with chk.expect(tc.DesyncError, what) as err:
        (theirs if rank == last else mine)()
    head = lines(err)[0]
    chk.true(f"{what}: head {head!r}", head.startswith(
        f"collective #{comm.seq - 1} on COMM_WORLD diverged (op, ") and all(
        k in head for k in kinds.split(", ")))
    chk.usable(comm, what)

# Two votes identical on the wire on one line: the columns where the calls start differ.
with chk.expect(tc.DesyncError, "two votes on one line") as err:
    comm.allgather(1) if rank == last else comm.allgather(2)  # ONE-LINE
chk.eq("one line: kinds", err.error.kinds, (tc.MismatchKind.CALL,))
one_line, text = next((i, text) for i, text in enumerate(open(__file__), 1)
                      if "# ONE-LINE" in text)
starts = [str(text.find("comm.allgather") + 1), str(text.rfind("comm.allgather") + 1)]
columns = [line.split(f"at {FILE}:{one_line}:")[1].split(",")[0] for line in lines(err)[1:3]]
chk.eq("one line: the two columns shown", sorted(columns), sorted(starts))
chk.usable(comm, "after two votes on one line")

# The same site, one iteration short on one rank: the step clock tells them apart.
with chk.expect(tc.DesyncError, "same-site skip") as err:
    for it in range(3):
        comm.set_step(it)
        if rank == last and it == 1:
            continue
        comm.allgather(RankState(rank, it))
chk.eq("skip: kinds", err.error.kinds, (tc.MismatchKind.STEP,))
comm.set_step(None)
chk.usable(comm, "after the skip")

# Two communicators over one parent, used in different orders.
second = tc.TypedComm(MPI.COMM_WORLD, timeout=20.0)
chk.eq("second name", second.name, "COMM_WORLD#2")
with chk.expect(tc.DesyncError, "communicators mixed") as err:
    (second if rank == last else comm).allgather(rank)
chk.true("mixed: communicator named", "communicator" in lines(err)[0]
         and "on COMM_WORLD#2" in str(err.error))
chk.same("mixed: one text on every rank, headed by the lowest rank's communicator",
         str(err.error))
chk.true("mixed: heading", str(err.error).startswith("collective #"))
chk.usable(comm, "after mixing")

# One rank's bad argument: every rank raises in the same call.
with chk.expect(tc.EncodeError if rank == last else tc.PeerError, "bad root") as err:
    comm.bcast(1, root=size if rank == last else 0)
chk.true("bad root: named", f"expected root in 0..{last}, got {size}" in str(err.error))
chk.usable(comm, "after a bad root")
with chk.expect(tc.EncodeError if rank == last else tc.PeerError, "bad color") as err:
    comm.split(2 ** 31 if rank == last else 0)
chk.usable(comm, "after a bad color")
with chk.expect(tc.EncodeError if rank == last else tc.PeerError, "bad timeout") as err:
    tc.TypedComm(MPI.COMM_WORLD, timeout=0 if rank == last else 5.0)
chk.true("bad timeout: named", "expected timeout None or seconds > 0, got 0" in str(err.error))
with chk.expect(tc.DesyncError, "different timeouts") as err:
    tc.TypedComm(MPI.COMM_WORLD, timeout=1.0 if rank == last else 5.0)
chk.eq("timeouts: kinds", err.error.kinds, (tc.MismatchKind.SETTINGS,))

# A rank that frees while its peers still call: a desync, not a hang.
victim = tc.TypedComm(WORLD.Dup(), timeout=20.0)
with chk.expect(tc.DesyncError, "free while others call") as err:
    victim.free() if rank == last else victim.allgather(1)
chk.true("free: op named", "free" in str(err.error) and "allgather" in str(err.error))

# A bcast of a class only the root imported, without schema=: every rank raises the same
# DecodeError, naming the root as the payload's source and the class as the root names it.
if size > 1:
    if rank == 0:
        module = types.ModuleType("only_rank_zero")
        exec("import msgspec\nclass Hidden(msgspec.Struct):\n    a: int\n", module.__dict__)
        sys.modules[module.__name__] = module
        hidden = module.Hidden(1)
    seq = comm.seq
    with chk.expect(tc.DecodeError, "class only the root has") as err:
        comm.bcast(hidden if rank == 0 else None, 0)  # HIDDEN
    chk.same("class only the root has: the same error", (str(err.error), err.error.source,
                                                         err.error.schema))
    chk.eq("class only the root has: source and schema", (err.error.source, err.error.schema),
           (0, "Hidden"))
    chk.true(f"class only the root has: message ({err.error})", str(err.error).startswith(
        f"collective #{seq} on COMM_WORLD: rank 1{'' if size == 2 else ' (and '}"))
    chk.true("class only the root has: the payload named", "could not decode the root's "
             "bcast[Hidden] payload" in str(err.error))
    chk.usable(comm, "after a class only the root has")

# An engine's broadcast_object: the root's side and the receivers' in two arms of one role
# branch, called for the work requests and then the control requests from two lines. Its callers
# are part of its identity: a rank that skips the work requests raises on every rank, with one
# text, where it would take the control requests as work.
def broadcast_object(obj, src=0):
    if comm.rank == src:
        comm.bcast(obj, root=src)
        return obj
    else:
        return comm.bcast(None, root=src)


def receive_requests(it, skipper):
    got = []
    has_work = rank != skipper  # this rank's own decision (a local queue, a timeout)
    if has_work:
        got.append(broadcast_object([f"work {it}"] if rank == 0 else None))
    got.append(broadcast_object([f"abort {it}"] if rank == 0 else None))
    return got


if size > 1:
    for it in range(2):  # the first run proves the branch; the second sends the role identity
        chk.eq(f"role wrapper: iteration {it}", receive_requests(it, None),
               [[f"work {it}"], [f"abort {it}"]])
    for skipper in (0, last):
        seq = comm.seq
        with chk.expect(tc.DesyncError, f"role wrapper: rank {skipper} skips") as err:
            receive_requests(9, skipper)
        chk.same(f"role wrapper: rank {skipper} skips: one text", str(err.error))
        # (receivers that name no schema may show none beside the root's: kinds may add it)
        chk.eq(f"role wrapper: rank {skipper} skips: seq and first kind",
               (err.error.seq, err.error.kinds[0]), (seq, tc.MismatchKind.CALL))
        head = receive_requests.__code__.co_firstlineno
        chk.true(f"role wrapper: rank {skipper} skips: callers named ({err.error})",
                 f"called from {FILE}:{head + 4}" in str(err.error) and
                 f"called from {FILE}:{head + 5}" in str(err.error))
        chk.usable(comm, f"after rank {skipper} skipped through a role wrapper")

# vLLM's GroupCoordinator.all_reduce: a flag picks one of two routes to one collective, and the
# function returns its result. The route it picks is the same line for every use: the batch-size
# vote and the timeout vote through it are told apart by their callers, so a rank that skips the
# first raises on every rank where it would hand its peers the timeout vote as a batch size.
class Coordinator:
    def __init__(self, use_custom_op):
        self.use_custom_op = use_custom_op

    def all_gather(self, value):
        if size == 1:
            return [value]
        if self.use_custom_op:
            return self._custom(value)
        else:
            return self._out_place(value)

    def _custom(self, value):
        return comm.allgather(value)

    def _out_place(self, value):
        return comm.allgather(value)


def votes(group, skipper):
    got = []
    if rank != skipper:
        got.append(group.all_gather(100 + rank))  # the batch-size vote
    got.append(group.all_gather(rank))  # the timeout vote
    return got


if size > 1:
    for custom in (True, False):
        chk.eq(f"picker: route {custom}", votes(Coordinator(custom), None),
               [[100 + r for r in range(size)], list(range(size))])
    with chk.expect(tc.DesyncError, "picker: the last rank skips") as err:
        votes(Coordinator(True), last)
    chk.same("picker: the last rank skips: one text", str(err.error))
    head = votes.__code__.co_firstlineno
    chk.true(f"picker: callers named ({err.error})",
             f"called from {FILE}:{head + 3}" in str(err.error) and
             f"called from {FILE}:{head + 4}" in str(err.error))
    chk.usable(comm, "after the last rank skipped through a picker")

# A __post_init__ that reads rank-local state: the last rank refuses what the others accept.
# Every rank raises in the same call (the last its own error, the others PeerError naming it),
# a SymmetricFlush keeps the batch pending everywhere, and the communicator stays usable. The
# hook is defined on the last rank only, so the other ranks' schema runs none (the C path
# serves them) and the flag in the last rank's header alone makes every rank settle.
if size > 1:
    from typedcoll.executor import SymmetricFlush

    strict = [False]
    if rank == last:
        class Limited(msgspec.Struct):
            x: int

            def __post_init__(self):
                if strict[0] and self.x > 1:
                    raise ValueError("x above this rank's limit")
    else:
        class Limited(msgspec.Struct):  # type: ignore[no-redef]
            x: int

    hooked = [
        ("allgather", lambda: comm.allgather(Limited(0 if rank == last else rank + 2))),
        ("bcast", lambda: comm.bcast(Limited(5) if rank == 0 else None, 0, schema=Limited)),
        ("gather", lambda: comm.gather(Limited(0 if rank == last else rank + 2), last)),
        ("scatter", lambda: comm.scatter([Limited(r + 2) for r in range(size)] if rank == 0
                                         else None, 0, schema=Limited)),
    ]
    for op, call in hooked:
        chk.eq(f"hook {op}: accepted everywhere", type(call()).__name__ in ("list", "Limited",
                                                                           "NoneType"), True)
        strict[0] = rank == last
        own = tc.DecodeError if rank == last else tc.PeerError
        with chk.expect(own, f"hook {op}: refused on the last rank only") as err:
            call()
        strict[0] = False
        named = err.error.ranks if rank != last else (last,)
        chk.eq(f"hook {op}: the rank named", named, (last,))
        chk.true(f"hook {op}: why ({err.error})", "x above this rank's limit" in str(err.error)
                 and (rank == last or "__post_init__" in str(err.error)))
        chk.usable(comm, f"after hook {op}")
    # Receivers that name no schema find the class by name: only the last rank's runs a hook,
    # so the header carries no flag; the search's own settle tells every rank to settle.
    def wild_bcast():
        return comm.bcast(Limited(5) if rank == 0 else None, 0)  # receivers: no schema=

    for attempt in ("found by name", "guessed"):
        strict[0] = rank == last
        with chk.expect(tc.DecodeError if rank == last else tc.PeerError,
                        f"hook wild bcast, {attempt}") as err:
            wild_bcast()
        strict[0] = False
        chk.true(f"hook wild bcast, {attempt}: why ({err.error})",
                 "x above this rank's limit" in str(err.error))
    chk.eq("hook wild bcast: accepted", wild_bcast().x, 5)
    flush = SymmetricFlush(comm, {"limited": Limited})
    flush.post("limited", Limited(5 if rank == 0 else 0))
    strict[0] = rank == last
    with chk.expect(tc.DecodeError if rank == last else tc.PeerError, "hook flush") as err:
        flush.flush()
    strict[0] = False
    chk.eq("hook flush: kept pending", flush.num_pending, 1)
    got = flush.flush()
    chk.eq("hook flush: delivered once", [m.x for _, m in got.messages("limited")],
           [5] + [0] * (size - 1))
    chk.usable(comm, "after hook flush")

# Two communicators of one name over one parent, the last rank on the other one: their names
# alone hid the communicator mismatch ("diverged (envelope)", no kind, one group, and no number
# given back); they are named apart by instance, and both stay aligned.
tp_a = tc.TypedComm(MPI.COMM_WORLD, timeout=20.0, name="tp")
tp_b = tc.TypedComm(MPI.COMM_WORLD, timeout=20.0, name="tp")
with chk.expect(tc.DesyncError, "one name, two communicators") as err:
    (tp_b if rank == last else tp_a).allgather(rank)
chk.same("one name: one error on every rank", str(err.error))
chk.eq("one name: kinds", tuple(err.error.kinds), (tc.MismatchKind.COMMUNICATOR,))
chk.true(f"one name: named apart ({err.error})", "on tp (instance " in str(err.error))
chk.eq("one name: both usable after", (tp_a.allgather(rank), tp_b.allgather(rank)),
       (list(range(size)), list(range(size))))

# Two threads on one communicator: refused, never paired across threads, never a hang.
shared = tc.TypedComm(WORLD.Dup(), timeout=5.0)
outcomes = {0: [], 1: []}
start = threading.Barrier(2)  # the two threads begin together, so their calls overlap


def hammer(tid):
    start.wait()
    for i in range(3000):
        try:
            shared.allgather((tid, i))
        except tc.CollectiveError as exc:
            outcomes[tid].append(type(exc).__name__)
            return
    outcomes[tid].append("done")


threads = [threading.Thread(target=hammer, args=(t,)) for t in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
chk.true("threads: none hung", not any(t.is_alive() for t in threads))
ends = outcomes[0] + outcomes[1]
chk.true(f"threads: a collision was refused ({ends})", "ConcurrentCallError" in ends)
with chk.expect(tc.ConcurrentCallError, "the channel is unusable after a collision"):
    shared.allgather(rank)
chk.done(uniform=False)
