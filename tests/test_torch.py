"""The torch.distributed backend on gloo (CPU): desyncs, errors and values at 2 and 4 ranks.

Each multi-rank program is this file run as ``python tests/test_torch.py WORKER RANK SIZE PORT
OUT`` in SIZE processes on a free localhost port, killed as a group after a hard timeout so a
hang fails the test. One program runs many cases in sequence (a DesyncError leaves the
communicator usable), writing every rank's outcomes to JSON that the tests then check: one
process start per program keeps the whole file well under a minute.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch") if __name__ != "__main__" else __import__("torch")

HERE = Path(__file__).resolve()
SEED = int(os.environ.get("TYPEDCOLL_SEED", random.randrange(2 ** 31)))
SITE = r"test_torch\.py:\d+"


def run_ranks(worker: str, size: int, tmp_path: Path, timeout: float = 45.0) -> list:
    """Run ``worker`` on ``size`` gloo ranks; every rank's outcome dict, in rank order."""
    from typedcoll._torch import free_port
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])), TYPEDCOLL_SEED=str(SEED),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE), worker, str(r), str(size), str(port),
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, start_new_session=True) for r in range(size)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{worker} at {size} ranks hung (seed {SEED}): "
                    + "\n".join(p.communicate()[0][-3000:] for p in procs))
    for r, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"{worker} rank {r} failed (seed {SEED}):\n{out[-5000:]}"
    return [json.loads((tmp_path / f"{worker}.{r}.json").read_text()) for r in range(size)]


# --- the programs (run in the child processes) ---------------------------------------------------
def _outcome(fn):
    import typedcoll as tc
    try:
        value = fn()
    except tc.CollectiveError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "seq": exc.seq}
    return {"value": repr(value)}


def worker_desync(rank: int, size: int) -> dict:
    import msgspec
    import typedcoll as tc

    class RankState(msgspec.Struct):
        rank: int
        num_active_requests: int
        num_active_tokens: int

    class TimeoutFlag(msgspec.Struct):
        timed_out: bool

    comm = tc.TypedComm.from_torch(timeout=20)
    odd = rank == size - 1  # the one rank that takes another branch
    z = torch.zeros
    cases = {
        "schema": lambda: comm.allgather(TimeoutFlag(True) if odd else RankState(rank, 1, 2),
                                         step=4),
        "op": lambda: comm.bcast(1, root=0) if odd else comm.allgather(1),
        "root": lambda: comm.bcast(rank, root=1 if odd else 0),
        "step": lambda: comm.allgather(rank, step=8 if odd else 7),
        "t_shape": lambda: comm.all_gather_tensor(z(3 if odd else 2, 4), name="hidden", step=1),
        "t_dtype": lambda: comm.all_reduce_tensor(z(4, dtype=torch.float64 if odd
                                                    else torch.float32), "sum", name="grad"),
        "t_op": lambda: comm.all_reduce_tensor(z(4), "max" if odd else "sum", name="grad"),
        "t_root": lambda: comm.broadcast_tensor(z(4), 1 if odd else 0, name="weights"),
        "t_name": lambda: comm.all_reduce_tensor(z(4), "sum", name="loss" if odd else "grad"),
        "t_kind": lambda: (comm.reduce_scatter_tensor(z(4), "sum", name="grad") if odd
                           else comm.all_reduce_tensor(z(4), "sum", name="grad")),
        "t_vs_object": lambda: (comm.allgather(RankState(rank, 0, 0)) if odd
                                else comm.all_gather_tensor(z(2), name="hidden")),
        "t_step": lambda: comm.all_gather_tensor(z(2), name="hidden", step=2 if odd else 1),
        "t_local_error": lambda: comm.all_reduce_tensor(z(2), "avg" if odd else "sum",
                                                        name="grad"),
        "t_not_tensor": lambda: comm.all_gather_tensor([1.0] if odd else z(1), name="hidden"),
    }
    out = {name: _outcome(fn) for name, fn in cases.items()}
    out["after"] = _outcome(lambda: comm.all_gather_tensor(torch.tensor([rank]), name="r")
                            .tolist())
    out["mpi4py_imported"] = {"value": repr("mpi4py" in sys.modules)}
    return out


def worker_values(rank: int, size: int) -> dict:
    """Typed results against plain torch collectives (and numpy) on fresh random data."""
    import numpy as np
    import torch.distributed as dist
    import typedcoll as tc
    from typedcoll import _torch
    from typedcoll._torch import all_gather_single, reduce_scatter_single

    comm = tc.TypedComm.from_torch(timeout=20)
    checks = 0

    def data(r, step, dtype):
        gen = torch.Generator().manual_seed(SEED * 1000 + step * 31 + r)
        if dtype.is_floating_point:
            return torch.randn(4, 3, generator=gen).to(dtype)
        return torch.randint(-10 ** 6, 10 ** 6, (4, 3), generator=gen, dtype=dtype)

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
           "prod": dist.ReduceOp.PRODUCT}
    for step, dtype in enumerate([torch.float32, torch.float64, torch.int64, torch.bfloat16]):
        x = data(rank, step, dtype)
        assert x.abs().sum() > 0
        want = x.new_empty((4 * size, 3))
        all_gather_single(want, x)
        assert torch.equal(comm.all_gather_tensor(x, name="h", step=step), want)
        assert torch.equal(want, torch.cat([data(r, step, dtype) for r in range(size)]))
        for op, red in ops.items():
            got, ref = x.clone(), x.clone()
            comm.all_reduce_tensor(got, op, name="g", step=step)
            dist.all_reduce(ref, op=red)
            assert torch.equal(got, ref), (op, dtype)
            ref_rs = x.new_empty((4 // size, 3)) if 4 % size == 0 else None
            if ref_rs is not None:
                reduce_scatter_single(ref_rs, x, op=red)
                assert torch.equal(comm.reduce_scatter_tensor(x, op, name="r"), ref_rs)
            checks += 3
        for root in range(size):
            got = x.clone()
            comm.broadcast_tensor(got, root, name="w", step=step)
            assert torch.equal(got, data(root, step, dtype))
            checks += 1
    # Object collectives, overflow sizes included (phase 2: allgatherv, gatherv, bcast).
    rng = np.random.default_rng(SEED + rank)
    for n in (3, 300, 5000):
        mine = rng.integers(0, 255, n, dtype=np.uint8).tobytes()
        every = comm.allgather(mine)
        assert every[rank] == mine and len({len(v) for v in every}) == 1
        assert comm.gather(mine, root=size - 1) == (every if rank == size - 1 else None)
        assert comm.bcast(mine if rank == 0 else None, root=0, schema=bytes) == every[0]
        for dtype in (np.float64, np.int32, np.uint32):
            arr = rng.integers(1, 100, n).astype(dtype)
            parts = comm.allgather(arr)
            assert np.array_equal(comm.allreduce(arr, "sum"), sum(parts[1:], parts[0].copy()))
        checks += 4
    sub = comm.split(rank % 2, key=-rank)
    assert sub.allgather(rank) == sorted(range(rank % 2, size, 2), reverse=True)
    dup = comm.dup()
    assert dup.all_gather_tensor(torch.tensor([rank]), name="r").tolist() == list(range(size))
    # Steady state: one gloo all_gather_single per typed allgather, never the object API.
    calls = []
    original = _torch.all_gather_single
    _torch.all_gather_single = lambda *a, **k: calls.append(1) or original(*a, **k)
    forbidden = ("all_gather_object", "broadcast_object_list", "gather_object")
    saved = {name: getattr(dist, name) for name in forbidden}
    for name in forbidden:
        setattr(dist, name, None)
    for i in range(5):
        comm.allgather({"rank": rank, "i": i})
    for name, fn in saved.items():
        setattr(dist, name, fn)
    _torch.all_gather_single = original
    assert len(calls) == 5, calls
    return {"checks": {"value": checks}, "mpi4py": {"value": "mpi4py" in sys.modules}}


def worker_timeout(rank: int, size: int) -> dict:
    import typedcoll as tc
    comm = tc.TypedComm.from_torch(timeout=0.5, name="tc")
    out = {}
    if rank == 0:  # its peers skip this collective
        out["hang"] = _outcome(lambda: comm.allgather(1))
        out["again"] = _outcome(lambda: comm.allgather(1))
    comm2 = tc.TypedComm.from_torch(timeout=20)  # made by every rank: a world collective
    out["fresh"] = _outcome(lambda: comm2.allgather(rank))
    return out


def _child(worker: str, rank: int, size: int, port: int, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    result = globals()[f"worker_{worker}"](rank, size)
    Path(out, f"{worker}.{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip teardown: a timed-out gloo op stays pending forever


# --- the tests -----------------------------------------------------------------------------------
def _line(ranks: str, text: str) -> str:
    return rf"\n  {ranks}: +{text} at {SITE}"


@pytest.fixture(scope="module")
def desync2(tmp_path_factory):
    return run_ranks("desync", 2, tmp_path_factory.mktemp("desync2"))


EXPECTED = {
    "schema": ("DesyncError", r"collective #0 on WORLD diverged \(schema\):"
               + _line("rank 0", r"allgather\[RankState\]") + " step 4"
               + _line("rank 1", r"allgather\[TimeoutFlag\]") + " step 4"),
    "op": ("DesyncError", r"collective #1 on WORLD diverged \(op, root\):"
           + _line("rank 0", r"allgather\[int\] root=None")
           + _line("rank 1", r"bcast\[int\] root=0")),
    "root": ("DesyncError", r"collective #2 on WORLD diverged \(root\):"
             + _line("rank 0", r"bcast\[int\] root=0") + _line("rank 1", r"bcast\[int\] root=1")),
    "step": ("DesyncError", r"collective #3 on WORLD diverged \(step\):"
             + _line("rank 0", r"allgather\[int\]") + " step 7"
             + _line("rank 1", r"allgather\[int\]") + " step 8"),
    "t_shape": ("DesyncError", r"collective #4 on WORLD diverged \(shape\):"
                + _line("rank 0", r"all_gather_tensor\[hidden\] shape=\(2, 4\) dtype=float32")
                + " step 1"
                + _line("rank 1", r"all_gather_tensor\[hidden\] shape=\(3, 4\) dtype=float32")
                + " step 1"),
    "t_dtype": ("DesyncError", r"collective #5 on WORLD diverged \(dtype\):"
                + _line("rank 0", r"all_reduce_tensor\[grad\] op=sum shape=\(4,\) "
                        r"dtype=float32")
                + _line("rank 1", r"all_reduce_tensor\[grad\] op=sum shape=\(4,\) "
                        r"dtype=float64")),
    "t_op": ("DesyncError", r"collective #6 on WORLD diverged \(reduce op\):"
             + _line("rank 0", r"all_reduce_tensor\[grad\] op=sum")
             + _line("rank 1", r"all_reduce_tensor\[grad\] op=max")),
    "t_root": ("DesyncError", r"collective #7 on WORLD diverged \(root\):"
               + _line("rank 0", r"broadcast_tensor\[weights\] root=0")
               + _line("rank 1", r"broadcast_tensor\[weights\] root=1")),
    "t_name": ("DesyncError", r"collective #8 on WORLD diverged \(schema\):"
               + _line("rank 0", r"all_reduce_tensor\[grad\] op=sum")
               + _line("rank 1", r"all_reduce_tensor\[loss\] op=sum")),
    "t_kind": ("DesyncError", r"collective #9 on WORLD diverged \(op\):"
               + _line("rank 0", r"all_reduce_tensor\[grad\] op=sum")
               + _line("rank 1", r"reduce_scatter_tensor\[grad\] op=sum")),
    "t_vs_object": ("DesyncError", r"collective #10 on WORLD diverged \(op, schema\):"
                    + _line("rank 0", r"all_gather_tensor\[hidden\]")
                    + _line("rank 1", r"allgather\[RankState\]")),
    "t_step": ("DesyncError", r"collective #11 on WORLD diverged \(step\):"
               + _line("rank 0", r"all_gather_tensor\[hidden\]") + " step 1"
               + _line("rank 1", r"all_gather_tensor\[hidden\]") + " step 2"),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_desync_raises_same_error_on_every_rank(desync2, case):
    kind, pattern = EXPECTED[case]
    messages = {r[case].get("message") for r in desync2}
    assert len(messages) == 1, desync2  # every rank, the same text
    for outcome in desync2:
        assert outcome[case]["error"] == kind, outcome[case]
        assert __import__("re").fullmatch(pattern, outcome[case]["message"]), \
            f"{outcome[case]['message']!r}\n !~ {pattern!r}"


def test_local_error_names_failing_rank(desync2):
    zero, one = desync2[0]["t_local_error"], desync2[1]["t_local_error"]
    assert one == {"error": "EncodeError", "seq": 12, "message": (
        "collective #12 on WORLD: rank 1 could not send its all_reduce_tensor[grad] "
        "contribution: expected op 'sum', 'max', 'min' or 'prod', got 'avg'")}
    assert zero == {"error": "PeerError", "seq": 12, "message": (
        "collective #12 on WORLD: rank 1 failed its all_reduce_tensor[grad] contribution: "
        "expected op 'sum', 'max', 'min' or 'prod', got 'avg'")}
    assert desync2[0]["t_not_tensor"]["error"] == "PeerError"
    assert desync2[1]["t_not_tensor"]["message"].endswith(
        "could not send its all_gather_tensor[hidden] contribution: expected a torch.Tensor, "
        "got list")


def test_usable_after_desync_and_no_mpi(desync2):
    for outcome in desync2:
        assert outcome["after"] == {"value": "[0, 1]"}
        assert outcome["mpi4py_imported"] == {"value": "False"}


@pytest.mark.parametrize("size", [2, 4])
def test_values_match_plain_torch(tmp_path, size):
    results = run_ranks("values", size, tmp_path, timeout=60)
    assert len({r["checks"]["value"] for r in results}) == 1
    assert not any(r["mpi4py"]["value"] for r in results)


def test_timeout_names_the_collective(tmp_path):
    results = run_ranks("timeout", 2, tmp_path)
    hang, again = results[0]["hang"], results[0]["again"]
    assert hang["error"] == "CollectiveTimeout"
    assert __import__("re").fullmatch(rf"collective #0 on tc: allgather\[int\] at {SITE} did not "
                                      rf"complete within 0\.5 s(\n.*)?", hang["message"],
                                      flags=__import__("re").S), hang
    assert again["error"] == "CollectiveTimeout" and "refused" in again["message"]
    assert [r["fresh"] for r in results] == [{"value": "[0, 1]"}] * 2


# --- the device-path verdict, on hand-built envelope blocks (no GPU) ----------------------------
def _blocks(calls, seqs):
    from typedcoll import _tensor_device as device
    from typedcoll._tensor_envelope import BLOCK
    buf = bytearray(BLOCK * len(calls))
    for r, (call, seq) in enumerate(zip(calls, seqs)):
        device.pack_block(memoryview(buf)[r * BLOCK:], call, seq)
    return bytes(buf)


class _P:
    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size, self.name = rank, size, "WORLD"


def test_device_verdict_on_hand_built_blocks():
    import typedcoll as tc
    from typedcoll import _tensor_device as device
    from typedcoll._tensor_envelope import BLOCK, _Call
    p = [_P(r, 3) for r in range(3)]
    x, y = torch.zeros(2, 3), torch.zeros(4, 3)
    calls = [_Call(p[r], "all_gather_tensor", t, "h", 5) for r, t in enumerate([x, x, y])]
    blocks = _blocks(calls, [9, 9, 9])
    for r in range(3):
        rec = device._Pending(9, calls[r], 0, None)
        own = blocks[r * BLOCK:r * BLOCK + 48]
        err = device.verdict(p[r], rec, blocks, own, "deferred")
        assert isinstance(err, tc.DesyncError)
        assert __import__("re").fullmatch(
            r"collective #9 on WORLD diverged \(shape\):"
            + _line("ranks 0-1", r"all_gather_tensor\[h\] shape=\(2, 3\) dtype=float32")
            + " step 5" + _line("rank 2", r"all_gather_tensor\[h\] shape=\(4, 3\) "
                                          r"dtype=float32") + " step 5", str(err)), str(err)
    same = _blocks(calls[:2], [9, 9])
    assert device.verdict(p[0], device._Pending(9, calls[0], 0, None), same, same[:48],
                           "deferred") is None
    bad = _Call(p[1], "all_reduce_tensor", x, "g", None, reduce_op="avg")
    good = _Call(p[0], "all_reduce_tensor", x, "g", None, reduce_op="sum")
    blocks = _blocks([good, bad], [3, 3])
    err = device.verdict(p[0], device._Pending(3, good, 0, None), blocks, blocks[:48], "deferred")
    assert isinstance(err, tc.PeerError) and str(err) == (
        "collective #3 on WORLD: rank 1 failed its all_reduce_tensor[g] contribution: expected "
        "op 'sum', 'max', 'min' or 'prod', got 'avg'")
    assert device.verdict(p[1], device._Pending(3, bad, 0, None), blocks,
                           blocks[256:304], "deferred") is None  # it raised at call time


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
