"""gloo overhead: a checked typed allgather of a 3-field Struct against plain torch.distributed.

Run: ``python bench/torch_gloo.py [--ranks 2] [--rounds R] [--iters I] [--json F]`` (it starts
its own processes on a free localhost port; no MPI).

Methods, interleaved round by round in one process group, on the ``RankState`` record:
  raw       all_gather of the same 64 bytes as a uint8 CPU tensor (the gloo floor)
  typed     TypedComm.from_torch().allgather(record) (envelope + check + msgspec decode)
  object    dist.all_gather_object of the record as a dict (pickle)
  detail    raw again, in a second run whose processes start with
            TORCH_DISTRIBUTED_DEBUG=DETAIL (a process-level setting: its wrapper checks every
            collective with extra gloo collectives), reported in the same table
and on an engine's tensor vote (``int64 vote``: a one-element int64 CPU tensor, all-reduced
with MAX in place):
  raw       dist.all_reduce(t, op=MAX)
  drop-in   typedcoll.compat.torch().all_reduce(t, op=MAX) (the envelope exchange, then the
            same gloo all-reduce on the private group: two gloo round trips)
Each figure is the median over rounds of the slowest rank's mean per call. Goals: typed <=
1.2x raw; detail >= 3x typed (the vote's ratio is reported, with no goal). typed and drop-in
are reported unavailable, with why, where ``TypedComm.from_torch`` does not work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from harness import records, report, timing
from typedcoll.transports.gloo import free_port

CASE = "RankState"
VOTE = "int64 vote"
METHODS = ("raw", "typed", "object", "detail", "drop-in")
RATIOS = [report.Ratio(CASE, "typed", "raw", ("<=", 1.2)),
          report.Ratio(CASE, "detail", "typed", (">=", 3.0)),
          report.Ratio(CASE, "object", "typed"),
          report.Ratio(VOTE, "drop-in", "raw")]


def child(variant: str, rank: int, size: int, port: int, rounds: int, iters: int,
          out: str) -> None:
    import torch
    import torch.distributed as dist

    import typedcoll as tc

    # torch 2.13 names it all_gather_single (the old name warns); torch 2.11 has only the old.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    send = torch.zeros(64, dtype=torch.uint8)
    recv = torch.empty(64 * size, dtype=torch.uint8)
    record = records.rank_state(rank)
    as_dict = {"rank": rank, "num_active_requests": 3 + rank, "num_active_tokens": 17 * rank}
    unavailable: Dict[str, str] = {}
    # "case|method" -> one call
    methods: Dict[str, Callable[[], Any]] = {}
    if variant == "detail":
        methods[f"{CASE}|detail"] = lambda: gather(recv, send)
    else:
        gathered: List[Any] = [None] * size

        def pickled() -> None:
            dist.all_gather_object(gathered, as_dict)

        vote = torch.tensor([rank], dtype=torch.int64)
        methods = {f"{CASE}|raw": lambda: gather(recv, send), f"{CASE}|object": pickled,
                   f"{VOTE}|raw": lambda: dist.all_reduce(vote, op=dist.ReduceOp.MAX)}
        why_not = None
        try:
            typed = tc.TypedComm.from_torch()
            got = typed.allgather(record)
            votes = tc.compat.torch()
            check = torch.tensor([rank], dtype=torch.int64)
            votes.all_reduce(check, op=dist.ReduceOp.MAX)
            if check.item() != size - 1:
                why_not = f"the drop-in's all_reduce returned {check.item()}"
        except Exception as exc:  # the torch transport is being adapted: say so, never fake
            why_not = f"TypedComm.from_torch failed: {type(exc).__name__}: {str(exc)[:160]}"
        answers: List[Any] = [None] * size
        dist.all_gather_object(answers, why_not)  # every rank leaves typed out alike
        if any(answers):
            unavailable["typed"] = unavailable["drop-in"] = next(a for a in answers if a)
        else:
            pickled()
            if got != [records.RankState(**d) for d in gathered]:
                raise SystemExit(f"typed allgather returned {got!r}")
            methods[f"{CASE}|typed"] = lambda: typed.allgather(record)
            methods[f"{VOTE}|drop-in"] = lambda: votes.all_reduce(vote, op=dist.ReduceOp.MAX)
    samples: Dict[str, List[float]] = {name: [] for name in methods}
    for r in range(rounds):
        names = list(methods)
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = methods[name]
            for _ in range(max(1, iters // 10)):
                fn()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[name].append((time.perf_counter() - t0) / iters)
    Path(out).write_text(json.dumps({"samples": samples, "unavailable": unavailable,
                                     "torch": torch.__version__}))
    sys.stdout.flush()
    os._exit(0)


def launch(variant: str, args: argparse.Namespace, workdir: str) -> List[Dict[str, Any]]:
    port = free_port()
    # gloo binds to the interface the hostname resolves to; in containers that is often not
    # routable between local processes, loopback always is.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.pop("TORCH_DISTRIBUTED_DEBUG", None)
    if variant == "detail":
        env["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    outs = [os.path.join(workdir, f"{variant}.{r}.json") for r in range(args.ranks)]
    procs = [subprocess.Popen([sys.executable, __file__, "--child", variant, "--rank", str(r),
                               "--ranks", str(args.ranks), "--port", str(port), "--rounds",
                               str(args.rounds), "--iters", str(args.iters), "--out", outs[r]],
                              env=env) for r in range(args.ranks)]
    for proc in procs:
        if proc.wait(timeout=600) != 0:
            raise SystemExit(f"{variant} rank failed with {proc.returncode}")
    return [json.loads(Path(o).read_text()) for o in outs]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing.add_arguments(parser, rounds=7, iters=200)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.rank, args.ranks, args.port, args.rounds, args.iters, args.out)
    settings = timing.Settings(args)
    with tempfile.TemporaryDirectory() as workdir:
        per_rank = launch("plain", args, workdir)
        detail = launch("detail", args, workdir)
    results = []
    for case in (CASE, VOTE):
        for name in METHODS:
            key = f"{case}|{name}"
            source = detail if name == "detail" else per_rank
            if key not in source[0]["samples"]:
                continue
            # A round's figure is the slowest rank's mean per call, as everywhere.
            rounds_us = [max(rank["samples"][key][r] for rank in source) * 1e6
                         for r in range(settings.rounds)]
            results.append({"case": case, "method": name, "iters": args.iters,
                            "warmup": max(1, args.iters // 10), "rounds_us": rounds_us,
                            **timing.summarize(rounds_us)})
    doc = report.document("torch_gloo", "typedcoll on torch.distributed gloo", args.ranks,
                          settings.as_dict(), results, RATIOS,
                          report.versions(torch_version=per_rank[0]["torch"]))
    doc["unavailable"] = per_rank[0]["unavailable"]
    doc["notes"].append("detail: a second set of processes started with "
                        "TORCH_DISTRIBUTED_DEBUG=DETAIL, same settings")
    print(report.table(doc, METHODS))
    report.write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
