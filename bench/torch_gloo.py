"""gloo overhead: a checked typed allgather of a 3-field Struct against plain torch.distributed.

Run: ``python bench/torch_gloo.py [--ranks 2] [--rounds 7] [--iters 200]`` (it starts its own
processes on a free localhost port).

Methods, interleaved round by round inside one process group; the table shows the median over
rounds of each round's mean per call, slowest rank:
  raw       all_gather_single of the same 64 bytes as a uint8 CPU tensor (the floor)
  typed     TypedComm.from_torch().allgather(RankState) (envelope + check + msgspec decode)
  object    dist.all_gather_object of the record as a dict (pickle)
  detail    raw again, in a second process group started with TORCH_DISTRIBUTED_DEBUG=DETAIL
            (a process-level setting: its wrapper checks every collective with extra gloo
            collectives), run after the first and reported in the same table
Targets: typed <= 1.2 x raw; detail >= 3 x typed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from _record import RankState  # bench/ is on sys.path when a script runs


def child(variant: str, rank: int, size: int, port: int, rounds: int, iters: int,
          out: str) -> None:
    import torch
    import torch.distributed as dist

    import typedcoll as tc
    from typedcoll._torch import all_gather_single

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    send = torch.zeros(64, dtype=torch.uint8)
    recv = torch.empty(64 * size, dtype=torch.uint8)
    record = RankState(rank, 3 + rank, 17 * rank)
    as_dict = {"rank": rank, "num_active_requests": 3 + rank, "num_active_tokens": 17 * rank}
    if variant == "detail":
        methods = {"detail": lambda: all_gather_single(recv, send)}
    else:
        typed = tc.TypedComm.from_torch()
        gathered = [None] * size

        def pickled():
            dist.all_gather_object(gathered, as_dict)

        methods = {"raw": lambda: all_gather_single(recv, send),
                   "typed": lambda: typed.allgather(record),
                   "object": pickled}
        pickled()
        assert typed.allgather(record) == [RankState(**d) for d in gathered]
    samples = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            for _ in range(max(5, iters // 10)):
                fn()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[name].append((time.perf_counter() - t0) / iters * 1e6)
    Path(out).write_text(json.dumps({n: statistics.median(v) for n, v in samples.items()}))
    sys.stdout.flush()
    os._exit(0)


def launch(variant: str, size: int, args: argparse.Namespace, workdir: str) -> dict:
    from typedcoll._torch import free_port
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TORCH_DISTRIBUTED_DEBUG", None)
    if variant == "detail":
        env["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    outs = [os.path.join(workdir, f"{variant}.{r}.json") for r in range(size)]
    procs = [subprocess.Popen([sys.executable, __file__, "--child", variant, "--rank", str(r),
                               "--ranks", str(size), "--port", str(port), "--rounds",
                               str(args.rounds), "--iters", str(args.iters), "--out", outs[r]],
                              env=env) for r in range(size)]
    for proc in procs:
        if proc.wait(timeout=600) != 0:
            raise SystemExit(f"{variant} rank failed with {proc.returncode}")
    per_rank = [json.loads(Path(o).read_text()) for o in outs]
    return {name: max(r[name] for r in per_rank) for name in per_rank[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.rank, args.ranks, args.port, args.rounds, args.iters, args.out)
    import torch
    with tempfile.TemporaryDirectory() as workdir:
        figures = launch("plain", args.ranks, args, workdir)
        figures.update(launch("detail", args.ranks, args, workdir))
    raw = figures["raw"]
    print(f"# typedcoll on torch.distributed gloo: {args.ranks} ranks, torch {torch.__version__},"
          f" msgspec {msgspec.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} cores")
    print(f"# {args.rounds} interleaved rounds x {args.iters} calls; median of round means, "
          f"slowest rank (detail: a second process group, same settings)")
    print(f"{'method':<8} {'us/call':>9} {'x raw':>7}")
    for name, us in figures.items():
        print(f"{name:<8} {us:9.1f} {us / raw:7.2f}")
    typed_vs_raw = figures["typed"] / raw
    detail_vs_typed = figures["detail"] / figures["typed"]
    print(f"typed / raw     = {typed_vs_raw:.2f}  (target <= 1.2)  "
          f"{'OK' if typed_vs_raw <= 1.2 else 'MISSED'}")
    print(f"detail / typed  = {detail_vs_typed:.2f}  (target >= 3)    "
          f"{'OK' if detail_vs_typed >= 3 else 'MISSED'}")
    print(f"object / typed  = {figures['object'] / figures['typed']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ranks": args.ranks, "us_per_call": figures},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
