"""The command line: ``typedcoll lint PATH... [--json] [--config FILE]``.

Exit status: 0 nothing found, 1 findings, 2 unreadable input (a missing path, a file that does
not parse, a bad configuration file); the reasons go to stderr, one line per file.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ._analysis import Analysis
from ._findings import findings
from ._callgraph import Program
from ._collectives import CollectiveTable
from ._config import Config, ConfigError, load_config
from ._report import format_json, format_text
from ._source import LintInputError, read_sources

PROG = "typedcoll lint"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Find collectives under rank-divergent conditions.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="Python files or directories, analysed together")
    parser.add_argument("--json", action="store_true", help='print {"findings": [...]}')
    parser.add_argument("--config", metavar="FILE",
                        help="TOML (Python 3.11+) or JSON file extending the default tables")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = load_config(args.config) if args.config else Config()
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        sources = read_sources(args.paths)
    except LintInputError as exc:
        for path, reason in exc.problems:
            print(f"{PROG}: {path}: {reason}", file=sys.stderr)
        return 2
    for source in sources:
        for line in source.unreasoned:
            print(f"{PROG}: {source.path}:{line}: `# typedcoll: symmetric` without a reason "
                  f"accepts nothing: write `# typedcoll: symmetric (why every rank takes this "
                  f"branch alike)`", file=sys.stderr)
    analysis = Analysis(Program(sources, CollectiveTable(config)), config)
    analysis.run()
    found = findings(analysis)
    print(format_json(found) if args.json else format_text(found, len(sources)))
    return 1 if found else 0
