"""What every script prints and writes: versions, machine, tables with ratios, the JSON document.

The document (``--json``; written by rank 0) has the same top-level fields for every script,
which ``docs/bench.md`` describes and ``tests/test_bench.py`` checks:

  kind, schema_version, script, title, created, argv, ranks, versions, machine, settings,
  results   one entry per cell: case, method, iters, warmup, rounds_us, median_us, p10_us, p90_us
  ratios    one entry per ratio: case, num, den, value, goal (e.g. "<= 1.5", or null), met
  unavailable   method -> why it could not run here (it has no results)
  notes     anything a reader needs to trust the figures

Scripts may add fields of their own (``stages``, ``model``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

KIND = "typedcoll-bench"
SCHEMA_VERSION = 2


# --- the machine and the libraries -------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, Any]:
    return {"host": platform.node(), "cpu_model": cpu_model(), "cores": os.cpu_count(),
            "arch": platform.machine(), "os": f"{platform.system()} {platform.release()}",
            "load_average": round(os.getloadavg()[0], 2)}


def fast_path(typed_comm: Any = None) -> str:
    """Which steady state typedcoll ran: its C extension (and whether it exchanges over MPI's C
    symbols itself) or the pure-Python steps."""
    from typedcoll.core import fast
    if not fast.ENABLED:
        return "pure Python"
    if typed_comm is None:
        return "C extension"
    transport = typed_comm._p.transport
    if transport.kind != "mpi":
        return f"C extension, {transport.kind} exchange"
    return "C extension, " + ("C exchange" if transport.engine is not None else "Python exchange")


def versions(typed_comm: Any = None, torch_version: Optional[str] = None) -> Dict[str, str]:
    import msgspec
    import numpy
    import typedcoll

    out = {"typedcoll": typedcoll.__version__, "fast_path": fast_path(typed_comm),
           "python": platform.python_version(), "msgspec": msgspec.__version__,
           "numpy": numpy.__version__}
    if "mpi4py" in sys.modules:
        import mpi4py
        from mpi4py import MPI
        first = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
        out["mpi4py"] = mpi4py.__version__
        out["mpi_library"] = first.replace(" Version:", "").split(",")[0]
        out["mpi_standard"] = "%d.%d" % MPI.Get_version()
    if torch_version is not None:
        out["torch"] = torch_version
    return out


# --- ratios against goals ----------------------------------------------------------------------
class Ratio(NamedTuple):
    """``num / den`` on ``case``, held against ``goal`` (("<=", 1.5), (">=", 1.5), or None)."""

    case: str
    num: str
    den: str
    goal: Optional[Tuple[str, float]] = None


def ratios(results: List[Dict[str, Any]], specs: Sequence[Ratio]) -> List[Dict[str, Any]]:
    """Each ratio that both its cells have, with whether its goal was met."""
    median = {(r["case"], r["method"]): r["median_us"] for r in results}
    out = []
    for spec in specs:
        num, den = median.get((spec.case, spec.num)), median.get((spec.case, spec.den))
        if num is None or den is None:
            continue
        value = num / den
        met = None
        if spec.goal is not None:
            sign, bound = spec.goal
            met = value <= bound if sign == "<=" else value >= bound
        out.append({"case": spec.case, "num": spec.num, "den": spec.den, "value": value,
                    "goal": None if spec.goal is None else f"{spec.goal[0]} {spec.goal[1]:g}",
                    "met": met})
    return out


# --- the document ------------------------------------------------------------------------------
def document(script: str, title: str, ranks: int, settings: Dict[str, Any],
             results: List[Dict[str, Any]], specs: Sequence[Ratio],
             versions_: Dict[str, str], **extra: Any) -> Dict[str, Any]:
    doc: Dict[str, Any] = {
        "kind": KIND, "schema_version": SCHEMA_VERSION, "script": script, "title": title,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": sys.argv[1:], "ranks": ranks, "versions": versions_, "machine": machine(),
        "settings": settings, "results": results, "ratios": ratios(results, specs),
        "unavailable": {}, "notes": [],
    }
    doc.update(extra)
    return doc


def write_json(doc: Dict[str, Any], path: Optional[str]) -> None:
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")


# --- the table ---------------------------------------------------------------------------------
def fmt_us(us: float) -> str:
    if us >= 10_000:
        return f"{us:,.0f}"
    if us >= 100:
        return f"{us:.0f}"
    return f"{us:.2f}" if us < 10 else f"{us:.1f}"


def header(doc: Dict[str, Any]) -> List[str]:
    v, m, s = doc["versions"], doc["machine"], doc["settings"]
    libs = [f"typedcoll {v['typedcoll']} ({v['fast_path']})", f"python {v['python']}"]
    if "mpi4py" in v:
        libs.append(f"mpi4py {v['mpi4py']} on {v['mpi_library']} (MPI {v['mpi_standard']})")
    libs += [f"msgspec {v['msgspec']}", f"numpy {v['numpy']}"]
    if "torch" in v:
        libs.append(f"torch {v['torch']}")
    lines = [f"# {doc['title']}: {doc['ranks']} ranks",
             "# " + " / ".join(libs),
             f"# {m['host']}: {m['cores']} cores, {m['cpu_model']}; load {m['load_average']:g}; "
             f"{doc['created']}"]
    if "rounds" in s:
        lines.append(f"# {s['rounds']} interleaved rounds of up to {s['iters']} calls per cell; "
                     f"median over rounds of the slowest rank's mean per call, us")
    lines += [f"# note: {n}" for n in doc.get("notes", [])]
    return lines


def _ratio_text(r: Dict[str, Any]) -> str:
    text = f"{r['num']}/{r['den']} {r['value']:.2f}"
    if r["goal"] is not None:
        text += f" ({r['goal']} {'ok' if r['met'] else 'MISSED'})"
    return text


def table(doc: Dict[str, Any], methods: Sequence[str], case_title: str = "case",
          cases: Optional[Sequence[str]] = None, with_header: bool = True,
          with_summary: bool = True) -> str:
    """Cases as rows, methods as columns (µs), then each case's ratios; ``cases`` restricts
    the rows (and the columns to the methods they have); the summary says which goals were
    met."""
    cells = {(r["case"], r["method"]): r for r in doc["results"]
             if cases is None or r["case"] in cases}
    shown: List[str] = []
    for case, _ in cells:
        if case not in shown:
            shown.append(case)
    present = [m for m in methods if any(m == meth for _, meth in cells)]
    case_w = max([len(case_title)] + [len(c) for c in shown]) + 1
    col_w = max([10] + [len(m) + 2 for m in present])
    out = header(doc) + [""] if with_header else []
    out.append(case_title.ljust(case_w) + "".join(f"{m:>{col_w}}" for m in present)
               + "  ratios")
    by_case: Dict[str, List[Dict[str, Any]]] = {}
    for r in doc["ratios"]:
        by_case.setdefault(r["case"], []).append(r)
    for case in shown:
        row = case.ljust(case_w)
        for m in present:
            cell = cells.get((case, m))
            row += f"{fmt_us(cell['median_us']) if cell else '-':>{col_w}}"
        row += "  " + "; ".join(_ratio_text(r) for r in by_case.get(case, []))
        out.append(row.rstrip())
    if not with_summary:
        return "\n".join(out)
    for method, why in doc.get("unavailable", {}).items():
        out.append(f"{method}: unavailable ({why})")
    goals = [r for r in doc["ratios"] if r["met"] is not None]
    if goals:
        missed = [f"{r['case']} {r['num']}/{r['den']}" for r in goals if not r["met"]]
        out.append(f"goals: {len(goals) - len(missed)} of {len(goals)} met"
                   + (f"; missed: {', '.join(missed)}" if missed else ""))
    return "\n".join(out)


# --- checks before timing ----------------------------------------------------------------------
def stop_on_wrong_results(comm: Any, problems: List[str]) -> None:
    """Every rank's problems with the results it got; if any rank has one, every rank stops."""
    every = comm.allgather(problems)
    wrong = [f"rank {r}: {p}" for r, ps in enumerate(every) for p in ps]
    if wrong:
        if comm.rank == 0:
            print("wrong results, nothing timed:\n  " + "\n  ".join(wrong), file=sys.stderr)
        raise SystemExit(1)
