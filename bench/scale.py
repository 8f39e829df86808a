"""Scaling model: latency steps and bytes per collective, typedcoll against MPI, N = 2 ... 16,384.

Run (no MPI): ``python bench/scale.py [--measured COLLECTIVES.json ...] [--peers PEERS.json]
[--json F] [--png F]``

The model (``harness/model.py``) counts, for each collective of ``bench/collectives.py`` and
its payload, the message latencies on the critical path (steps) and the bytes through the
busiest rank, for typedcoll's exchange and the MPI collective that follows it, for MPI's own
algorithm, and for mpi4py's pickle collective. Given results of ``bench/collectives.py`` at
several rank counts (``--measured``; 2, 4, 8 and 16 ranks of one machine), it fits
``t = c + alpha * steps + beta * bytes`` to them (beta from the 1 MiB floor of a
``bench/peers.py`` result, ``--peers``) and draws the measured points on the modelled curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

import msgspec

from harness import model, plots, records, report

SHOWN_NS = (8, 16, 64, 256, 1024, 4096, 16384)


def payloads() -> Dict[str, int]:
    """Bytes each op of bench/collectives.py carries per rank, as typedcoll encodes them."""
    state = len(msgspec.msgpack.encode(records.rank_state(1)))
    path = len(f"{records.RankState.__module__}:{records.RankState.__qualname__}") + 1
    return {"allgather": state, "gather": state, "bcast": state + path, "allreduce": 1,
            "reduce": 1, "barrier": 0, "scatter": state + path, "alltoall": state}


def measured_points(paths: List[str]) -> List[Dict[str, Any]]:
    points = []
    for path in paths:
        with open(path) as fh:
            doc = json.load(fh)
        if doc.get("script") != "collectives":
            raise SystemExit(f"expected a bench/collectives.py result in {path}, got "
                             f"{doc.get('script')!r}")
        for r in doc["results"]:
            points.append({"op": r["case"], "side": "typed" if r["method"] == "typed"
                           else "mpi4py", "n": doc["ranks"], "us": r["median_us"],
                           "source": path, "fast_path": doc["versions"]["fast_path"],
                           "host": doc["machine"]["host"]})
    return points


def beta_from(path: Optional[str]) -> Optional[float]:
    """ns per byte through the busiest rank: the peers run's 1 MiB floor over its bytes."""
    if not path:
        return None
    with open(path) as fh:
        doc = json.load(fh)
    floor = next((r for r in doc["results"] if r["method"] == "mpi_raw" and r["case"] == "1 MiB"),
                 None)
    if floor is None or doc["ranks"] < 2:
        return None
    return floor["median_us"] * 1e3 / ((doc["ranks"] - 1) * (1 << 20))


def text_table(doc: Dict[str, Any]) -> str:
    rows = {(r["op"], r["side"], r["n"]): r for r in doc["model"]["rows"]}
    fit = doc["model"]["fit"]
    out = [f"# {doc['title']}",
           f"# t = c + {fit['alpha_us']:.3f} us x steps + {fit['beta_ns']:.3f} ns x bytes; "
           f"{fit['points']} measured points ({fit['source']})",
           f"# payload bytes per rank: {doc['model']['payload_bytes']}", ""]
    head = (f"{'op':<10} {'N':>6} {'typed steps':>11} {'typed bytes':>12} {'MPI steps':>9} "
            f"{'MPI bytes':>11} {'mpi4py steps':>12} {'typed us':>9} {'mpi4py us':>9}")
    out.append(head)
    for op in model.OPS:
        for n in SHOWN_NS:
            t, m, p = rows[(op, "typed", n)], rows[(op, "mpi", n)], rows[(op, "mpi4py", n)]
            tu = "-" if t["model_us"] is None else f"{t['model_us']:.1f}"
            pu = "-" if p["model_us"] is None else f"{p['model_us']:.1f}"
            out.append(f"{op:<10} {n:>6,} {t['steps']:>11g} {t['bytes']:>12,.0f} "
                       f"{m['steps']:>9g} {m['bytes']:>11,.0f} {p['steps']:>12g} {tu:>9} "
                       f"{pu:>9}")
        out.append("")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", nargs="*", default=[],
                        help="bench/collectives.py results (--json) at several rank counts")
    parser.add_argument("--peers", help="a bench/peers.py result: beta from its 1 MiB floor")
    parser.add_argument("--json", help="write the model document here")
    parser.add_argument("--png", default="", help="draw the model and the measured points here")
    args = parser.parse_args(argv)
    sizes = payloads()
    rows = model.table(sizes)
    points = measured_points(args.measured)
    beta = beta_from(args.peers)
    fit = model.fit(rows, points, beta)
    hosts = sorted({p["host"] for p in points})
    fit["source"] = (f"{', '.join(hosts)}; N = {sorted({p['n'] for p in points})}"
                     if points else "no measured points: times not modelled")
    fit["beta_source"] = args.peers or f"default {model.DEFAULT_BETA_NS} ns per byte"
    doc = report.document("scale", "typedcoll scaling model", 0, {}, [], [],
                          report.versions(),
                          model={"ops": list(model.OPS), "ns": model.NS, "payload_bytes": sizes,
                                 "fit": fit, "rows": rows},
                          measured=points)
    doc["notes"].append("ranks 0: a model, not a run; measured points carry their own N")
    print(text_table(doc))
    report.write_json(doc, args.json)
    if args.png:
        why_not = plots.scale(doc, args.png, list(model.OPS))
        print(f"wrote {args.png}" if why_not is None else f"no plot: {why_not}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
