"""The trace analysis: pure logic over decoded dumps (no communicator), unit-tested by hand.

In the manner of torch's flight-recorder analyzer: communicators are grouped by id (the same on
every member), each member's entries are aligned by sequence number, and two findings are
reported per communicator:

- the first divergent collective: the lowest seq that every dumped member holds and whose
  entries disagree (op, call site or name, schema, step: the same grouping and words as a live
  ``DesyncError``), followed by the decisions (notes) that differ between the groups;
- missing ranks: the lowest seq that some member never started (its count stops earlier), each
  with where it was at dump time; else, where every dumped member reached the same count, the
  newest collective when it did not complete (a timeout every rank reported), naming members
  with no dump at all (killed, or never wrote one) as unknown, not absent: a collective that
  completed anywhere had every member.

Everything here is bounded by what was read: loops run over entries held, never over a range of
sequence numbers or ranks a dump merely claims (``trace`` bounds the reading itself).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import msgspec

from ..core.plumbing import register_internal
from ..core.desync import desync_message
from ..core.mismatch import (EnvelopeInfo, Group, MismatchKind, Note, as_the_roots_class,
                             compact_ranks, decision_lines, describe, differing_notes,
                             format_groups, group_envelopes, mismatch_kinds, numbering_of,
                             role_split)
from ..core.recorder import RecordEntry
from ..core.verdict import ABANDONED
from .model import CommDump, CommState, Dump, RankStatus

MAX_FIELD = 200  # characters of any one string from a dump that reach the output
MAX_RANK_LINES = 16  # per finding: more ranks are summarised in one line
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: Optional[str], limit: int = MAX_FIELD) -> str:
    """A string from a dump, safe to print on one line: no control characters, bounded."""
    if text is None:
        return ""
    text = _UNSAFE.sub("?", text if len(text) <= 4 * limit else text[:4 * limit])
    return text if len(text) <= limit else text[:limit - 1] + "…"


class Finding(msgspec.Struct, kw_only=True):
    """A divergence, or missing ranks, at collective ``seq`` of communicator ``comm``."""

    comm: str
    seq: int
    kinds: List[MismatchKind]
    groups: List[Group]  # the ranks that started the collective, grouped by envelope
    missing: List[int] = []  # ranks whose count stops before ``seq``
    no_dump: List[int] = []  # ranks that left no dump
    stops_at: List[Tuple[int, Optional[RecordEntry]]] = []  # missing rank, its newest entry
    where: List[Tuple[int, str]] = []  # missing rank, where it was at dump time
    decisions: List[Tuple[str, str, List[Tuple[str, str]]]] = []
    # Members without a dump, as a dumped peer's side channel last heard them: (rank, heard
    # by, where it was, collectives it had issued, its newest entry).
    heard: List[Tuple[int, int, str, int, Optional[RecordEntry]]] = []
    t_start_ns: int = 0
    text: str = ""


class CommReport(msgspec.Struct, kw_only=True):
    """The analysis of one communicator."""

    comm: str
    size: int
    world_ranks: List[int]
    dumped: List[int]
    compared: Optional[Tuple[int, int]]  # lowest and highest seq every dumped member holds
    issued: int = 0  # the highest count of collectives a dumped member issued on it
    divergence: Optional[Finding] = None
    missing: Optional[Finding] = None


class RankTail(msgspec.Struct, kw_only=True):
    """A rank's newest entries, across its communicators, oldest first."""

    rank: int
    entries: List[Tuple[str, RecordEntry]]


class Report(msgspec.Struct, kw_only=True):
    """The whole analysis: ``consistent`` is False when any communicator has a finding."""

    consistent: bool
    ranks: List[int]
    comms: List[CommReport]
    first: Optional[Finding]
    last: List[RankTail]


def envelope(rank: int, e: RecordEntry, comm: str, notes: Sequence[Note] = ()) -> EnvelopeInfo:
    # The entry's error is left out: at a divergence it is the DesyncError itself, on every
    # rank; the last-entries section shows it.
    return EnvelopeInfo(rank=rank, seq=e.seq, op=clean(e.op, 64), schema=clean(e.schema),
                        fingerprint=clean(e.fingerprint, 64), comm=clean(comm),
                        site=clean(e.site), column=e.column,
                        name=None if e.name is None else clean(e.name),
                        occurrence=e.occurrence, step=e.step, root=e.root,
                        reduce_op=None if e.reduce_op is None else clean(e.reduce_op, 16),
                        notes=tuple(notes),
                        branch=e.branch, via=None if e.via is None else clean(e.via),
                        callers=tuple(msgspec.structs.replace(
                            c, site=clean(c.site), via=None if c.via is None else clean(c.via))
                            for c in e.callers))


def seq_label(e: RecordEntry) -> str:
    """``#12``, or ``creation`` for the exchange that created the communicator."""
    return "creation" if e.op == "create" else f"#{e.seq}"


def state_text(e: RecordEntry) -> str:
    """``completed``, ``in flight at dump time`` or ``failed (<the error's first line>)``."""
    if e.state == "failed":
        # The error's first line; a DesyncError's ends in ":" before its groups.
        return f"failed ({clean(e.error).rstrip(': ')})"
    if e.state == "started":
        return "in flight at dump time"
    return clean(e.state, 32)


def describe_entry(e: RecordEntry) -> str:
    """``allgather[RankState] at loop.py:10, its 4th call, step 3: completed``."""
    return f"{describe(envelope(0, e, ''))}: {state_text(e)}"


def _aligned(m: CommDump) -> Dict[int, RecordEntry]:
    # The creation exchange is numbered apart from the collectives (the top seq): not aligned.
    return {e.seq: e for e in m.entries if e.op != "create"}


def _paired_live(e: RecordEntry) -> bool:
    """The live verdict paired this call's arms: it completed, or it raised a rank's own
    failure (a bad argument: ``EncodeError`` there, ``PeerError`` naming it elsewhere), which
    the verdict gives only once the arms pair; a ``DesyncError`` or a timeout did not."""
    return e.state == "completed" or (e.state == "failed" and (e.error or "").startswith(
        ("EncodeError:", "PeerError:")))


def analyze_comm(comm_id: str, members: Dict[int, CommDump]) -> CommReport:
    """Align one communicator's members (comm rank -> its dump) by seq; see the module doc."""
    first = members[min(members)]
    size = first.size
    world = first.world_ranks if first.world_ranks is not None else list(range(size))
    by_seq = {r: _aligned(m) for r, m in members.items()}
    reached = {r: m.seq for r, m in members.items()}
    common = set.intersection(*(set(s) for s in by_seq.values())) if by_seq else set()
    shown = clean(comm_id) + numbering_of(size, world)  # findings name ranks as the comm does
    report = CommReport(comm=comm_id, size=size, world_ranks=list(world), dumped=sorted(members),
                        compared=(min(common), max(common)) if common else None,
                        issued=max(reached.values()))
    for seq in sorted(common):
        envelopes = as_the_roots_class([envelope(r, by_seq[r][seq], comm_id, members[r].notes)
                                         for r in sorted(members)])
        kinds = mismatch_kinds(envelopes)
        if (kinds == [MismatchKind.CALL] and role_split(envelopes, None) and
                all(_paired_live(by_seq[r][seq]) for r in members)):
            kinds = []  # a root and its receivers in a role branch's two arms, as live accepted
        if kinds:
            groups = group_envelopes(envelopes)
            report.divergence = Finding(
                comm=comm_id, seq=seq, kinds=kinds, groups=groups,
                decisions=differing_notes(groups),
                t_start_ns=min(by_seq[r][seq].t_start_ns for r in members),
                text=desync_message(seq, shown, kinds, groups))
            break
    no_dump = [r for r in range(size) if r not in members]
    low, top = min(reached.values()), max(reached.values())
    if low == top and no_dump and _nothing_waits(top, by_seq):
        no_dump = []
    if low < top or no_dump:
        # With every dumped member level, the absent ones are reported against the newest
        # collective the others started (the one a killed rank left them waiting in).
        seq = low if low < top else max(top - 1, 0)
        missing = [r for r in sorted(members) if reached[r] <= seq]
        present = [r for r in sorted(members) if reached[r] > seq]
        envelopes = [envelope(r, by_seq[r][seq], comm_id) for r in present if seq in by_seq[r]]
        heard = _heard_of(comm_id, members, no_dump)
        # Each member's latest notes (a member without a dump: as its peers last heard them):
        # what the absent ones decided where the others went on (an empty batch, a local
        # timeout) is what a reader needs first.
        notes = {r: m.notes for r, m in members.items()}
        notes.update((r, state.notes) for r, (_, _, state) in heard.items())
        noted = [Group((r,), EnvelopeInfo(rank=r, seq=seq, op="", notes=tuple(notes[r])))
                 for r in sorted(notes)]
        finding = Finding(
            comm=comm_id, seq=seq, kinds=[MismatchKind.MISSING_RANKS],
            groups=group_envelopes(envelopes), missing=missing, no_dump=no_dump,
            decisions=differing_notes(noted) if missing or heard else [],
            heard=[(r, by, clean(seen.where), state.seq, state.last)
                   for r, (by, seen, state) in sorted(heard.items())],
            stops_at=[(r, by_seq[r].get(reached[r] - 1)) for r in missing],
            where=[(r, clean(members[r].where)) for r in missing],
            t_start_ns=min((by_seq[r][seq].t_start_ns for r in present if seq in by_seq[r]),
                           default=0))
        finding.text = missing_message(finding, reached, shown)
        report.missing = finding
    elif common and any(by_seq[r][max(common)].state != "completed" for r in members):
        report.missing = _unfinished(comm_id, shown, max(common), by_seq)
    return report


def _heard_of(comm_id: str, members: Dict[int, CommDump],
              no_dump: Sequence[int]) -> Dict[int, Tuple[int, RankStatus, CommState]]:
    """For each member without a dump, the newest answer a dumped member's side channel had
    from it about this communicator: (who heard it, its answer, its state here)."""
    wanted = set(no_dump)
    out: Dict[int, Tuple[int, RankStatus, CommState]] = {}
    newest: Dict[int, int] = {}
    for r, m in members.items():
        for seen in m.peers:
            status = seen.status
            if seen.rank not in wanted or status is None or \
                    seen.seen_ns <= newest.get(seen.rank, -1):
                continue
            state = next((c for c in status.comms if c.id == comm_id), None) if \
                status.comm is None or status.comm.id != comm_id else status.comm
            if state is not None:
                out[seen.rank], newest[seen.rank] = (r, status, state), seen.seen_ns
    return out


def _nothing_waits(top: int, by_seq: Dict[int, Dict[int, RecordEntry]]) -> bool:
    """Whether dumped members level at count ``top`` wait on no one: they issued nothing here
    (a rank that left no dump cannot have kept them from a collective none of them started),
    or their newest collective completed, so every member took part in it."""
    return top == 0 or all(top - 1 in entries and entries[top - 1].state == "completed"
                           for entries in by_seq.values())


def _unfinished(comm_id: str, shown: str, seq: int,
                by_seq: Dict[int, Dict[int, RecordEntry]]) -> Finding:
    """Every member started ``seq`` and none is missing, but it did not complete on some: a
    timeout every rank reported (a rank that came late included), or dumps taken mid-call. A
    rank that started it only after every peer had given up came late: its peers waited for
    it, and no transport stalled (its own dump, written as it gave up in turn, is the newer)."""
    states: Dict[str, List[int]] = {}
    for r in sorted(by_seq):
        states.setdefault(state_text(by_seq[r][seq]), []).append(r)
    # Late: started after every other member's end. One pass, with the two latest ends (a
    # rank's own end is not its peers'), as dumps may hold thousands of members.
    ends = {r: by_seq[r][seq].t_end_ns for r in by_seq}
    known = sorted((end, r) for r, end in ends.items() if end is not None)
    unended = len(ends) - len(known)  # a rank without an end can be late; its peers cannot
    late = []
    for r in sorted(by_seq) if len(by_seq) > 1 and unended <= 1 else ():
        if unended and ends[r] is not None:
            continue
        peers_end = known[-1][0] if known[-1][1] != r else known[-2][0]
        if peers_end < by_seq[r][seq].t_start_ns:
            late.append(r)
    # A peer's end includes its hang report's wait (up to a second): a rank that came within
    # it is told by its own verdict, which its failed call records.
    abandoned = [r for r in sorted(by_seq) if r not in late and by_seq[r][seq].state == "failed"
                 and ABANDONED in (by_seq[r][seq].error or "")]
    if abandoned and len(abandoned) < len(by_seq):
        lines = [f"collective #{seq} on {shown} did not complete: "
                 f"{compact_ranks(sorted(late + abandoned))} started it after a peer had given "
                 f"up waiting (it came late: its call failed as abandoned; its peers waited "
                 f"for it)"]
    elif late:
        on_time = set(by_seq) - set(late)
        ended = max((ends[q] or 0 for q in on_time), default=0)
        after = min(by_seq[r][seq].t_start_ns for r in late) - ended
        lines = [f"collective #{seq} on {shown} did not complete: {compact_ranks(late)} "
                 f"started it {after / 1e9:.1f} s after every peer had given up waiting (it "
                 f"came late: its peers waited for it)"]
    else:
        lines = [f"collective #{seq} on {shown} did not complete: every member started it"]
    lines += [f"  {compact_ranks(ranks)}: {state}" for state, ranks in states.items()]
    return Finding(comm=comm_id, seq=seq, kinds=[MismatchKind.MISSING_RANKS], groups=[],
                   t_start_ns=min(by_seq[r][seq].t_start_ns for r in by_seq),
                   text="\n".join(lines))


def missing_message(f: Finding, reached: Dict[int, int], shown: str) -> str:
    """``collective #5 on COMM_WORLD is missing ranks: rank 1 never started it`` and details;
    ``shown``: the communicator as findings name it (with how it numbers its ranks)."""
    absent = sorted(f.missing + f.no_dump)
    if f.missing:
        lines = [f"collective #{f.seq} on {shown} is missing ranks: "
                 f"{compact_ranks(absent)} never started it"]
    else:  # only ranks without a dump: what they did is not known
        who = "it" if len(f.no_dump) == 1 else "they"
        lines = [f"collective #{f.seq} on {shown} did not complete, and "
                 f"{compact_ranks(f.no_dump)} left no dump: whether {who} started it is unknown"]
    if f.groups:
        lines.append("  started by:")
        lines += format_groups(f.groups, [], indent="    ")
    where = dict(f.where)
    stops = dict(f.stops_at)
    for r in f.missing[:MAX_RANK_LINES]:
        last = stops.get(r)
        text = f"stops at #{reached[r] - 1}" if reached[r] else "issued no collective"
        if last is not None:
            text += f" ({describe_entry(last)})"
        if where.get(r, "?") != "?":
            text += f"; at dump time at {where[r]}"
        lines.append(f"  rank {r}: {text}")
    if len(f.missing) > MAX_RANK_LINES:
        lines.append(f"  ... and {len(f.missing) - MAX_RANK_LINES} more ranks that stop earlier")
    if f.no_dump:
        lines.append(f"  {compact_ranks(f.no_dump)}: no dump (killed, or ran without "
                     f"TYPEDCOLL_TRACE_DIR)")
    for r, by, at, issued, last in f.heard[:MAX_RANK_LINES]:
        text = f"issued #{issued - 1}" if issued else "had issued no collective"
        if last is not None:
            text += f" ({describe_entry(last)})"
        lines.append(f"  rank {r}, as rank {by} last heard from it: {text}"
                     + (f"; at {at}" if at != "?" else ""))
    return "\n".join(lines + decision_lines(f.decisions))


def analyze(dumps: Dict[int, Dump], last: int = 5) -> Report:
    """Analyse per-process dumps (world rank -> dump)."""
    comms: Dict[str, Dict[int, CommDump]] = {}
    for dump in dumps.values():
        for c in dump.comms:
            comms.setdefault(c.id, {})[c.rank] = c
    reports = [analyze_comm(cid, comms[cid]) for cid in sorted(comms)]
    findings = [f for r in reports for f in (r.divergence, r.missing) if f is not None]
    # Divergences first: a missing rank is usually the consequence of an earlier desync.
    first = min(findings, key=lambda f: (MismatchKind.MISSING_RANKS in f.kinds, f.t_start_ns),
                default=None)
    # Per world rank, not per file: one process may hold several ranks (in-memory ranks).
    merged: Dict[int, List[Tuple[str, RecordEntry]]] = {}
    for dump in dumps.values():
        for c in dump.comms:
            rank = c.world_ranks[c.rank] if c.world_ranks is not None else dump.rank
            merged.setdefault(rank, []).extend(
                (c.id, e) for e in (c.entries[-last:] if last > 0 else []))
    tails = []
    for rank, items in sorted(merged.items()):
        items.sort(key=lambda item: item[1].t_start_ns)
        tails.append(RankTail(rank=rank, entries=items[-last:] if last > 0 else []))
    return Report(consistent=not findings, ranks=sorted(dumps), comms=reports, first=first,
                  last=tails)


def summary(f: Finding) -> str:
    """The first finding in one complete line."""
    if MismatchKind.MISSING_RANKS in f.kinds:
        return f.text.splitlines()[0]
    kinds = ", ".join(k.value for k in f.kinds)
    sides = "; ".join(f"{compact_ranks(g.ranks)} at {g.envelope.site}" for g in f.groups[:4])
    more = f"; and {len(f.groups) - 4} more groups" if len(f.groups) > 4 else ""
    return f"collective #{f.seq} on {clean(f.comm)} diverged ({kinds}): {sides}{more}"


def consistent_text(c: CommReport) -> str:
    """What a communicator without a finding compared: entries, counts only, or nothing."""
    if c.compared:
        return "consistent"
    if c.issued == 0:  # no entries because there was nothing to record
        by = "" if len(c.dumped) == c.size else \
            f" by {compact_ranks(c.dumped)} (the others left no dump)"
        return f"consistent: nothing was issued on it{by}"
    return ("consistent sequence numbers; no entries to compare (flight recorder off, "
            "TYPEDCOLL_TRACE_BUFFER=0?)")


def format_report(report: Report, dumps: Dict[int, Dump], source: str, last: int = 5) -> str:
    """The human-readable report; ``last`` 0 leaves out the last entries per rank."""
    lines = [f"typedcoll trace: {len(dumps)} dump{'s' if len(dumps) != 1 else ''} "
             f"({compact_ranks(report.ranks)}) in {clean(source, 1000)}"]
    for rank, d in sorted(dumps.items())[:MAX_RANK_LINES]:
        lines.append(f"  rank {rank}: dumped on {clean(d.reason) or '?'} ({clean(d.host)} pid "
                     f"{d.pid})")
    if len(dumps) > MAX_RANK_LINES:
        lines.append(f"  ... and {len(dumps) - MAX_RANK_LINES} more")
    lines.append("")
    if report.first is not None:
        lines += [f"first finding: {summary(report.first)}", ""]
    for c in report.comms:
        world = "" if c.world_ranks == list(range(c.size)) else \
            f", world {compact_ranks(c.world_ranks)}"
        span = f"#{c.compared[0]}-#{c.compared[1]}" if c.compared else "none"
        lines.append(f"{clean(c.comm)} ({c.size} ranks{world}; compared collectives {span}):")
        if c.divergence is None and c.missing is None:
            lines.append("  " + consistent_text(c))
        for finding in (c.divergence, c.missing):
            if finding is not None:
                lines += ["  " + line for line in finding.text.split("\n")]
    if last <= 0:
        return "\n".join(lines)
    lines += ["", "last entries per rank (oldest first):"]
    for tail in report.last[:MAX_RANK_LINES]:
        lines.append(f"  rank {tail.rank}:" + ("" if tail.entries else " (none recorded)"))
        for comm_id, e in tail.entries:
            lines.append(f"    {clean(comm_id)} {seq_label(e)} {describe_entry(e)}")
    return "\n".join(lines)


register_internal(__file__)
