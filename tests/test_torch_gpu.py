"""Device-path tests: CUDA tensor collectives over NCCL at world size 1 (skipped without a GPU).

Run on a GPU machine: ``python -m pytest -q tests/test_torch_gpu.py``. Each collective's result is
compared, on fresh random data, with the plain NCCL collective and with the CPU (gloo) path, in
both check modes; the verification path is driven by corrupting the gathered envelope in pinned
memory, as a peer with a different envelope would. Every test frees its communicators, so each
starts on a fresh private channel named WORLD.
"""

from __future__ import annotations

import os
import random
import re
import zlib
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import typedcoll as tc  # noqa: E402
from typedcoll.tensor import device  # noqa: E402
from typedcoll.transports.gloo import free_port  # noqa: E402
from typedcoll.transports.torch import all_gather_single, reduce_scatter_single  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEED = int(os.environ.get("TYPEDCOLL_SEED", random.randrange(2 ** 31)))
HERE = Path(__file__).resolve()
_MARK = re.compile(r"#\s*@(\S+)")
SITES = {m.group(1): f"{HERE.name}:{n}" for n, line in enumerate(HERE.read_text().splitlines(), 1)
         for m in [_MARK.search(line)] if m}


@pytest.fixture(scope="module")
def groups():
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    print(f"seed {SEED}")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, device_id=torch.device("cuda", 0))
    gloo = dist.new_group([0], backend="gloo")
    yield dist.group.WORLD, gloo
    dist.destroy_process_group()


def _data(shape: Any, dtype: Any, gen: Any) -> Any:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)


def _raw(op: str, t: Any, group: Any) -> Any:
    if op == "all_gather":
        out = t.new_empty((t.shape[0] * dist.get_world_size(group),) + t.shape[1:])
        all_gather_single(out, t, group=group)
        return out
    if op == "all_reduce":
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t
    if op == "broadcast":
        dist.broadcast(t, src=0, group=group)
        return t
    if op == "all_to_all":
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=group)
        return out
    out = t.new_empty((t.shape[0] // dist.get_world_size(group),) + t.shape[1:])
    reduce_scatter_single(out, t, op=dist.ReduceOp.SUM, group=group)
    return out


def _typed(comm: Any, op: str, t: Any, step: int) -> Any:
    if op == "all_gather":
        return comm.all_gather_tensor(t, name="h", step=step)
    if op == "all_reduce":
        return comm.all_reduce_tensor(t, "max", name="g", step=step)
    if op == "broadcast":
        return comm.broadcast_tensor(t, 0, name="w", step=step)
    if op == "all_to_all":
        return comm.all_to_all_tensor(t, name="a", step=step)
    return comm.reduce_scatter_tensor(t, "sum", name="r", step=step)


@pytest.mark.parametrize("mode", ["deferred", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("op", ["all_gather", "all_reduce", "broadcast", "reduce_scatter",
                                "all_to_all"])
def test_matches_plain_nccl_and_cpu_path(groups, op, dtype, mode):
    nccl, gloo = groups
    with tc.TypedComm.from_torch(nccl, timeout=60, tensor_check=mode) as gpu, \
            tc.TypedComm.from_torch(gloo, timeout=60) as cpu:
        gen = torch.Generator().manual_seed(SEED + zlib.crc32(f"{op}{dtype}{mode}".encode()))
        for step in range(80):  # more calls than the pinned ring has slots
            shape = tuple(int(n) for n in torch.randint(1, 300, (2,), generator=gen))
            host = _data(shape, dtype, gen)
            assert host.abs().sum() > 0
            got = _typed(gpu, op, host.cuda(), step)
            want = _raw(op, host.cuda(), nccl)
            via_cpu = _typed(cpu, op, host.clone(), step)
            assert torch.equal(got, want)
            assert torch.equal(got.cpu(), via_cpu)
        gpu.synchronize()
        assert not gpu._p.extensions["tensor"].pending


def _copied_back(comm: Any) -> Any:
    """The communicator's device checks, every envelope copied back: a corruption lands after."""
    checks = comm._p.extensions["tensor"]
    checks.copy_back(force=True)
    torch.cuda.synchronize()
    return checks


def test_deferred_check_raises_at_synchronize(groups):
    with tc.TypedComm.from_torch(groups[0]) as comm:
        comm.all_gather_tensor(torch.randn(4, 3, device="cuda"), name="h", step=7)  # @sync
        _copied_back(comm).pending[-1].blocks[8] = 99  # the seq: a peer at another collective
        with pytest.raises(tc.DesyncError) as err:
            comm.synchronize()
        assert str(err.value) == (
            "collective #99 on WORLD diverged (envelope):\n"
            f"  rank 0: all_gather_tensor shape=(4, 3) dtype=float32 name='h' at "
            f"{SITES['sync']}, its 1st call, step 7")


def test_deferred_check_raises_at_next_call(groups):
    with tc.TypedComm.from_torch(groups[0]) as comm:
        x = torch.randn(5, device="cuda")
        comm.all_reduce_tensor(x, "sum", name="g")
        _copied_back(comm).pending[-1].blocks[1] = 11  # the op code: a peer's broadcast
        with pytest.raises(tc.DesyncError, match=r"^collective #0 on WORLD diverged"):
            comm.all_reduce_tensor(x, "sum", name="g")
        comm.all_reduce_tensor(x, "sum", name="g")  # usable again at world size 1
        comm.synchronize()


@pytest.mark.parametrize("mode", ["deferred", "eager"])
def test_local_error_raises_encode_error(groups, mode):
    with tc.TypedComm.from_torch(groups[0], tensor_check=mode) as comm:
        with pytest.raises(tc.EncodeError) as err:
            comm.all_reduce_tensor(torch.ones(3, device="cuda"), "avg", name="g")  # @avg
        assert str(err.value) == (
            f"collective #0 on WORLD: rank 0 could not send its all_reduce_tensor contribution "
            f"at {SITES['avg']}: expected op 'sum', 'prod', 'max' or 'min', got 'avg'")
        comm.synchronize()  # the failing rank's own pending check does not raise twice
        assert comm.all_reduce_tensor(torch.ones(3, device="cuda"), "sum").sum().item() == 3


def test_a_bitwise_op_is_gloos_alone(groups):
    """NCCL reduces no bitwise op: a CUDA tensor's raises with why; a CPU tensor's is gloo's."""
    with tc.TypedComm.from_torch(groups[0]) as comm:
        with pytest.raises(tc.EncodeError) as err:
            comm.all_reduce_tensor(torch.ones(3, dtype=torch.int32, device="cuda"), "bor")
        assert str(err.value).endswith(
            "expected op 'sum', 'prod', 'max' or 'min', got 'bor' (NCCL reduces no bitwise op: "
            "a CPU tensor's goes through gloo)"), err.value
        assert comm.all_reduce_tensor(torch.tensor([6, 3]), "band").tolist() == [6, 3]


def test_object_collectives_on_an_nccl_group_use_private_gloo(groups):
    with tc.TypedComm.from_torch(groups[0]) as comm:
        assert comm._p.transport.control.name() == "gloo"
        assert comm._p.transport.device_group is groups[0]
        assert comm.allgather({"a": 1}) == [{"a": 1}]
        cpu = comm.all_gather_tensor(torch.arange(3))  # CPU tensors take the gloo path
        assert cpu.tolist() == [0, 1, 2] and not comm._p.extensions


def test_object_collective_verifies_pending_device_checks(groups):
    # "Verified at the next typed call": an object collective counts, and a failed check raises
    # there, before the object collective is issued.
    with tc.TypedComm.from_torch(groups[0]) as comm:
        comm.all_gather_tensor(torch.randn(4, device="cuda"), name="h")
        checks = _copied_back(comm)
        assert checks.pending and comm._p.deferred is checks
        checks.pending[-1].blocks[1] = 11  # the op code: a peer's broadcast
        with pytest.raises(tc.DesyncError, match=r"^collective #0 on WORLD diverged"):
            comm.allgather(1)
        assert not checks.pending and comm._p.deferred is None
        assert comm.allgather({"b": 2}) == [{"b": 2}] and comm.seq == 2
        comm.all_gather_tensor(torch.randn(4, device="cuda"), name="h")
        comm.synchronize()
        assert comm._p.deferred is None


def test_copies_back_coalesce_while_the_gpu_is_busy(groups):
    # A burst enqueued behind a busy stream: the copy back of the first envelope waits for the
    # stream, so the later slots go back together, in fewer copies than calls. A corrupt envelope
    # in the middle of a shared copy is still pinned to its own seq, and the results are right.
    with tc.TypedComm.from_torch(groups[0]) as comm:
        checks = device.checks_of(comm._p)
        xs = [torch.randn(64, 3, device="cuda") for _ in range(24)]
        torch.cuda._sleep(int(0.05 * 2e9))
        outs = [comm.all_gather_tensor(x, name="h", step=i)  # @burst
                for i, x in enumerate(xs)]
        _copied_back(comm)
        events = {id(checks.done[rec.index]) for rec in checks.pending}
        assert len(checks.pending) == 24 and 2 <= len(events) < 24, len(events)
        assert all(torch.equal(out, x) for out, x in zip(outs, xs))
        checks.pending[13].blocks[16] ^= 1  # rank 0's step as gathered for seq 13: 13 -> 12
        with pytest.raises(tc.DesyncError) as err:
            comm.synchronize()
        assert str(err.value) == (
            "collective #13 on WORLD diverged (envelope):\n"
            f"  rank 0: all_gather_tensor shape=(64, 3) dtype=float32 name='h' at "
            f"{SITES['burst']}, its 14th call, step 12")
        comm.all_gather_tensor(xs[0], name="h")
        comm.synchronize()


def test_calls_on_several_streams(groups):
    # The envelope gather runs on whatever stream is current, as the payload does; switching
    # streams between calls changes neither results nor checks.
    with tc.TypedComm.from_torch(groups[0]) as comm:
        side = torch.cuda.Stream()
        gen = torch.Generator().manual_seed(SEED)
        for step in range(40):
            host = torch.randn(16, 5, generator=gen)
            stream = side if step % 3 else torch.cuda.current_stream()
            with torch.cuda.stream(stream):
                x = host.cuda()
                got = comm.all_gather_tensor(x, name="h", step=step)
                want = comm.all_reduce_tensor(x.clone(), "sum", name="g", step=step)
            stream.synchronize()
            assert torch.equal(got.cpu(), host) and torch.equal(want.cpu(), host)
        comm.synchronize()
        assert not comm._p.extensions["tensor"].pending


def test_split_and_dup_get_their_own_nccl_backend(groups):
    with tc.TypedComm.from_torch(groups[0]) as comm:
        x = torch.randn(6, 2, device="cuda")
        with comm.dup() as dup:
            assert dup._p.transport.device_group is not groups[0]
            assert torch.equal(dup.all_gather_tensor(x), x)
            assert torch.equal(dup.all_reduce_tensor(x.clone(), "max"), x)
            dup.synchronize()
        with comm.split(0) as sub:
            assert torch.equal(sub.reduce_scatter_tensor(x, "sum"), x)
            assert torch.equal(sub.broadcast_tensor(x.clone(), 0), x)
            assert sub.allgather(5) == [5]
            sub.synchronize()
        assert torch.equal(comm.all_gather_tensor(x), x)


def test_without_nccl_a_cuda_tensor_is_a_local_error(groups):
    with tc.TypedComm.from_torch(groups[1]) as comm:
        with pytest.raises(tc.EncodeError, match=r"expected a CPU tensor \(the group has no NCCL "
                                                 r"backend\), got one on cuda:0$"):
            comm.all_gather_tensor(torch.ones(2, device="cuda"))
        assert comm.all_gather_tensor(torch.ones(2)).tolist() == [1.0, 1.0]


def test_the_torch_drop_in_runs_tensor_calls_on_nccl(groups):
    """compat.torch's tensor calls on CUDA tensors take the device path and fill their outputs
    (sentinels before: at world size 1 every collective is the identity)."""
    from torch.distributed import ReduceOp

    from typedcoll import compat

    api = compat.torch(groups[0], timeout=60)
    gen = torch.Generator().manual_seed(SEED)
    side = torch.cuda.Stream()
    for _ in range(70):  # more calls than the pinned ring has slots
        host = _data((5, 3), torch.float32, gen)
        got, want = host.cuda(), host.cuda()
        api.all_reduce(got, op=ReduceOp.MAX)
        dist.all_reduce(want, op=ReduceOp.MAX, group=groups[0])
        api.broadcast(got, src=0)
        assert torch.equal(got, want)
        parts = [torch.full_like(got, float("nan"))]
        api.all_gather(parts, got)
        flat = torch.full((5, 3), float("nan"), device="cuda")
        api.all_gather_into_tensor(flat, got)
        mine = torch.full((5, 3), float("nan"), device="cuda")
        with torch.cuda.stream(side):  # issued on another stream, waited for on this one
            side.wait_stream(torch.cuda.default_stream())
            handle = api.reduce_scatter_tensor(mine, got, async_op=True)
        handle.wait()
        assert torch.equal(parts[0], want) and torch.equal(flat, want)
        assert torch.equal(mine, want)
        reduced, gathered, scattered = got.clone(), [torch.full_like(got, float("nan"))], \
            torch.full_like(got, float("nan"))
        api.reduce(reduced, dst=0, op=ReduceOp.MIN)
        api.gather(got, gathered, dst=0)
        api.scatter(scattered, [got], src=0)
        assert torch.equal(reduced, want) and torch.equal(gathered[0], want)
        assert torch.equal(scattered, want)
        swapped, rows, lists = torch.full_like(got, float("nan")), \
            torch.full_like(got, float("nan")), [torch.full_like(got, float("nan"))]
        api.all_to_all_single(swapped, got)
        api.all_to_all_single(rows, got, [5], [5])
        api.all_to_all(lists, [got])
        assert torch.equal(swapped, want) and torch.equal(rows, want)
        assert torch.equal(lists[0], want)
    api.typed.synchronize()
    assert not api.typed._p.extensions["tensor"].pending
    api.free()


def test_a_callers_own_error_still_enqueues_the_payload_when_deferred(groups, monkeypatch):
    """Deferred mode: a drop-in's output error on one rank is flagged in the envelope and that
    rank still enqueues its payload (its tensor passed every check), so its peers' NCCL call,
    enqueued before they can know, completes; a bad tensor enqueues nothing."""
    from typedcoll import compat

    enqueued = []
    original = device.enqueued
    monkeypatch.setattr(device, "enqueued", lambda work: (enqueued.append(1), original(work)))
    api = compat.torch(groups[0], timeout=60, tensor_check="deferred")
    x = torch.ones(4, device="cuda")
    with pytest.raises(tc.EncodeError, match="expected tensor_list to be a list of 1 tensors"):
        api.all_gather([], x)
    assert len(enqueued) == 2  # the envelopes' all-gather, then the payload's
    with pytest.raises(tc.EncodeError, match="expected a contiguous tensor"):
        api.all_reduce(torch.ones(4, 2, device="cuda").t())
    assert len(enqueued) == 3  # the envelopes' only
    api.free()
