"""``typedcoll lint``: find collectives under rank-divergent conditions before they run.

A static check over Python source, standard library only (no MPI, no torch): a collective, or a
call that reaches one through the analysed files, control-dependent on a rank-local value (a queue,
a clock, per-rank state, a caught exception, an environment variable) is reported with the chain
of calls and the gate. See docs/lint.md for the rules.

    python -m typedcoll.lint PATH... [--json] [--config FILE]
"""

from __future__ import annotations

from typing import Iterable, List, Optional

from ._analysis import Analysis
from ._findings import findings
from ._callgraph import Program
from ._collectives import CollectiveTable
from ._command import main
from ._config import Config, ConfigError, load_config
from ._model import RANK_LOCAL_GATE, RULES, UNBALANCED_RANK_BRANCH, Finding, GateInfo
from ._source import LintInputError, read_sources

__all__ = [
    "Config",
    "ConfigError",
    "Finding",
    "GateInfo",
    "LintInputError",
    "RANK_LOCAL_GATE",
    "RULES",
    "UNBALANCED_RANK_BRANCH",
    "lint_paths",
    "load_config",
    "main",
]


def lint_paths(paths: Iterable[str], config: Optional[Config] = None) -> List[Finding]:
    """Check the ``.py`` files at ``paths`` (directories walked) together, as one program.

    Raises :class:`LintInputError` if any path is missing or any file does not parse.
    """
    config = config or Config()
    sources = read_sources(paths)
    program = Program(sources, CollectiveTable(config))
    analysis = Analysis(program, config)
    analysis.run()
    return findings(analysis)
