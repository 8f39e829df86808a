"""Where a value comes from: the taint lattice over symmetric and rank-local values.

A taint is a set of sources; the empty set is a symmetric value (the same on every rank). Kinds:

- ``local``: differs by what this rank holds or when it looks (queues, per-rank state, clocks,
  environment variables, caught exceptions, a parameter nobody analysed passes);
- ``rank``: differs by rank identity alone (``rank``, ``tp_rank``, a gather's result, which only the
  root gets) -- a role, harmless when both sides of a branch on it issue the same collectives;
- ``synced``: the value came from a collective that returns the same to every rank; it marks a
  symmetric value, so a gate on it is harmless and an attribute holding it stays symmetric;
- ``param``: a placeholder for a parameter of the function being analysed, replaced by what its
  callers pass once every function is analysed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, Mapping

LOCAL = "local"
RANK = "rank"
SYNCED = "synced"
PARAM = "param"

_KEEP = 12  # sources kept per kind (lowest lines first): enough to name the cause


@dataclass(frozen=True, order=True)
class Source:
    """``text`` is the expression or name, ``why`` its category, ``line`` where it arises.

    For ``param`` sources ``owner`` identifies the function and ``text`` the parameter; for a
    source standing for others across a call (:func:`collapse`), ``owner`` describes the cause it
    stands for, so that chains of calls do not nest their explanations.
    """

    kind: str
    line: int
    text: str
    why: str = ""
    owner: str = ""

    def describe(self) -> str:
        if self.owner and self.kind != PARAM:  # stands for a cause across a call
            where = f" at line {self.line}" if self.line else ""
            return f"{self.text}{where}: {self.why}"
        where = f", line {self.line}" if self.line else ""
        return f"{self.text} ({self.why}{where})" if self.why else self.text


Taint = FrozenSet[Source]
SYMMETRIC: Taint = frozenset()


def join(*taints: Taint) -> Taint:
    """Union, keeping every parameter placeholder and the first few sources of each kind."""
    nonempty = [t for t in taints if t]
    if not nonempty:
        return SYMMETRIC
    if len(nonempty) == 1:
        merged = nonempty[0]
    else:
        merged = frozenset().union(*nonempty)
    if len(merged) <= _KEEP:
        return merged
    return _cap(merged)


def _cap(merged: Taint) -> Taint:
    kept = []
    counts = {LOCAL: 0, RANK: 0, SYNCED: 0}
    for source in sorted(merged):
        if source.kind == PARAM:
            kept.append(source)
        elif counts[source.kind] < _KEEP:
            counts[source.kind] += 1
            kept.append(source)
    return frozenset(kept)


def local(text: str, why: str, line: int) -> Taint:
    return frozenset({Source(LOCAL, line, text, why)})


def rank(text: str, why: str, line: int) -> Taint:
    return frozenset({Source(RANK, line, text, why)})


def synced(text: str, line: int) -> Taint:
    return frozenset({Source(SYNCED, line, text, "a collective's result")})


def param(owner: str, name: str) -> Taint:
    return frozenset({Source(PARAM, 0, name, "", owner)})


def divergent(taint: Taint) -> bool:
    """Differs between ranks, by rank-local state or by rank identity."""
    return any(s.kind in (LOCAL, RANK) for s in taint)


def rank_local(taint: Taint) -> bool:
    return any(s.kind == LOCAL for s in taint)


def only_synced(taint: Taint) -> bool:
    """Came from collectives only: symmetric, and still symmetric when stored and read later."""
    return bool(taint) and all(s.kind == SYNCED for s in taint)


def substitute(taint: Taint, owner: str, bindings: Mapping[str, Taint]) -> Taint:
    """Replace ``owner``'s parameter placeholders by the taints bound to them."""
    if not any(s.kind == PARAM and s.owner == owner for s in taint):
        return taint
    parts = [frozenset(s for s in taint if not (s.kind == PARAM and s.owner == owner))]
    parts += [bindings.get(s.text, SYMMETRIC) for s in taint
              if s.kind == PARAM and s.owner == owner]
    return join(*parts)


def expand(taint: Taint, params: Mapping[str, Mapping[str, Taint]]) -> Taint:
    """Replace every parameter placeholder by what that parameter's callers pass."""
    if not any(s.kind == PARAM for s in taint):
        return taint
    parts = [frozenset(s for s in taint if s.kind != PARAM)]
    parts += [params.get(s.owner, {}).get(s.text, SYMMETRIC) for s in taint if s.kind == PARAM]
    return join(*parts)


# Causes named first: the ones a reader can act on before those that merely lack proof.
_WHY_ORDER = ("clock", "environment variable", "caught exception", "queue", "point-to-point",
              "rank-local call", "per-rank state", "module state", "parameter")


def _why_rank(why: str) -> int:
    for index, prefix in enumerate(_WHY_ORDER):
        if why.startswith(prefix):
            return index
    return len(_WHY_ORDER)


def first_cause(taint: Taint, text: str = "") -> Source:
    """The source to name for a divergent taint: rank-local before rank identity, one that the
    gate's own text mentions first, then by category and line."""
    return min((s for s in taint if s.kind in (LOCAL, RANK)),
               key=lambda s: (s.kind != LOCAL, s.text not in text, _why_rank(s.why), s.line,
                              s.text))


def describe_all(taint: Iterable[Source]) -> str:
    return "; ".join(s.describe() for s in taint)


def collapse(taint: Taint, text: str, verb: str, line: int) -> Taint:
    """One source standing for a value's rank-local (and one for its rank) causes, named after
    where it crossed a call (``self._batch() (returns self.queue ...)``); synced marks and
    parameter placeholders pass through. Keeps explanations short and taint sets small."""
    if not any(s.kind in (LOCAL, RANK) for s in taint):
        return taint
    kept = [s for s in taint if s.kind not in (LOCAL, RANK)]
    for kind in (LOCAL, RANK):
        causes = [s for s in taint if s.kind == kind]
        if causes:
            cause = first_cause(frozenset(causes))
            root = cause.owner or cause.describe()
            kept.append(Source(kind, line, text, f"{verb} {root}", root))
    return frozenset(kept)


def merge(a: Dict[str, Taint], b: Dict[str, Taint]) -> Dict[str, Taint]:
    """Two environments of locals where control flow joins: each name's taints joined."""
    if a is b:
        return dict(a)
    out = dict(a)
    for key, value in b.items():
        old = out.get(key)
        out[key] = value if old is None or old == value else join(old, value)
    return out
