"""The hang report: what a timed-out rank learns by asking every peer over the side channel.

A collective #N that times out raises :class:`~typedcoll.CollectiveTimeout`; before it does, the
protocol calls :func:`hang_report`, which asks every peer of the communicator where it is
(``side``) and waits at most ``GRACE`` seconds for the answers. A peer that has issued at most N
collectives on the communicator never arrived at #N: it is named with its last started collective
(on any communicator) and where it is now (file:line of the thread inside a collective, else of
its main thread). That covers a rank one call short, which skipped a call and moved on: it has
issued N and is somewhere else. A peer that does not answer (stuck in a C call that holds the
GIL, dead) is named as unresponsive, with what this rank knows of it: the last collective that
completed here, which every member took part in; one that an uncaught exception ended, and that
said so on its way out (``side.Ended``), is named with that exception and where it was raised.

A peer that arrived at another call as collective #N (its op or call identity differ from this
rank's, as the live check pairs calls) is named with that call: the ranks are out of step, not
only late.
The decisions that differ between the ranks that answered (``comm.note``) follow, in the same
words as a DesyncError's. The text follows ``core.mismatch``: :func:`describe` says what a rank
was calling, :func:`compact_ranks` lists ranks.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..core.call import Call
from ..core.channel import Channel
from ..core.errors import CREATE_SEQ, numbered
from ..core.plumbing import register_internal
from ..core.mismatch import (EnvelopeInfo, Group, MismatchKind, compact_ranks, describe,
                             format_decisions, role_split)
from ..core.protocol import LIVE, Protocol
from ..core.recorder import RecordEntry
from ..core.desync import one_call
from ..core.verdict import ABANDONED, heading
from . import side as side_channel
from . import state, watcher
from .model import CommState, PeerSeen, RankStatus

GRACE = 1.0  # how long the asker waits for answers: the report comes within timeout + GRACE
# An ending rank asks whether peers wait for it (waiting_for_this_rank): each ask's grace, the
# pause between asks, and how long it goes on asking.
END_GRACE, END_POLL, END_WINDOW = 0.5, 0.25, 5.0
MAX_DETAILED = 8  # ranks described one by one in each list; the rest are only listed
UNRESPONSIVE_WHY = ("it released this communicator already (a `with` block left by an "
                    "exception releases it on that rank alone), or it is stuck in a C call that "
                    "holds the GIL, dead, or running without typedcoll diagnostics")
_NONCES = itertools.count(int.from_bytes(os.urandom(3), "little") << 20)


class _Seen:
    """What the side channel told this rank of its peers, per channel (for dumps)."""

    lock = threading.Lock()
    # channel -> comm rank -> the latest
    peers: "weakref.WeakKeyDictionary[Channel, Dict[int, PeerSeen]]" = \
        weakref.WeakKeyDictionary()


def peers_seen(channel: Channel) -> List[PeerSeen]:
    with _Seen.lock:
        return [seen for _, seen in sorted(_Seen.peers.get(channel, {}).items())]


def _remember(channel: Channel, peers: Sequence[int], answers: Dict[int, RankStatus],
              asked_ns: int) -> None:
    now = time.time_ns()
    with _Seen.lock:
        seen = _Seen.peers.setdefault(channel, {})
        for r in peers:
            old = seen.get(r)
            status = answers.get(r)
            seen[r] = PeerSeen(
                rank=r, answered=status is not None, asked_ns=asked_ns,
                seen_ns=now if status is not None else (old.seen_ns if old else 0),
                status=status if status is not None else (old.status if old else None))


def ask_peers(p: Protocol, seq: int, reason: str, dump: bool,
              grace: float = GRACE) -> Tuple[Optional[Dict[int, RankStatus]], str]:
    """Every peer's answer that came within ``grace`` (None, and why, without a side channel)."""
    side = watcher.side_of(p.channel)
    if isinstance(side, str):
        return None, side
    peers = [r for r in range(p.size) if r != p.rank]
    query = side_channel.Query(next(_NONCES), p.rank, p.instance, seq, dump, reason[:200])
    asked_ns = time.time_ns()
    replies = side.ask(query, peers, time.monotonic() + grace)
    answers = {r: a.status for r, a in replies.items() if 0 <= r < p.size and r != p.rank}
    _remember(p.channel, peers, answers, asked_ns)
    return answers, ""


def waiting_for_this_rank(window: float = END_WINDOW) -> List[str]:
    """Called as this rank ends (an uncaught exception): over MPI, the communicators without a
    timeout whose peers wait inside a collective this rank never issued, and so never
    completes; one line each. Asked every ``END_POLL`` seconds for up to ``window``, since
    peers still computing reach their next collective later; empty once no peer answers
    (they have ended too) or when none waits. A timeout's peers report by themselves."""
    end = time.monotonic() + window
    protocols = [p for p in list(LIVE) if p.transport.kind == "mpi" and p.timeout is None
                 and p.size > 1 and not p.freed]
    while protocols:
        lines, answered = [], False
        for p in protocols:
            if time.monotonic() > end:
                break
            answers, _ = ask_peers(p, p.seq, f"rank {p.rank} is ending", False, END_GRACE)
            if not answers:
                continue
            answered = True
            waiting = sorted(r for r, status in answers.items() if _waits_at(status, p.seq))
            if waiting:
                lines.append(f"{compact_ranks(waiting)} of {p.name} wait for it in collective "
                             f"#{p.seq}, which has no timeout")
        if lines or not answered or time.monotonic() + END_POLL > end:
            return lines
        time.sleep(END_POLL)
    return []


def _waits_at(status: RankStatus, seq: int) -> bool:
    """Whether a peer is inside collective ``seq`` or a later one of the communicator asked."""
    comm = status.comm
    return comm is not None and waits_past(comm.seq, comm.last, status.collective is not None,
                                           seq)


def waits_past(issued: int, last: Optional[RecordEntry], inside: bool, seq: int) -> bool:
    """Whether a rank that issued ``issued`` collectives on a communicator, the newest
    recorded ``last`` (None: no recorder, and then ``inside``: it is in some collective), waits
    inside collective ``seq`` or a later one: one a peer that issued ``seq`` never joins."""
    if issued <= seq:
        return False
    if last is not None:
        return last.seq >= seq and last.state == "started"
    return inside


def hang_report(p: Protocol, call: Call) -> Tuple[Optional[Tuple[int, ...]], str]:
    """(ranks that never arrived or did not answer, report text) for the timed-out ``call``."""
    started = time.monotonic()
    # This rank's own deadline passed: it gave up by itself, so it did not come late, whatever
    # its peers' calls did (a peer that came late fails in turn once it reads the give-ups).
    gave_up = call.deadline is not None and started >= call.deadline - DEADLINE_SLACK_S
    reason = f"{heading(p, call.seq)} timed out"
    answers, why = ask_peers(p, call.seq, reason, state.trace_dir() is not None)
    if answers is None:
        return None, "\n".join([f"hang report unavailable: {why}"] + _last_together(p))
    took = time.monotonic() - started
    peers = [r for r in range(p.size) if r != p.rank]
    silent = [r for r in peers if r not in answers]
    ended = _farewells(p, silent)
    silent = [r for r in silent if r not in ended]
    absent: List[int] = []
    arrived = [p.rank]
    creation = call.seq == CREATE_SEQ  # a peer that holds the communicator is in its creation
    for r, status in sorted(answers.items()):
        comm = status.comm
        (arrived if comm is not None and (creation or comm.seq > call.seq) else absent).append(r)
    head = (f"hang report (side channel: {len(answers)} of {len(peers)} "
            f"{'peer' if len(peers) == 1 else 'peers'} answered "
            f"{f'in {took:.3f}' if not (silent or ended) else f'within {GRACE:g}'} s):")
    lines = [head]
    if absent:
        # The diagnostics id, not the name: two groups over the same ranks share a name, and
        # the peers' lines below name communicators by id.
        lines.append(f"  never arrived at {heading(p, call.seq, state.comm_id(p))}: "
                     f"{compact_ranks(absent)}")
        lines += _grouped(p, absent, lambda r: _absent_lines(p, answers[r]))
    for normal, title in ((False, "ended by an uncaught exception"),
                          (True, "ended normally")):
        these = sorted(r for r, message in ended.items() if message.normal == normal)
        if these:
            lines.append(f"  {title}: {compact_ranks(these)}")
            lines += _grouped(p, these, lambda r: [f"    {_WHO}: {ended[r].text}"])
    if ended and not silent:
        lines += _last_together(p, indent="    ")
    if silent:
        lines.append(f"  unresponsive: {compact_ranks(silent)} (no answer within {GRACE:g} s: "
                     f"{UNRESPONSIVE_WHY})")
        together = _last_together(p, indent="    ")
        lines += _grouped(p, silent, lambda r: [f"    {_WHO}: {_last_answer(p.channel, r)}"])
        lines += together
    if not absent and not silent and not ended:
        # Where each is tells a slow rank (in its own code, or between the phases of a
        # collective over gloo) from one waiting in a collective on another communicator.
        # Where this rank's wait ended before its deadline, peers whose call already failed
        # (they gave up on it, or came late too and learnt so first) mean this rank came late.
        # Where it gave up by itself, a peer whose call failed as abandoned came late.
        failed = {r: status.comm.last for r, status in answers.items()
                  if status.comm is not None and status.comm.last is not None
                  and status.comm.last.seq == call.seq and status.comm.last.state == "failed"}
        late = sorted(r for r, last in failed.items() if _came_late(last))
        if failed and not gave_up:
            lines.append(f"  every rank has started {numbered(call.seq)}, and "
                         f"{compact_ranks(sorted(failed))} already failed it: this rank came "
                         f"late; where each peer is now:")
        elif late:
            lines.append(f"  every rank has started {numbered(call.seq)}, "
                         f"{compact_ranks(late)} only after a rank had given up on it (it came "
                         f"late: its call failed as abandoned); where each peer is now:")
        else:
            lines.append(f"  every rank has started {numbered(call.seq)}: it is slow, or the "
                         f"transport is stuck; where each peer is now:")
        lines += _grouped(p, sorted(answers), lambda r: _absent_lines(p, answers[r]))
    lines.append(f"  arrived: {compact_ranks(arrived)}")
    lines += _other_calls(p, call.seq, arrived[1:], answers)
    lines += _decisions(p, answers)
    missing = tuple(sorted(absent + silent + list(ended)))
    return missing, "\n".join(lines)


DEADLINE_SLACK_S = 0.01  # a backend's timer may end its wait this much before our clock's deadline


def _came_late(entry: RecordEntry) -> bool:
    """Whether a failed call failed as abandoned: its rank came after a peer had given up."""
    return ABANDONED in (entry.error or "")


_WHO = "\0who\0"  # where a rank's description names it, filled in once per group


def _farewells(p: Protocol, silent: Sequence[int]) -> Dict[int, side_channel.Ended]:
    """What ended each of ``silent`` that said so before it ended (``side.Ended``)."""
    side = watcher.side_of(p.channel)
    if isinstance(side, str) or not silent:
        return {}
    try:
        return side.ended(silent)
    except Exception:  # a broken side channel: they stay unresponsive
        return {}


def _grouped(p: Protocol, ranks: Sequence[int],
             describe_rank: Callable[[int], List[str]]) -> List[str]:
    """Each rank's description, ranks described alike under one label (at 16 ranks and more,
    most absent ranks wait at the same line), at most MAX_DETAILED groups."""
    groups: Dict[Tuple[str, ...], List[int]] = {}
    for r in ranks:
        groups.setdefault(tuple(describe_rank(r)), []).append(r)
    lines: List[str] = []
    for body, members in list(groups.items())[:MAX_DETAILED]:
        lines.append(body[0].replace(_WHO, ranks_label(p, members), 1))
        lines += body[1:]
    if len(groups) > MAX_DETAILED:
        rest = [r for members in list(groups.values())[MAX_DETAILED:] for r in members]
        lines.append(f"    ... and {compact_ranks(rest)} (at most {MAX_DETAILED} descriptions)")
    return lines


def ranks_label(p: Protocol, members: Sequence[int]) -> str:
    """``rank 3``, ``ranks 0-2,5``, with their world ranks where they differ."""
    world = state.world_ranks(p.channel)
    text = compact_ranks(members)
    if world is None or any(r >= len(world) for r in members) \
            or all(world[r] == r for r in members):
        return text
    mapped = [world[r] for r in members]
    return f"{text} (world {compact_ranks(mapped)})"


def entry_text(e: RecordEntry, comm: Optional[str], now_ns: int) -> str:
    """``allgather[int] on COMM_WORLD seq=2 at prog.py:9, its 3rd call: completed`` (without
    ``on ...`` when ``comm`` is None)."""
    kinds = [MismatchKind.SEQUENCE] if comm is None else [MismatchKind.COMMUNICATOR,
                                                          MismatchKind.SEQUENCE]
    text = describe(_envelope(0, e, comm or ""), kinds)
    if e.state == "started":
        return f"{text}: in flight for {max(0, now_ns - e.t_start_ns) / 1e9:.1f} s"
    if e.state == "failed":
        return f"{text}: failed ({e.error})"
    return f"{text}: completed"


def _newest(status: RankStatus) -> Optional[CommState]:
    started = [(c.last.t_start_ns, i) for i, c in enumerate(status.comms) if c.last is not None]
    return status.comms[max(started)[1]] if started else None


def _other_calls(p: Protocol, seq: int, arrived: Sequence[int],
                 answers: Dict[int, RankStatus]) -> List[str]:
    """The arrived peers whose collective #``seq`` is another call than this rank's: the ranks
    are out of step, not only late, and the absent rank's arrival would end in a DesyncError.
    Calls pair as the live check pairs them: a name= wherever it is written, a rooted call in
    a role branch's arms (an elif's too) as one call; a schema is not compared (a bcast's
    receivers may name none)."""
    mine = state.comm_state(p).last
    if mine is None or mine.seq != seq:
        return []
    entries = {p.rank: mine}
    for r in arrived:
        comm = answers[r].comm
        if comm is not None and comm.last is not None and comm.last.seq == seq:
            entries[r] = comm.last
    calls = {r: _envelope(r, e) for r, e in entries.items()}
    if role_split(list(calls.values()), None):
        return []
    other = {r: e for r, e in entries.items() if not one_call(calls[r], calls[p.rank])}
    if not other:
        return []
    return ([f"  at another call as collective #{seq}: {compact_ranks(sorted(other))} (the ranks "
             f"are out of step)",
             f"    this rank: {_called(mine)}"]
            + _grouped(p, sorted(other), lambda r: [f"    {_WHO}: {_called(other[r])}"]))


def _envelope(rank: int, e: RecordEntry, comm: str = "") -> EnvelopeInfo:
    """A recorded call as ``rank``'s envelope: what pairs calls and what describes them."""
    return EnvelopeInfo(rank=rank, seq=e.seq, op=e.op, schema=e.schema, fingerprint=e.fingerprint,
                        comm=comm, site=e.site, column=e.column, name=e.name,
                        occurrence=e.occurrence, step=e.step, branch=e.branch, via=e.via,
                        callers=e.callers)


def _called(e: RecordEntry) -> str:
    """``barrier name='stats' at prog.py:9, its 2nd call, step 1``: a call, without its state."""
    return describe(_envelope(0, e))


def _absent_lines(p: Protocol, status: RankStatus) -> List[str]:
    now = status.time_ns
    inside = f", inside a collective on {status.collective}" if status.collective else ""
    if status.thread:
        lines = [f"    {_WHO}: now at {status.where} (thread {status.thread}{inside})"]
    else:
        lines = [f"    {_WHO}: the thread that created {p.name} there has ended"]
    newest = _newest(status)
    if newest is not None and newest.last is not None:
        lines.append(f"      last started: {entry_text(newest.last, newest.id, now)}")
    here = status.comm
    if here is None:
        lines.append(f"      it has no live {state.comm_id(p)} (not created there yet, or freed)")
    elif newest is None or newest.id != here.id:
        text = f"      on {here.id}: issued {here.seq} collectives"
        if here.last is not None:
            text += f", the last {entry_text(here.last, None, now)}"
        lines.append(text)
    return lines


def _last_answer(channel: Channel, r: int) -> str:
    seen = next((s for s in peers_seen(channel) if s.rank == r and s.status is not None), None)
    if seen is None or seen.status is None:
        return "it never answered this rank's side channel"
    age = (time.time_ns() - seen.seen_ns) / 1e9
    status = seen.status
    text = f"its last answer, {age:.1f} s ago: at {status.where}"
    newest = _newest(status)
    if newest is not None and newest.last is not None:
        text += f", last started {entry_text(newest.last, newest.id, status.time_ns)}"
    return text


def _last_together(p: Protocol, indent: str = "  ") -> List[str]:
    """The newest collective every rank took part in, from this rank's own recorder."""
    recorder = p.recorder
    if recorder is None:
        return [f"{indent}every rank took part in the first {max(p.seq - 1, 0)} collectives "
                f"on {p.name} (flight recorder off)"]
    done = None
    for number in range(recorder.count, recorder.count - len(recorder), -1):
        entry = recorder.entry(number)  # newest first: the in-flight one, then completed ones
        if entry.state == "completed":
            done = entry
            break
    if done is None:
        return []
    age = (time.time_ns() - (done.t_end_ns or done.t_start_ns)) / 1e9
    return [f"{indent}last collective every rank took part in: "
            f"{entry_text(done, p.name, time.time_ns())} {age:.1f} s ago"]


def _decisions(p: Protocol, answers: Dict[int, RankStatus]) -> List[str]:
    """The decisions that differ between the ranks that answered (and this rank)."""
    groups = [Group((p.rank,), EnvelopeInfo(rank=p.rank, seq=0, op="", notes=tuple(
        p.decisions())))]
    for r, status in sorted(answers.items()):
        notes = tuple(status.comm.notes) if status.comm is not None else ()
        groups.append(Group((r,), EnvelopeInfo(rank=r, seq=0, op="", notes=notes)))
    groups.sort(key=lambda g: g.ranks)
    return format_decisions(groups)


register_internal(__file__)
