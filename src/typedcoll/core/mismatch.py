"""Mismatch analysis: pure logic over per-rank envelope descriptions, no communicator.

The same analysis serves a live :class:`DesyncError` (the ranks exchange their
:class:`EnvelopeInfo` once they have seen that the compact headers differ), hang reports and the
offline trace analyzer (records read back from per-rank dumps). :func:`describe` is the one
formatter of "what a rank was calling"; ``core.desync`` writes a DesyncError's text from it.
"""

from __future__ import annotations

import enum
from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgspec

from .identity import ordinal
from .sites import format_column
from .wire import INTERNAL_PAYLOADS, REDUCING_OPS, ROOTED_OPS


class MismatchKind(enum.Enum):
    """One aspect in which the ranks of a collective disagree."""

    SEQUENCE = "sequence"
    COMMUNICATOR = "communicator"
    OP = "op"
    CALL = "call site"
    SCHEMA = "schema"
    STEP = "step"
    ROOT = "root"
    REDUCE_OP = "reduce op"
    SHAPE = "shape"
    DTYPE = "dtype"
    SETTINGS = "settings"
    MISSING_RANKS = "missing ranks"


MismatchKind.__module__ = "typedcoll"


class Note(msgspec.Struct, frozen=True, kw_only=True):
    """A rank-local decision recorded with ``comm.note(key, value)``."""

    key: str
    value: Any = None
    site: str = "?"
    step: Optional[int] = None


class Branch(msgspec.Struct, frozen=True):
    """The role branch a call is written in (``core.arms``): ``key`` names the ``if`` and the
    k-th call of a name in its arms (the same for both arms' calls), ``arm`` which arm (0, 1);
    ``outer``: the enclosing branches that pair the call too, as (key, arm), innermost first."""

    key: str
    arm: int
    outer: Tuple[Tuple[str, int], ...] = ()

    def candidates(self) -> List[Tuple[str, int]]:
        return [(self.key, self.arm), *self.outer]


# The callers past those kept (core.callers.too_deep), named by their digest: never pairs by role
TOO_DEEP_SITE = "(more callers: {:08x})"
_TOO_DEEP_HEAD = TOO_DEEP_SITE.split("{")[0]


class Caller(msgspec.Struct, frozen=True):
    """A caller of a call made for its callers (``core.callers``: written in a role branch, or
    outside its function's loops): its site, as an envelope's own (the file and line, the
    column, the thin wrappers passed), and the role branch that call is written in, where it is
    one's."""

    site: str
    column: Optional[int] = None
    via: Optional[str] = None
    branch: Optional[Branch] = None


class EnvelopeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What one rank says it is calling: the readable form of its envelope."""

    rank: int
    seq: int
    op: str
    schema: str = ""
    fingerprint: str = ""
    comm: str = ""
    site: str = "?"
    column: Optional[int] = None  # where on the site's line the call starts, 0-based
    name: Optional[str] = None
    occurrence: int = 0
    step: Optional[int] = None
    root: Optional[int] = None
    reduce_op: Optional[str] = None
    shape: Optional[Tuple[int, ...]] = None
    dtype: Optional[str] = None
    settings: Optional[str] = None
    thread: str = ""
    error_type: Optional[str] = None
    error: Optional[str] = None
    notes: Tuple[Note, ...] = ()
    branch: Optional[Branch] = None
    via: Optional[str] = None  # the thin wrapper the call went through (core.identity)
    callers: Tuple[Caller, ...] = ()  # of a call made for its callers, innermost first
    # An unnamed rooted call in the arm of a role branch whose arms pair none of its calls:
    # where that branch is, and why (core.arms.unpaired_of); said in a DesyncError's hint.
    unpaired: Optional[str] = None


class Group(msgspec.Struct, frozen=True):
    """Ranks whose envelopes agree in every field shown, and that envelope (its first rank's).

    Decisions (notes) are not shown in the envelope line, so ranks of one group may differ in
    them: ``member_notes`` then holds each rank's, in the order of ``ranks`` (empty where they
    all noted alike)."""

    ranks: Tuple[int, ...]
    envelope: EnvelopeInfo
    member_notes: Tuple[Tuple[Note, ...], ...] = ()

    def notes_by_rank(self) -> List[Tuple[int, Tuple[Note, ...]]]:
        if not self.member_notes:
            return [(r, self.envelope.notes) for r in self.ranks]
        return list(zip(self.ranks, self.member_notes))


def role_split(envelopes: Sequence[EnvelopeInfo], root: Optional[int]) -> bool:
    """Every envelope names no ``name=``, and at every level of the call (its site, then each
    caller, ``core.callers``) the ranks name one site or split by one role branch with one rank
    alone in its arm: ``root`` where it is known, else any one rank (a dump holds no root; the
    live verdict checked it)."""
    return split_levels(envelopes, root) is not None


Level = Tuple[str, Optional[int], Optional[str], Optional[Branch]]


def levels(e: EnvelopeInfo) -> List[Level]:
    """A call's site and its callers', innermost first: (site, column, via, branch)."""
    return [(e.site, e.column, e.via, e.branch),
            *((c.site, c.column, c.via, c.branch) for c in e.callers)]


def split_levels(envelopes: Sequence[EnvelopeInfo], root: Optional[int]
                 ) -> Optional[List[Optional[str]]]:
    """``role_split``'s pairing: for each level, None where every rank names one site there, else
    the key of the role branch that splits them (:func:`split_branch`: the root alone in its arm,
    at a caller's level as at the call's own site); None where the ranks do not pair, or name
    one site at every level. A caller's arms both call the function, so the root alone is what
    tells two arms that make one call apart from a rank that left out one call of two by its
    role (``if rank != last: return bo(work)`` / ``return bo(control)``). Every rank reads the
    same envelopes, so every rank pairs alike."""
    if any(e.name is not None for e in envelopes):
        return None
    chains = [levels(e) for e in envelopes]
    if len({len(chain) for chain in chains}) != 1 or \
            any(level[0].startswith(_TOO_DEEP_HEAD) for chain in chains for level in chain):
        return None
    keys: List[Optional[str]] = []
    for depth in range(len(chains[0])):
        row = [chain[depth] for chain in chains]
        if len(set(row)) == 1:  # one site (a cut text too: the branch then tells arms apart)
            keys.append(None)
            continue
        key = split_branch([level[3] for level in row], [level[2] for level in row], root)
        if key is None:
            return None
        keys.append(key)
    return keys if any(key is not None for key in keys) else None


def split_branch(branches: Sequence[Optional[Branch]], vias: Sequence[Optional[str]],
                 root: Optional[int]) -> Optional[str]:
    """The key of the branch that splits one level of the ranks' calls, or None: the root's
    innermost branch, named by every rank (as its own innermost or an enclosing one), with the
    root alone in its arm. Only the root's innermost: where the root's call pairs in an ``if`` of
    its own, receivers elsewhere are another call's (two conditionals, each a role branch, under
    a rank-local ``ready``), while receivers split further (``elif``) still pair through the
    branch that holds them. Without a root (a dump) any one rank alone, by its innermost.

    Every rank must have gone through the same thin wrapper (``via``, or none): a branch whose
    arms reach two wrappers (``fn = send_size if ... else send_flag`` called in both arms) is
    two calls, as the wrappers' own lines were before thin wrappers were passed over."""
    if any(b is None for b in branches) or len(set(vias)) > 1:
        return None
    arms_of = [dict(b.candidates()) for b in branches]  # type: ignore[union-attr]
    leads = range(len(branches)) if root is None else [root] if 0 <= root < len(branches) \
        else []
    for lead in leads:
        key = branches[lead].key  # type: ignore[union-attr]
        arms = [a.get(key) for a in arms_of]
        if None not in arms and len(set(arms)) == 2 and arms.count(arms[lead]) == 1:
            return key
    return None


def _identity(e: EnvelopeInfo) -> Any:
    return ("name", e.name) if e.name is not None else ("site", e.site, e.column, e.via,
                                                           e.callers)


# (kind, how to read the compared value from an envelope), in the order messages list them
_CHECKS = (
    (MismatchKind.SEQUENCE, lambda e: e.seq),
    (MismatchKind.COMMUNICATOR, lambda e: e.comm),
    (MismatchKind.OP, lambda e: e.op),
    (MismatchKind.CALL, _identity),
    (MismatchKind.SCHEMA, lambda e: (e.schema, e.fingerprint)),
    (MismatchKind.STEP, lambda e: e.step),
    (MismatchKind.ROOT, lambda e: e.root),
    (MismatchKind.REDUCE_OP, lambda e: e.reduce_op),
    (MismatchKind.SHAPE, lambda e: e.shape),
    (MismatchKind.DTYPE, lambda e: e.dtype),
    (MismatchKind.SETTINGS, lambda e: e.settings),
)


def _shown(e: EnvelopeInfo) -> Tuple[Any, ...]:
    return (e.seq, e.comm, e.op, e.schema, e.fingerprint, e.site, e.column, e.name, e.occurrence,
            e.step, e.root, e.reduce_op, e.shape, e.dtype, e.settings, e.error, e.via,
            e.callers)


def group_envelopes(envelopes: Sequence[EnvelopeInfo]) -> List[Group]:
    """Ranks grouped by identical envelopes, groups ordered by their lowest rank."""
    by_key: Dict[Tuple[Any, ...], List[EnvelopeInfo]] = {}
    for env in sorted(envelopes, key=lambda e: e.rank):
        by_key.setdefault(_shown(env), []).append(env)
    return [Group(tuple(e.rank for e in members), members[0],
                  () if all(e.notes == members[0].notes for e in members)
                  else tuple(e.notes for e in members))
            for members in by_key.values()]


def mismatch_kinds(envelopes: Sequence[EnvelopeInfo]) -> List[MismatchKind]:
    """The aspects in which the envelopes differ, in a fixed order."""
    return [kind for kind, read in _CHECKS if len({read(e) for e in envelopes}) > 1]


_ROOTS_CLASS_OPS = frozenset({"bcast", "scatter"})


def as_the_roots_class(envelopes: List[EnvelopeInfo]) -> List[EnvelopeInfo]:
    """A receiver of bcast or scatter that names no schema takes the root's class: read it as
    the one class the other ranks name, where they name one. Else a call that differs only in
    its root would also read as a schema divergence, and the analyzer, whose records of such
    receivers name no class, would find one in a healthy call of the README's own form
    (``comm.bcast(x if rank == 0 else None)``)."""
    if not envelopes or envelopes[0].op not in _ROOTS_CLASS_OPS or \
            any(e.op != envelopes[0].op for e in envelopes):
        return envelopes
    named = {(e.schema, e.fingerprint) for e in envelopes if e.schema}
    if len(named) != 1 or len(named) == len(envelopes):
        return envelopes
    schema, fingerprint = named.pop()
    return [e if e.schema else msgspec.structs.replace(e, schema=schema, fingerprint=fingerprint)
            for e in envelopes]


def rank_runs(ranks: Sequence[int]) -> str:
    """``[7, 6, 4, 5]`` -> ``"7,6,4-5"``: the ranks in the given order, consecutive ones as runs."""
    runs: List[str] = []
    for i, r in enumerate(ranks):
        if i and r == ranks[i - 1] + 1:
            runs[-1] = f"{runs[-1].split('-')[0]}-{r}"
        else:
            runs.append(str(r))
    return ",".join(runs)


def ordered_ranks(ranks: Sequence[int], most: Optional[int] = 32) -> str:
    """``[7, 6, 4, 5]`` -> ``"ranks 7,6,4-5"``, in the given order; past ``most`` ranks (None:
    no limit), the first ``most`` and a count."""
    shown = ranks if most is None else ranks[:most]
    more = f",... ({len(ranks)} in all)" if len(shown) < len(ranks) else ""
    return ("ranks " if len(ranks) > 1 else "rank ") + rank_runs(shown) + more


def compact_ranks(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 4, 5]`` -> ``"ranks 0-2,4-5"``; ``[3]`` -> ``"rank 3"``."""
    ordered = sorted(set(ranks))
    return ordered_ranks(ordered, None) if ordered else "no ranks"


def numbering(p: Any) -> str:
    """How communicator ``p`` numbers its ranks, where not as the job does: `` (ranks 0-3 here
    are world ranks 4-7)``, so that the ranks a message names can be found; "" where alike."""
    try:
        world = p.transport.world_ranks()
    except Exception:  # a message must never fail for want of this note
        return ""
    return numbering_of(p.size, world)


def numbering_of(size: int, world: Optional[Sequence[int]]) -> str:
    """:func:`numbering` of a communicator of ``size`` ranks whose world ranks are ``world``
    (the trace analyzer's, from dumps)."""
    if world is None or list(world) == list(range(size)):
        return ""
    here = compact_ranks(range(size))
    return f" ({here} here {'is' if size == 1 else 'are'} world {ordered_ranks(world)})"


def comm_name(p: Any) -> str:
    """``p``'s name as messages give it: with its :func:`numbering`."""
    return f"{p.name}{numbering(p)}"


def label(op: str, schema: str) -> str:
    """``allgather[RankState]``, or the bare op for collectives without a payload schema."""
    return f"{op}[{schema}]" if schema else op


def place(env: EnvelopeInfo, show_column: bool = False, callers: bool = True) -> str:
    """Where a rank made its call: ``engine.py:88 through Dist.tp_allgather (dist.py:40)``, the
    caller's line alone naming every use of a wrapper alike; with ``callers``, the lines that
    called its function too (``called from scheduler.py:194``), which a desync needs to tell two
    uses of one helper apart and a failure to send does not (its site is where to look)."""
    text = format_column(env.site, env.column) if show_column else env.site
    if env.via is not None and env.name is None:
        text += f" through {env.via}"
    if env.name is None and callers:
        for caller in env.callers:
            where = format_column(caller.site, caller.column) if show_column else caller.site
            text += f" called from {where}" + (f" through {caller.via}" if caller.via else "")
    return text


def describe(env: EnvelopeInfo, kinds: Sequence[MismatchKind] = (),
             show_fingerprint: bool = False, show_column: bool = False) -> str:
    """What a rank was calling, as one fragment::

        allgather[RankState] at model.py:88, its 3rd call, step 451

    ``kinds`` adds the fields that differ; ``show_fingerprint`` tells apart two versions of a
    same-named schema, ``show_column`` two calls written on one line (``model.py:88:17``).
    """
    schema = env.schema
    if show_fingerprint and env.fingerprint and schema:
        schema = f"{schema}@{env.fingerprint[:8]}"
    if env.op in INTERNAL_PAYLOADS and MismatchKind.SCHEMA not in kinds:
        schema = ""  # typedcoll's own settings, not the caller's (unless they differ)
    text = label(env.op, schema)
    if MismatchKind.COMMUNICATOR in kinds:
        text += f" on {env.comm}"
    # A record (hang reports, dumps) keeps no root or reduce op: left out there, not "None";
    # and an op that takes none shows none (the ops differ then, and say so).
    if env.op in ROOTED_OPS and (env.root is not None or MismatchKind.ROOT in kinds):
        text += f" root={env.root}"
    if env.op in REDUCING_OPS and (env.reduce_op is not None or
                                   MismatchKind.REDUCE_OP in kinds):
        text += f" op={env.reduce_op}"
    if env.shape is not None:
        text += f" shape={tuple(env.shape)}"
    if env.dtype is not None:
        text += f" dtype={env.dtype}"
    if env.settings is not None and MismatchKind.SETTINGS in kinds:
        text += f" {env.settings}"
    if MismatchKind.SEQUENCE in kinds:
        # The creation exchange is numbered apart from the collectives, with the top number.
        text += " (creation)" if env.seq == 2 ** 64 - 1 else f" seq={env.seq}"
    if env.name is not None:
        text += f" name={env.name!r}"
    text += f" at {place(env, show_column)}"
    if env.occurrence:
        text += f", its {ordinal(env.occurrence)} call"
    if env.step is not None:
        text += f", step {env.step}"
    if env.error:
        text += f" (failed: {env.error})"
    return text


def format_groups(groups: Sequence[Group], kinds: Sequence[MismatchKind],
                  indent: str = "  ") -> List[str]:
    labels = [compact_ranks(g.ranks) + ":" for g in groups]
    width = max(len(text) for text in labels)
    schemas = {(g.envelope.schema, g.envelope.fingerprint) for g in groups}
    collide = len(schemas) > len({name for name, _ in schemas})
    # Columns where two calls (or two of their callers) on one line are what differs.
    sites = {((g.envelope.site, g.envelope.column),)
             + tuple((c.site, c.column) for c in g.envelope.callers) for g in groups}
    one_line = len(sites) > len({tuple(site for site, _ in chain) for chain in sites})
    return [f"{indent}{text:<{width}} {describe(g.envelope, kinds, collide, one_line)}"
            for text, g in zip(labels, groups)]


def differing_notes(groups: Sequence[Group]) -> List[Tuple[str, str, List[Tuple[str, str]]]]:
    """The latest notes whose values differ between groups: (key, site, [(ranks, value)])."""
    per_rank = sorted(pair for g in groups for pair in g.notes_by_rank())
    if len(per_rank) < 2:
        return []
    by_key: Dict[str, Dict[int, Note]] = {}
    note: Optional[Note]
    for rank, notes in per_rank:
        for note in notes:
            by_key.setdefault(note.key, {})[rank] = note
    out = []
    for key, noted in by_key.items():
        values = {repr(n.value) for n in noted.values()}
        if len(values) < 2 and len(noted) == len(per_rank):
            continue
        sites = sorted({n.site for n in noted.values()})
        rows: Dict[str, List[int]] = {}
        for rank, _ in per_rank:
            note = noted.get(rank)
            rows.setdefault(repr(note.value) if note else "(not noted)", []).append(rank)
        out.append((key, " and ".join(sites), [(compact_ranks(r), v) for v, r in rows.items()]))
    return out


def format_decisions(groups: Sequence[Group], indent: str = "  ") -> List[str]:
    """``decisions that differ: can_queue at x.py:12 — ranks 0,2-3: True; rank 1: False``."""
    return decision_lines(differing_notes(groups), indent)


def decision_lines(rows: Sequence[Tuple[str, str, List[Tuple[str, str]]]],
                   indent: str = "  ") -> List[str]:
    """``differing_notes``'s rows as ``format_decisions`` shows them."""
    if not rows:
        return []
    lines = [f"{indent}decisions that differ:"]
    for key, site, values in rows:
        lines.append(f"{indent}  {key} at {site} — " + "; ".join(f"{r}: {v}" for r, v in values))
    return lines
