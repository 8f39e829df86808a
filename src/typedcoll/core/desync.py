"""The text of a :class:`DesyncError`: its heading, every group's call (``mismatch.describe``),
the decisions that differ, and a hint that says what to do about the difference found.

A hint is written for what the kinds of difference say together: a schema that differs alone
(give every rank one schema=), calls that differ only by their callers (one helper reached
from two lines), only by the thin wrappers passed (a dispatcher's one line), or only by their
sites. Pure logic over :class:`EnvelopeInfo`, no communicator, so the live check, hang reports
and the trace analyzer write the same text.
"""

from __future__ import annotations

import re
from typing import AbstractSet, Dict, List, Optional, Sequence, Tuple

from .identity import ordinal
from .sites import NO_COLUMNS, format_column
from .mismatch import (Caller, EnvelopeInfo, Group, MismatchKind, compact_ranks,
                       format_decisions, format_groups, place, role_split)

# Ops whose callers choose the schema (schema=), and reductions, which take the value's type.
_SCHEMA_OPS = frozenset({"allgather", "gather", "bcast", "scatter", "alltoall"})
_VALUE_OPS = frozenset({"allreduce", "reduce", "reduce_scatter"})
_TAKING_OPS = frozenset({"bcast", "scatter"})  # whose receivers may take the root's schema
_PYTHON_SCALARS = frozenset({"int", "float", "bool"})


def _object_list_length(schema: str) -> Optional[int]:
    """n where ``schema`` is the torch drop-in's list of n objects (``tuple[Any, ..., Any]``:
    a list's length is part of its schema there), else None."""
    if schema == "tuple[]":
        return 0
    return schema.count("Any") if re.fullmatch(r"tuple\[Any(, Any)*\]", schema) else None


def _numpy_scalars_beside_python_values(kinds: Sequence[MismatchKind], groups: Sequence[Group],
                                        ops: AbstractSet[str]) -> List[str]:
    """Where some ranks sent a numpy scalar (a 0-d array: ``arr.sum()``, ``np.any(...)``) and the
    others a Python value (an idle rank's ``0`` or ``False``): the schemas may print alike
    (``bool``), so say what differs."""
    if len(ops) != 1 or not set(kinds) <= {MismatchKind.SCHEMA, MismatchKind.SHAPE,
                                           MismatchKind.DTYPE}:
        return []
    numpy = [g for g in groups if g.envelope.shape is not None and len(g.envelope.shape) == 0]
    python = [g for g in groups if g.envelope.shape is None and g.envelope.dtype is None
              and g.envelope.schema in _PYTHON_SCALARS]
    if not numpy or not python or len(numpy) + len(python) != len(groups):
        return []
    dtypes = " and ".join(sorted({str(g.envelope.dtype) for g in numpy}))
    values = " and ".join(sorted({g.envelope.schema for g in python}))
    ranks = compact_ranks(sorted(r for g in numpy for r in g.ranks))
    others = compact_ranks(sorted(r for g in python for r in g.ranks))
    casts = "int(x) or float(x)" if ops & _VALUE_OPS else "int(x), float(x) or bool(x)"
    return [f"  {ranks} sent a numpy scalar (dtype {dtypes}), {others} a Python {values}: a "
            f"numpy scalar travels as a 0-d array, so give every rank's value one type "
            f"({casts} on every rank, or a numpy scalar on every rank)"]


def _recursion(groups: Sequence[Group]) -> List[str]:
    """Where a rank's callers repeat a line (a function that calls itself), what recursion
    counts for."""
    chains = [g.envelope.callers for g in groups]
    repeats = any(len({(c.site, c.column) for c in chain}) < len(chain) for chain in chains)
    # one outermost caller, reached through more levels on some ranks: a recursion's depth
    deeper = len({chain[-1] for chain in chains}) == 1 and len({len(c) for c in chains}) > 1
    if not (repeats or deeper):
        return []
    return [f"  {'' if repeats else 'if the function calls itself: '}a function's calls of "
            f"itself are callers too (a walk that calls at each node tells its nodes apart by "
            f"depth): ranks that recurse to different depths before one collective are two "
            f"calls unless it has a name="]


def _parting(groups: Sequence[Group]) -> List[str]:
    """Where chains of callers first differ past their first level (an entry point that one
    rank alone runs under a profiler, or in a thread): that level, so that no reader has to
    compare two long rows by eye."""
    chains = [g.envelope.callers for g in groups]
    level = next((k for k in range(max(map(len, chains))) if len(
        {(c[k].site, c[k].column, c[k].via) if k < len(c) else None for c in chains}) > 1), 0)
    if level < 1:
        return []

    # columns where the lines alone do not tell the callers apart, as the rows show them
    columns = len({c[level].site if level < len(c) else None for c in chains}) < len(groups)

    def at(chain: Sequence[Caller]) -> str:
        if level >= len(chain):
            return "no further caller"
        caller = chain[level]
        where = format_column(caller.site, caller.column) if columns else caller.site
        return where + (f" through {caller.via}" if caller.via else "")
    return [f"  the callers agree up to the {ordinal(level)} and part at the "
            f"{ordinal(level + 1)}: " + "; ".join(f"{compact_ranks(g.ranks)}: {at(chain)}"
                                                 for g, chain in zip(groups, chains))]


def _innermost(via: str) -> str:
    """The wrapper of a chain of thin ones (``A through B``) that makes the call: ``B``."""
    return via.rsplit(" through ", 1)[-1]


def _hint(kinds: Sequence[MismatchKind], groups: Sequence[Group]) -> List[str]:
    ops = {g.envelope.op for g in groups}
    taking = {g.envelope.schema for g in groups if g.envelope.op in _TAKING_OPS} & {"", "?"}
    if MismatchKind.SCHEMA in kinds and taking and \
            len({g.envelope.schema for g in groups} - taking) <= 1:
        # receivers that named no schema take the root's: no disagreement of their making
        kinds = [kind for kind in kinds if kind is not MismatchKind.SCHEMA]
    scalars = _numpy_scalars_beside_python_values(kinds, groups, ops)
    if scalars:
        return scalars
    if list(kinds) == [MismatchKind.SCHEMA] and len(ops) == 1:
        op = ops.pop()
        schemas = " and ".join(sorted({g.envelope.schema for g in groups}))
        if op in _VALUE_OPS:
            return [f"  only the value types differ ({schemas}): a reduction takes each value's "
                    f"own type, so give every rank's value one type (int(x), float(x) or one "
                    f"numpy dtype)"]
        if op in _SCHEMA_OPS and len({g.envelope.schema for g in groups}) == 1:
            return [f"  the ranks' {schemas} differ in structure (fields, their types, or "
                    f"the defaults a receiver fills in for fields a sender leaves out): define "
                    f"it alike on every rank (one version of the code, and defaults that do "
                    f"not depend on the rank or its environment)"]
        if op in _SCHEMA_OPS:
            lengths = {_object_list_length(g.envelope.schema) for g in groups}
            if None not in lengths:
                counts = " and ".join(str(n) for n in sorted(n for n in lengths if n is not None))
                return [f"  only the lengths of the object lists differ ({counts} items): "
                        f"torch's object collectives take a list of the same length on every "
                        f"rank"]
            return [f"  only the schemas differ ({schemas}): if ranks may send different types "
                    f"here, give every rank's call one schema= that admits them all "
                    f"(Optional[X] where a rank has nothing to send, or a Union)"]
        if op == "flush":
            names = {g.envelope.schema for g in groups}
            if len({re.sub(r"#\d+$", "", n) for n in names}) == 1 < len(names):
                return [f"  only the numbers of flushes made at one line differ ({schemas}): "
                        f"objects made there are numbered in the order each rank made them, so "
                        f"a rank flushed one where its peers flushed another, or the ranks made "
                        f"them in different orders: then make them in one order on every rank, "
                        f"or give each its own batch_name= (one per stage, say)"]
            if len(names) > 1:
                return [f"  only the flushes' batches differ ({schemas}): each SymmetricFlush "
                        f"is named where it was created, or by its batch_name=, so a rank "
                        f"flushed one where its peers flushed another (a rank skipped or added "
                        f"a flush), or built it elsewhere: if these are one flush point, flush "
                        f"them with one name= (or build them with one batch_name=)"]
            return ["  only the flush's channels differ: build the SymmetricFlush with the same "
                    "channels and message types on every rank (and one version of each type)"]
    if ops == {"flush"} and set(kinds) == {MismatchKind.CALL, MismatchKind.SCHEMA} and \
            all(g.envelope.name is None for g in groups):
        return ["  the ranks flushed different SymmetricFlush objects from different lines: if "
                "these are one flush point (a driver's and its workers'), flush them with one "
                "name=; else a rank skipped or added a flush before this one"]
    if list(kinds) == [MismatchKind.CALL]:
        unplaced = [g for g in groups if g.envelope.column is None and g.envelope.name is None
                    and any(h.envelope.site == g.envelope.site and h.envelope.column is not None
                            for h in groups)]
        if unplaced:
            ranks = compact_ranks([r for g in unplaced for r in g.ranks])
            return [f"  {ranks} ran code with {NO_COLUMNS}, its peers with: a site's column "
                    f"is part of its identity, so run every rank alike (remove __pycache__ "
                    f"written without columns), or give the call a name="]
        named = [g for g in groups if g.envelope.name is not None]
        if len(named) == len(groups):
            return ["  only the names differ: each name= is a collective of its own, so a rank "
                    "skipped or added a call before this one, or the ranks named one call "
                    "differently"]
        if named:
            ranks = compact_ranks([r for g in named for r in g.ranks])
            return [f"  {ranks} named the call and the others did not: if these are the same "
                    f"collective, give it the same name= on every rank; else a rank skipped or "
                    f"added a call before this one"]
        # One place in the function (one site, or the arms of one role branch) reached from
        # different callers; where the sites differ as well, the sites' hint below is the one
        places = {(g.envelope.site, g.envelope.column, g.envelope.via) if g.envelope.branch is None
                  else g.envelope.branch.key for g in groups}
        if len(places) == 1 and all(g.envelope.callers for g in groups) and \
                len({g.envelope.callers for g in groups}) > 1:
            return ["  the callers differ: a call made outside its function's loops (a "
                    "helper's) or in a loop it leaves (a retry loop's), written in a role "
                    "branch's arm, or one of several its function "
                    "picks between and returns, is one call per line that calls its function, "
                    "so a rank skipped or added a call of it before this one, or the ranks "
                    "reach it from two places (a driver and its workers): "
                    "then call it from one line on every rank, or pass each use a name= of its "
                    "own down to the call (one name= written inside the function makes all its "
                    "uses one call)"] + _parting(groups) + _recursion(groups)
        vias = {g.envelope.via for g in groups}
        if len(vias) == 1 and None not in vias:
            via = vias.pop()
            innermost = _innermost(str(via))
            # A name= written in the innermost wrapper would make every use of it one call
            # (two votes over one shared _all_gather): the name must be this use's alone.
            return [f"  only the callers of {via} differ: a call through a thin wrapper is its "
                    f"caller's, so a rank skipped or added a call before this one, or these are "
                    f"one collective reached from two places: then give this use a name= of its "
                    f"own, passed down to the call in {innermost} (a name= written in "
                    f"{innermost} itself makes every call through it one call)"]
        if len({(g.envelope.site, g.envelope.column) for g in groups}) == 1:
            return ["  only the thin wrappers differ: the ranks reached this line through "
                    "different ones (a dispatcher, a decorator's frame, a worker thread, a "
                    "subclass's override, a proxy only some ranks use), so a rank skipped or "
                    "added a call before this one, or these are one collective: then give "
                    "this call the same name= on every rank"]
        refusal = next((g.envelope.unpaired for g in groups if g.envelope.unpaired), None)
        if refusal is not None:
            # Not a name's case: a name= on calls one arm lacks would pair them with the other
            # arm's next call, and hand that call their data.
            return [f"  these calls are in the arms of the {refusal}: a rank in one arm meets "
                    f"another call of the other. Make both arms issue the same calls in the "
                    f"same order (a call only the root makes, under a condition of its own: "
                    f"broadcast the condition first so that every rank makes it, or post it to a "
                    f"SymmetricFlush); a name= would pair such a call with the other arm's next "
                    f"one and hand it this call's data"]
        if len({g.envelope.occurrence for g in groups}) > 1:
            # One collective reached from two places is made as often at each: counts that
            # differ say a rank made a call the others did not, which a name= would pair.
            return ["  only the call sites differ, and the ranks have made these calls a "
                    "different number of times: a rank most likely skipped or added a call "
                    "before this one (a name= would then pair it with another call and hand "
                    "that call its data); only if these are one collective reached from "
                    "different places, and called as often on every rank, give every rank's "
                    "call the same name="]
        inner = {_innermost(g.envelope.via) if g.envelope.via else None for g in groups}
        if len(inner) == 1 and None not in inner:
            # Every rank's call made in one helper (a padding vote reached from the real batch
            # and from the dummy batch): the name goes down to it; written in it, it would make
            # every use of the helper one call (two votes over one shared _all_gather).
            helper = inner.pop()
            return [f"  only the call sites differ: if these are the same collective reached "
                    f"from different places, give every rank's call the same name=, passed "
                    f"down to the call in {helper} (a name= written in {helper} itself makes "
                    f"every call through it one call: only where it makes one collective)"]
        return ["  only the call sites differ: if these are the same collective called from "
                "different places, give every rank's call the same name="]
    if MismatchKind.STEP in kinds and len(kinds) == 1:
        unset = sorted(r for g in groups if g.envelope.step is None for r in g.ranks)
        if unset:
            # Not an iteration skipped: a clock that only some ranks set (a driver's loop sets
            # it, its workers' never does) stamps nothing on the others.
            stamped = sorted(r for g in groups if g.envelope.step is not None for r in g.ranks)
            out = [f"  only {compact_ranks(stamped)} stamped this call with a step: "
                   f"{compact_ranks(unset)} never set the step clock on this communicator (or "
                   f"set it to None); set it on every rank alike (set_step in the loop each "
                   f"rank runs, or step= on the call)"]
            if len({g.envelope.step for g in groups if g.envelope.step is not None}) > 1:
                out.append(f"  and {compact_ranks(stamped)} are at different steps of the same "
                           f"call: a rank skipped or repeated an iteration")
            return out
        return ["  the ranks are at different steps of the same call: a rank skipped or "
                "repeated an iteration"]
    return []


def desync_message(seq: int, comm: str, kinds: Sequence[MismatchKind],
                   groups: Sequence[Group], head: str = "") -> str:
    """The text of a :class:`DesyncError` over ``groups``, headed ``head`` (else the
    collective's number on ``comm``)."""
    kinds_text = ", ".join(k.value for k in kinds) or "envelope"
    first = f"{head or f'collective #{seq} on {comm}'} diverged ({kinds_text}):"
    return "\n".join([first] + format_groups(groups, kinds) + format_decisions(groups)
                      + _hint(kinds, groups))


def one_call(a: EnvelopeInfo, b: EnvelopeInfo) -> bool:
    """Whether two ranks' envelopes name one call as the live check pairs them: one op and
    ``name=`` (a name is the call wherever it is written), else one site with the same wrappers
    and callers, or a rooted call's arms of one role branch (an elif's too)."""
    if a.op != b.op or a.name != b.name:
        return False
    if a.name is not None or place(a) == place(b) and a.column == b.column:
        return True
    return role_split([a, b], None)


def failed_elsewhere(failed: Sequence[int], infos: Sequence[EnvelopeInfo]) -> str:
    """A failure's verdict compares no failed rank (it may not know its schema or root), so a
    rank that failed at another call than its peers' would read as a plain failure: name it,
    and the ranks' calls (op, call site or name=), as a failure's last words. Empty where
    every failed rank's call pairs with a peer's (:func:`one_call`), or its site is unknown."""
    kept = [r for r in range(len(infos)) if r not in failed]
    away = [r for r in failed if infos[r].site != "?" and kept
            and not any(one_call(infos[r], infos[q]) for q in kept)]
    if not away or role_split(infos, None):
        return ""
    # Calls of one line that only columns tell apart (a conditional's two calls) show them.
    columns = len({place(i, True) for i in infos}) > len({place(i) for i in infos})
    calls = [(i.op, i.name, place(i, columns)) for i in infos]
    groups: Dict[Tuple[str, Optional[str], str], List[int]] = {}
    for r, call in enumerate(calls):
        groups.setdefault(call, []).append(r)
    said = "; ".join(f"{compact_ranks(ranks)}: {op}"
                     f"{f' name={name!r}' if name is not None else ''} at {at}"
                     for (op, name, at), ranks in groups.items())
    return (f" (and {compact_ranks(away)} made another call than the others, so the ranks are "
            f"out of step too: {said})")
