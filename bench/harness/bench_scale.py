"""Scale by simulation: what checking N envelopes and decoding N payloads costs one rank, no MPI.

A real :class:`~typedcoll._protocol.Protocol` runs over :class:`SimTransport`, an in-process
transport of N ranks whose ``allgather_slots(send, recv)`` fills ``recv`` with N copies of the
local slot: every other rank sent exactly what this one did, which is the steady state (all
envelopes agree, nothing raises). Per N and payload it times, each as the median over rounds of
a batch's mean per call:

  check    ``Protocol.phase1`` (the general path) with nothing delivered: encode, header, and
           the verification of the N envelopes already in ``recv`` (the sequence number is
           rewound before each call, so the slots left by the previous identical call stay
           valid). The envelope check's cost, with its N-independent part (encode and header).
  decode   ``gather_payloads`` plus the typed decode of the N payloads, on phase 1's result
           (the general path's Python loop).
  hot      ``TypedComm.allgather`` with nothing delivered (sequence rewound likewise): check plus
           decode on the path a user's call takes, the C fast path where it is built.
  full     a complete ``TypedComm.allgather`` through the simulated transport, delivery included.
  deliver  the simulated delivery alone (a numpy broadcast copy of the slot into N places).
  unpickle what mpi4py's pickle allgather does with the same N payloads on receipt: N loads.

Wire bytes per rank are counted by the transport (bytes a rank receives per collective, phase 1
and the overflow phase) at a small N, and are linear in N; pickle's come from the pickled size.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from . import _bench_report as report
from ._bench_payloads import BY_NAME, PAYLOADS
from ._bench_report import open_figure, save_figure
from ._comm import TypedComm
from ._protocol import MODE_MSG
from .codecs import resolve

GOAL_N = 4096
GOAL_CHECK_US = 50.0
TIMED_PAYLOADS = ("TimeoutFlag", "RankState", "IterStats")


class SimTransport:
    """N simulated ranks, all sending what this rank sends; counts the bytes it delivers."""

    kind = "sim"

    def __init__(self, size: int) -> None:
        self.rank = 0
        self.size = size
        self.deliver = True
        self.received = 0

    def allgather_slots(self, send: bytearray, recv: bytearray) -> None:
        if self.deliver:
            slot = len(send)
            rows = np.frombuffer(recv, dtype=np.uint8).reshape(self.size, slot)
            rows[:] = np.frombuffer(send, dtype=np.uint8)
            self.received += len(recv)

    def allgather_slots_until(self, send: bytearray, recv: bytearray, deadline: float) -> None:
        self.allgather_slots(send, recv)

    def allgatherv(self, send: bytes, counts: List[int], deadline: Optional[float] = None
                   ) -> bytearray:
        # Every simulated rank overflowed alike, so every count is this rank's.
        self.received += sum(counts)
        return bytearray(bytes(send) * self.size)

    def gatherv(self, *args: Any) -> Any:
        raise NotImplementedError("the scale simulation only runs allgather")

    bcast_bytes = allreduce_array = split = dup = gatherv

    def abort(self, code: int = 1) -> None:
        raise SystemExit(code)

    def free(self) -> None:
        pass


def _batch_us(fn: Callable[[], Any], iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e6


def _rounds_us(fn: Callable[[], Any], rounds: int, budget: float, max_iters: int) -> List[float]:
    fn()
    once = _batch_us(fn, 1)
    iters = int(min(max_iters, max(2, budget / max(once * 1e-6, 1e-7))))
    return [_batch_us(fn, iters) for _ in range(rounds)]


def _median_us(fn: Callable[[], Any], rounds: int, budget: float, max_iters: int) -> float:
    return report.quantile(_rounds_us(fn, rounds, budget, max_iters), 0.5)


def measure(payload_name: str, n: int, rounds: int, budget: float,
            max_iters: int) -> Dict[str, Any]:
    """The timings of one payload at N simulated ranks."""
    value = BY_NAME[payload_name].typed(0)
    transport = SimTransport(n)
    comm = TypedComm._from_transport(transport, f"sim{n}", None)
    p = comm._p
    info = resolve(type(value))
    for _ in range(3):  # settle the slot size on this payload, as in steady state
        got = comm.allgather(value)
    if got != [value] * n:
        raise AssertionError(f"the simulated allgather of {payload_name} at N={n} is wrong")
    full = _median_us(lambda: comm.allgather(value), rounds, budget, max_iters)
    deliver = _median_us(lambda: transport.allgather_slots(p.send, p.recv), rounds, budget,
                         max_iters)

    comm.allgather(value)
    transport.deliver = False
    last_seq = p.seq - 1

    def check() -> Any:
        p.seq = last_seq  # the slots in recv carry last_seq: they stay a valid steady state
        return p.phase1("allgather", info, value, MODE_MSG)
    p1 = check()
    # The minimum too: on a shared machine the fastest round is the check's own cost, the
    # median includes other processes' time slices.
    check_rounds = _rounds_us(check, rounds, budget, max_iters)

    def decode() -> List[Any]:
        bufs = p.gather_payloads(p1)
        assert bufs is not None  # allgather: every rank gets every payload
        return [p.decode(p1, buf, r) for r, buf in enumerate(bufs)]
    if decode() != [value] * n:
        raise AssertionError(f"the simulated decode of {payload_name} at N={n} is wrong")
    decode_us = _median_us(decode, rounds, budget, max_iters)

    def hot() -> Any:
        p.seq = last_seq
        return comm.allgather(value)
    if hot() != [value] * n:
        raise AssertionError(f"the undelivered allgather of {payload_name} at N={n} is wrong")
    hot_us = _median_us(hot, rounds, budget, max_iters)

    blobs = [pickle.dumps(BY_NAME[payload_name].native(0), protocol=pickle.HIGHEST_PROTOCOL)] * n
    loads = pickle.loads
    unpickle_us = _median_us(lambda: [loads(b) for b in blobs], rounds, budget, max_iters)
    return {"payload": payload_name, "n": n, "slot": p.slot,
            "check_us": report.quantile(check_rounds, 0.5), "check_min_us": min(check_rounds),
            "decode_us": decode_us, "hot_us": hot_us, "full_us": full, "deliver_us": deliver,
            "unpickle_us": unpickle_us}


def wire_bytes(n: int = 8) -> List[Dict[str, Any]]:
    """Bytes one rank receives per allgather, per peer, counted by the simulated transport."""
    out = []
    for payload in PAYLOADS:
        value = payload.typed(0)
        transport = SimTransport(n)
        comm = TypedComm._from_transport(transport, "wire", None)
        for _ in range(3):
            comm.allgather(value)
        transport.received = 0
        comm.allgather(value)
        phase1 = comm._p.slot * n
        native = payload.native(0)
        out.append({
            "payload": payload.name, "payload_bytes": payload.raw_size(0), "slot": comm._p.slot,
            "typed_phase1_per_peer": phase1 // n,
            "typed_overflow_per_peer": (transport.received - phase1) // n,
            "pickle_per_peer": len(pickle.dumps(native, protocol=pickle.HIGHEST_PROTOCOL)),
        })
    return out


def run_scale(args: argparse.Namespace) -> int:
    quick = args.quick
    rounds = args.rounds or (2 if quick else 7)
    budget = args.budget or (0.002 if quick else 0.03)
    max_iters = 20 if quick else 5000
    top = min(args.max_n, 64 if quick else args.max_n)
    ns = [n for n in (2 ** k for k in range(3, 15)) if n <= top]
    load_start = os.getloadavg()[0]
    progress = report.Progress(len(ns) * len(TIMED_PAYLOADS), enabled=not args.no_progress)
    timings = []
    for name in TIMED_PAYLOADS:
        for n in ns:
            timings.append(measure(name, n, rounds, budget, max_iters))
            progress.advance(f"{name} N={n}")
    goal = next((t for t in timings if t["payload"] == "RankState" and t["n"] == GOAL_N), None)
    doc: Dict[str, Any] = {
        "kind": "typedcoll-bench-scale", "schema_version": report.SCHEMA_VERSION,
        "title": "typedcoll bench --scale: envelope check and decode cost per rank, simulated",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine_info(), "versions": report.library_versions(),
        "settings": {"rounds": rounds, "budget_s": budget, "max_iters": max_iters,
                     "quick": quick},
        "notes": ["one process; a real Protocol over a simulated N-rank transport; no MPI"],
        "n_values": ns, "timings": timings, "wire": wire_bytes(),
        "goal": {"n": GOAL_N, "check_us_max": GOAL_CHECK_US,
                 "check_us": goal["check_us"] if goal else None,
                 "check_min_us": goal["check_min_us"] if goal else None,
                 "met": (goal["check_us"] <= GOAL_CHECK_US) if goal else None},
    }
    doc["machine"]["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    path = args.json or "typedcoll-bench-scale.json"
    report.write_json(doc, path)
    print(scale_table(doc))
    print(f"\nwrote {path}")
    png = path.rsplit(".", 1)[0] + ".png" if args.png is None else args.png
    if png:
        why_not = plot_scale(doc, png)
        print(f"wrote {png}" if why_not is None else f"no plot: {why_not}")
    return 0


def scale_table(doc: Dict[str, Any]) -> str:
    v, m = doc["versions"], doc["machine"]
    out = [f"# {doc['title']}",
           f"# typedcoll {v['typedcoll']} ({v.get('typedcoll_fast_path', '?')}) / "
           f"python {v['python']} / msgspec {v['msgspec']} / "
           f"numpy {v['numpy']}",
           f"# machine: {m['host']}, {m['cores']} cores, {m['cpu_model']}; {doc['created']}"
           + (f"; 1-min load average {m['load_average'][0]:g} at start, "
              f"{m['load_average'][1]:g} at end" if m.get("load_average") else ""),
           f"# medians over {doc['settings']['rounds']} rounds; us per call on one rank; "
           f"check = phase 1 without delivery (encode + header + verify N envelopes); "
           f"hot = the user's allgather without delivery (check + decode)", ""]
    for name in TIMED_PAYLOADS:
        rows = [t for t in doc["timings"] if t["payload"] == name]
        if not rows:
            continue
        out.append(f"{name} (slot {rows[0]['slot']} B)")
        out.append(f"{'N':>7} {'check':>10} {'(min)':>8} {'decode':>10} {'hot':>10} "
                   f"{'full':>10} {'deliver':>10} {'unpickle':>10}  {'check/rank':>10}")
        for t in rows:
            out.append(f"{t['n']:>7,} {t['check_us']:>10.1f} {t['check_min_us']:>8.1f} "
                       f"{t['decode_us']:>10.1f} {t['hot_us']:>10.1f} "
                       f"{t['full_us']:>10.1f} {t['deliver_us']:>10.1f} {t['unpickle_us']:>10.1f}"
                       f"  {t['check_us'] * 1000 / t['n']:>8.1f}ns")
        out.append("")
    goal = doc["goal"]
    if goal["check_us"] is not None:
        verdict = "met" if goal["met"] else "MISSED"
        out.append(f"goal: envelope check <= {goal['check_us_max']:g} us at {goal['n']:,} ranks: "
                   f"median {goal['check_us']:.1f} us, fastest round {goal['check_min_us']:.1f} "
                   f"us (RankState) -> {verdict}")
    else:
        out.append(f"goal: not measured (N={goal['n']} not simulated in this run)")
    out.append("")
    out.append("wire bytes one rank receives per allgather, per peer (x N for the total)")
    out.append(f"{'payload':<12} {'payload B':>10} {'slot B':>8} {'typed phase 1':>14} "
               f"{'typed overflow':>15} {'typed total':>12} {'pickle':>10}")
    for w in doc["wire"]:
        total = w["typed_phase1_per_peer"] + w["typed_overflow_per_peer"]
        out.append(f"{w['payload']:<12} {w['payload_bytes']:>10,} {w['slot']:>8,} "
                   f"{w['typed_phase1_per_peer']:>14,} {w['typed_overflow_per_peer']:>15,} "
                   f"{total:>12,} {w['pickle_per_peer']:>10,}")
    out.append("(pickle: the pickled object; mpi4py also allgathers one 4- or 8-byte count "
               "per rank first)")
    return "\n".join(out)


def plot_scale(doc: Dict[str, Any], path: str) -> Optional[str]:
    """Check and decode cost against N (log-log); None, or why not."""
    opened = open_figure()
    if isinstance(opened, str):
        return opened
    plt, fig, ax = opened
    styles = {"check_us": "-", "decode_us": "--", "unpickle_us": ":"}
    for i, name in enumerate(TIMED_PAYLOADS):
        rows = [t for t in doc["timings"] if t["payload"] == name]
        for key, style in styles.items():
            ax.plot([t["n"] for t in rows], [t[key] for t in rows], style, color=f"C{i}",
                    marker="o", markersize=3, label=f"{name}: {key[:-3]}")
    goal = doc["goal"]
    ax.axhline(goal["check_us_max"], color="grey", linewidth=0.8)
    ax.axvline(goal["n"], color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("simulated ranks N")
    ax.set_ylabel("us per collective on one rank (median)")
    ax.set_title(f"envelope check and decode vs N ({doc['machine']['cpu_model']}); "
                 f"goal: check <= {goal['check_us_max']:g} us at N={goal['n']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    save_figure(plt, fig, path)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """``python bench/scale.py``: the same as ``typedcoll bench --scale``."""
    from ._bench import main as bench_main
    return bench_main(["--scale"] + list(argv or []))
