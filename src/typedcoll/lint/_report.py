"""Findings as text for people, and as JSON (``{"findings": [...]}``) for tools."""

from __future__ import annotations

import json
from typing import List

from ._model import Finding, GateInfo

_SHOWN_GATES = 4
# How to declare intent, where a gate is one every rank takes alike (a false alarm).
ACCEPT_HINT = ("a gate every rank takes alike is accepted by `# typedcoll: symmetric (why)` on "
               "its line (docs/lint.md, Accepting a gate)")


def _gate_line(gate: GateInfo) -> str:
    where = f"line {gate.line}"
    if gate.exit_line:
        where += f", {gate.kind.replace('-', ' ')} at line {gate.exit_line}"
    else:
        where += f", {gate.kind}"
    return f"    gate ({where}): `{gate.text}` -- {gate.source}"


def format_text(findings: List[Finding], files_checked: int) -> str:
    """One block per finding: the call, the chain to the collective, then each gate."""
    out: List[str] = []
    for f in findings:
        out.append(f"{f.path}:{f.line}:{f.column}: {f.rule}: {f.collective} reached in "
                   f"{f.function}")
        if len(f.chain) > 2:
            out.append("    via: " + " -> ".join(f.chain))
        out.extend(_gate_line(g) for g in f.gates[:_SHOWN_GATES])
        if len(f.gates) > _SHOWN_GATES:
            out.append(f"    ... and {len(f.gates) - _SHOWN_GATES} more gates (--json lists all)")
    if findings:
        out.append(ACCEPT_HINT)
    files = len({f.path for f in findings})
    noun = "finding" if len(findings) == 1 else "findings"
    checked = "file" if files_checked == 1 else "files"
    out.append(f"{len(findings)} {noun} in {files} of {files_checked} {checked} checked")
    return "\n".join(out)


def format_json(findings: List[Finding]) -> str:
    return json.dumps({"findings": [f.to_json() for f in findings]}, indent=2)
