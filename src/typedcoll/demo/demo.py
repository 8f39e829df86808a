"""``typedcoll demo``: the executor model in raw, typed and symmetric modes, side by side.

Run as a plain command, it relaunches itself under ``mpiexec -n N`` with ``--worker DIR``; every
rank runs the three modes on one seeded fault plan and writes what it saw to DIR (``runner``);
the plain process then reads DIR back and prints the summary. Exit 0 when every mode behaved as
expected: raw fails (as the engine did), typed raises the same DesyncError on every rank, naming
the decisions that differ, and symmetric runs to the end with every message delivered exactly
once to every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..core.mismatch import compact_ranks
from .launch import relaunch
from .plan import LOOPS, FaultPlan

RULE = "-" * 78


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="typedcoll demo",
        description="Run a model of an attention-DP serving engine on N ranks with a seeded "
                    "fault plan, in three modes: raw (mpi4py pickle, as the engine was), typed "
                    "(TypedComm) and symmetric (SymmetricFlush).")
    p.add_argument("--ranks", type=int, default=4, help="MPI ranks to launch (default 4)")
    p.add_argument("--iterations", type=int, default=40, help="executor iterations (default 40)")
    p.add_argument("--seed", type=int, default=3, help="fault-plan seed (default 3)")
    p.add_argument("--loop", choices=LOOPS, default="overlap",
                   help="executor loop to model (default overlap)")
    p.add_argument("--disaggregated", action="store_true",
                   help="model disaggregated serving (KV-transfer vote and timeouts)")
    p.add_argument("--cost-rounds", type=int, default=3,
                   help="interleaved rounds of the control-plane cost measurement (0: skip)")
    p.add_argument("--modes", default="raw,typed,symmetric",
                   help="comma-separated modes to run (default all three; the soak runs "
                        "'symmetric' alone)")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds before the job is killed")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    return p


def _plan(args: argparse.Namespace) -> FaultPlan:
    return FaultPlan.random(args.seed, args.ranks, args.iterations, loop=args.loop,
                            disaggregated=args.disaggregated)


def _modes(args: argparse.Namespace) -> List[str]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in ("raw", "typed", "symmetric"):
            raise SystemExit(f"typedcoll demo: expected modes among raw, typed, symmetric, "
                             f"got {mode!r}")
    return modes


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        from mpi4py import MPI

        from .runner import worker
        args.ranks = MPI.COMM_WORLD.Get_size()
        modes = tuple(m for m in ("typed", "symmetric", "raw") if m in _modes(args))
        return worker(args.worker, _plan(args), modes=modes, cost_rounds=args.cost_rounds)
    if args.ranks < 2:
        print("typedcoll demo: expected --ranks of at least 2 (a desync needs two ranks)",
              file=sys.stderr)
        return 2
    _modes(args)  # refuse unknown modes before launching anything
    with tempfile.TemporaryDirectory(prefix="typedcoll-demo-") as results:
        log_path = os.path.join(results, "mpiexec.log")
        worker_argv = ["typedcoll", "demo", "--worker", results, "--iterations",
                       str(args.iterations), "--seed", str(args.seed), "--loop", args.loop,
                       "--cost-rounds", str(args.cost_rounds), "--modes", args.modes]
        if args.disaggregated:
            worker_argv.append("--disaggregated")
        print(f"typedcoll demo: launching {args.ranks} ranks under mpiexec ...", flush=True)
        with open(log_path, "w") as log:
            rc = relaunch(worker_argv, args.ranks, args.timeout, stdout=log, stderr=log)
        records = read_records(results)
        ok = summarize(args, _plan(args), records, rc)
        if not ok:
            with open(log_path) as log:
                tail = log.read()[-3000:]
            print(f"\nmpiexec exited {rc}; its output:\n{tail}")
    return 0 if ok else 1


def read_records(results: str) -> Dict[int, List[Dict[str, Any]]]:
    """``{rank: [record, ...]}`` from a results directory (what ``runner`` wrote)."""
    out: Dict[int, List[Dict[str, Any]]] = {}
    for name in sorted(os.listdir(results)):
        if name.startswith("rank") and name.endswith(".jsonl"):
            with open(os.path.join(results, name)) as fh:
                out[int(name[4:-6])] = [json.loads(line) for line in fh if line.strip()]
    return out


def final_record(records: List[Dict[str, Any]], mode: str) -> Optional[Dict[str, Any]]:
    """A rank's outcome in ``mode``: its own record, else its watchdog's "hung" line."""
    mine = [r for r in records if r.get("mode") == mode]
    done = [r for r in mine if r.get("status") != "hung"]
    return (done or mine or [None])[-1]  # type: ignore[list-item]  # [None] typed from mine


def _outcomes(records: Dict[int, List[Dict[str, Any]]], mode: str,
              ranks: int) -> Dict[int, Optional[Dict[str, Any]]]:
    return {r: final_record(records.get(r, []), mode) for r in range(ranks)}


def _group(outcomes: Dict[int, Optional[Dict[str, Any]]],
           key: Callable[[Optional[Dict[str, Any]]], Tuple[str, str]]) -> Dict[Any, List[int]]:
    groups: Dict[Any, List[int]] = {}
    for rank, rec in outcomes.items():
        groups.setdefault(key(rec), []).append(rank)
    return groups


def summarize(args: argparse.Namespace, plan: FaultPlan, records: Dict[int, List[Dict[str, Any]]],
              rc: int) -> bool:
    """Print the side-by-side summary; True when every mode behaved as expected."""
    n = args.ranks
    print(f"\nAttention-DP executor model, {plan.loop} loop"
          f"{', disaggregated serving' if plan.disaggregated else ''}: {n} ranks, "
          f"{plan.iterations} iterations, fault-plan seed {plan.seed}")
    print(f"Fault plan: {plan.describe()}.")
    print("The same executor code runs three times on this plan; only its collectives differ.")

    modes = _modes(args)
    raw_ok = typed_ok = sym_ok = True
    if "raw" in modes:
        raw_ok = _print_raw(n, records)
    if "typed" in modes:
        typed_ok = _print_typed(n, records)
    if "symmetric" in modes:
        sym_ok = _print_symmetric(n, plan, records)
    _print_cost(args, n, records)
    ok = raw_ok and typed_ok and sym_ok
    print(f"\n{RULE}\nresult: " + ("every mode behaved as expected" if ok else
                                    "UNEXPECTED behaviour (see above)"))
    return ok


def _print_raw(n: int, records: Dict[int, List[Dict[str, Any]]]) -> bool:
    raw = _outcomes(records, "raw", n)
    crashed = {r: o for r, o in raw.items() if o is not None and o["status"] == "crashed"}
    raw_ok = bool(crashed)
    print(f"\n{RULE}\n1. raw: mpi4py pickle collectives, matched by position "
          f"(the engine before the fix)")
    for (status, text), ranks in _group(raw, _raw_key).items():
        label = compact_ranks(ranks) + ":"
        print(f"   {label:<13}{text}")
    if raw_ok:
        print("   -> a positional TypeError far from its cause: nothing names the gated "
              "allgather that ran on some ranks only.")
    else:
        print("   -> unexpected: the raw run did not fail (a plan without divergence? try "
              "another --seed)")
    return raw_ok


def _print_typed(n: int, records: Dict[int, List[Dict[str, Any]]]) -> bool:
    typed = _outcomes(records, "typed", n)
    texts = {o["error"] for o in typed.values() if o is not None and o["status"] == "desync"}
    typed_ok = all(o is not None and o["status"] == "desync" and o["decisions"]
                   for o in typed.values()) and len(texts) == 1
    print(f"\n{RULE}\n2. typed: the same code over TypedComm (step clock set per iteration, "
          f"gates noted)")
    if typed_ok:
        first = typed[0]
        assert first is not None
        print(f"   every rank raised, in the same collective (#{first['seq']}):")
        for line in first["error"].splitlines():
            print(f"     {line}")
        print("   -> the first divergent collective, both call sites, the ranks on each side, and "
              "the\n      rank-local decisions that differ between them.")
    else:
        for (status, text), ranks in _group(typed, _raw_key).items():
            print(f"   {compact_ranks(ranks) + ':':<13}{text}")
        print("   -> unexpected: expected one DesyncError on every rank")
    return typed_ok


def _print_symmetric(n: int, plan: FaultPlan, records: Dict[int, List[Dict[str, Any]]]) -> bool:
    sym = _outcomes(records, "symmetric", n)
    done = [o for o in sym.values() if o is not None and o["status"] == "completed"]
    sym_ok = len(done) == n and len({(o["flushes"], o["posted"]) for o in done}) == 1
    print(f"\n{RULE}\n3. symmetric: gated code posts to a SymmetricFlush, one flush per "
          f"{'micro-batch' if plan.loop == 'pipeline' else 'iteration'}")
    if sym_ok:
        o = done[0]
        per = ", ".join(f"{v} {k}" for k, v in o["posted_by_channel"].items())
        print(f"   ran all {o['iterations']} iterations on every rank: {o['flushes']} flushes, "
              f"{o['posted']} messages posted ({per}),")
        print(f"   {o['deliveries']} deliveries = {o['posted']} x {n} ranks: every message "
              f"reached every rank exactly once (checked).")
    else:
        for (status, text), ranks in _group(sym, _raw_key).items():
            print(f"   {compact_ranks(ranks) + ':':<13}{text}")
        print("   -> unexpected: expected every rank to complete with messages conserved")
    return sym_ok


def _print_cost(args: argparse.Namespace, n: int, records: Dict[int, List[Dict[str, Any]]]) -> None:
    cost = [rec for recs in records.values() for rec in recs if rec.get("mode") == "cost"]
    if cost:
        c = cost[0]
        print(f"\n{RULE}\nControl plane per iteration (router states + timeouts + iteration "
              f"stats), {n} ranks, median of {args.cost_rounds} rounds, slowest rank:")
        print(f"   one collective per channel, pickle (the engine's fix) : "
              f"{c['per_channel_collectives']} collectives  {c['per_channel_pickle_us']:8.1f} us")
        print(f"   one collective per channel, typed                     : "
              f"{c['per_channel_collectives']} collectives  {c['per_channel_us']:8.1f} us")
        print(f"   coalesced SymmetricFlush                              : "
              f"{c['flush_collectives']} collective   {c['flush_us']:8.1f} us   "
              f"({c['ratio_pickle']:.2f}x the engine's fix, {c['ratio']:.2f}x typed per channel)")
        if n > (os.cpu_count() or 1):
            print(f"   ({n} ranks on {os.cpu_count()} cores: oversubscribed, absolute times "
                  f"are inflated)")


def _raw_key(rec: Optional[Dict[str, Any]]) -> Tuple[str, str]:
    if rec is None:
        return ("missing", "no record (killed before it could report)")
    status = rec["status"]
    if status == "crashed":
        return (status, f"{rec['error']}\n{'':16}(iteration {rec['iteration']}, in the "
                        f"{rec.get('where', '?')})")
    if status == "hung":
        return (status, f"blocked in the {rec['where']} (iteration {rec['iteration']}) "
                        f"waiting for peers that had crashed; the job was aborted")
    if status == "completed":
        return (status, f"completed {rec['iterations']} iterations")
    return (status, rec.get("error", status).splitlines()[0])
