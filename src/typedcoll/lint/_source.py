"""Reading the files to check: paths to parsed modules, and the acceptance comments in them."""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

# ``# typedcoll: symmetric (why every rank takes the same branch here)``; the reason is required,
# so that every accepted gate says why it is safe.
_ACCEPT = re.compile(r"#\s*typedcoll:\s*symmetric\s*\(\s*([^)\s][^)]*)\)")
# The marker without a reason accepts nothing: said on stderr, not left to be found out.
_MARKER = re.compile(r"#\s*typedcoll:\s*symmetric\b")


class LintInputError(Exception):
    """Some inputs could not be read or parsed; ``problems`` lists ``(path, reason)`` pairs.

    The caller's fault (a wrong path, a file that is not Python); retrying does not help.
    """

    def __init__(self, problems: List[Tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in problems))


@dataclass
class SourceFile:
    """One parsed file: its path as given, its tree, and its lines with an acceptance comment."""

    path: str
    tree: ast.Module
    lines: List[str]
    accepted: Dict[int, str]
    unreasoned: List[int] = field(default_factory=list)  # markers without a reason


def _python_files(path: str) -> Iterable[str]:
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.join(root, name)
    else:
        yield path


def _accepted_lines(text: str) -> Tuple[Dict[int, str], List[int]]:
    """The lines whose comment accepts a gate (with its reason), and those whose marker has
    no reason."""
    accepted: Dict[int, str] = {}
    unreasoned: List[int] = []
    if "typedcoll:" not in text:
        return accepted, unreasoned
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            match = _ACCEPT.search(tok.string)
            if match:
                accepted[tok.start[0]] = match.group(1).strip()
            elif _MARKER.search(tok.string):
                unreasoned.append(tok.start[0])
    return accepted, unreasoned


def read_source(path: str) -> SourceFile:
    """Parse one file; raises :class:`LintInputError` naming the file and why it is unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LintInputError([(path, f"cannot read: {exc.strerror or exc}")]) from exc
    try:
        text = data.decode("utf-8-sig")  # a leading byte order mark is no part of the source
    except UnicodeDecodeError as exc:
        raise LintInputError([(path, f"not UTF-8: {exc.reason} at byte {exc.start}")]) from exc
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as exc:
        raise LintInputError([(path, f"syntax error at line {exc.lineno}: {exc.msg}")]) from exc
    except ValueError as exc:  # source with NUL bytes
        raise LintInputError([(path, f"cannot parse: {exc}")]) from exc
    return SourceFile(path, tree, text.splitlines(), *_accepted_lines(text))


def read_sources(paths: Iterable[str]) -> List[SourceFile]:
    """Every ``.py`` file under ``paths`` (directories walked in sorted order), each once."""
    sources: List[SourceFile] = []
    problems: List[Tuple[str, str]] = []
    seen = set()
    for given in paths:
        if not os.path.exists(given):
            problems.append((given, "no such file or directory"))
            continue
        for file in _python_files(given):
            key = os.path.realpath(file)
            if key in seen:
                continue
            seen.add(key)
            try:
                sources.append(read_source(file))
            except LintInputError as exc:
                problems.extend(exc.problems)
    if problems:
        raise LintInputError(problems)
    return sources
