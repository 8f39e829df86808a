"""The torch drop-in: its logic under typedcoll.testing, and its results against torch's own
object and tensor collectives on gloo (2 and 4 processes, each step run through both in the same
job)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional

import msgspec
import numpy as np
import pytest

import typedcoll as tc
from typedcoll import compat
from typedcoll.testing import run

from test_compat_mpi4py import assert_every_rank_lists_rank_1s_note
from test_testing_core import errors_by_rank

HERE = Path(__file__).resolve()
SEED = int(os.environ.get("TYPEDCOLL_SEED", random.randrange(2 ** 31)))


@dataclasses.dataclass
class Stats:
    rank: int
    sizes: list[int]
    note: Optional[str] = None


class Request(msgspec.Struct):
    id: int
    embedding: np.ndarray


class Span(NamedTuple):
    start: int
    stop: int


class Phase(enum.Enum):
    PREFILL = "prefill"


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, Request):
        return a.id == b.id and same(a.embedding, b.embedding)
    return a == b


def payload(i: int, rank: int) -> Any:
    table = [None, (rank, ("x", 2.5)), {"k": {rank, 7}}, Stats(rank, [rank] * 3),
             Request(rank, np.arange(rank + 1, dtype=np.float32)), Span(rank, 9), Phase.PREFILL,
             np.int64(rank), 2 ** 70 + rank, {(1, rank): [frozenset({rank})]}, b"\x00" * rank,
             float("nan"), [np.arange(2)] * rank, "s" * rank]
    return table[i % len(table)]


# --- one program, run through torch.distributed and through the drop-in ------------------------
def program(api: Any, rank: int, size: int, rng: random.Random) -> list:
    """Every object collective with payloads that tell types and orders apart; returns what each
    call gave (lists are filled in place, as torch fills them)."""
    out = []
    for i in range(14):
        j = rng.randrange(100)
        gathered = [None] * size
        api.all_gather_object(gathered, payload(i + rank, rank))
        out.append(gathered)
        items = [payload(j + k, rank) for k in range(3)] if rank == i % size else [None] * 3
        api.broadcast_object_list(items, src=i % size)
        out.append(items)
        dst = (i + 1) % size
        received = [None] * size if rank == dst else None
        api.gather_object(payload(j, rank), received, dst=dst)
        out.append(received)
        output = [None]
        api.scatter_object_list(output, [payload(j + k, k) for k in range(size)]
                                if rank == i % size else None, src=i % size)
        out.append(output)
        if size > 1:
            peer = (rank + 1) % size
            if rank % 2 == 0 and peer != rank:
                api.send_object_list([payload(j, rank), payload(j + 1, rank)], dst=peer)
            elif rank % 2 == 1:
                items = [None, None]
                source = api.recv_object_list(items, src=(rank - 1) % size)
                out.append((items, source))
        api.barrier()
    return out


def tensor_program(api: Any, rank: int, size: int, rng: random.Random) -> list:
    """Every tensor collective of the drop-in, in torch's signatures, with values that tell
    ranks and orders apart; returns what each call left in its tensors."""
    import torch
    from torch.distributed import ReduceOp

    out: list = []
    for i in range(4):
        j = rng.randrange(100)
        vote = torch.tensor([rank + i, j * (rank + 1)], dtype=torch.int64)
        api.all_reduce(vote, op=ReduceOp.MAX)
        total = torch.full((3,), float(rank + j))
        api.all_reduce(total)
        least = torch.tensor(j - rank, dtype=torch.int32)
        api.all_reduce(least, ReduceOp.MIN, async_op=True).wait()
        bits = torch.tensor([rank + 1, j | rank, 7 ^ rank], dtype=torch.int64)
        api.all_reduce(bits, op=(ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR)[i % 3])
        out.append(bits.tolist())
        row = torch.arange(4, dtype=torch.float32) * (rank + 1)
        api.broadcast(row, src=i % size)
        out += [vote.tolist(), total.tolist(), least.tolist(), row.tolist()]
        parts = [torch.zeros(2, 2, dtype=torch.int32) for _ in range(size)]
        api.all_gather(parts, torch.full((2, 2), rank * j, dtype=torch.int32))
        flat, wide = torch.zeros(size * 3), torch.zeros(size * 2, 3, dtype=torch.int32)
        api.all_gather_into_tensor(flat, torch.arange(3.0) + rank)
        api.all_gather_into_tensor(wide, torch.full((2, 3), rank - j, dtype=torch.int32))
        mine = torch.zeros(2, dtype=torch.float64)
        api.reduce_scatter_tensor(mine, torch.arange(2.0 * size, dtype=torch.float64)
                                  * (rank + j))
        flags = torch.zeros(40, dtype=torch.int32)  # past what rides in the exchange
        api.reduce_scatter_tensor(flags, torch.arange(40 * size, dtype=torch.int32) * (rank + 1)
                                  + j, op=(ReduceOp.BXOR, ReduceOp.BAND, ReduceOp.BOR)[i % 3])
        out += [[p.tolist() for p in parts], flat.tolist(), wide.tolist(), mine.tolist(),
                flags.tolist()]
        # All-to-all: equal blocks (a vote's size, and past what rides in the exchange), rows
        # per rank that differ by rank, a list per rank, and a reduce-scatter of a list.
        for width in (1, 40):
            blocks = torch.arange(size * width, dtype=torch.int64) + 1000 * rank + j
            swapped = torch.zeros(size * width, dtype=torch.int64)
            api.all_to_all_single(swapped, blocks)
            out.append(swapped.tolist())
        # rank r sends (2r + k + i) % 3 rows to rank k: what a rank sends and what it receives
        # differ, so counts taken the wrong way round move other rows or raise
        sends = [(2 * rank + k + i) % 3 for k in range(size)]
        receives = [(2 * k + rank + i) % 3 for k in range(size)]
        rows = torch.arange(sum(sends) * 2, dtype=torch.float32).reshape(-1, 2) + 10 * rank + j
        into = torch.zeros(sum(receives), 2)
        api.all_to_all_single(into, rows, receives, sends)
        # split sizes None, [] and given, mixed between ranks, as torch lets them be
        mixed = torch.zeros(size * 2)
        api.all_to_all_single(mixed, torch.arange(size * 2.0) + 100 * rank + j,
                              [2] * size if rank % 2 else None, [] if rank % 3 else None)
        out.append(mixed.tolist())
        lists = [torch.zeros(2, dtype=torch.int32) for _ in range(size)]
        sources = [torch.full((2,), 10 * rank + k + j, dtype=torch.int32) for k in range(size)]
        if hasattr(api, "typed"):
            api.all_to_all(lists, sources)
        else:  # some builds' gloo lacks the list form: torch's side takes the flat one
            whole = torch.zeros(2 * size, dtype=torch.int32)
            api.all_to_all_single(whole, torch.cat(sources))
            lists = list(whole.split(2))
        share = torch.zeros(3)
        api.reduce_scatter(share, [torch.full((3,), float(rank * k + j)) for k in range(size)],
                           op=ReduceOp.MAX)
        out += [into.tolist(), [t.tolist() for t in lists], share.tolist()]
    for i in range(2):
        root = (i + 1) % size
        acc = torch.tensor([rank * 3 + i, rng.randrange(100) - rank], dtype=torch.int64)
        api.reduce(acc, dst=root, op=ReduceOp.MAX if i else ReduceOp.SUM)
        mask = torch.tensor([rank + 1, 6 - rank, i], dtype=torch.uint8)
        api.reduce(mask, dst=root, op=ReduceOp.BOR if i else ReduceOp.BXOR)
        if rank == root:  # the other ranks' tensors are undefined in torch
            out += [acc.tolist(), mask.tolist()]
        into = [torch.zeros(2) for _ in range(size)] if rank == root else None
        api.gather(torch.tensor([rank, i * 0.5]), into, dst=root)
        if into is not None:
            out.append([t.tolist() for t in into])
        piece = torch.zeros(3, dtype=torch.int32)
        parts = [torch.full((3,), 10 * r + i, dtype=torch.int32) for r in range(size)]
        api.scatter(piece, parts if rank == root else None, src=root)
        out.append(piece.tolist())
    if rank % 2 == 0 and rank + 1 < size:
        api.send(torch.arange(4, dtype=torch.float64) * (rank + 1), dst=rank + 1)
        api.isend(torch.tensor([[rank, 7]]), dst=rank + 1, tag=3).wait()
    elif rank % 2 == 1:
        floats, ints = torch.zeros(4, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.int64)
        source = api.recv(floats, src=rank - 1)
        api.irecv(ints, src=rank - 1, tag=3).wait()
        out.append((floats.tolist(), source, ints.tolist()))
    if size > 1:  # a ring: receive from the left, send to the right, the receive listed first
        import torch.distributed as dist
        left = torch.zeros(3, dtype=torch.int64)
        for handle in api.batch_isend_irecv([
                dist.P2POp(dist.irecv, left, (rank - 1) % size),
                dist.P2POp(dist.isend, torch.arange(3) + 10 * rank, (rank + 1) % size)]):
            handle.wait()
        out.append(left.tolist())
    api.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    out.append((api.get_rank(), api.get_world_size()))
    return out


def tensor_failures(drop_in: Any, rank: int, size: int) -> list:
    """What only the drop-in catches: a skipped vote, an output list of the wrong size on one
    rank, an op it does not reduce, arguments that cannot be compared. Each must raise on every
    rank and leave it usable; the default group named as torch names it is no error."""
    import torch
    import torch.distributed as dist
    from torch.distributed import ReduceOp

    failures = []

    def expect(kinds: tuple, label: str, call: Any) -> None:
        """``kinds``: the error of the last rank (the one that errs), then of the others."""
        try:
            call()
        except (tc.DesyncError, tc.EncodeError, tc.PeerError) as exc:
            if type(exc) is not kinds[rank != size - 1]:
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{label}: nothing raised")

    def skipped_vote() -> None:
        if rank != size - 1:
            drop_in.all_reduce(torch.tensor([1]), op=ReduceOp.MAX)  # batch-size vote
        drop_in.all_reduce(torch.tensor([rank]), op=ReduceOp.MAX)  # timeout vote

    expect((tc.DesyncError, tc.DesyncError), "skipped vote", skipped_vote)

    def broadcast_pyobj(data: list, src: int = 0) -> list:
        """SGLang's, unchanged: a size, then the pickled bytes unless the list is empty."""
        if rank == src:
            if len(data) == 0:
                drop_in.broadcast(torch.tensor([0], dtype=torch.long), src=src)
            else:
                raw = pickle.dumps(data)
                drop_in.broadcast(torch.tensor([len(raw)], dtype=torch.long), src=src)
                drop_in.broadcast(torch.frombuffer(bytearray(raw), dtype=torch.uint8), src=src)
            return data
        else:
            size_tensor = torch.tensor([0], dtype=torch.long)
            drop_in.broadcast(size_tensor, src=src)
            if size_tensor.item() == 0:
                return []
            data_tensor = torch.empty(size_tensor.item(), dtype=torch.uint8)
            drop_in.broadcast(data_tensor, src=src)
            return pickle.loads(bytes(data_tensor.numpy()))

    def work_then_control(skip: bool) -> list:
        got = []
        if not skip:  # a decision of this rank's own: an empty queue, a local timeout
            got.append(broadcast_pyobj(["work"] if rank == 0 else []))
        got.append(broadcast_pyobj(["abort"] if rank == 0 else []))
        return got

    for _ in range(2):
        if work_then_control(False) != [["work"], ["abort"]]:
            failures.append("broadcast_pyobj from two lines: wrong requests")
    # Its callers tell its calls apart: the skipped work requests raise on every rank, where the
    # last rank would take the control requests as work.
    expect((tc.DesyncError, tc.DesyncError), "skipped broadcast_pyobj",
           lambda: work_then_control(rank == size - 1))
    short = [torch.zeros(1)] * (size - 1 if rank == size - 1 else size)
    expect((tc.EncodeError, tc.PeerError), "short tensor_list",
           lambda: drop_in.all_gather(short, torch.zeros(1)))
    expect((tc.EncodeError, tc.PeerError), "AVG (not reduced by the drop-in)",
           lambda: drop_in.all_reduce(torch.zeros(1), op=ReduceOp.AVG if rank == size - 1
                                      else ReduceOp.SUM))
    expect((tc.EncodeError, tc.PeerError), "BAND of a float tensor (gloo reduces no float so)",
           lambda: drop_in.all_reduce(torch.zeros(1), op=ReduceOp.BAND if rank == size - 1
                                      else ReduceOp.SUM))
    # Values that cannot even be compared with an op or a rank: flagged, never raised alone.
    expect((tc.EncodeError, tc.PeerError), "op an array",
           lambda: drop_in.all_reduce(torch.zeros(1), op=np.array([1, 2]) if rank == size - 1
                                      else ReduceOp.SUM))
    expect((tc.EncodeError, tc.PeerError), "src a list",
           lambda: drop_in.broadcast(torch.zeros(1), src=[0] if rank == size - 1 else 0))
    expect((tc.DesyncError, tc.DesyncError), "reduce to another root",
           lambda: drop_in.reduce(torch.zeros(1), dst=1 if rank == size - 1 else 0))
    expect((tc.EncodeError, tc.PeerError), "gather list off the root",
           lambda: drop_in.gather(torch.zeros(1), [torch.zeros(1)] * size, dst=0)
           if rank == size - 1 else drop_in.gather(torch.zeros(1), [torch.zeros(1)] * size
                                                   if rank == 0 else None, dst=0))
    expect((tc.EncodeError, tc.PeerError), "scatter list of another shape",
           lambda: drop_in.scatter(torch.zeros(2), [torch.zeros(3)] * size
                                   if rank == size - 1 else None, src=size - 1))
    expect((tc.EncodeError, tc.PeerError), "monitored_barrier timeout not a duration",
           lambda: drop_in.monitored_barrier(timeout="soon" if rank == size - 1 else 30))
    if size > 1 and rank in (0, 1):  # a receive into another dtype and shape: the receiver
        if rank == 0:
            drop_in.send(torch.ones(3), dst=1)
            drop_in.send(torch.tensor([5, 6]), dst=1)
        else:
            try:
                drop_in.recv(torch.zeros(2, dtype=torch.int64), src=0)
                failures.append("recv of another dtype and shape: nothing raised")
            except tc.DesyncError as exc:
                if "shape (3,) float32" not in str(exc) or "expected shape (2,) int64" not in \
                        str(exc) or exc.kinds != (tc.MismatchKind.DTYPE, tc.MismatchKind.SHAPE):
                    failures.append(f"recv of another dtype and shape: {exc}")
            again = torch.zeros(2, dtype=torch.int64)
            drop_in.recv(again, src=0)
            if again.tolist() != [5, 6]:
                failures.append(f"recv after the mismatch: got {again.tolist()}")
    # All-to-all counts that disagree between ranks (the last expects 2 rows from rank 0 and
    # none from itself) raise alike on every rank, before any row moves; counts that do not
    # add up to a rank's own rows are that rank's error.
    receives = [2] + [1] * (size - 2) + [0] if rank == size - 1 else [1] * size
    try:
        drop_in.all_to_all_single(torch.zeros(size), torch.zeros(size), receives, [1] * size)
        failures.append("all_to_all_single counts that disagree: nothing raised")
    except tc.DesyncError as exc:
        want = (f"rank 0 sends 1 row to rank {size - 1}, which expects 2 from it; rank "
                f"{size - 1} sends 1 row to rank {size - 1}, which expects 0 from it")
        if want not in str(exc) or exc.kinds != (tc.MismatchKind.SHAPE,) or \
                "test_compat_torch.py" not in str(exc):
            failures.append(f"all_to_all_single counts that disagree: {exc}")
    try:  # rows of another dtype: the counts exchange names it, before NCCL or gloo could
        drop_in.all_to_all_single(torch.zeros(size, dtype=torch.int64 if rank == size - 1
                                              else torch.float32),
                                  torch.zeros(size, dtype=torch.int64 if rank == size - 1
                                              else torch.float32))
        failures.append("all_to_all_single of rows of another dtype: nothing raised")
    except tc.DesyncError as exc:
        want = (f"the ranks' rows differ: {'rank 0 moves' if size == 2 else 'ranks'}")
        if want not in str(exc) or "of int64 () on cpu" not in str(exc) or \
                exc.kinds != (tc.MismatchKind.DTYPE,):
            failures.append(f"all_to_all_single of rows of another dtype: {exc}")
    expect((tc.EncodeError, tc.PeerError), "all_to_all_single of a conjugate view",
           lambda: drop_in.all_to_all_single(
               torch.zeros(size, dtype=torch.complex64), torch.ones(size, dtype=torch.complex64)
               .conj() if rank == size - 1 else torch.ones(size, dtype=torch.complex64)))
    expect((tc.EncodeError, tc.PeerError), "reduce_scatter of a list it cannot stack",
           lambda: drop_in.reduce_scatter(torch.zeros(2), [torch.zeros(2).to_sparse()
                                                           if rank == size - 1 else
                                                           torch.zeros(2)] * size))
    named = []  # counts that disagree, the calls named and made from two lines: one text
    try:
        if rank == 0:
            drop_in.all_to_all_single(torch.zeros(size), torch.zeros(size), [1] * size,
                                      [1] * size, name="routes")
        else:
            drop_in.all_to_all_single(torch.zeros(size), torch.zeros(size), receives,
                                      [1] * size, name="routes")
    except tc.DesyncError as exc:
        named = drop_in.typed.allgather(str(exc))
    if len(set(named)) != 1 or "all_to_all_tensor name='routes'" not in named[0]:
        failures.append(f"named counts that disagree: {named}")
    expect((tc.EncodeError, tc.PeerError), "all_to_all_single split sizes past the rows",
           lambda: drop_in.all_to_all_single(torch.zeros(size), torch.zeros(size), [1] * size,
                                             [2] * size if rank == size - 1 else [1] * size))
    try:
        drop_in.all_reduce_coalesced
        failures.append("all_reduce_coalesced: no AttributeError")
    except AttributeError as exc:
        if "compat.torch has no 'all_reduce_coalesced'" not in str(exc) or \
                "all_to_all_single" not in str(exc):
            failures.append(f"all_reduce_coalesced: {exc}")
    try:
        drop_in.batch_isend_irecv([torch.zeros(1)])
        failures.append("batch_isend_irecv of a tensor: nothing raised")
    except ValueError as exc:
        if "expected a P2POp whose op is isend or irecv at index 0" not in str(exc):
            failures.append(f"batch_isend_irecv of a tensor: {exc}")
    # dist.group.WORLD is the default group this drop-in was made for.
    world = torch.tensor([rank])
    handle = drop_in.all_reduce(world, group=dist.group.WORLD, async_op=True)
    if not (handle.wait() and handle.is_completed() and handle.get_future().wait() == [world]
            and world.item() == size * (size - 1) // 2):
        failures.append(f"group=WORLD, async_op: got {world.item()}")
    seen = [None] * size
    drop_in.all_gather_object(seen, rank, group=dist.group.WORLD)
    if seen != list(range(size)) or drop_in.get_rank(dist.group.WORLD) != rank:
        failures.append(f"group=WORLD for objects: got {seen}")
    after = torch.tensor([rank])
    drop_in.all_reduce(after)
    if after.item() != size * (size - 1) // 2:
        failures.append(f"usable afterwards: got {after.item()}")
    return failures


def worker(rank: int, size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    drop_in = compat.torch(timeout=30)
    expected = program(dist, rank, size, random.Random(SEED))
    got = program(drop_in, rank, size, random.Random(SEED))
    failures = [f"call {k}: got {g!r}, torch gave {e!r}"
                for k, (g, e) in enumerate(zip(got, expected)) if not same(g, e)]
    if len(got) != len(expected):
        failures.append(f"{len(got)} calls, torch made {len(expected)}")
    expected = tensor_program(dist, rank, size, random.Random(SEED))
    got = tensor_program(drop_in, rank, size, random.Random(SEED))
    failures += [f"tensor call {k}: got {g!r}, torch gave {e!r}"
                 for k, (g, e) in enumerate(zip(got, expected)) if g != e]
    failures += tensor_failures(drop_in, rank, size)
    if size >= 3:  # on a subgroup, src is a global rank, also through a TypedComm over it
        import torch
        sub = dist.new_group([1, 2])
        if rank in (1, 2):
            for api in (compat.torch(sub, timeout=30),
                        compat.torch(tc.TypedComm.from_torch(sub, timeout=30))):
                value = torch.tensor([rank])
                api.broadcast(value, src=2)
                if value.item() != 2 or api.get_rank() != rank - 1:
                    failures.append(f"subgroup broadcast from global rank 2: got {value.item()}")
                api.typed.free()
    Path(out_dir, f"compat_torch.{rank}.json").write_text(json.dumps(failures))
    drop_in.free()
    dist.destroy_process_group()
    # The results are written; skip the interpreter's teardown, where gloo's threads abort the
    # process now and then ("terminate called without an active exception") whatever ran before
    # (the transport's own teardown, tested with it).
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.parametrize("size", [2, 4])
def test_matches_torch_collectives_on_gloo(tmp_path, size):
    pytest.importorskip("torch")
    from typedcoll.transports.gloo import free_port
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(HERE.parent.parent / "src"), os.environ.get("PYTHONPATH", "")])),
               TYPEDCOLL_SEED=str(SEED), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE), str(r), str(size), str(port),
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, start_new_session=True) for r in range(size)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it exited: no group is left to signal
                pass
        pytest.fail(f"hung at {size} ranks (seed {SEED})")
    for r, (proc, text) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {r} failed (seed {SEED}):\n{text[-4000:]}"
        failures = json.loads((tmp_path / f"compat_torch.{r}.json").read_text())
        assert failures == [], f"rank {r} (seed {SEED}): {failures[:3]}"


# --- the drop-in's own checks, in one process ---------------------------------------------------
def test_same_program_under_typedcoll_testing():
    def prog(comm):
        return program(compat.torch(comm), comm.rank, comm.size, random.Random(SEED))

    out = run(3, prog, timeout=20)
    assert [len(x) for x in out] == [len(out[0]), len(out[0]) + 14, len(out[0])]


def test_output_list_too_short_raises_on_every_rank():
    def prog(comm):
        t = compat.torch(comm)
        t.all_gather_object([None] * (1 if comm.rank == 1 else 2), comm.rank)

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=10)
    errors = errors_by_rank(info.value)
    assert isinstance(errors[1], tc.EncodeError) and isinstance(errors[0], tc.PeerError)
    assert str(errors[1]).endswith("expected object_list to be a list of at least 2 items, got "
                                   "a list of 1")


def test_broadcast_lists_of_different_lengths_are_a_schema_mismatch():
    def prog(comm):
        t = compat.torch(comm)
        with pytest.raises(tc.DesyncError) as info:
            t.broadcast_object_list([1, 2] if comm.rank == 0 else [None] * 3, src=0)
        return (info.value.kinds, [g.envelope.schema for g in info.value.groups],
                str(info.value).splitlines()[-1])

    for got in run(2, prog, timeout=10):
        # The hint names the lists' lengths, not a schema= the drop-in does not take.
        assert got == ((tc.MismatchKind.SCHEMA,), ["tuple[Any, Any]", "tuple[Any, Any, Any]"],
                       "  only the lengths of the object lists differ (2 and 3 items): torch's "
                       "object collectives take a list of the same length on every rank")


def test_recv_list_of_another_length_names_both_sites():
    def prog(comm):
        t = compat.torch(comm)
        if comm.rank == 0:
            t.send_object_list([1, 2], dst=1)
            return None
        with pytest.raises(tc.DesyncError, match=r"recv #0 from rank 0 \(tag 0\) on WORLD "
                                                 r"diverged \(schema\)"):
            t.recv_object_list([None], src=0)
        return "ok"

    assert run(2, prog, timeout=10)[1] == "ok"


def test_object_lists_sent_with_names_are_told_apart():
    # Two one-item lists from two lines, the receiver skipping the first on a flag of its own:
    # unnamed, it took the meta message as the data without an error (point to point calls
    # compare no call sites); named on both sides, the receive raises.
    def prog(comm, skip):
        t = compat.torch(comm)
        if comm.rank == 0:
            t.send_object_list([{"meta": 1}], dst=1, name="meta")
            return None
        got = [None]
        if skip:
            with pytest.raises(tc.DesyncError, match=r"recv #0 from rank 0 \(tag 0\) on WORLD "
                                                     r"diverged \(call site\)"):
                t.recv_object_list(got, src=0, name="data")
            return "raised"
        t.recv_object_list(got, src=0, name="meta")
        return got

    assert run(2, prog, True, timeout=10) == [None, "raised"]
    assert run(2, prog, False, timeout=10) == [None, [{"meta": 1}]]


def test_scatter_needs_an_input_list_on_the_source():
    def prog(comm):
        compat.torch(comm).scatter_object_list([None], None, src=0)

    with pytest.raises(ExceptionGroup) as info:
        run(2, prog, timeout=10)
    errors = errors_by_rank(info.value)
    assert isinstance(errors[0], tc.EncodeError)
    assert str(errors[0]).endswith("source rank must provide non-None scatter_object_input_list")
    assert isinstance(errors[1], tc.PeerError)


def test_rank_arguments_follow_torch():
    def prog(comm):
        t = compat.torch(comm)
        with pytest.raises(tc.PeerError if comm.rank else tc.EncodeError,
                           match="expected a global rank or a group rank, got both"):
            t.broadcast_object_list([1], src=0 if comm.rank == 0 else None, group_src=0)
        if comm.rank == 0:
            with pytest.raises(ValueError, match="expected a destination other than this rank"):
                t.send_object_list([1], dst=0)
        items = [comm.rank]
        t.broadcast_object_list(items, group_src=1)
        return items, t.barrier(async_op=True).wait()

    assert run(2, prog, timeout=10) == [([1], True), ([1], True)]


def test_name_and_step_keywords_and_the_step_clock():
    def prog(comm):
        t = compat.torch(comm)
        got = [None] * comm.size
        # One vote written on two lines, made one call by its name.
        if comm.rank == 0:
            t.all_gather_object(got, "a", name="vote")
        else:
            t.all_gather_object(got, "b", name="vote")
        votes = list(got)
        # A per-step vote skipped by rank 1 on step 1: the step clock catches it there.
        with pytest.raises(tc.DesyncError) as info:
            for step in range(3):
                t.set_step(step)
                if not (comm.rank == 1 and step == 1):
                    t.barrier()
        t.set_step(None)
        # step= on the call itself.
        with pytest.raises(tc.DesyncError) as second:
            t.gather_object(comm.rank, [None] * comm.size if comm.rank == 0 else None, dst=0,
                            step=comm.rank)
        return votes, info.value.kinds, second.value.kinds

    for got in run(2, prog, timeout=10):
        assert got == (["a", "b"], (tc.MismatchKind.STEP,), (tc.MismatchKind.STEP,))


def test_a_note_made_on_one_rank_is_in_the_error_every_rank_raises():
    # The drop-in had no note(): AttributeError, where TypedComm's decisions reach the report.
    def prog(comm):
        t = compat.torch(comm)
        if comm.rank == 1:
            t.note("idle", True)  # NOTE-IDLE
            t.barrier()
        t.all_gather_object([None] * comm.size, comm.rank)

    with pytest.raises(ExceptionGroup) as info:
        run(3, prog, timeout=2)
    assert_every_rank_lists_rank_1s_note(info.value,
                                         f"test_compat_torch.py:{_line_of('# NOTE-IDLE')}")


def test_a_note_records_the_latest_value_its_line_and_step():
    def prog(comm):
        t = compat.torch(comm)
        t.set_step(2)
        t.note("k", 0)
        t.note("k", {"why": "x"})  # NOTE-LATEST
        return comm._p.decisions()

    site = f"test_compat_torch.py:{_line_of('# NOTE-LATEST')}"
    assert run(1, prog) == [(tc.Note(key="k", value={"why": "x"}, site=site, step=2),)]


def _line_of(mark: str) -> int:
    return next(n for n, text in enumerate(HERE.read_text().splitlines(), 1)
                if text.endswith(mark))


GROUP_TIMEOUT = """
import datetime, os, sys
import torch.distributed as dist
import typedcoll as tc
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0,
                        world_size=1, timeout=datetime.timedelta(seconds=17))
print(tc.compat.torch().typed.timeout, tc.compat.torch(timeout=5).typed.timeout, flush=True)
os._exit(0)
"""


def test_the_drop_in_takes_the_groups_timeout_unless_given_one():
    # torch's own calls fail after the group's timeout; the drop-in's waited forever.
    pytest.importorskip("torch")
    from typedcoll.transports.gloo import free_port
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(HERE.parent.parent / "src"), os.environ.get("PYTHONPATH", "")])))
    out = subprocess.run([sys.executable, "-c", GROUP_TIMEOUT, str(free_port())],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.split() == ["17.0", "5"], out.stdout + out.stderr


def test_launch_ports_are_drawn_below_the_kernels_ephemeral_range():
    # A port found free and bound later by another process: a port the kernel hands out itself
    # (bind(0), a connecting socket) can be taken in between, and a launch failed so.
    pytest.importorskip("torch")
    from typedcoll.transports.gloo import _ephemeral_low, free_port
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports), (sorted(ports), low)
    assert len(ports) > 1  # drawn at random: concurrent launches do not all pick one port


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])


def test_monitored_barrier_names_a_late_rank_within_its_own_timeout():
    import time

    def prog(comm):
        api = compat.torch(comm)
        if comm.rank == 2:
            time.sleep(1.5)
        started = time.monotonic()
        try:
            api.monitored_barrier(timeout=datetime.timedelta(seconds=0.5))
        except tc.CollectiveTimeout as exc:
            return exc.missing, time.monotonic() - started, "abandoned" in str(exc), comm.timeout
        return "completed"

    got = run(3, prog, timeout=None)
    for missing, took, abandoned, after in got[:2]:
        assert missing == (2,) and 0.4 < took < 1.4 and not abandoned and after is None, got
    assert got[2][2] and got[2][3] is None, got  # the late rank learns its peers gave up
