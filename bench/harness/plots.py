"""The PNGs, drawn from result documents alone (the device host has no matplotlib: its JSON is
drawn here later with ``--render``). Each function returns None, or why no plot was drawn."""

from __future__ import annotations

from typing import Any, Dict, List, Optional


def _pyplot() -> Any:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); draw it later with --render"
    return plt


def peers(doc: Dict[str, Any], path: str) -> Optional[str]:
    """Latency against payload bytes per method (log-log; bars p10-p90)."""
    plt = _pyplot()
    if isinstance(plt, str):
        return plt
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    sizes = {p["name"]: p["floor_bytes"] for p in doc["payloads"]}
    markers = "os^vDP*Xh"
    for i, m in enumerate(doc["methods"]):
        rows = sorted((r for r in doc["results"] if r["method"] == m["key"]),
                      key=lambda r: sizes[r["case"]])
        if not rows:
            continue
        ax.errorbar([sizes[r["case"]] for r in rows], [r["median_us"] for r in rows],
                    yerr=[[r["median_us"] - r["p10_us"] for r in rows],
                          [r["p90_us"] - r["median_us"] for r in rows]],
                    marker=markers[i % len(markers)], capsize=3,
                    linestyle="--" if m["is_floor"] else "-", label=m["label"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per rank (array bytes; records and lists: their msgpack size)")
    ax.set_ylabel("us per allgather (median; bars p10-p90)")
    ax.set_title(f"{doc['ranks']} ranks, {doc['machine']['cores']} cores "
                 f"({doc['machine']['cpu_model']}); {doc['versions']['fast_path']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def scale(doc: Dict[str, Any], path: str, ops: List[str]) -> Optional[str]:
    """Per op: modelled time against N, typedcoll and MPI, with the measured points on it; and
    a bottom row of bytes per rank and latency steps for every op."""
    plt = _pyplot()
    if isinstance(plt, str):
        return plt
    cols = 4
    rows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(rows + 1, cols, figsize=(4.2 * cols, 3.4 * (rows + 1)), dpi=100,
                             squeeze=False)
    table = doc["model"]["rows"]
    fit = doc["model"]["fit"]
    for i, op in enumerate(ops):
        ax = axes[i // cols][i % cols]
        for side, colour in (("typed", "C0"), ("mpi4py", "C1")):
            name = "typedcoll" if side == "typed" else "mpi4py"
            pts = [r for r in table if r["op"] == op and r["side"] == side
                   and r["model_us"] is not None]
            if pts:
                ax.plot([r["n"] for r in pts], [r["model_us"] for r in pts], color=colour,
                        label=f"{name} model")
            measured = [m for m in doc["measured"] if m["op"] == op and m["side"] == side]
            if measured:
                ax.plot([m["n"] for m in measured], [m["us"] for m in measured], "o",
                        color=colour, markersize=4, label=f"{name} measured")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if i == 0:
            ax.set_ylabel("us per call")
            ax.legend(fontsize=6)
    for j in range(len(ops), rows * cols):
        axes[j // cols][j % cols].axis("off")
    bottom = axes[rows]
    for key, ax, label in (("bytes", bottom[0], "bytes through the busiest rank"),
                           ("steps", bottom[1], "latency steps (critical path)")):
        for k, op in enumerate(ops):
            for side, style in (("typed", "-"), ("mpi", "--")):
                pts = [r for r in table if r["op"] == op and r["side"] == side]
                ax.plot([r["n"] for r in pts], [max(r[key], 0.5) for r in pts], style,
                        color=f"C{k}", label=op if side == "typed" else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{label} (solid typedcoll, dashed MPI)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    bottom[0].legend(fontsize=6, ncol=2)
    for ax in bottom[2:]:
        ax.axis("off")
    bottom[2].text(0, 0.9, f"model: t = c + {fit['alpha_us']:.2f} us x steps + "
                           f"{fit['beta_ns']:.3f} ns x bytes\n"
                           f"alpha and c per op and side fitted to\n"
                           f"{fit['points']} measured points ({fit['source']})",
                   fontsize=8, va="top", transform=bottom[2].transAxes)
    fig.suptitle(doc["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
