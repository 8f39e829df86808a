"""GPU cost of the checked tensor collectives: typed (envelope + check) against raw NCCL.

Run (one process per GPU; world size 1 on a single GPU):
    torchrun --nproc-per-node=1 bench/torch_gpu.py [--rounds 7] [--iters 400] [--json out.json]

Methods, interleaved round by round; each figure is the median over rounds of one round's mean
wall time per call, over back-to-back calls ended by ``torch.cuda.synchronize()`` and, for the
typed ones, ``comm.synchronize()`` (every deferred check verified inside the timing):
  ag_raw       torch.empty + all_gather_single                     (the floor)
  ag_typed     comm.all_gather_tensor, deferred check (default)
  ag_eager     comm.all_gather_tensor, eager check (a host sync before each payload)
  ag_packed    the alternative layout: payload and envelope packed into one buffer, one
               all-gather, then unpacked (two extra payload copies); not used by typedcoll
  ag_serial    the first session's design, for comparison: the envelope's copies and an
               out-of-place all-gather on the caller's stream, then the payload
  ar_raw       all_reduce (sum, in place)
  ar_typed     comm.all_reduce_tensor, deferred check
  ar_maxmin    all_reduce + a 2x6-word int64 MAX all-reduce: what the alternative in-band
               all-reduce check (max == min of the envelope words) would cost
Goal: ag_typed <= 1.05 x ag_raw at >= 1 MiB.

Wall time per call is bound by the CPU here (every torch.distributed call costs tens of us of
Python and launch work, far more than a world-size-1 all-gather costs the GPU), so the device's
own time is measured too, in the GPU-bound regime a serving loop runs in (the CPU runs ahead):
  dev_*        GPU time per call of ag_raw, ag_typed, ag_serial, ar_raw and ar_typed: from a
               CUDA event to the last of the end events recorded on the caller's stream and on
               the typed communicator's two copy streams (so its copies count), over a burst of
               calls enqueued while the caller's stream is held by a torch.cuda._sleep, so no
               launch gap is inside the interval (checked: the start event must still be
               pending when the burst is enqueued; the burst fits the ring of deferred checks,
               so the CPU never waits)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

import typedcoll as tc
from typedcoll.tensor import device as tensor_device
from typedcoll.tensor.envelope import BLOCK, RING
from typedcoll.transports.gloo import free_port
from typedcoll.transports.torch import all_gather_single

SIZES = [1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def _label(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _device_time(fn, burst: int, hold_s: float, comm) -> float:
    """GPU us per call of ``fn`` over a burst enqueued behind a sleep (see the module doc).

    A burst the host did not finish enqueueing within the hold (a slow host moment) is not
    GPU-bound: it is measured again with twice the hold, three times at most.
    """
    for _ in range(3):
        torch.cuda.synchronize()
        comm.synchronize()
        streams = [torch.cuda.current_stream()]
        streams += tensor_device.checks_of(comm._p).streams()
        start = torch.cuda.Event(enable_timing=True)
        ends = [torch.cuda.Event(enable_timing=True) for _ in streams]
        torch.cuda._sleep(int(hold_s * 2e9))  # ~2 GHz SM clock: at least hold_s
        start.record()
        for _ in range(burst):
            fn()
        for end, stream in zip(ends, streams):
            end.record(stream)
        bound = not start.query()
        torch.cuda.synchronize()
        comm.synchronize()
        if bound:
            return max(start.elapsed_time(end) for end in ends) * 1e3 / burst
        hold_s *= 2
    raise SystemExit(f"device-time burst not GPU-bound even with a {hold_s / 2:.3f} s hold")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=400,
                        help="most timed calls per method, size and round (default 400)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if "RANK" not in os.environ:  # plain `python bench/torch_gpu.py`: world size 1
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    world = dist.get_world_size()
    rank = dist.get_rank()
    typed = tc.TypedComm.from_torch()
    eager = tc.TypedComm.from_torch(tensor_check="eager")
    words = torch.zeros(12, dtype=torch.int64, device=device)
    env_in = torch.zeros(BLOCK, dtype=torch.uint8, device=device)
    env_out = torch.zeros(BLOCK * world, dtype=torch.uint8, device=device)
    env_host = torch.zeros(BLOCK * (world + 1), dtype=torch.uint8, pin_memory=True)

    results = {}
    for nbytes in SIZES:
        x = torch.randn(nbytes // 4, device=device)
        shape = (x.shape[0] * world,)

        def ag_raw():
            out = x.new_empty(shape)
            all_gather_single(out, x)

        def ag_packed():
            send = torch.empty(nbytes + BLOCK, dtype=torch.uint8, device=device)
            send[:nbytes].copy_(x.view(torch.uint8))
            send[nbytes:].copy_(env_host[:BLOCK], non_blocking=True)
            both = torch.empty((world, nbytes + BLOCK), dtype=torch.uint8, device=device)
            all_gather_single(both, send)
            both[:, :nbytes].contiguous().view(torch.float32)

        def ag_serial():
            env_in.copy_(env_host[:BLOCK], non_blocking=True)
            all_gather_single(env_out, env_in)
            env_host[BLOCK:].copy_(env_out, non_blocking=True)
            torch.cuda.Event().record()
            ag_raw()

        def ar_maxmin():
            dist.all_reduce(x)
            dist.all_reduce(words, op=dist.ReduceOp.MAX)

        methods = {
            "ag_raw": ag_raw,
            "ag_typed": lambda: typed.all_gather_tensor(x, name="h"),
            "ag_eager": lambda: eager.all_gather_tensor(x, name="h"),
            "ag_packed": ag_packed,
            "ag_serial": ag_serial,
            "ar_raw": lambda: dist.all_reduce(x),
            "ar_typed": lambda: typed.all_reduce_tensor(x, "sum", name="g"),
            "ar_maxmin": ar_maxmin,
        }
        # The same numbers first: a benchmark of a wrong result is worthless.
        want = x.new_empty(shape)
        all_gather_single(want, x)
        assert torch.equal(typed.all_gather_tensor(x, name="h"), want)
        assert torch.equal(eager.all_gather_tensor(x, name="h"), want)
        iters = max(min(10, args.iters), min(args.iters, (256 << 20) // (nbytes * max(world, 1))))
        samples = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, fn in methods.items():
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                typed.synchronize()
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                torch.cuda.synchronize()
                typed.synchronize()
                eager.synchronize()
                samples[name].append((time.perf_counter() - t0) / iters * 1e6)
        medians = {name: statistics.median(v) for name, v in samples.items()}
        burst = RING - 4
        timed = ("ag_raw", "ag_typed", "ag_serial", "ar_raw", "ar_typed")
        hold = 3 * burst * max(medians[name] for name in timed) * 1e-6 + 0.005
        device_samples = {name: [] for name in timed}
        for _ in range(args.rounds):  # interleaved, like the wall-time rounds
            for name in timed:
                device_samples[name].append(_device_time(methods[name], burst, hold, typed))
        for name in timed:
            medians["dev_" + name] = statistics.median(device_samples[name])
        gathered = [None] * world
        dist.all_gather_object(gathered, medians)  # the benchmark's own bookkeeping, once
        results[nbytes] = {name: max(m[name] for m in gathered) for name in medians}

    if rank == 0:
        names = list(next(iter(results.values())))
        print(f"# typedcoll GPU tensor checks: {world} rank(s), {torch.cuda.get_device_name()}, "
              f"torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))},"
              f" python {platform.python_version()}")
        print(f"# {args.rounds} interleaved rounds; median of round means, us per call, "
              f"slowest rank; x = / raw of the same op")
        print(f"{'size':>7} " + " ".join(f"{n:>10}" for n in names)
              + f" {'ag x':>6} {'eager x':>7} {'ar x':>6} {'dev ag x':>8} {'dev ar x':>8}")
        for nbytes, row in results.items():
            print(f"{_label(nbytes):>7} " + " ".join(f"{row[n]:10.1f}" for n in names)
                  + f" {row['ag_typed'] / row['ag_raw']:6.3f}"
                  + f" {row['ag_eager'] / row['ag_raw']:7.3f}"
                  + f" {row['ar_typed'] / row['ar_raw']:6.3f}"
                  + f" {row['dev_ag_typed'] / row['dev_ag_raw']:8.3f}"
                  + f" {row['dev_ar_typed'] / row['dev_ar_raw']:8.3f}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"world": world, "us_per_call": results}, fh, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
