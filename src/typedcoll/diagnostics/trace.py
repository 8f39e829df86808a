"""``typedcoll trace DIR [--json] [--last K] [--clock-skew S]``: the first divergent collective.

Reads every ``rank<R>.json`` in DIR (``dumps`` writes them), analyses them (``analysis``) and
prints the report, or with ``--json`` the same as one JSON object (``typedcoll-trace-report``,
documented in ``docs/diagnostics.md``). Exit codes: 0 consistent, 1 a divergence or missing
ranks, 2 unreadable input.

Dumps may be hostile or corrupt, so reading is bounded in memory and time whatever they hold:
only regular files are opened (a FIFO named ``rank0.json`` is refused without blocking), a file
over ``MAX_FILE_BYTES`` is refused from its size before a byte is read, every number a dump
claims (a communicator's size, ranks, sequence numbers) is checked against hard limits before
anything is sized by it, and each rank keeps only the newest ``WINDOW`` entries per
communicator. The analysis then loops over entries held, never over claimed ranges.

Dumps of one run are the only input that makes sense, and a directory reused across runs keeps
the files of ranks that did not dump this time (a killed rank's, or those of a larger earlier
run), which the analysis would blame. So ``one_run`` refuses dumps whose recorded collectives
cannot have been the same calls: a checked collective ends on no rank before every rank has
started it, so where one rank's call ended more than the hosts' clock skew before another
rank's same-numbered call started, they were two runs' calls.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import msgspec

from ..core.plumbing import register_internal
from .analysis import Report, analyze, clean, format_report
from .model import FORMAT, REPORT_FORMAT, REPORT_VERSION, VERSION, CommDump, Dump, DumpHeader

MAX_FILE_BYTES = 64 * 2 ** 20
MAX_FILES = 65536
MAX_RANKS = 2 ** 20  # the largest communicator size (and world rank) a dump may claim
MAX_COMMS = 4096  # communicators per dump
MAX_MEMBERS = 2 ** 22  # the sizes of every distinct communicator, added up
WINDOW = 4096  # newest entries kept per communicator per rank
MAX_ENTRIES = 4_000_000  # kept over all dumps: beyond, the input is refused as too large
MAX_LAST = 1000
MAX_SEQ = 2 ** 64 - 1
CLOCK_SKEW_S = 1.0  # how far apart the hosts' clocks may be, by default
_DUMP_NAME = re.compile(r"^rank(\d{1,7})\.json$")
_HEADER = msgspec.json.Decoder(DumpHeader)
_DUMP = msgspec.json.Decoder(Dump)


class TraceInputError(Exception):
    """A dump that cannot be read: names the file and what is wrong with it."""


def read_bounded(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of regular file ``path``, refused (TraceInputError) above ``limit`` bytes."""
    try:
        # O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TraceInputError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TraceInputError(f"{path}: not a regular file (a FIFO, device or directory "
                                  f"named like a dump); refused")
        if info.st_size > limit:
            raise TraceInputError(f"{path}: {info.st_size} bytes, over the {limit} bytes a "
                                  f"dump may have; refused")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # it grew while we read
                raise TraceInputError(f"{path}: over the {limit} bytes a dump may have; "
                                      f"refused")
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_dump(data: bytes, source: str) -> Dump:
    """Decode and check one dump, or raise TraceInputError naming ``source`` and the problem."""
    try:
        header = _HEADER.decode(data)
    except msgspec.ValidationError as exc:
        raise TraceInputError(f"{source}: not a typedcoll trace dump ({exc})") from exc
    except msgspec.DecodeError as exc:
        raise TraceInputError(f"{source}: truncated or not JSON ({exc}); was the writer killed "
                              f"mid-dump, or is this not a typedcoll dump?") from exc
    if header.format != FORMAT:
        raise TraceInputError(f"{source}: not a typedcoll trace dump (expected format "
                              f"{FORMAT!r}, found {clean(repr(header.format), 80)})")
    if header.version != VERSION:
        raise TraceInputError(f"{source}: unsupported dump version {header.version!r} (this "
                              f"typedcoll reads version {VERSION})")
    try:
        dump = _DUMP.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise TraceInputError(f"{source}: malformed typedcoll dump: {exc}") from exc
    check_dump(dump, source)
    return dump


def check_dump(dump: Dump, source: str) -> None:
    """Every number later code sizes or loops by, within hard limits; windows trimmed."""
    def bad(what: str) -> TraceInputError:
        return TraceInputError(f"{source}: malformed typedcoll dump: {what}")

    if not 0 <= dump.rank < MAX_RANKS:
        raise bad(f"rank {dump.rank} outside 0..{MAX_RANKS - 1}")
    if len(dump.comms) > MAX_COMMS:
        raise bad(f"{len(dump.comms)} communicators, over the {MAX_COMMS} accepted")
    for c in dump.comms:
        where = f"communicator {clean(c.id, 80)!r}"
        if not 1 <= c.size <= MAX_RANKS:
            raise bad(f"{where}: size {c.size} outside 1..{MAX_RANKS}")
        if not 0 <= c.rank < c.size:
            raise bad(f"{where}: rank {c.rank} outside 0..{c.size - 1}")
        if not 0 <= c.seq <= MAX_SEQ:
            raise bad(f"{where}: seq {c.seq} outside 0..2**64-1")
        if c.world_ranks is not None and (len(c.world_ranks) != c.size or any(
                not 0 <= w < MAX_RANKS for w in c.world_ranks)):
            raise bad(f"{where}: world_ranks must hold {c.size} ranks below {MAX_RANKS}")
        numbered = set()
        for e in c.entries:
            if not 0 <= e.seq <= MAX_SEQ:
                raise bad(f"{where}: entry seq {e.seq} outside 0..2**64-1")
            # A rank numbers its collectives once each: a repeated number is two files or two
            # runs merged, and aligning by it would compare one of them at random.
            if e.op != "create":
                if e.seq in numbered:
                    raise bad(f"{where}: two entries numbered #{e.seq}")
                numbered.add(e.seq)
        del c.entries[:-WINDOW]


def load_dir(directory: str) -> Dict[int, Dump]:
    """Every ``rank<R>.json`` in ``directory``, by world rank, checked."""
    try:
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it if _DUMP_NAME.match(e.name))
    except OSError as exc:
        raise TraceInputError(f"{directory}: cannot list the directory: "
                              f"{exc.strerror or exc}") from exc
    if len(names) > MAX_FILES:
        raise TraceInputError(f"{directory}: {len(names)} dumps, over the {MAX_FILES} this "
                              f"reader accepts")
    dumps: Dict[int, Dump] = {}
    members: Dict[Tuple[str, int], str] = {}
    layouts: Dict[str, Tuple[int, Optional[List[int]], str]] = {}  # size, world ranks, file
    kept = claimed = 0
    for name in names:
        path = os.path.join(directory, name)
        dump = parse_dump(read_bounded(path), path)
        if dump.rank != int(_DUMP_NAME.match(name).group(1)):  # type: ignore[union-attr]
            raise TraceInputError(f"{path}: the dump says it is rank {dump.rank}'s")
        if dump.rank in dumps:
            raise TraceInputError(f"{path}: a second dump for rank {dump.rank}")
        for c in dump.comms:
            key = (c.id, c.rank)
            if key in members:
                raise TraceInputError(f"{path}: communicator {clean(c.id, 80)!r} rank {c.rank} "
                                      f"is also in {members[key]}")
            members[key] = path
            if c.id not in layouts:
                claimed += c.size
                if claimed > MAX_MEMBERS:
                    raise TraceInputError(f"{path}: the communicators' sizes add up to over "
                                          f"{MAX_MEMBERS} ranks; refused")
            size, ranks, first = layouts.setdefault(c.id, (c.size, c.world_ranks, path))
            if size != c.size:
                raise TraceInputError(f"{path}: communicator {clean(c.id, 80)!r} has {c.size} "
                                      f"ranks here and {size} in {first}")
            # Members of one communicator agree on who its ranks are; where they do not, the
            # analysis would name ranks by whichever file it read first.
            if ranks is not None and c.world_ranks is not None and ranks != c.world_ranks:
                at = next(i for i, (a, b) in enumerate(zip(c.world_ranks, ranks)) if a != b)
                raise TraceInputError(
                    f"{path}: communicator {clean(c.id, 80)!r} has world rank "
                    f"{c.world_ranks[at]} as its rank {at} here and world rank {ranks[at]} in "
                    f"{first}: dumps of two runs")
            kept += len(c.entries)
        if kept > MAX_ENTRIES:
            raise TraceInputError(f"{directory}: over {MAX_ENTRIES} entries in all; analyse a "
                                  f"copy holding fewer ranks")
        dumps[dump.rank] = dump
    if not dumps:
        raise TraceInputError(f"{directory}: no rank<R>.json dumps (set TYPEDCOLL_TRACE_DIR "
                              f"for the job to write them)")
    return dumps


def one_run(dumps: Dict[int, Dump], directory: str, skew_s: float = CLOCK_SKEW_S) -> None:
    """Refuse dumps from two runs (see the module doc). Only exchanges count: a tensor
    collective's entry may end before its peers start it (its check can be deferred)."""
    comms: Dict[str, List[Tuple[int, CommDump]]] = {}
    for rank, dump in dumps.items():
        for c in dump.comms:
            world = c.world_ranks[c.rank] if c.world_ranks is not None else rank
            comms.setdefault(c.id, []).append((world, c))
    for comm_id, members in sorted(comms.items()):
        ended = [{e.seq: e for e in c.entries if e.state == "completed" and e.t_end_ns and
                  not e.op.endswith("_tensor")} for _, c in members]
        for seq in sorted(set.intersection(*(set(by_seq) for by_seq in ended))):
            ends = [(by_seq[seq].t_end_ns or 0, world) for (world, _), by_seq in
                    zip(members, ended)]
            starts = [(-by_seq[seq].t_start_ns, world) for (world, _), by_seq in
                      zip(members, ended)]
            (first_end, early), (last_start, late) = min(ends), min(starts)  # lowest ranks
            gap = (-last_start - first_end) / 1e9
            if gap > skew_s:
                raise TraceInputError(
                    f"{directory}: rank {early}'s and rank {late}'s dumps are from different "
                    f"runs: collective #{seq} on {clean(comm_id, 80)} ended on rank {early} "
                    f"{gap:.1f} s before it started on rank {late} (a collective ends on no "
                    f"rank before every rank has started it); remove the dumps an earlier run "
                    f"left there, or pass --clock-skew with more than {skew_s:g} s where the "
                    f"hosts' clocks differ by more")


def report_json(report: Report) -> bytes:
    """The ``--json`` document (schema in docs/diagnostics.md)."""
    doc = {"format": REPORT_FORMAT, "version": REPORT_VERSION, **msgspec.to_builtins(report)}
    return msgspec.json.encode(doc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``typedcoll trace DIR [--json] [--last K] [--clock-skew S]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="typedcoll trace",
        description="Merge per-rank flight-recorder dumps (TYPEDCOLL_TRACE_DIR) and report the "
                    "first divergent collective, the decisions that differ, and missing ranks. "
                    "Exit 0: consistent; 1: a divergence or missing ranks; 2: unreadable input.")
    parser.add_argument("directory", help="the directory holding rank<R>.json dumps")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--last", type=int, default=5, metavar="K",
                        help=f"entries to show from the end of each rank's buffer (default 5, "
                             f"at most {MAX_LAST})")
    parser.add_argument("--clock-skew", type=float, default=CLOCK_SKEW_S, metavar="S",
                        help=f"how many seconds the hosts' clocks may differ by before dumps "
                             f"whose collectives do not overlap in time are refused as two "
                             f"runs' (default {CLOCK_SKEW_S:g})")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        dumps = load_dir(args.directory)
        one_run(dumps, args.directory, args.clock_skew)
    except TraceInputError as exc:
        print(f"typedcoll trace: error: {exc}", file=sys.stderr)
        return 2
    last = min(max(args.last, 0), MAX_LAST)
    report = analyze(dumps, last)
    try:
        if args.json:
            sys.stdout.write(report_json(report).decode() + "\n")
        else:
            print(format_report(report, dumps, args.directory, last))
        sys.stdout.flush()
    except BrokenPipeError:  # `typedcoll trace DIR | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if report.consistent else 1


register_internal(__file__)
