"""Allgather latency of typedcoll against the raw floors and every peer, 8 B to 1 MiB.

Run: ``mpiexec -n 2 python bench/peers.py [--rounds R] [--iters I] [--json F] [--png F]``
(Open MPI: ``mpirun --oversubscribe --bind-to core -n N ...``); ``--payloads RankState "1 MiB"``
for a subset, ``--no-torch`` without the gloo rows, ``--render F.json [--png F.png]`` to
reprint and draw a saved result (no MPI).

Payloads (``harness/records.py``): the 3-field ``RankState``, the executor's 26-field
``IterStats``, a list of 2,048 ints, and float64 arrays of 8 B to 1 MiB. Methods
(``harness/peers.py``): the MPI floor (``comm.Allgather`` of the same bytes), mpi4py pickle,
``pkl5``, typedcoll on MPI; the gloo floor, gloo under ``TORCH_DISTRIBUTED_DEBUG=DETAIL``,
torch ``all_gather_object``, typedcoll on gloo. Goals: typed on MPI <= 1.5x the floor for
``RankState`` and <= 1.25x at >= 64 KiB; ahead of pickle (<= 1.1x at 64 KiB, <= 1.0x
elsewhere); typed on gloo <= 1.2x the gloo floor at every size.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from typing import Any, Dict, List, Optional, Sequence


from harness import plots, records, report, timing
from harness.peers import METHODS


def ratio_specs(names: List[str]) -> List[report.Ratio]:
    specs = []
    for name in names:
        floor_goal = {"RankState": 1.5, "64 KiB": 1.25, "1 MiB": 1.25}.get(name)
        specs += [
            report.Ratio(name, "typed_mpi", "mpi_raw",
                         None if floor_goal is None else ("<=", floor_goal)),
            report.Ratio(name, "typed_mpi", "mpi_pickle", ("<=", 1.1 if name == "64 KiB" else 1.0)),
            report.Ratio(name, "typed_gloo", "gloo_raw", ("<=", 1.2)),
            report.Ratio(name, "gloo_detail", "gloo_raw"),
        ]
    return specs


def payload_info(payload: records.Payload) -> Dict[str, Any]:
    value = payload.typed(0)
    import typedcoll.codecs as codecs
    typed_bytes = len(codecs.encode_array(value)) if hasattr(value, "dtype") \
        else len(codecs.ENCODER.encode(value))
    return {"name": payload.name, "floor_bytes": len(payload.floor(0)), "typed_bytes": typed_bytes,
            "pickle_bytes": len(pickle.dumps(payload.native(0), protocol=pickle.HIGHEST_PROTOCOL))}


def render(path: str, png: str) -> int:
    with open(path) as fh:
        doc = json.load(fh)
    print(report.table(doc, [m["key"] for m in doc["methods"]], "payload"))
    if png:
        why_not = plots.peers(doc, png)
        print(f"wrote {png}" if why_not is None else f"no plot: {why_not}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing.add_arguments(parser, rounds=7, iters=2000, budget=0.04)
    parser.add_argument("--payloads", nargs="+", default=[p.name for p in records.PAYLOADS],
                        help="a subset of the payloads, by name (default: all)")
    parser.add_argument("--no-torch", action="store_true", help="leave out the gloo rows")
    parser.add_argument("--png", default="", help="also draw the latency plot here (rank 0)")
    parser.add_argument("--render", metavar="JSON", help="reprint (and --png draw) a saved result")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render, args.png)
    settings = timing.Settings(args)
    names = args.payloads
    unknown = [n for n in names if n not in records.BY_NAME]
    if unknown:
        raise SystemExit(f"expected payloads among {list(records.BY_NAME)}, got {unknown}")

    from mpi4py import MPI

    import typedcoll
    from harness import peers

    world = MPI.COMM_WORLD
    control = world.Dup()
    typed_probe = typedcoll.TypedComm(world)  # which fast path the typed rows run
    torch_state = peers.init_torch(world, wanted=not args.no_torch)
    builder = peers.Builder(world, torch_state)
    unavailable: Dict[str, str] = dict(torch_state.unavailable)
    cells: List[timing.Cell] = []
    problems: List[str] = []
    for name in names:
        payload = records.BY_NAME[name]
        for method in METHODS:
            if method.key in unavailable:
                continue
            error = wrong = None
            try:
                call, check = builder.build(method.key, payload)
                wrong = check(call())
            except Exception as exc:  # a backend still being written: leave it out, say why
                error = f"{name}: {type(exc).__name__}: {str(exc)[:160]}"
            errors = [e for e in control.allgather(error) if e]
            if errors:
                unavailable[method.key] = "failed on set-up: " + errors[0]
                cells = [c for c in cells if c.method != method.key]
                continue
            if wrong:
                problems.append(f"{method.key} {name}: {wrong}")
            cells.append(timing.Cell(name, method.key, call))
    report.stop_on_wrong_results(control, problems)

    results = timing.measure(control, cells, settings)
    if results is None:
        return 0
    doc = report.document(
        "peers", "typedcoll allgather against its floors and peers", world.size,
        settings.as_dict(), results, ratio_specs(names),
        report.versions(typed_probe, torch_state.version),
        payloads=[payload_info(records.BY_NAME[n]) for n in names],
        methods=[{"key": m.key, "label": m.label, "backend": m.backend,
                  "is_floor": m.is_floor} for m in METHODS],
        detail_check=torch_state.detail_check)
    doc["unavailable"] = unavailable
    doc["notes"].append("floor bytes: an array's own bytes; a record or list: its msgpack size")
    print(report.table(doc, [m.key for m in METHODS], "payload"))
    report.write_json(doc, args.json)
    if args.png:
        why_not = plots.peers(doc, args.png)
        print(f"wrote {args.png}" if why_not is None else f"no plot: {why_not}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
