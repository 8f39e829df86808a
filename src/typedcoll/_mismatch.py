"""Mismatch analysis: pure logic over per-rank envelope descriptions, no communicator.

The same analysis serves a live :class:`DesyncError` (the ranks exchange their
:class:`EnvelopeInfo` once they have seen that the compact headers differ) and the offline trace
analyzer (records read back from per-rank dumps).
"""

from __future__ import annotations

import enum
from typing import Dict, List, Optional, Sequence, Tuple

import msgspec

from ._wire import REDUCING_OPS, ROOTED_OPS


class MismatchKind(enum.Enum):
    """One aspect in which the ranks of a collective disagree."""

    SEQUENCE = "sequence"
    OP = "op"
    SCHEMA = "schema"
    STEP = "step"
    ROOT = "root"
    REDUCE_OP = "reduce op"
    SHAPE = "shape"
    DTYPE = "dtype"
    CALL_SITE = "call site"
    MISSING_RANKS = "missing ranks"


MismatchKind.__module__ = "typedcoll"


class EnvelopeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What one rank says it is calling: the readable form of its envelope."""

    rank: int
    seq: int
    op: str
    schema: str
    fingerprint: str = ""
    site: str = "?"
    site_checked: bool = False
    step: Optional[int] = None
    root: Optional[int] = None
    reduce_op: Optional[str] = None
    shape: Optional[Tuple[int, ...]] = None
    dtype: Optional[str] = None
    error: Optional[str] = None


class Group(msgspec.Struct, frozen=True):
    """Ranks whose envelopes agree in every field shown, and that envelope."""

    ranks: Tuple[int, ...]
    envelope: EnvelopeInfo


# (kind, how to read the compared value from an envelope)
_CHECKS = (
    (MismatchKind.SEQUENCE, lambda e: e.seq),
    (MismatchKind.OP, lambda e: e.op),
    (MismatchKind.SCHEMA, lambda e: (e.schema, e.fingerprint)),
    (MismatchKind.STEP, lambda e: e.step),
    (MismatchKind.ROOT, lambda e: e.root),
    (MismatchKind.REDUCE_OP, lambda e: e.reduce_op),
    (MismatchKind.SHAPE, lambda e: e.shape),
    (MismatchKind.DTYPE, lambda e: e.dtype),
)


def _shown(e: EnvelopeInfo) -> tuple:
    return (e.seq, e.op, e.schema, e.fingerprint, e.site, e.step, e.root, e.reduce_op, e.shape,
            e.dtype)


def group_envelopes(envelopes: Sequence[EnvelopeInfo]) -> List[Group]:
    """Ranks grouped by identical envelopes, groups ordered by their lowest rank."""
    by_key: Dict[tuple, List[EnvelopeInfo]] = {}
    for env in sorted(envelopes, key=lambda e: e.rank):
        by_key.setdefault(_shown(env), []).append(env)
    return [Group(tuple(e.rank for e in members), members[0]) for members in by_key.values()]


def mismatch_kinds(envelopes: Sequence[EnvelopeInfo]) -> List[MismatchKind]:
    """The aspects in which the envelopes differ, in a fixed order."""
    kinds = [kind for kind, read in _CHECKS if len({read(e) for e in envelopes}) > 1]
    if any(e.site_checked for e in envelopes) and len({e.site for e in envelopes}) > 1:
        kinds.append(MismatchKind.CALL_SITE)
    return kinds


def compact_ranks(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 4, 5]`` -> ``"ranks 0-2,4-5"``; ``[3]`` -> ``"rank 3"``."""
    ordered = sorted(set(ranks))
    runs: List[str] = []
    start = prev = ordered[0]
    for r in ordered[1:] + [None]:  # type: ignore[list-item]
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ("ranks " if len(ordered) > 1 else "rank ") + ",".join(runs)


def describe(env: EnvelopeInfo, kinds: Sequence[MismatchKind] = (),
             show_fingerprint: bool = False) -> str:
    """One envelope as a log fragment: ``allgather[RankState] root=0 at file.py:88 step 451``.

    ``show_fingerprint`` tells apart two versions of a same-named schema.
    """
    schema = env.schema
    if show_fingerprint and env.fingerprint:
        schema = f"{schema}@{env.fingerprint[:8]}"
    text = f"{env.op}[{schema}]" if schema else env.op
    if env.op in ROOTED_OPS or MismatchKind.ROOT in kinds:
        text += f" root={env.root}"
    if env.op in REDUCING_OPS or MismatchKind.REDUCE_OP in kinds:
        text += f" op={env.reduce_op}"
    if env.shape is not None:
        text += f" shape={tuple(env.shape)}"
    if env.dtype is not None:
        text += f" dtype={env.dtype}"
    if MismatchKind.SEQUENCE in kinds:
        text += f" seq={env.seq}"
    text += f" at {env.site}"
    if env.step is not None:
        text += f" step {env.step}"
    if env.error:
        text += f" (failed: {env.error})"
    return text


def format_groups(groups: Sequence[Group], kinds: Sequence[MismatchKind],
                  indent: str = "  ") -> List[str]:
    labels = [compact_ranks(g.ranks) + ":" for g in groups]
    width = max(len(label) for label in labels)
    schemas = {(g.envelope.schema, g.envelope.fingerprint) for g in groups}
    collide = len(schemas) > len({name for name, _ in schemas})
    return [f"{indent}{label:<{width}} {describe(g.envelope, kinds, collide)}"
            for label, g in zip(labels, groups)]


def desync_message(seq: int, comm: str, kinds: Sequence[MismatchKind],
                   groups: Sequence[Group]) -> str:
    kinds_text = ", ".join(k.value for k in kinds) or "envelope"
    head = f"collective #{seq} on {comm} diverged ({kinds_text}):"
    return "\n".join([head] + format_groups(groups, kinds))
