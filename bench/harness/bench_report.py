"""The benchmark's outputs: statistics, the rank-0 table, the JSON document, the plot, progress.

Everything here works from the JSON document alone, so a result taken on another machine (the
device host has no matplotlib) is rendered here with ``typedcoll bench --render FILE``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

SCHEMA_VERSION = 1


# --- statistics --------------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy for the render path."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("expected at least one value")
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(rounds_us: Sequence[float]) -> Dict[str, float]:
    return {"median_us": quantile(rounds_us, 0.5), "p10_us": quantile(rounds_us, 0.1),
            "p90_us": quantile(rounds_us, 0.9)}


# --- the machine and the libraries ---------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, Any]:
    return {"host": platform.node(), "cpu_model": cpu_model(), "cores": os.cpu_count(),
            "arch": platform.machine(), "os": f"{platform.system()} {platform.release()}"}


def mpi_library(text: str) -> str:
    """``MPICH 5.0.2`` / ``Open MPI v4.1.6`` from the library's multi-line version text."""
    first = " ".join(text.strip().splitlines()[0].split())
    return first.replace(" Version:", "").split(",")[0]


def fast_path() -> str:
    """Which hot path typedcoll ran: its optional C extension, or the pure-Python one."""
    from . import _protocol
    # Looked up by name: the fast path is the core's internal detail and may move.
    return "C extension" if getattr(_protocol, "_fast_allgather", None) else "pure Python"


def library_versions(mpi: Any = None, torch_version: Optional[str] = None) -> Dict[str, str]:
    import msgspec
    import numpy

    from . import __version__
    versions = {"typedcoll": __version__, "typedcoll_fast_path": fast_path(),
                "python": platform.python_version(), "msgspec": msgspec.__version__,
                "numpy": numpy.__version__}
    if mpi is not None:
        import mpi4py
        versions["mpi4py"] = mpi4py.__version__
        versions["mpi_library"] = mpi_library(mpi.Get_library_version())
        versions["mpi_standard"] = "%d.%d" % mpi.Get_version()
    if torch_version is not None:
        versions["torch"] = torch_version
    return versions


def header_lines(doc: Dict[str, Any]) -> List[str]:
    v, m = doc["versions"], doc["machine"]
    lines = [f"# {doc['title']}"]
    fast = v.get("typedcoll_fast_path", "fast path not recorded")
    libs = [f"typedcoll {v['typedcoll']} ({fast})", f"python {v['python']}"]
    if "mpi4py" in v:
        libs.append(f"mpi4py {v['mpi4py']} on {v['mpi_library']} (MPI {v['mpi_standard']})")
    libs += [f"msgspec {v['msgspec']}", f"numpy {v['numpy']}"]
    if "torch" in v:
        libs.append(f"torch {v['torch']}")
    lines.append("# " + " / ".join(libs))
    load = m.get("load_average")
    load_text = f"; 1-min load average {load[0]:g} at start, {load[1]:g} at end" if load else ""
    lines.append(f"# machine: {m['host']}, {m['cores']} cores, {m['cpu_model']} ({m['arch']}, "
                 f"{m['os']}); {doc['created']}{load_text}")
    for note in doc.get("notes", []):
        lines.append(f"# note: {note}")
    return lines


# --- the peers table ---------------------------------------------------------------------------
def _fmt_us(us: float) -> str:
    if us >= 10_000:
        return f"{us:,.0f}"
    if us >= 100:
        return f"{us:.0f}"
    return f"{us:.1f}"


def peers_table(doc: Dict[str, Any]) -> str:
    """Methods as rows, payloads as columns: median µs with its ratio to the MPI floor.

    Then the spread (p10–p90 over rounds) and, for the gloo rows, the ratio to the gloo floor,
    so the cost each layer adds on its own backend reads directly.
    """
    payloads = [p["name"] for p in doc["payloads"]]
    cells = {(r["method"], r["payload"]): r for r in doc["results"]}
    skipped = {m["key"]: m["skipped"] for m in doc["methods"] if m.get("skipped")}
    label_w = max(len(m["label"]) for m in doc["methods"]) + 1
    col_w = 17
    sizes = {p["name"]: p["bytes"] for p in doc["payloads"]}
    out = header_lines(doc)
    out.append(f"# {doc['ranks']} ranks; per cell: median over {doc['settings']['rounds']} "
               f"interleaved rounds of the slowest rank's mean per call; x: ratio to the MPI "
               f"Allgather floor of the same bytes")
    out.append("")
    out.append("median us/call (x MPI floor)".ljust(label_w) +
               "".join(f"{p:>{col_w}}" for p in payloads))
    out.append("bytes per rank".ljust(label_w) + "".join(f"{sizes[p]:>{col_w},}" for p in payloads))
    for m in doc["methods"]:
        row = m["label"].ljust(label_w)
        if m["key"] in skipped:
            out.append(row + f"  skipped: {skipped[m['key']]}")
            continue
        for p in payloads:
            r = cells[(m["key"], p)]
            row += f"{_fmt_us(r['median_us']) + ' (' + format(r['x_floor'], '.2f') + 'x)':>{col_w}}"
        out.append(row)
    out.append("")
    out.append("spread: p10-p90 us".ljust(label_w) + "".join(f"{p:>{col_w}}" for p in payloads))
    for m in doc["methods"]:
        if m["key"] in skipped:
            continue
        row = m["label"].ljust(label_w)
        for p in payloads:
            r = cells[(m["key"], p)]
            row += f"{_fmt_us(r['p10_us']) + '-' + _fmt_us(r['p90_us']):>{col_w}}"
        out.append(row)
    gloo_rows = [m for m in doc["methods"] if m["backend"] == "torch" and not m.get("is_floor")
                 and m["key"] not in skipped]
    if gloo_rows and "gloo_raw" not in skipped:
        out.append("")
        out.append("x gloo floor".ljust(label_w) + "".join(f"{p:>{col_w}}" for p in payloads))
        for m in gloo_rows:
            row = m["label"].ljust(label_w)
            for p in payloads:
                row += f"{format(cells[(m['key'], p)]['x_gloo_floor'], '.2f') + 'x':>{col_w}}"
            out.append(row)
    return "\n".join(out)


def plain_label(method: Dict[str, Any]) -> str:
    """A method's label outside the table, where "same" has no row above it to refer to."""
    return method["label"].replace("  same, DEBUG=", "gloo under DEBUG=").strip()


def peers_markdown(doc: Dict[str, Any]) -> str:
    """The median table as Markdown (for docs/bench.md): µs/call, × MPI floor, [× gloo floor]."""
    payloads = [p["name"] for p in doc["payloads"]]
    cells = {(r["method"], r["payload"]): r for r in doc["results"]}
    sizes = {p["name"]: p["bytes"] for p in doc["payloads"]}
    out = ["| method | " + " | ".join(f"{p} ({sizes[p]:,} B)" for p in payloads) + " |",
           "|---|" + "---:|" * len(payloads)]
    for m in doc["methods"]:
        label = plain_label(m).replace("DEBUG=", "TORCH_DISTRIBUTED_DEBUG=")
        if m.get("skipped"):
            out.append(f"| {label} | skipped: {m['skipped']} |" + " |" * (len(payloads) - 1))
            continue
        row = []
        for p in payloads:
            r = cells[(m["key"], p)]
            text = f"{_fmt_us(r['median_us'])} ({r['x_floor']:.2f}×)"
            if r.get("x_gloo_floor") is not None and not m.get("is_floor"):
                text += f" [{r['x_gloo_floor']:.2f}×]"
            row.append(text)
        out.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(out)


def open_figure() -> Any:
    """``(pyplot, figure, axes)`` on the headless Agg backend, or a str saying why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); render later with --render"
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    return plt, fig, ax


def save_figure(plt: Any, fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_peers(doc: Dict[str, Any], path: str) -> Optional[str]:
    """Latency against payload size per method (log-log, p10–p90 bars); None, or why not."""
    opened = open_figure()
    if isinstance(opened, str):
        return opened
    plt, fig, ax = opened
    sizes = {p["name"]: p["bytes"] for p in doc["payloads"]}
    markers = "os^vDP*Xh"
    for i, m in enumerate(doc["methods"]):
        rows = [r for r in doc["results"] if r["method"] == m["key"]]
        if not rows:
            continue
        rows.sort(key=lambda r: sizes[r["payload"]])
        x = [sizes[r["payload"]] for r in rows]
        y = [r["median_us"] for r in rows]
        err = [[r["median_us"] - r["p10_us"] for r in rows],
               [r["p90_us"] - r["median_us"] for r in rows]]
        ax.errorbar(x, y, yerr=err, marker=markers[i % len(markers)], capsize=3,
                    linestyle="--" if m.get("is_floor") else "-", label=plain_label(m))
    ax.set_xscale("log")
    ax.set_yscale("log")
    for name, size in sizes.items():
        ax.axvline(size, color="grey", linewidth=0.5, alpha=0.5)
        ax.text(size, 1.0, f" {name}", transform=ax.get_xaxis_transform(), rotation=90,
                va="top", ha="right", fontsize=7, color="dimgrey")
    ax.set_xlabel("payload bytes per rank (msgpack size of the typed value; blobs: their length)")
    ax.set_ylabel("latency per allgather, us (median; bars p10-p90)")
    ax.set_title(f"{doc['ranks']} ranks on {doc['machine']['cores']} cores "
                 f"({doc['machine']['cpu_model']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(plt, fig, path)
    return None


def write_json(doc: Dict[str, Any], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")


# --- progress ------------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr; whole lines every 10% where stderr is not a terminal.

    Under mpiexec a rank's stderr is a pipe even when the launcher's is a terminal, so the
    self-launcher passes ``TYPEDCOLL_BENCH_TTY=1`` down when its own stderr is one.
    """

    def __init__(self, total: int, enabled: bool = True, stream: Any = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() or os.environ.get("TYPEDCOLL_BENCH_TTY") == "1"
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def advance(self, label: str, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw < 0.1 and self.done < self.total:
                return
            self._last_draw = now
            width = 30
            filled = int(width * frac)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {frac:4.0%} {elapsed:5.0f}s eta {eta:4.0f}s "
                              f"{label[:40]:<40}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            decile = int(frac * 10)
            if decile == self._last_decile:
                return
            self._last_decile = decile
            self.stream.write(f"bench: {frac:4.0%} after {elapsed:.0f}s (eta {eta:.0f}s) "
                              f"{label}\n")
        self.stream.flush()
