"""``typedcoll bench``: what a checked allgather costs, against the raw floor and every peer.

    typedcoll bench [--ranks N] [--quick] [--rounds R] [--budget S] [--json F] [--png F]
    mpiexec -n N python bench/peers.py [same options]        (already launched: runs in place)
    typedcoll bench --scale [--quick] [--json F] [--png F]    (no MPI: N = 8 ... 16,384 simulated)
    typedcoll bench --render F.json [--png F.png]             (table and plot of a saved result)

Outside an MPI launch the command starts itself under ``mpiexec -n N`` (bounded by ``--timeout``).

How a run measures (issue 7), step by step:
  1. Set-up. Every method (``_bench_methods.METHODS``) is built for every payload
     (``_bench_payloads.PAYLOADS``), each on its own communicator, and called once; its result is
     checked against what every rank built. A wrong result stops the run: no number is given
     for a method that does not do the job. Methods that cannot run here are skipped, with why.
  2. Calibration. Per cell (method × payload): two untimed calls, then a few timed ones; the
     slowest rank's time per call sets the cell's iteration count (``--budget`` seconds of calls
     per round, within [min, max] iterations) and its warm-up, identically on every rank, since
     a count that differed between ranks would deadlock the collectives.
  3. Rounds. In each of ``--rounds`` rounds every cell runs: warm-up calls, a barrier, then its
     iterations timed as one batch (no timer inside the loop: at ~3 µs a call a per-call timer
     would be a visible part of the floor). The method order rotates from round to round, so slow
     drifts of the machine hit every method alike.
  4. Summary. Per round the slowest rank's mean per call is the round's figure (a collective is
     as slow as its slowest member); the table shows the median over rounds with p10–p90, and
     ratios to the MPI ``Allgather`` of the same bytes (and, for gloo rows, to gloo's own).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _bench_report as report
from ._bench_methods import METHODS, Method, Setup, init_torch
from ._bench_payloads import PAYLOADS, SOURCE, Payload

TITLE = "typedcoll bench: allgather latency against the raw floor and its peers"
_LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
_CHILD_ENV = "TYPEDCOLL_BENCH_CHILD"


class Settings:
    """Loop counts: the full defaults take ~1-2 minutes at 2 ranks on 2 cores."""

    def __init__(self, args: argparse.Namespace) -> None:
        quick = args.quick
        self.quick = quick
        self.rounds = args.rounds or (2 if quick else 12)
        self.budget = args.budget or (0.004 if quick else 0.08)
        self.min_iters = 2 if quick else 3
        self.max_iters = 40 if quick else 20_000
        self.calibrate = 1 if quick else 3

    def as_dict(self) -> Dict[str, Any]:
        return {"rounds": self.rounds, "budget_s": self.budget, "min_iters": self.min_iters,
                "max_iters": self.max_iters, "calibration_calls": self.calibrate,
                "quick": self.quick}


class Cell:
    """One method on one payload: its call, loop counts and per-round seconds per call."""

    def __init__(self, method: Method, payload: Payload, call: Any) -> None:
        self.method = method
        self.payload = payload
        self.call = call
        self.iters = 0
        self.warmup = 0
        self.estimate = 0.0
        self.samples: List[float] = []

    @property
    def label(self) -> str:
        return f"{self.method.key} {self.payload.name}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="typedcoll bench",
        description="Allgather latency of typedcoll against the raw floor and pickle/gloo peers.")
    parser.add_argument("--ranks", type=int,
                        help="ranks to launch under mpiexec (default 2; ignored when launched)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (a few iterations)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 12; quick 2)")
    parser.add_argument("--budget", type=float,
                        help="seconds of timed calls per cell and round (default 0.08)")
    parser.add_argument("--json", help="result file (default typedcoll-bench-<N>ranks.json; "
                                       "scale: typedcoll-bench-scale.json)")
    parser.add_argument("--png", help="plot file (default: the JSON's name with .png; '' for none)")
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch rows")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds before a self-launched run is killed (default 900)")
    parser.add_argument("--scale", action="store_true",
                        help="the no-MPI scale simulation instead (N = 8 ... 16,384)")
    parser.add_argument("--max-n", type=int, default=16384, help="scale: largest N simulated")
    parser.add_argument("--render", metavar="FILE", help="print the table of a saved result "
                                                         "and write its plot (--png)")
    parser.add_argument("--markdown", action="store_true",
                        help="with --render: the median table as Markdown instead")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.render:
        return render(args.render, args.png, args.markdown)
    if args.scale:
        from ._bench_scale import run_scale
        return run_scale(args)
    if not _launched():
        return self_launch(list(sys.argv[1:] if argv is None else argv), args.ranks or 2,
                           args.timeout)
    return run_peers(args)


# --- launching ---------------------------------------------------------------------------------
def _launched() -> bool:
    """Whether this process is a rank of an MPI launch (ours, or one the user started)."""
    return any(name in os.environ for name in _LAUNCHER_ENV + (_CHILD_ENV,))


def self_launch(argv: List[str], ranks: int, timeout: float) -> int:
    """Run this command again under ``mpiexec -n ranks``; every rank is killed after ``timeout``."""
    from ._launch import relaunch

    env = {_CHILD_ENV: "1"}
    if sys.stderr.isatty():
        env["TYPEDCOLL_BENCH_TTY"] = "1"  # the ranks' stderr is a pipe: tell them to draw a bar
    try:
        rc = relaunch(["typedcoll", "bench", *argv], ranks, timeout, env=env)
    except FileNotFoundError as exc:
        print(f"typedcoll bench: {exc}", file=sys.stderr)
        return 2
    if rc == -9:
        print(f"typedcoll bench: killed after {timeout:g} s (--timeout)", file=sys.stderr)
        return 124
    return rc


# --- the peer benchmark ------------------------------------------------------------------------
def run_peers(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    settings = Settings(args)
    load_start = os.getloadavg()[0]
    notes: List[str] = []
    if args.ranks and args.ranks != size:
        notes.append(f"--ranks {args.ranks} ignored: launched with {size} ranks")
    if args.no_torch:
        from ._bench_methods import TorchState
        torch_state = TorchState()
        torch_state.unavailable = "left out (--no-torch)"
    else:
        torch_state = init_torch(world)
    setup = Setup(world, torch_state)
    skipped = {m.key: setup.skipped(m) for m in METHODS}

    cells: List[Cell] = []
    failures: List[str] = []
    for payload in PAYLOADS:
        for method in METHODS:
            if skipped[method.key]:
                continue
            problem = error = None
            try:
                call, check = setup.build(method, payload)
                problem = check(call())
            except Exception as exc:  # a backend still being written: skip it, say why
                error = f"{payload.name}: {type(exc).__name__}: {exc}"
            outcomes = world.allgather((problem, error))
            errors = [e for _, e in outcomes if e]
            if errors:
                skipped[method.key] = "raised on set-up: " + errors[0][:200]
                cells = [c for c in cells if c.method is not method]
                continue
            problems = [f"{method.key} {payload.name} on rank {r}: {p}"
                        for r, (p, _) in enumerate(outcomes) if p]
            failures += problems
            cells.append(Cell(method, payload, call))
    if failures:
        if rank == 0:
            print("typedcoll bench: wrong results, nothing timed:\n  " + "\n  ".join(failures),
                  file=sys.stderr)
        return 1

    progress = report.Progress(len(cells) * (settings.rounds + 1),
                               enabled=rank == 0 and not args.no_progress)
    for cell in cells:
        calibrate(cell, settings, setup)
        progress.advance("calibrating " + cell.label)
    if rank == 0 and not args.no_progress:
        rest = sum(settings.rounds * (c.iters + c.warmup) * c.estimate for c in cells)
        print(f"bench: {len(cells)} cells x {settings.rounds} rounds, about {rest:.0f} s to go",
              file=sys.stderr, flush=True)
    for r in range(settings.rounds):
        for payload in PAYLOADS:
            row = [c for c in cells if c.payload is payload]
            shift = r % len(row)
            for cell in row[shift:] + row[:shift]:
                cell.samples.append(timed_batch(cell, setup))
                progress.advance(f"round {r + 1}/{settings.rounds} {cell.label}")

    all_samples = world.gather([c.samples for c in cells], root=0)
    if all_samples is None:  # not the root
        return 0
    doc = build_doc(world, MPI, torch_state, settings, cells, all_samples, skipped, notes)
    # Other work on the machine shows in the spread; the load average says how much there was.
    doc["machine"]["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    json_path = args.json or f"typedcoll-bench-{size}ranks.json"
    report.write_json(doc, json_path)
    print(report.peers_table(doc))
    print(f"\nwrote {json_path}")
    png = os.path.splitext(json_path)[0] + ".png" if args.png is None else args.png
    if png:
        why_not = report.plot_peers(doc, png)
        print(f"wrote {png}" if why_not is None else f"no plot: {why_not}")
    return 0


def calibrate(cell: Cell, settings: Settings, setup: Setup) -> None:
    """Agree on the cell's iteration and warm-up counts from the slowest rank's time per call."""
    call = cell.call
    call()
    call()
    setup.barrier()
    t0 = time.perf_counter()
    for _ in range(settings.calibrate):
        call()
    per_call = (time.perf_counter() - t0) / settings.calibrate
    per_call = setup.raw_comm.allreduce(per_call, op=setup.mpi.MAX)
    cell.estimate = per_call
    cell.iters = int(min(settings.max_iters, max(settings.min_iters,
                                                  settings.budget / max(per_call, 1e-7))))
    cell.warmup = max(1, math.ceil(cell.iters / 10))


def timed_batch(cell: Cell, setup: Setup) -> float:
    call = cell.call
    for _ in range(cell.warmup):
        call()
    setup.barrier()
    t0 = time.perf_counter()
    for _ in range(cell.iters):
        call()
    return (time.perf_counter() - t0) / cell.iters


def build_doc(world: Any, mpi: Any, torch_state: Any, settings: Settings, cells: List[Cell],
              all_samples: List[List[List[float]]], skipped: Dict[str, Optional[str]],
              notes: List[str]) -> Dict[str, Any]:
    """The JSON document: versions, machine, settings, and one summary per cell."""
    results: List[Dict[str, Any]] = []
    medians: Dict[Tuple[str, str], float] = {}
    for i, cell in enumerate(cells):
        # A round's figure is its slowest rank's: the collective finishes when they all have.
        rounds_us = [max(per_rank[i][r] for per_rank in all_samples) * 1e6
                     for r in range(len(cell.samples))]
        summary = report.summarize(rounds_us)
        medians[(cell.method.key, cell.payload.name)] = summary["median_us"]
        results.append({"method": cell.method.key, "payload": cell.payload.name,
                        "iters": cell.iters, "warmup": cell.warmup, "rounds_us": rounds_us,
                        **summary})
    for r, cell in zip(results, cells):
        median = medians[(cell.method.key, cell.payload.name)]
        r["x_floor"] = median / medians[("mpi_raw", cell.payload.name)]
        gloo = medians.get(("gloo_raw", cell.payload.name))
        r["x_gloo_floor"] = median / gloo if gloo and cell.method.backend == "torch" else None
    if torch_state.detail_group is not None and not torch_state.detail_note:
        notes.append("DETAIL row: a second gloo group created in-process under "
                     "TORCH_DISTRIBUTED_DEBUG=DETAIL (its backend is torch's ProcessGroupWrapper, "
                     "and a deliberate shape mismatch on such a group was caught); the other "
                     "torch rows use the plain default group")
    if torch_state.dist is not None and hasattr(torch_state.dist, "all_gather_single"):
        notes.append("gloo rows call all_gather_single, which all_gather_into_tensor aliases "
                     "(deprecated) in this torch")
    return {
        "kind": "typedcoll-bench-peers", "schema_version": report.SCHEMA_VERSION,
        "title": TITLE, "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "ranks": world.size, "machine": report.machine_info(),
        "versions": report.library_versions(mpi, None if torch_state.dist is None
                                             else torch_state.version),
        "settings": settings.as_dict(), "notes": notes,
        "detail_check": torch_state.detail_check,
        "payload_structs": SOURCE,
        "payloads": [{"name": p.name, "bytes": max(p.raw_size(r) for r in range(world.size)),
                      "pickle_bytes": _pickled_size(p), "fields": _field_count(p)}
                     for p in PAYLOADS],
        "methods": [{"key": m.key, "label": m.label, "backend": m.backend,
                     "is_floor": m.is_floor, "skipped": skipped[m.key]} for m in METHODS],
        "results": results,
    }


def _field_count(payload: Payload) -> Optional[int]:
    value = payload.typed(0)
    return len(value.__struct_fields__) if hasattr(value, "__struct_fields__") else None


def _pickled_size(payload: Payload) -> int:
    import pickle
    return len(pickle.dumps(payload.native(0), protocol=pickle.HIGHEST_PROTOCOL))


# --- rendering a saved result ------------------------------------------------------------------
def render(path: str, png: Optional[str], markdown: bool = False) -> int:
    with open(path) as fh:
        doc = json.load(fh)
    if markdown:
        if doc.get("kind") == "typedcoll-bench-scale":
            print("expected a peers result for --markdown, got a scale result", file=sys.stderr)
            return 2
        print(report.peers_markdown(doc))
        return 0
    out = os.path.splitext(path)[0] + ".png" if png is None else png
    if doc.get("kind") == "typedcoll-bench-scale":
        from ._bench_scale import plot_scale, scale_table
        print(scale_table(doc))
        why_not = plot_scale(doc, out) if out else None
    else:
        print(report.peers_table(doc))
        why_not = report.plot_peers(doc, out) if out else None
    if out:
        print(f"wrote {out}" if why_not is None else f"no plot: {why_not}")
    return 0
