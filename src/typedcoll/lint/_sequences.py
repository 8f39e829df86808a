"""The collective sequences of code paths, and when two of them match.

A sequence holds the collectives a path issues (``Op``), its exits (``("exit", kind)``, a raise
caught by a ``try`` with that ``try``'s id), loops (``("loop", body)``) and alternatives
(``("alt", a, b, ...)``), one path each. What reads code into sequences is ``_balance``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union, cast


class Op:
    """A collective in a sequence: its operation and, where the call writes it out, the source
    text of its communicator. Two match when their operations do and their communicators are not
    both known and different: a communicator left implicit may be any."""

    __slots__ = ("name", "comm")

    def __init__(self, name: str, comm: Optional[str]) -> None:
        self.name = name
        self.comm = comm

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Op):
            return NotImplemented
        return self.name == other.name and (
            self.comm is None or other.comm is None or self.comm == other.comm)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, {self.comm!r})"


Token = Union[Op, Tuple[object, ...]]
Seq = Tuple[Token, ...]

EXIT = "exit"
RAISE = ("raise",)
_MAX_PATHS = 64  # beyond this many paths through a side, only its structure is compared


def branches(tok: Token) -> Optional[Tuple[Seq, Seq]]:
    """The two sides of an ``("alt", a, b)`` token; None for anything else."""
    if isinstance(tok, tuple) and len(tok) == 3 and tok[0] == "alt":
        return cast(Seq, tok[1]), cast(Seq, tok[2])
    return None


def terminates(seq: Seq) -> bool:
    if not seq:
        return False
    last = seq[-1]
    if isinstance(last, tuple) and last and last[0] in (EXIT, "raise"):
        return True
    sides = branches(last)
    return sides is not None and terminates(sides[0]) and terminates(sides[1])


def has_ops(seq: Seq) -> bool:
    """Whether any collective is issued on some path of ``seq`` (exits alone issue none)."""
    for tok in seq:
        if isinstance(tok, Op):
            return True
        if tok and tok[0] in ("alt", "loop") and any(
                has_ops(cast(Seq, part)) for part in tok[1:]):
            return True
    return False


def _strict(seq: Seq) -> Tuple[object, ...]:
    """``seq`` with each collective as a plain tuple of its operation and communicator."""
    out: List[object] = []
    for tok in seq:
        if isinstance(tok, Op):
            out.append(("op", tok.name, tok.comm))
        elif tok and tok[0] in ("alt", "loop"):
            out.append((tok[0],) + tuple(_strict(cast(Seq, part)) for part in tok[1:]))
        else:
            out.append(tok)
    return tuple(out)


def same(a: Seq, b: Seq) -> bool:
    """Equal communicators included: two sides merge into one only then, so that a communicator
    one side leaves implicit does not take the other side's name (or lose it)."""
    return a == b and _strict(a) == _strict(b)


def alt(a: Seq, b: Seq) -> Seq:
    if same(a, b):
        return a
    if not (has_ops(a) or has_ops(b)) and not (terminates(a) and terminates(b)):
        return ()  # the two sides differ only in exits that skip no collective
    return (("alt", a, b),)


def resume(seq: Seq, catcher: int) -> Seq:
    """``seq`` with the raises ``catcher`` catches no longer ending their paths: those go on
    after the ``try`` (its handlers are left out of every path)."""
    out: List[Token] = []
    for tok in seq:
        if tok == (EXIT, "raise", catcher):
            break
        sides = branches(tok)
        if sides is not None:
            out.extend(alt(resume(sides[0], catcher), resume(sides[1], catcher)))
        elif isinstance(tok, tuple) and tok and tok[0] in ("alt", "loop"):
            out.append((tok[0],) + tuple(resume(cast(Seq, p), catcher) for p in tok[1:]))
        else:
            out.append(tok)
    return tuple(out)


def anonymous(seq: Seq) -> Seq:
    """``seq`` with every communicator left implicit."""
    out: List[Token] = []
    for tok in seq:
        if isinstance(tok, Op):
            out.append(Op(tok.name, None) if tok.comm is not None else tok)
        elif tok and tok[0] in ("alt", "loop"):
            out.append((tok[0],) + tuple(anonymous(cast(Seq, part)) for part in tok[1:]))
        else:
            out.append(tok)
    return tuple(out)


def linear(seq: Seq) -> Optional[List[Seq]]:
    """Every path through the alternatives in ``seq``; None when there are too many to list."""
    paths: List[Seq] = [()]
    for tok in seq:
        if not (isinstance(tok, tuple) and tok and tok[0] == "alt"):
            paths = [path + (tok,) for path in paths]
            continue
        sides: List[Seq] = []
        for part in tok[1:]:
            found = linear(cast(Seq, part))
            if found is None:
                return None
            sides += found
        paths = [path + side for path in paths for side in sides]
        if len(paths) > _MAX_PATHS:
            return None
    return paths


def one_path_equal(a: Seq, b: Seq) -> bool:
    def trim(seq: Seq) -> Seq:
        while seq and seq[-1] in ((EXIT, "return"), (EXIT, "continue")):
            seq = seq[:-1]
        return seq
    a, b = trim(a), trim(b)
    if (a and a[-1] == RAISE) or (b and b[-1] == RAISE):
        return True
    return a == b


def paths_equal(a: Seq, b: Seq) -> bool:
    """Two paths issue the same collectives (an exception raised on either ends that rank).

    Alternatives inside them match alike, or else every path through one side must match every
    path through the other: a collective in a callee, whose communicator is left implicit,
    matches either side of ``if pynccl: pynccl.all_gather(x) else: self.all_gather(x)``.
    """
    if one_path_equal(a, b):
        return True
    paths_a, paths_b = linear(a), linear(b)
    if paths_a is None or paths_b is None or (len(paths_a) == 1 and len(paths_b) == 1):
        return False
    return all(one_path_equal(x, y) for x in paths_a for y in paths_b)
