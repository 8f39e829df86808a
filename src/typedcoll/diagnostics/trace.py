"""``typedcoll trace DIR``: find the first divergent collective in per-rank flight-recorder dumps.

The analysis is pure logic over decoded dumps (no communicator), in the manner of torch's flight
recorder analyzer: dumps are grouped by communicator id (name plus creation ordinal, the same on
every member), each member's entries are aligned by sequence number, and two findings are
reported per communicator:

- the first divergent collective: the lowest seq that every member started and whose entries
  disagree (op, schema or step; the same :mod:`_mismatch` grouping and text as a live
  ``DesyncError``);
- missing ranks: the lowest seq that some member never started (its buffer stops earlier), and
  members with no dump at all (killed, or never wrote one).

Exit codes: 0 consistent, 1 a divergence or missing ranks, 2 unreadable input.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import msgspec

from ._mismatch import (EnvelopeInfo, Group, MismatchKind, compact_ranks, desync_message,
                        format_groups, group_envelopes, mismatch_kinds)

FORMAT = "typedcoll-trace"
SUPPORTED_VERSION = 1
_DUMP_NAME = re.compile(r"^rank(\d+)\.json$")


class Entry(msgspec.Struct, kw_only=True):
    """One flight-recorder entry as dumped."""

    seq: int
    op: str
    schema: str = ""
    fingerprint: str = ""
    site: str = "?"
    step: Optional[int] = None
    bytes: int = 0
    state: str = "completed"
    t_start_ns: int = 0
    t_end_ns: Optional[int] = None
    error: Optional[str] = None


class CommDump(msgspec.Struct, kw_only=True):
    """One communicator's part of a rank's dump."""

    id: str
    rank: int
    size: int
    seq: int
    name: str = ""
    world_ranks: Optional[List[int]] = None
    transport: str = ""
    timeout: Optional[float] = None
    capacity: int = 0
    recorded: int = 0
    entries: List[Entry] = []


class Dump(msgspec.Struct, kw_only=True):
    """One rank's dump file (format ``typedcoll-trace``, version 1)."""

    format: str
    version: int
    rank: int
    world_size: Optional[int] = None
    host: str = ""
    pid: int = 0
    time_ns: int = 0
    reason: str = ""
    message: str = ""
    events: List[str] = []
    comms: List[CommDump] = []


class TraceInputError(Exception):
    """A dump that cannot be read: names the file and what is wrong with it."""


class Finding(msgspec.Struct, kw_only=True):
    """A divergence or missing ranks at collective ``seq`` of communicator ``comm``."""

    comm: str
    seq: int
    kinds: List[MismatchKind]
    groups: List[Group]  # the ranks that started the collective, grouped by envelope
    missing: List[int] = []  # comm ranks that never started it
    no_dump: List[int] = []  # comm ranks that left no dump
    stops_at: Dict[int, Optional[Entry]] = {}  # missing rank -> its last entry on this comm
    t_start_ns: int = 0
    text: str = ""


class CommReport(msgspec.Struct, kw_only=True):
    """The analysis of one communicator."""

    comm: str
    size: int
    world_ranks: List[int]
    dumped: List[int]
    compared: Optional[Tuple[int, int]]  # the seq range every dumped member still holds
    divergence: Optional[Finding] = None
    missing: Optional[Finding] = None


class Report(msgspec.Struct, kw_only=True):
    """The whole analysis: ``consistent`` is False when any communicator has a finding."""

    consistent: bool
    ranks: List[int]
    comms: List[CommReport]
    first: Optional[Finding]
    last: Dict[int, List[Tuple[str, Entry]]]


# --- reading ---------------------------------------------------------------------------------
def parse_dump(data: bytes, source: str) -> Dump:
    """Decode one dump, or raise TraceInputError naming ``source`` and the problem."""
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise TraceInputError(f"{source}: truncated or not JSON ({exc}); was the writer killed "
                              f"mid-dump, or is this not a typedcoll dump?") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise TraceInputError(f"{source}: not a typedcoll trace dump (expected format "
                              f"{FORMAT!r}, found {found!r})")
    if doc.get("version") != SUPPORTED_VERSION:
        raise TraceInputError(f"{source}: unsupported dump version {doc.get('version')!r} "
                              f"(this typedcoll reads version {SUPPORTED_VERSION})")
    try:
        return msgspec.convert(doc, Dump)
    except msgspec.ValidationError as exc:
        raise TraceInputError(f"{source}: malformed typedcoll dump: {exc}") from exc


def load_dir(directory: str) -> Dict[int, Dump]:
    """Every ``rank<R>.json`` in ``directory``, by world rank."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise TraceInputError(f"{directory}: cannot list the directory: {exc}") from exc
    dumps: Dict[int, Dump] = {}
    for name in names:
        if not _DUMP_NAME.match(name):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise TraceInputError(f"{path}: cannot read: {exc}") from exc
        dump = parse_dump(data, path)
        if dump.rank in dumps:
            raise TraceInputError(f"{path}: a second dump for rank {dump.rank}")
        dumps[dump.rank] = dump
    if not dumps:
        raise TraceInputError(f"{directory}: no rank<R>.json dumps (set TYPEDCOLL_TRACE_DIR "
                              f"for the job to write them)")
    return dumps


# --- analysis (pure) -------------------------------------------------------------------------
def _envelope(rank: int, e: Entry) -> EnvelopeInfo:
    # The entry's error is left out: at a divergence it is the DesyncError itself, on every
    # rank; the last-entries section shows it.
    return EnvelopeInfo(rank=rank, seq=e.seq, op=e.op, schema=e.schema,
                        fingerprint=e.fingerprint, site=e.site, step=e.step)


def analyze_comm(comm_id: str, members: Dict[int, CommDump]) -> CommReport:
    """Align one communicator's members (comm rank -> its dump) by seq; see the module doc."""
    any_member = next(iter(members.values()))
    size = any_member.size
    world = any_member.world_ranks or list(range(size))
    by_seq = {r: {e.seq: e for e in m.entries} for r, m in members.items()}
    reached = {r: m.seq for r, m in members.items()}
    oldest = max((min(s) if s else m.seq) for s, m in zip(by_seq.values(), members.values()))
    low = min(reached.values())
    report = CommReport(comm=comm_id, size=size, world_ranks=list(world),
                        dumped=sorted(members), compared=(oldest, low - 1) if low > oldest else None)
    for seq in range(oldest, low):
        envelopes = [_envelope(r, by_seq[r][seq]) for r in sorted(members) if seq in by_seq[r]]
        kinds = mismatch_kinds(envelopes)
        if kinds:
            groups = group_envelopes(envelopes)
            report.divergence = Finding(
                comm=comm_id, seq=seq, kinds=kinds, groups=groups,
                t_start_ns=min(by_seq[r][seq].t_start_ns for r in members if seq in by_seq[r]),
                text=desync_message(seq, comm_id, kinds, groups))
            break
    no_dump = [r for r in range(size) if r not in members]
    top = max(reached.values())
    if low < top or no_dump:
        # With every dumped member level, the absent ones are reported against the newest
        # collective the others started (the one a killed rank left them waiting in).
        seq = low if low < top else max(top - 1, 0)
        missing = [r for r in sorted(members) if reached[r] <= seq]
        present = [r for r in sorted(members) if reached[r] > seq]
        envelopes = [_envelope(r, by_seq[r][seq]) for r in present if seq in by_seq[r]]
        stops_at = {r: (by_seq[r].get(reached[r] - 1)) for r in missing}
        finding = Finding(comm=comm_id, seq=seq, kinds=[MismatchKind.MISSING_RANKS],
                          groups=group_envelopes(envelopes), missing=missing, no_dump=no_dump,
                          stops_at=stops_at,
                          t_start_ns=min((by_seq[r][seq].t_start_ns for r in present
                                          if seq in by_seq[r]), default=0))
        finding.text = missing_message(finding, reached)
        report.missing = finding
    return report


def missing_message(f: Finding, reached: Dict[int, int]) -> str:
    """``collective #5 on COMM_WORLD is missing ranks: rank 1 never started it`` and details."""
    absent = sorted(f.missing + f.no_dump)
    lines = [f"collective #{f.seq} on {f.comm} is missing ranks: {compact_ranks(absent)} "
             f"never started it"]
    if f.groups:
        lines.append("  started by:")
        lines += format_groups(f.groups, [], indent="    ")
    for r in f.missing:
        last = f.stops_at.get(r)
        where = f"stops at #{reached[r] - 1}" if reached[r] else "issued no collective"
        if last is not None:
            where += f" ({_describe(last)})"
        lines.append(f"  rank {r}: {where}")
    for r in f.no_dump:
        lines.append(f"  rank {r}: no dump (killed, or ran without TYPEDCOLL_TRACE_DIR)")
    return "\n".join(lines)


def _describe(e: Entry) -> str:
    text = f"{e.op}[{e.schema}]" if e.schema else e.op
    text += f" at {e.site}"
    if e.step is not None:
        text += f" step {e.step}"
    if e.state == "failed":
        return f"{text}, failed: {e.error}"
    return f"{text}, {'in flight at dump time' if e.state == 'started' else e.state}"


def analyze(dumps: Dict[int, Dump], last: int = 5) -> Report:
    """Analyse per-rank dumps (world rank -> dump)."""
    comms: Dict[str, Dict[int, CommDump]] = {}
    for dump in dumps.values():
        for c in dump.comms:
            comms.setdefault(c.id, {})[c.rank] = c
    reports = [analyze_comm(cid, comms[cid]) for cid in sorted(comms)]
    findings = [f for r in reports for f in (r.divergence, r.missing) if f is not None]
    # Divergences first: a missing rank is usually the consequence of an earlier desync.
    first = min(findings, key=lambda f: (MismatchKind.MISSING_RANKS in f.kinds, f.t_start_ns),
                default=None)
    tails: Dict[int, List[Tuple[str, Entry]]] = {}
    for rank, dump in sorted(dumps.items()):
        merged = [(c.id, e) for c in dump.comms for e in c.entries]
        merged.sort(key=lambda item: item[1].t_start_ns)
        tails[rank] = merged[-last:] if last > 0 else []
    return Report(consistent=not findings, ranks=sorted(dumps), comms=reports, first=first,
                  last=tails)


# --- output ----------------------------------------------------------------------------------
def format_report(report: Report, dumps: Dict[int, Dump], source: str) -> str:
    """The human-readable report."""
    lines = [f"typedcoll trace: {len(dumps)} dump{'s' if len(dumps) != 1 else ''} "
             f"({compact_ranks(report.ranks)}) in {source}"]
    for rank, d in sorted(dumps.items()):
        lines.append(f"  rank {rank}: dumped on {d.reason or '?'} ({d.host} pid {d.pid})")
    lines.append("")
    if report.first is not None:
        lines.append(f"first finding: {report.first.text.splitlines()[0].rstrip(':')}")
        lines.append("")
    for c in report.comms:
        world = "" if c.world_ranks == list(range(c.size)) else \
            f", world {compact_ranks(c.world_ranks)}"
        span = f"#{c.compared[0]}-#{c.compared[1]}" if c.compared else "none"
        lines.append(f"{c.comm} ({c.size} ranks{world}; compared collectives {span}):")
        if c.divergence is None and c.missing is None:
            lines.append("  consistent" if c.compared else
                         "  consistent sequence numbers; no entries to compare (flight recorder "
                         "off, TYPEDCOLL_TRACE_BUFFER=0?)")
        for finding in (c.divergence, c.missing):
            if finding is not None:
                lines += ["  " + line for line in finding.text.split("\n")]
    lines.append("")
    lines.append("last entries per rank (oldest first):")
    for rank, tail in report.last.items():
        lines.append(f"  rank {rank}:" + ("" if tail else " (none recorded)"))
        for comm_id, e in tail:
            lines.append(f"    {comm_id} #{e.seq} {_describe(e)}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``typedcoll trace DIR [--json] [--last K]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="typedcoll trace",
        description="Merge per-rank flight-recorder dumps (TYPEDCOLL_TRACE_DIR) and report the "
                    "first divergent collective and missing ranks. Exit 0: consistent; 1: a "
                    "divergence or missing ranks; 2: unreadable input.")
    parser.add_argument("directory", help="the directory holding rank<R>.json dumps")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--last", type=int, default=5, metavar="K",
                        help="entries to show from the end of each rank's buffer (default 5)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        dumps = load_dir(args.directory)
    except TraceInputError as exc:
        print(f"typedcoll trace: error: {exc}", file=sys.stderr)
        return 2
    report = analyze(dumps, max(args.last, 0))
    if args.json:
        doc = msgspec.to_builtins(report)
        doc = {"format": "typedcoll-trace-report", "version": 1, **doc}
        print(msgspec.json.encode(doc).decode())
    else:
        print(format_report(report, dumps, args.directory))
    return 0 if report.consistent else 1
