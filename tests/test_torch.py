"""The torch.distributed backend on gloo (CPU): values, desyncs and timeouts at 2, 4 and 8 ranks.

Each multi-rank program is this file run as ``python tests/test_torch.py PROGRAM RANK SIZE PORT
OUT`` in SIZE processes on a free localhost port, killed as a group after a hard timeout so a
hang fails the test. One program runs every case in sequence (a DesyncError leaves the
communicator usable) and checks its own values (a failed check exits non-zero); what must be
compared across ranks (error texts) is written to JSON that the tests then check. One run per
size keeps the file short: most of its time is each process importing torch.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import msgspec
import numpy as np
import pytest

torch = pytest.importorskip("torch") if __name__ != "__main__" else __import__("torch")

HERE = Path(__file__).resolve()
SEED = int(os.environ.get("TYPEDCOLL_SEED", random.randrange(2 ** 31)))
_MARK = re.compile(r"#\s*@(\S+)")
_LINES = HERE.read_text().splitlines()
# Line number of each line marked ``# @tag`` in this file, and "test_torch.py:LINE": expected
# messages name call sites without hard-coded line numbers.
_TAGGED = {m.group(1): n for n, line in enumerate(_LINES, 1) for m in [_MARK.search(line)] if m}
SITES = {tag: f"{HERE.name}:{n}" for tag, n in _TAGGED.items()}


def lambda_at(tag: str, body: str) -> str:
    """How messages name the thin lambda of desyncs() on the line marked ``# @tag`` whose body
    starts with ``body``: its calls' site is the line that called it."""
    column = _LINES[_TAGGED[tag] - 1].index(body) + 1
    return f"desyncs.<locals>.<lambda> ({SITES[tag]}:{column})"


class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int
    num_active_tokens: int


class TimeoutFlag(msgspec.Struct):
    timed_out: bool


def run_ranks(program: str, size: int, tmp_path: Path,
              timeout: Optional[float] = None) -> List[dict]:
    """Run ``program`` on ``size`` gloo ranks; every rank's outcomes, in rank order. The limit
    grows with the size: each process imports torch, and a small machine runs them in turn."""
    timeout = 60.0 + 15.0 * size if timeout is None else timeout
    from typedcoll.transports.gloo import free_port
    port = free_port()
    env = dict(os.environ, TYPEDCOLL_SEED=str(SEED), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE), program, str(r), str(size), str(port),
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, start_new_session=True) for r in range(size)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it exited: no group is left to signal
                pass
        pytest.fail(f"{program} at {size} ranks hung (seed {SEED}):\n"
                    + "\n".join(p.communicate()[0][-3000:] for p in procs))
    for r, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"{program} rank {r} failed (seed {SEED}):\n{out[-6000:]}"
    return [json.loads((tmp_path / f"{program}.{r}.json").read_text()) for r in range(size)]


# --- the programs (run in the child processes) ---------------------------------------------------
def outcome(fn: Callable[[], Any]) -> dict:
    import typedcoll as tc
    try:
        value = fn()  # @outcome
    except tc.CollectiveError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"value": repr(value)}


def same(got: Any, want: Any) -> bool:
    if isinstance(want, np.ndarray):
        return (isinstance(got, np.ndarray) and got.dtype == want.dtype
                and got.shape == want.shape and bool(np.array_equal(got, want, equal_nan=True)))
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return type(got) is type(want) and got == want


def check(label: str, got: Any, want: Any) -> None:
    if not same(got, want):
        raise AssertionError(f"{label} (seed {SEED}):\n  got  {got!r}\n  want {want!r}")


def program_all(rank: int, size: int) -> dict:
    """The values, then the desyncs (whose last case leaves the world's channel timed out)."""
    check_values(rank, size)
    return desyncs(rank, size)


def check_values(rank: int, size: int) -> None:
    """Every collective against values computed independently on every rank."""
    import torch.distributed as dist
    import typedcoll as tc
    from typedcoll.codecs import reduce_values
    from typedcoll.core.wire import HEADER_SIZE, LARGE_SHRINK_WINDOW, MAX_SLOT
    from typedcoll.transports import torch as transport_module

    comm = tc.TypedComm.from_torch(timeout=30)
    ranks = range(size)

    def blob(r: int, n: int) -> bytes:
        return np.random.default_rng([SEED, r, n]).integers(0, 256, n, dtype=np.uint8).tobytes()

    # A communicator whose slots stay within MAX_SLOT, as on MPI (its transport is made by the
    # dup, on every rank alike): payloads past it take phase 2 on gloo too.
    saved = transport_module.LARGEST_SLOT
    transport_module.LARGEST_SLOT = MAX_SLOT
    try:
        narrow = comm.dup()
    finally:
        transport_module.LARGEST_SLOT = saved
    assert narrow._p.policy.max_slot == MAX_SLOT < comm._p.policy.max_slot

    # allgather, gather, bcast, scatter and alltoall, inline and overflowing (phase 2) payloads;
    # on ``comm`` the slot grows past MAX_SLOT for them (one gloo operation), then shrinks
    for c, sizes in ((comm, (0, 3, 100, 5000, 70_000, 3)), (narrow, (3, 5000))):
        for n in sizes:
            check(f"allgather {n}", c.allgather(blob(rank, n)), [blob(r, n) for r in ranks])
            if c is comm and n == 70_000:  # the next calls carry it inline, in one operation
                check("slot fits 70,000 bytes", comm._p.policy.size > 70_000 + HEADER_SIZE, True)
            for root in ranks:
                check(f"gather {n} root {root}", c.gather(blob(rank, n), root),
                      [blob(r, n) for r in ranks] if rank == root else None)
                check(f"bcast {n} root {root}",
                      c.bcast(blob(rank, n) if rank == root else None, root, schema=bytes),
                      blob(root, n))
                check(f"scatter {n} root {root}",
                      c.scatter([blob(r, n + r) for r in ranks] if rank == root else None, root,
                                schema=bytes), blob(rank, n + rank))
            check(f"alltoall {n}", c.alltoall([blob(rank * size + j, n) for j in ranks]),
                  [blob(i * size + rank, n) for i in ranks])
    # Each window shrinks the slot to fit that window's largest payload: within 2 windows of
    # barriers one holds only small payloads, and the next call takes the slot it chose (from
    # there on, the power-of-two slots' own longer window applies).
    for _ in range(2 * LARGE_SHRINK_WINDOW + 1):
        comm.barrier()
    check("slot shrunk", comm._p.slot <= MAX_SLOT, True)
    states = [RankState(r, 3 * r, 17) for r in ranks]
    check("allgather RankState", comm.allgather(states[rank]), states)
    for root in ranks:  # receivers without a schema get the root's class
        check(f"bcast without schema, root {root}",
              comm.bcast(states[root] if rank == root else None, root), states[root])

    # allreduce and reduce: every op, Python numbers, arrays inline and above a slot,
    # non-native byte order, and the NaN rule
    int_ops = ["sum", "prod", "max", "min", "land", "lor", "lxor", "band", "bor", "bxor"]
    for op in int_ops:
        ints = [(r * 7 + 3) % 11 for r in ranks]
        check(f"allreduce int {op}", comm.allreduce(ints[rank], op), reduce_values(ints, op))
        check(f"reduce int {op}", comm.reduce(ints[rank], op, root=size - 1),
              reduce_values(ints, op) if rank == size - 1 else None)
        for dtype in ("<i8", ">i4", "<u2", "u1", "?"):
            for n in (3, 3000):
                arrays = [np.random.default_rng([SEED, r, n]).integers(0, 4, n).astype(dtype)
                          for r in ranks]
                check(f"allreduce {dtype}[{n}] {op}", comm.allreduce(arrays[rank], op),
                      reduce_values(arrays, op))
    for op in ("sum", "prod", "max", "min", "land", "lor", "lxor"):
        for dtype in ("<f8", ">f8", "<f4"):
            for n in (3, 3000):
                # Small integers: exact in any order of association, so gloo's own sums match.
                arrays = [np.random.default_rng([SEED, r, n]).integers(1, 4, n).astype(dtype)
                          for r in ranks]
                check(f"allreduce {dtype}[{n}] {op}", comm.allreduce(arrays[rank], op),
                      reduce_values(arrays, op))
    for n in (3, 3000):
        for op in ("max", "min"):
            arrays = [np.full(n, np.nan if r == size - 1 else 1.0) for r in ranks]
            check(f"NaN {op} [{n}]", comm.allreduce(arrays[rank], op), np.full(n, np.nan))
    comm.barrier()
    comm.barrier(step=3, name="sync")

    # split and dup: values, then a dup after a split that left a rank out
    sub = comm.split(rank % 2, key=-rank)
    check("split", sub.allgather(rank), sorted(range(rank % 2, size, 2), reverse=True))
    partial = comm.split(None if rank == 0 else 1)
    check("split with None", partial.allgather(rank) if partial else None,
          list(range(1, size)) if rank else None)
    dup = comm.dup()
    check("dup", dup.allgather(rank), list(ranks))
    check("dup of split", sub.dup().allgather(rank), sub.allgather(rank))
    for c in (sub, dup) + ((partial,) if partial else ()):
        c.free()

    # typed point to point (the transport's): a ring of sends before receives completes
    from typedcoll.core.transport import TransportTimeout
    transport = comm._p.transport
    for n in (0, 5, 100_000):
        transport.send_bytes(blob(rank, n), (rank + 1) % size, 3, time.monotonic() + 20)
        check(f"recv_bytes {n}", transport.recv_bytes((rank - 1) % size, 3,
                                                      time.monotonic() + 20),
              blob((rank - 1) % size, n))
    lonely = comm.dup()  # a receive that times out leaves its channel unusable
    if rank == 0:
        try:
            lonely._p.transport.recv_bytes(1, 4, time.monotonic() + 0.2)
            raise AssertionError("a receive with no sender returned")
        except TransportTimeout:
            pass

    # lifetime: TypedComms over one group share its channel; the last free destroys it
    group = dist.new_group(list(ranks))
    first, second = tc.TypedComm.from_torch(group), tc.TypedComm.from_torch(group)
    check("shared channel", first._p.channel is second._p.channel, True)
    check("names", [first.name, second.name], [f"group[{','.join(map(str, ranks))}]",
                                               f"group[{','.join(map(str, ranks))}]#2"])
    first.free()
    check("the other still works", second.allgather(rank), list(ranks))
    check("freed refuses", outcome(lambda: first.allgather(1)), {
        "error": "CollectiveError", "message": f"collective #1 on {first.name}: allgather "
                                               f"refused: the communicator was freed"})
    old = second._p.channel
    second.free()
    with tc.TypedComm.from_torch(group) as third:
        check("a new channel", third._p.channel is not old, True)
        check("after re-creation", third.allgather(rank), list(ranks))
    many = [tc.TypedComm.from_torch(group) for _ in range(1000)]
    check("1000 constructions share one channel", len({id(c._p.channel) for c in many}), 1)
    check("the last of them", many[-1].allgather(rank), list(ranks))
    check("its name", many[-1].name, f"group[{','.join(map(str, ranks))}]#1000")

    # tensor collectives against plain torch collectives on the world group
    for step, dtype in enumerate([torch.float32, torch.float64, torch.int64, torch.bfloat16]):
        gen = torch.Generator().manual_seed(SEED * 100 + step * 31 + rank)
        x = (torch.randn(4, 3, generator=gen) * 100).to(dtype)
        want = x.new_empty((4 * size, 3))
        transport_module.all_gather_single(want, x)
        check(f"all_gather_tensor {dtype}",
              torch.equal(comm.all_gather_tensor(x, name="h", step=step), want), True)
        for op, red in {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                        "min": dist.ReduceOp.MIN, "prod": dist.ReduceOp.PRODUCT}.items():
            got, ref = x.clone(), x.clone()
            comm.all_reduce_tensor(got, op, name="g", step=step)
            dist.all_reduce(ref, op=red)
            check(f"all_reduce_tensor {dtype} {op}", torch.equal(got, ref), True)
            if 4 % size == 0:
                ref_rs = x.new_empty((4 // size, 3))
                transport_module.reduce_scatter_single(ref_rs, x, op=red)
                check(f"reduce_scatter_tensor {dtype} {op}",
                      torch.equal(comm.reduce_scatter_tensor(x, op, name="r"), ref_rs), True)
        if 4 % size == 0:  # a vote that rides in the exchange, and rows that take gloo's own
            for rows in (x, x.repeat(64, 1)):
                ref_a2a = torch.empty_like(rows)
                dist.all_to_all_single(ref_a2a, rows)
                check(f"all_to_all_tensor {dtype} {tuple(rows.shape)}", torch.equal(
                    comm.all_to_all_tensor(rows, name="a", step=step), ref_a2a), True)
        sends = [(2 * rank + k + step) % 3 for k in range(size)]  # what a rank sends and
        receives = [(2 * k + rank + step) % 3 for k in range(size)]  # receives differ
        rows = x.repeat(8, 1)[:sum(sends)]
        ref_rows = rows.new_empty((sum(receives), 3))
        dist.all_to_all_single(ref_rows, rows, receives, sends)
        check(f"all_to_all_tensor counted {dtype}", torch.equal(comm.all_to_all_tensor(
            rows, send_counts=sends, receive_counts=receives, name="a", step=step), ref_rows),
              True)
        for root in ranks:
            got, ref = x.clone(), x.clone()
            comm.broadcast_tensor(got, root, name="w", step=step)
            dist.broadcast(ref, src=root)
            check(f"broadcast_tensor {dtype} root {root}", torch.equal(got, ref), True)
            got, ref = x.clone(), x.clone()
            comm.reduce_tensor(got, "max", root, name="d", step=step)
            dist.reduce(ref, dst=root, op=dist.ReduceOp.MAX)
            check(f"reduce_tensor {dtype} root {root}",
                  torch.equal(got, ref if rank == root else x), True)
            gathered = comm.gather_tensor(x, root, name="c", step=step)
            check(f"gather_tensor {dtype} root {root}",
                  torch.equal(gathered, want) if rank == root else gathered, True
                  if rank == root else None)
            parts = (torch.arange(size * 12.0).reshape(size, 4, 3) * (root + 1)).to(dtype)
            got = x.new_zeros(4, 3)
            comm.scatter_tensor(got, parts if rank == root else None, root, name="s", step=step)
            check(f"scatter_tensor {dtype} root {root}", torch.equal(got, parts[rank]), True)
    check("0-d all_gather_tensor", comm.all_gather_tensor(torch.tensor(rank)).tolist(),
          list(ranks))
    # Views whose memory is not their values (a column, a stride, an expansion) ride as their
    # values.
    w = torch.arange(12.0).reshape(4, 3) + 100 * rank
    for label, view in [("column", w[:, 0]), ("stride", w.reshape(-1)[::2]),
                        ("expanded", torch.tensor([rank + 0.5]).expand(5))]:
        want = view.new_empty((view.shape[0] * size,))
        transport_module.all_gather_single(want, view.contiguous())
        check(f"all_gather_tensor of a {label}", torch.equal(comm.all_gather_tensor(view), want),
              True)
    # A pending conjugate is refused in the call; a dtype numpy lacks still gets its message.
    c = torch.tensor([1 + 2j, 3 - 1j])
    got = outcome(lambda: comm.broadcast_tensor(c.conj() if rank == size - 1 else c, 0))
    check("conjugate view", got["error"], "EncodeError" if rank == size - 1 else "PeerError")
    check("conjugate view: why", "pending conjugate" in got["message"], True)
    # Counts past a rank's own rows are its error; counts that disagree, every rank's.
    got = outcome(lambda: comm.all_to_all_tensor(
        torch.zeros(size), send_counts=[2 if rank == size - 1 else 1] * size,
        receive_counts=[1] * size))
    check("send_counts past the rows", got["error"],
          "EncodeError" if rank == size - 1 else "PeerError")
    check("send_counts past the rows: why", "expected send_counts to add up to the tensor's "
          f"{size} rows (dim 0), got {[2] * size}" in got["message"], True)
    got = outcome(lambda: comm.all_to_all_tensor(
        torch.zeros(size), send_counts=[1] * size,
        receive_counts=[2] + [1] * (size - 2) + [0] if rank == size - 1 else [1] * size))
    check("counts that disagree", got["error"], "DesyncError")
    check("counts that disagree: why", f"rank 0 sends 1 row to rank {size - 1}, which expects "
          f"2 from it" in got["message"], True)
    got = outcome(lambda: comm.all_gather_tensor(
        torch.zeros(2, dtype=torch.bfloat16 if rank == 0 else torch.float16)))
    check("bfloat16 against float16", (got["error"], "dtype=bfloat16" in got["message"]),
          ("DesyncError", True))

    # Steady state: one gloo all-gather per typed allgather, nothing else on the private group
    calls: List[str] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            return getattr(control, name)
    control, transport.control = transport.control, Counting()
    try:
        for i in range(5):
            comm.allgather({"rank": rank, "i": i})
    finally:
        transport.control = control
    check("one all-gather per allgather", calls, ["_allgather_base"] * 5)
    # A small tensor rides in the envelope exchange: one gloo op per call (an int all-reduce
    # reduced from the slots); a float all-reduce (gloo's own reduction) and a tensor past
    # INLINE_MAX take a second op.
    calls.clear()
    vote, weights = torch.tensor([rank], dtype=torch.int64), torch.full((3,), rank + 0.5)
    transport.control = Counting()
    try:
        comm.all_reduce_tensor(vote, "max")
        comm.broadcast_tensor(weights.to(torch.bfloat16), 0)
        small = comm.all_gather_tensor(torch.tensor([[rank, 1], [2, 3]], dtype=torch.int32))
        comm.all_reduce_tensor(weights, "sum")
        big = comm.all_gather_tensor(torch.full((65,), float(rank)))  # 260 bytes
    finally:
        transport.control = control
    check("small calls: one op each", calls, ["_allgather_base"] * 4 + ["allreduce"]
          + ["_allgather_base"] * 2)
    check("inline vote", vote.tolist(), [size - 1])
    check("inline all-gather", small.tolist(), [[r, 1] if i == 0 else [2, 3]
                                               for r in ranks for i in range(2)])
    check("float all-reduce", weights.tolist(), [sum(r + 0.5 for r in ranks)] * 3)
    check("past INLINE_MAX", big.reshape(size, 65)[:, 0].tolist(), [float(r) for r in ranks])
    check("no mpi4py", "mpi4py" in sys.modules, False)
    comm.free()  # the world's channel goes with it: the desyncs start on a fresh one


def desyncs(rank: int, size: int) -> dict:
    """The call-identity cases, tensor mismatches and creation errors; every rank's text."""
    import typedcoll as tc

    comm = tc.TypedComm.from_torch(timeout=30)
    odd = size - 1
    out: Dict[str, dict] = {}

    # Two votes identical on the wire (one-int64 arrays) from two lines; one rank skips the
    # first vote once: every rank raises at that iteration, naming both call sites.
    def votes() -> None:
        for it in range(3):
            if not (rank == odd and it == 1):
                comm.allgather(np.array([rank + it], dtype=np.int64))  # @vote-batch
            comm.allgather(np.array([10 * it], dtype=np.int64))  # @vote-timeout
    out["votes"] = outcome(votes)
    out["votes usable"] = outcome(lambda: comm.allgather(rank))

    def extra() -> Any:
        if rank == odd:
            comm.allgather(10)  # @extra
        return comm.allgather(rank)  # @after-extra
    out["extra call"] = outcome(extra)  # @extra-case
    out["extra usable"] = outcome(lambda: comm.allgather(rank))

    def skip_with_step_clock() -> None:
        for it in range(3):
            comm.set_step(it)
            if rank == odd and it == 1:
                continue
            comm.allgather(RankState(rank, it, 0))  # @loop
    out["same-site skip"] = outcome(skip_with_step_clock)
    comm.set_step(None)
    out["named"] = outcome(lambda: comm.bcast(7, root=0, name="schedule") if rank == 0  # @root
                           else comm.bcast(None, root=0, schema=int, name="schedule"))  # @peer
    z = torch.zeros
    tensor_cases = {
        "t_shape": lambda: comm.all_gather_tensor(z(3 if rank == odd else 2, 4), step=1),  # @t1
        "t_dtype": lambda: comm.all_reduce_tensor(  # @t2
            z(4, dtype=torch.float64 if rank == odd else torch.float32), "sum"),
        "t_op": lambda: comm.all_reduce_tensor(z(4), "max" if rank == odd else "sum"),  # @t3
        "t_root": lambda: comm.broadcast_tensor(z(4), odd if rank == odd else 0),  # @t4
        "t_name": lambda: comm.all_reduce_tensor(z(4), name="loss" if rank == odd  # @t5
                                                 else "grad"),
        "t_vs_object": lambda: (comm.allgather(RankState(rank, 0, 0)) if rank == odd  # @t6
                                else comm.all_gather_tensor(z(2))),  # @t6b
        "t_bad_op": lambda: comm.all_reduce_tensor(z(2), "avg" if rank == odd else "sum"),  # @t7
        "t_not_tensor": lambda: comm.all_gather_tensor([1.0] if rank == odd else z(1)),  # @t8
    }
    for key, fn in tensor_cases.items():
        out[key] = outcome(fn)  # @tensor-case
    out["tensor usable"] = outcome(lambda: comm.all_gather_tensor(torch.tensor([rank])).tolist())

    def broadcast_object(obj: Any, src: int) -> Any:
        if rank == src:  # an engine's broadcast_object: the root's side, then the receivers'
            comm.bcast(obj, root=src)
            return obj
        else:
            return comm.bcast(None, root=src)  # @bo-peer
    # One receiver's root out of range at that role branch's first run: its own error
    out["role bad root"] = outcome(lambda: broadcast_object(  # @bo-case
        {"x": 1} if rank == 0 else None, size + 3 if rank == odd else 0))

    # A bad or different timeout on one rank: every rank raises at creation
    out["bad timeout"] = outcome(lambda: tc.TypedComm.from_torch(  # @bad-timeout
        timeout=0 if rank == odd else 5))
    out["other timeout"] = outcome(lambda: tc.TypedComm.from_torch(  # @other-timeout
        timeout=6 if rank == odd else 5))
    forever = tc.TypedComm.from_torch(timeout=math.inf)
    out["inf timeout"] = outcome(lambda: (forever.timeout, forever.allgather(rank),
                                          forever.gather(b"x" * 5000, root=0) is not None))

    # No step clock: the same-site skip leaves the short rank one call behind; its peers time
    # out in their last call (never data), while it waits for them, out of the collective.
    short = tc.TypedComm.from_torch(timeout=1.5, name="short")
    results = []

    def skip_without_clock() -> None:
        for it in range(3):
            if rank == odd and it == 1:
                continue
            results.append(short.allgather(RankState(rank, it, 0)))  # @no-clock
    out["no clock"] = outcome(skip_without_clock)
    out["no clock: calls returned"] = {"value": len(results)}
    if rank != odd:
        out["refused after timeout"] = outcome(lambda: short.allgather(1))  # @refused
    # The short rank stays until its peers timed out: its exit would close their connections.
    wait_for_all("timed-out", size - 1, count=rank != odd)
    return out


def program_late(rank: int, size: int, sleep: float = 2.5, late: int = 1) -> dict:
    """The last rank (``late`` ranks) arrives 2.5 s late at a call with a 1 s timeout: slow,
    not dead. Its peers give up first, and gloo then fails its call as though they had died."""
    import typedcoll as tc

    comm = tc.TypedComm.from_torch(timeout=1)
    comm.allgather(rank)
    if rank >= size - late:
        time.sleep(sleep)
    try:
        comm.allgather(rank)  # @late
    except tc.CollectiveError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"value": "completed"}


def program_just_late(rank: int, size: int) -> dict:
    """The last rank arrives 0.6 s after its peers' deadline: gloo failed their calls there, so
    its call fails too (it completed with theirs while gloo waited a second longer)."""
    return program_late(rank, size, 1.6)


def program_late_after_a_failed_peer(rank: int, size: int) -> dict:
    """Rank 1 comes within its peers' wait (gloo then fails its call as they give up); the
    last rank comes after all of them left: it came late."""
    import typedcoll as tc

    comm = tc.TypedComm.from_torch(timeout=1)
    comm.allgather(rank)
    time.sleep({1: 0.5, size - 1: 3.0}.get(rank, 0.0))
    try:
        comm.allgather(rank)  # @late_after_failed
    except tc.CollectiveError as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    # Every rank stays until all have raised: an exit would close the others' connections.
    wait_for_all("late_after_failed/raised", size)
    return out


def program_two_late(rank: int, size: int) -> dict:
    # 4 s: the early ranks' own reports (up to a grace second each) are over, their calls
    # recorded as failed, when the late ranks ask them.
    return program_late(rank, size, sleep=4.0, late=2)


def program_absent(rank: int, size: int) -> dict:
    """The last rank never calls collective #1. Rank 0 gives up waiting for it first; the others
    come once gloo has failed rank 0's call (at its deadline), which closed its connections:
    gloo fails their calls as though a peer had died, while they too wait for the absent
    rank."""
    import typedcoll as tc

    comm = tc.TypedComm.from_torch(timeout=1)
    comm.allgather(rank)
    out: dict = {}
    if rank < size - 1:
        if rank > 0:
            wait_for_all("absent/gave-up", 1, count=False)
            time.sleep(1.0)
            # Each of these ranks' reports asks which peers reached the call: they enter it
            # together (a tight store barrier), so none reads another as not yet there.
            wait_for_all("absent/entering", size - 2, poll=0.002)
        try:
            comm.allgather(rank)  # @absent
            out = {"value": "completed"}
        except tc.CollectiveTimeout as exc:
            out = {"error": type(exc).__name__, "message": str(exc),
                   "missing": list(exc.missing or ()), "failure": bool(exc.failure)}
        if rank == 0:
            wait_for_all("absent/gave-up", 1)
    # The absent rank stays until its peers have raised: its exit would close their connections.
    wait_for_all("absent/raised", size - 1, count=rank < size - 1)
    return out


def program_ends_normally(rank: int, size: int) -> dict:
    """The last rank's program ends (sys.exit(0)) while its peers start another collective:
    its farewell, left in the store, names it in their reports as ended normally."""
    import typedcoll as tc

    comm = tc.TypedComm.from_torch(timeout=30)
    comm.allgather(rank)  # @ended_last
    if rank == size - 1:
        Path(sys.argv[5], f"ends_normally.{rank}.json").write_text("{}")
        # What _child does at its end, without waiting for peers that wait for this rank.
        for key in ("finished", "left"):
            dist_store().add(f"typedcoll-test/ends_normally/{key}", 1)
        sys.exit(0)
    return outcome(lambda: comm.allgather(rank))


def program_recv_times_out(rank: int, size: int) -> dict:
    """Rank 1 waits for a message rank 0 never sends; then every rank makes a collective.
    gloo closed the pair of the timed-out receive, which the collectives use too."""
    import typedcoll as tc

    comm = tc.TypedComm.from_torch(timeout=3)
    out = {}
    if rank == 1:
        out["recv"] = outcome(lambda: comm.recv(0, schema=int))
    else:
        time.sleep(4)  # rank 1's receive has timed out
    out["allgather"] = outcome(lambda: comm.allgather(rank))
    return out


def program_unregistered(rank: int, size: int) -> dict:
    """A gloo group built by hand on a store of its own, as vllm builds its stateless
    data-parallel group: torch.distributed does not know it."""
    from datetime import timedelta

    import torch.distributed as dist
    import typedcoll as tc
    from typedcoll.transports.gloo import free_port

    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
    group = dist.ProcessGroupGloo(store, 0, 1, timedelta(seconds=10))
    try:
        tc.TypedComm.from_torch(group)
    except ValueError as exc:
        return {"error": "ValueError", "message": str(exc)}
    return {"value": "wrapped"}


def dist_store() -> Any:
    import torch.distributed as dist
    return dist.distributed_c10d._get_default_store()


def program_arrays(rank: int, size: int) -> dict:
    """numpy arrays on gloo without a timeout, where the C path serves them over the
    transport's own exchange, with the last rank on the Python steps: inline, past the slot, in
    another byte order, shapes that differ by rank, then a dtype that differs on rank 1."""
    if rank == size - 1:
        os.environ["TYPEDCOLL_PURE_PYTHON"] = "1"
    import typedcoll as tc
    from typedcoll.core import fast

    comm = tc.TypedComm.from_torch()
    cases = [(3, "<i8", 0), (3, "<i8", 0), (600, ">i4", 0), (3000, "<f8", 0), (3000, "<i8", 1),
             (3, "<i2", 5)]
    for k, (n, dtype, grow) in enumerate(cases):
        mine = np.full(n + grow * rank, 10 * k + rank).astype(dtype)
        check(f"allgather of arrays, case {k}", comm.allgather(mine),
              [np.full(n + grow * r, 10 * k + r).astype(dtype) for r in range(size)])
    odd = np.arange(3000, dtype=np.float32 if rank == 1 else np.int64)
    return {"c_path": fast.ENABLED, "desync": outcome(lambda: comm.allgather(odd))}


def _child(program: str, rank: int, size: int, port: int, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    result = globals()[f"program_{program}"](rank, size)  # @program
    Path(out, f"{program}.{rank}.json").write_text(json.dumps(result))
    # Rank 0 serves the job's store: it leaves last, once every other rank is done with it.
    wait_for_all(f"{program}/finished", size)
    if rank == 0:
        wait_for_all(f"{program}/left", size - 1, count=False)
    else:  # the last use of the store: rank 0 may leave at once
        dist.distributed_c10d._get_default_store().add(f"typedcoll-test/{program}/left", 1)
    sys.stdout.flush()
    os._exit(0)  # skip teardown: a timed-out collective may still be pending


def wait_for_all(key: str, size: int, count: bool = True, poll: float = 0.05) -> None:
    """Wait (at most 30 s) until ``size`` ranks added to ``key`` in the job's store."""
    import torch.distributed as dist
    store = dist.distributed_c10d._get_default_store()
    store.add(f"typedcoll-test/{key}", 1 if count else 0)
    deadline = time.monotonic() + 30
    while store.add(f"typedcoll-test/{key}", 0) < size and time.monotonic() < deadline:
        time.sleep(poll)


# --- the tests -----------------------------------------------------------------------------------
EXTRA_SIZE = [int(os.environ["TYPEDCOLL_TEST_RANKS"])] if os.environ.get(
    "TYPEDCOLL_TEST_RANKS", "8") not in ("2", "4", "8") else []


@pytest.fixture(scope="module", params=[2, 4, 8] + EXTRA_SIZE)
def desync(request, tmp_path_factory):
    """One run of the program at each size: its values are checked in the ranks; the desync
    outcomes come back. ``TYPEDCOLL_TEST_RANKS=16`` adds that size (as for test_scale_mpi.py)."""
    size = request.param
    return size, run_ranks("all", size, tmp_path_factory.mktemp(f"all{size}"))


def test_every_collective_matches_independent_values(desync):
    size, results = desync  # a failed check in any rank fails the run itself
    assert len(results) == size


@pytest.mark.parametrize("size,program", [(2, "late"), (3, "late"), (3, "just_late")])
def test_a_slow_rank_is_told_its_peers_gave_up_not_that_they_died(tmp_path, size, program):
    # Before, the late rank read "failed in the torch backend before completing (a peer's
    # process or connection is gone?)", and a hang report that every rank had started the call.
    # Just late, it returned the call's result while its peers raised.
    *early, late = run_ranks(program, size, tmp_path)
    at = f"collective #1 on WORLD: allgather[int] at {SITES['late']}"
    for r in early:  # the first to give up may fail a peer's wait, with the same report
        assert r["error"] == "CollectiveTimeout", r
        assert f"  never arrived at collective #1 on WORLD: rank {size - 1}\n" in r["message"], r
    peers = "rank 0" if size == 2 else f"ranks 0-{size - 2}"
    assert late == {"error": "CollectiveTimeout", "message": (
        f"{at} is abandoned: {peers} gave up waiting at collective #1 (timeout 1 s) before it "
        f"completed on rank {size - 1}; no rank returns this call's result (their reports name "
        f"the ranks they waited for)")}


def test_a_rank_whose_program_ended_is_named_as_ended_normally_not_unresponsive(tmp_path):
    # Its peers' calls fail as its connections close; their reports called it "unresponsive
    # ... dead, or running without typedcoll diagnostics", as for a killed process.
    *peers, _ = run_ranks("ends_normally", 3, tmp_path)
    for r in peers:
        assert r["error"] == "CollectiveTimeout", r
        assert ("\n  ended normally: rank 2\n    rank 2: its program ended without an uncaught "
                "exception; its last collective: allgather[int] on WORLD seq=0 at "
                f"{SITES['ended_last']} called from {SITES['program']} called from "
                f"{SITES['main']}, its 1st call: completed\n") in r["message"], r
        assert "unresponsive" not in r["message"], r


def test_a_receive_that_times_out_on_gloo_breaks_the_collectives_and_every_rank_says_why(
        tmp_path):
    # Every rank read "failed in the torch backend before completing (a peer's process or
    # connection is gone?): ... Connection closed by peer", though no process was gone.
    first, second, third = run_ranks("recv_times_out", 3, tmp_path)
    recv = second["recv"]
    assert recv["error"] == "CollectiveTimeout" and recv["message"].endswith(
        "did not complete within 3 s: no message from rank 0 arrived: gloo closes the connection "
        "of a receive that times out, which this communicator's collectives use, so they fail "
        "from now on, its peers told why"), recv
    assert second["allgather"]["message"].startswith(
        "collective #0 on WORLD: allgather[int] refused: the communicator is unusable since its "
        "recv[int] at "), second
    for r in (first, third):
        assert r["allgather"]["error"] == "CollectiveTimeout", r
        assert "rank 1 reported that its receive from rank 0 timed out: gloo closes the " \
               "connection of a receive that times out" in r["allgather"]["message"], r


def test_a_creation_whose_store_is_gone_says_so_not_that_every_member_came(monkeypatch):
    # The store's host (rank 0) had given up and exited: the check of who joined failed, and
    # the message read "every member came but some did not connect".
    import typedcoll as tc
    from typedcoll.transports import gloo

    class GoneStore:
        def set(self, key, value):
            pass

        def check(self, keys):
            raise RuntimeError("Connection reset by peer")

    def refused(*args):
        raise RuntimeError("Socket Timeout\nmore")
    monkeypatch.setattr(gloo.c10d, "ProcessGroupGloo", refused)
    monkeypatch.setattr(gloo.c10d, "PrefixStore", lambda prefix, store: store)
    with pytest.raises(tc.CollectiveTimeout) as info:
        gloo.make_gloo(GoneStore(), "p", 1, 2, 5.0, "group[0,1]")
    assert str(info.value) == (
        "creating typedcoll's private group over group[0,1] did not complete within 5 s: the "
        "job's store no longer answers (the rank that hosted it, rank 0 under tcp:// or "
        "env://, is gone?), so who came is unknown: RuntimeError: Connection reset by peer "
        "(every rank of the group must create its TypedComm or drop-in over it at the same "
        "point); gloo: Socket Timeout")
    assert info.value.missing is None


def test_a_group_torch_does_not_know_is_refused_saying_what_to_do(tmp_path):
    # It raised torch's own "Group ... is not registered, please create group with
    # torch.distributed.new_group API".
    (only,) = run_ranks("unregistered", 1, tmp_path)
    assert only["error"] == "ValueError", only
    assert only["message"].startswith(
        "expected a group torch.distributed knows (the default group, or one from "
        "dist.new_group), got one it does not ("), only
    assert only["message"].endswith(
        "); a group built by hand on its own store, as vllm's stateless data-parallel group is, "
        "cannot be wrapped: create a dist.new_group over the same ranks for typedcoll, or use "
        "typedcoll over MPI"), only


def test_late_ranks_that_meet_each_other_are_told_they_came_late_not_that_it_is_stuck(
        tmp_path):
    # Two late ranks start the call together after their peers gave up: their hang reports
    # said "every rank has started collective #1: it is slow, or the transport is stuck".
    *early, third, fourth = run_ranks("two_late", 4, tmp_path)
    for r in early:
        assert r["error"] == "CollectiveTimeout", r
    for late in (third, fourth):
        assert late["error"] == "CollectiveTimeout", late
        if "hang report" in late["message"]:  # else it read the give-ups first: "abandoned"
            # The other late rank's call may have failed already when this one asks.
            assert re.search(r"\n  every rank has started collective #1, and ranks 0-(1|2|1,3) "
                             r"already failed it: this rank came late; where each peer is now:\n",
                             late["message"]), late
        else:
            # The other late rank's call may have failed (gloo) before this one read the notices.
            assert re.search(r"is abandoned: ranks 0-1 (\(and possibly others\) )?gave up "
                             r"waiting", late["message"]), late


def test_a_rank_that_came_after_every_peer_left_is_told_so_though_gloo_failed_one(tmp_path):
    # Rank 1's call was failed by gloo (it came within the others' wait), so it left no give-up
    # notice, and the last rank read "ranks 0,2 gave up waiting ..., and gloo then failed the
    # call on rank 3 as though a peer had died", its own report saying it came late.
    *early, late = run_ranks("late_after_a_failed_peer", 4, tmp_path)
    assert all(r["error"] == "CollectiveTimeout" for r in early), early
    at = f"collective #1 on WORLD: allgather[int] at {SITES['late_after_failed']}"
    assert late["error"] == "CollectiveTimeout" and late["message"].startswith(
        f"{at} is abandoned: "), late
    assert "as though a peer had died" not in late["message"], late


@pytest.mark.parametrize("size", [3, 4])
def test_a_rank_failed_by_a_peers_give_up_names_the_absent_rank_not_a_dead_peer(tmp_path, size):
    # Before, the ranks that came after rank 0 gave up read "failed in the torch backend before
    # completing (a peer's process or connection is gone?)", though no process was gone: rank 0
    # had given up on the absent last rank.
    first, *failed, absent = run_ranks("absent", size, tmp_path)
    at = f"collective #1 on WORLD: allgather[int] at {SITES['absent']}"
    assert absent == {}
    assert first["message"].startswith(f"{at} did not complete within 1 s\n"), first
    assert f"  never arrived at collective #1 on WORLD: ranks 1-{size - 1}\n" in first["message"]
    assert (first["missing"], first["failure"]) == (list(range(1, size)), False), first
    for r, result in enumerate(failed, 1):  # every one of them gives the same account
        head, *report = result["message"].split("\n")
        assert "connection is gone" not in head, result
        if not result["failure"]:
            # Under heavy load gloo may drop rank 0's call only after this rank came: then it
            # waits out its own timeout, an account as true (the staging missed, not the fix).
            assert head == f"{at} did not complete within 1 s", result
        else:
            assert head == (
                f"{at} did not complete: ranks 0-{size - 2} arrived at it and waited for rank "
                f"{size - 1}; rank 0 gave up waiting at collective #1 (timeout 1 s), and gloo "
                f"then failed the call on rank {r} as though a peer had died (a give-up closes "
                f"its connections; gloo's error is in .failure)"), result
            assert f"  arrived: ranks 0-{size - 2}" in report, result
        assert f"  never arrived at collective #1 on WORLD: rank {size - 1}" in report, result
        assert result["missing"] == [size - 1], result


def test_arrays_on_the_c_path_over_gloo_meet_a_rank_on_the_python_steps(tmp_path):
    results = run_ranks("arrays", 3, tmp_path)  # the values are checked in the ranks
    from typedcoll.core import fast
    assert [r["c_path"] for r in results] == [fast.ENABLED, fast.ENABLED, False], results
    outcomes = [r["desync"] for r in results]
    assert all(o.get("error") == "DesyncError" for o in outcomes), outcomes
    assert len({o["message"] for o in outcomes}) == 1 and "rank 1" in outcomes[0]["message"]


def _groups(size: int) -> tuple:
    """The group labels of messages: the majority, then the odd rank out (the last)."""
    many = "rank 0" if size == 2 else f"ranks 0-{size - 2}"
    return many, f"rank {size - 1}"


def _table(head: str, size: int, many: str, odd: str, hint: Optional[str] = None) -> str:
    labels = _groups(size)
    width = max(len(label) for label in labels) + 1
    rows = [f"  {labels[0] + ':':<{width}} {many}", f"  {labels[1] + ':':<{width}} {odd}"]
    return "\n".join([head] + rows + ([f"  {hint}"] if hint else []))


NAME_HINT = ("only the names differ: each name= is a collective of its own, so a rank skipped "
             "or added a call before this one, or the ranks named one call differently")
SITE_HINT = ("only the call sites differ: if these are the same collective called from different "
             "places, give every rank's call the same name=")


def _expected(size: int) -> Dict[str, str]:
    s = SITES
    t, vote = "shape=(4,) dtype=float32", "shape=(1,) dtype=int64"
    # Thin lambdas (their calls on one line, all made or none: a branch that picks an argument
    # is no choice among calls): their site is outcome()'s line.
    t1, other = lambda_at("t1", "comm.all_gather_tensor"), lambda_at("other-timeout", "tc.")
    t3, t4 = lambda_at("t3", "comm.all_reduce_tensor"), lambda_at("t4", "comm.broadcast_tensor")
    # Functions that do more are thin at the call whose result they return: extra() (an extra
    # call first on one rank) and the lambdas whose arguments call on a line of their own.
    t2 = lambda_at("t2", "comm.all_reduce_tensor")
    # outcome() and extra() have no loop: the lines that called them follow the site, and
    # desyncs() calls outcome() for the extra call outside its loops, so its callers follow too
    # (program_all, thin, is passed over; _child's caller is module code, nobody's callee)
    program_all_def = next(n for n, line in enumerate(_LINES, 1)
                           if line.startswith("def program_all("))
    above = (f"called from {s['program']} through program_all ({HERE.name}:{program_all_def}) "
             f"called from {s['main']}")
    case, tensor = f"called from {s['extra-case']} {above}", f"called from {s['tensor-case']}"
    extra = next(f"desyncs.<locals>.extra ({HERE.name}:{n})" for n, line in enumerate(_LINES, 1)
                 if "def extra() -> Any:" in line)
    return {
        "votes": _table("collective #2 on WORLD diverged (call site):", size,
                        f"allgather[ndarray] {vote} at {s['vote-batch']}, its 2nd call",
                        f"allgather[ndarray] {vote} at {s['vote-timeout']}, its 2nd call",
                        SITE_HINT),
        "extra call": _table("collective #4 on WORLD diverged (call site):", size,
                             f"allgather[int] at {s['outcome']} through {extra} {case}, its 1st "
                             "call",
                             f"allgather[int] at {s['extra']} called from {s['outcome']} {case}, "
                             "its 1st call", SITE_HINT),
        "same-site skip": _table(
            "collective #7 on WORLD diverged (step):", size,
            f"allgather[RankState] at {s['loop']}, its 2nd call, step 1",
            f"allgather[RankState] at {s['loop']}, its 2nd call, step 2",
            "the ranks are at different steps of the same call: a rank skipped or repeated an "
            "iteration"),
        "t_shape": _table("collective #9 on WORLD diverged (shape):", size,
                          f"all_gather_tensor shape=(2, 4) dtype=float32 at {s['outcome']} "
                          f"through {t1} {tensor}, its 1st call, step 1",
                          f"all_gather_tensor shape=(3, 4) dtype=float32 at {s['outcome']} "
                          f"through {t1} {tensor}, its 1st call, step 1"),
        "t_dtype": _table("collective #10 on WORLD diverged (dtype):", size,
                          f"all_reduce_tensor op=sum {t} at {s['outcome']} through {t2} "
                          f"{tensor}, its 1st call",
                          f"all_reduce_tensor op=sum shape=(4,) dtype=float64 at {s['outcome']} "
                          f"through {t2} {tensor}, its 1st call"),
        "t_op": _table("collective #11 on WORLD diverged (reduce op):", size,
                       f"all_reduce_tensor op=sum {t} at {s['outcome']} through {t3} {tensor}, "
                       "its 1st call",
                       f"all_reduce_tensor op=max {t} at {s['outcome']} through {t3} {tensor}, "
                       "its 1st call"),
        "t_root": _table("collective #12 on WORLD diverged (root):", size,
                         f"broadcast_tensor root=0 {t} at {s['outcome']} through {t4} {tensor}, "
                         "its 1st call",
                         f"broadcast_tensor root={size - 1} {t} at {s['outcome']} through {t4} "
                         f"{tensor}, its 1st call"),
        "t_name": _table("collective #13 on WORLD diverged (call site):", size,
                         f"all_reduce_tensor op=sum {t} name='grad' at {s['outcome']}, its 1st "
                         "call",
                         f"all_reduce_tensor op=sum {t} name='loss' at {s['outcome']}, its 1st "
                         "call",
                         NAME_HINT),
        "t_vs_object": _table(
            "collective #14 on WORLD diverged (op, call site, schema, shape, dtype):", size,
            # (the lambda picks one of its two calls: each names its caller too)
            f"all_gather_tensor shape=(2,) dtype=float32 at {s['t6b']} called from "
            f"{s['outcome']} {tensor}, its 1st call",
            f"allgather[RankState] at {s['t6']} called from {s['outcome']} {tensor}, its 1st "
            "call"),
        "other timeout": _table("creation on WORLD#2 diverged (settings):", size,
                                f"create timeout=5 at {s['outcome']} through {other} "
                                f"called from {s['other-timeout']} {above}, its 1st call",
                                f"create timeout=6 at {s['outcome']} through {other} "
                                f"called from {s['other-timeout']} {above}, its 1st call"),
    }


@pytest.mark.parametrize("case", ["votes", "extra call", "same-site skip", "t_shape", "t_dtype",
                                  "t_op", "t_root", "t_name", "t_vs_object", "other timeout"])
def test_desync_raises_the_same_error_on_every_rank(desync, case):
    size, results = desync
    want = {"error": "DesyncError", "message": _expected(size)[case]}
    assert [r[case] for r in results] == [want] * size


def test_after_a_desync_the_communicator_is_usable(desync):
    size, results = desync
    for key in ("votes usable", "extra usable"):
        assert [r[key] for r in results] == [{"value": repr(list(range(size)))}] * size
    assert [r["tensor usable"] for r in results] == [{"value": repr(list(range(size)))}] * size
    assert [r["named"] for r in results] == [{"value": "7"}] * size  # same name, two lines


@pytest.mark.parametrize("case, head, what, via, detail", [
    ("t_bad_op", "collective #15 on WORLD", "all_reduce_tensor", ("t7", "comm.all_reduce_tensor"),
     "expected op 'sum', 'prod', 'max', 'min', 'band', 'bor' or 'bxor', got 'avg'"),
    ("t_not_tensor", "collective #16 on WORLD", "all_gather_tensor",
     ("t8", "comm.all_gather_tensor"), "expected a torch.Tensor, got list"),
    ("bad timeout", "creation on WORLD#2", "create", ("bad-timeout", "tc.TypedComm"),
     "expected timeout None or seconds > 0, got 0"),
])
def test_one_ranks_bad_argument_raises_on_every_rank(desync, case, head, what, via, detail):
    # Each case's call is a thin lambda's, called at outcome's line: messages name both.
    size, results = desync
    odd = size - 1
    at = f"{SITES['outcome']} through {lambda_at(*via)}"
    peer = {"error": "PeerError", "message": f"{head}: rank {odd} failed its {what} "
                                             f"contribution at {at}: {detail}"}
    own = {"error": "EncodeError", "message": f"{head}: rank {odd} could not send its {what} "
                                              f"contribution at {at}: {detail}"}
    assert [r[case] for r in results] == [peer] * odd + [own]


def test_a_receivers_bad_root_in_a_role_branch_raises_its_error_on_every_rank(desync):
    # Before, at 4 ranks and more: a call-site DesyncError ("only the call sites differ").
    size, results = desync
    odd = size - 1
    at = f"{SITES['bo-peer']}"
    detail = f"expected root in 0..{odd}, got {size + 3}"
    peer = {"error": "PeerError", "message": f"collective #18 on WORLD: rank {odd} failed its "
                                             f"bcast contribution at {at}: {detail}"}
    own = {"error": "EncodeError", "message": f"collective #18 on WORLD: rank {odd} could not "
                                              f"send its bcast contribution at {at}: {detail}"}
    assert [r["role bad root"] for r in results] == [peer] * odd + [own]


def test_infinite_timeout_waits_like_none(desync):
    size, results = desync
    assert [r["inf timeout"]["value"] for r in results] == [
        f"(inf, {list(range(size))}, {r == 0})" for r in range(size)]


def test_without_a_step_clock_the_short_rank_times_its_peers_out(desync):
    # The skip itself is invisible (same call, same site, no step); the short rank's peers then
    # wait in their last call and raise CollectiveTimeout: never a result from a missing rank.
    size, results = desync
    odd = size - 1
    assert results[odd]["no clock"] == {"value": "None"}
    for r in results[:odd]:
        assert r["no clock"]["error"] == "CollectiveTimeout"
        assert re.fullmatch(rf"collective #2 on short: allgather\[RankState\] at "
                            rf"{re.escape(SITES['no-clock'])} did not complete within 1\.5 s"
                            rf"(\n.*)?", r["no clock"]["message"], flags=re.S), r["no clock"]
        assert r["refused after timeout"]["error"] == "CollectiveTimeout"
        assert r["refused after timeout"]["message"].startswith(
            "collective #3 on short: allgather[int] refused: the communicator is unusable since "
            f"collective #2 on short (allgather[RankState] at {SITES['no-clock']}) timed out")
    assert [r["no clock: calls returned"] for r in results] == [{"value": 2}] * size


# --- the device path's verdict, on hand-built envelope blocks (no GPU) ----------------------------
class _FakeProtocol:
    """What the device verdict reads of a communicator."""

    def __init__(self, rank: int, size: int) -> None:
        from types import SimpleNamespace
        self.rank, self.size, self.name, self.instance = rank, size, "WORLD", 1
        self.transport = SimpleNamespace(kind="torch", device_group=object())
        self.channel = SimpleNamespace(broken=None)

    def identity(self, call: Any) -> bytes:
        from typedcoll.core.protocol import Protocol
        return Protocol.identity(self, call)  # type: ignore[arg-type]


def _device_call(p: Any, op: str, tensor: Any, seq: int, **kwargs: Any) -> Any:
    from typedcoll.tensor.envelope import tensor_call
    call = tensor_call(p, op, tensor, kwargs.pop("name", ""), kwargs.pop("step", None), **kwargs)
    frame = sys._getframe(1)
    call.code, call.lasti, call.seq, call.occurrence = frame.f_code, frame.f_lasti, seq, 1
    return call


def _blocks(ps: List[Any], calls: List[Any]) -> bytes:
    from typedcoll.tensor.blocks import pack_block
    from typedcoll.tensor.envelope import BLOCK
    buf = bytearray(BLOCK * len(calls))
    for r, (p, call) in enumerate(zip(ps, calls)):
        pack_block(memoryview(buf)[r * BLOCK:], p, call)
    return bytes(buf)


def test_gloo_largest_slots_are_whole_4_kib_units_within_the_budget():
    from typedcoll.core.wire import MAX_SLOT
    from typedcoll.transports.torch import LARGEST_SLOT, SLOT_BUDGET, largest_slot
    for size in range(1, 2049):
        slot = largest_slot(size)
        assert slot % MAX_SLOT == 0 and MAX_SLOT <= slot <= LARGEST_SLOT, size
        assert slot * size <= SLOT_BUDGET or slot == MAX_SLOT, size


def test_device_verdict_on_hand_built_blocks():
    import typedcoll as tc
    from typedcoll.core.wire import CHECKED
    from typedcoll.tensor import device
    from typedcoll.tensor.envelope import BLOCK
    ps = [_FakeProtocol(r, 3) for r in range(3)]
    x, y = torch.zeros(2, 3), torch.zeros(4, 3)
    calls = [_device_call(p, "all_gather_tensor", t, 9, step=5)  # @hand-built
             for p, t in zip(ps, [x, x, y])]
    blocks = _blocks(ps, calls)
    texts = set()
    for r in range(3):
        err = device.check(ps[r], calls[r], blocks, blocks[r * BLOCK:r * BLOCK + CHECKED],
                           "deferred")
        assert isinstance(err, tc.DesyncError)
        texts.add(str(err))
    assert texts == {
        "collective #9 on WORLD diverged (shape):\n"
        f"  ranks 0-1: all_gather_tensor shape=(2, 3) dtype=float32 at {SITES['hand-built']}, "
        "its 1st call, step 5\n"
        f"  rank 2:    all_gather_tensor shape=(4, 3) dtype=float32 at {SITES['hand-built']}, "
        "its 1st call, step 5"}
    same = _blocks(ps[:2], calls[:2])
    assert device.check(ps[0], calls[0], same, same[:CHECKED], "deferred") is None

    ps = ps[:2]
    # Built without an NCCL group, so with the host path's words for the op (gloo's ops)
    HOST_OPS = "expected op 'sum', 'prod', 'max', 'min', 'band', 'bor' or 'bxor'"
    # One line, as one call of the ranks' program: a failure at another call says so too
    good, bad = (_device_call(p, "all_reduce_tensor", x, 3, reduce_op=op)  # @reduce-op
                 for p, op in zip(ps, ["sum", "avg"]))
    blocks = _blocks(ps, [good, bad])
    err = device.check(ps[0], good, blocks, blocks[:CHECKED], "deferred")
    assert isinstance(err, tc.PeerError) and str(err) == (
        f"collective #3 on WORLD: rank 1 failed its all_reduce_tensor contribution at "
        f"{SITES['reduce-op']}: {HOST_OPS}, got 'avg'")
    own = blocks[BLOCK:BLOCK + CHECKED]
    assert device.check(ps[1], bad, blocks, own, "deferred") is None  # it raised at call time
    err = device.check(ps[1], bad, blocks, own, "eager")
    assert isinstance(err, tc.EncodeError) and str(err) == (
        f"collective #3 on WORLD: rank 1 could not send its all_reduce_tensor contribution at "
        f"{SITES['reduce-op']}: {HOST_OPS}, got 'avg'")
    assert good.array_fp == bad.array_fp and good.error is None


def test_long_device_envelopes_are_cut_to_fit():
    from typedcoll.tensor.envelope import META_MAX, DeviceMeta, META_DECODER, encode_meta
    meta = DeviceMeta("n" * 256, "float32", "cuda", tuple(range(1, 40)), "s" * 300, 7, "c" * 99,
                      "e" * 500)
    cut = META_DECODER.decode(encode_meta(meta))
    assert len(encode_meta(meta)) <= META_MAX
    assert (cut.name, cut.shape, cut.site, cut.comm, cut.error, cut.occurrence) == (
        "n" * 24, (), "s" * 40, "c" * 24, "e" * 64, 7)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])  # @main
