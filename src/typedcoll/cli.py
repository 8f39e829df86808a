"""``typedcoll`` command line: ``demo``, ``trace``, ``lint`` and ``--version``.

Each subcommand lives in its own package and is imported only when asked for, so ``typedcoll
trace`` and ``typedcoll lint`` work on a machine without MPI or torch.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

USAGE = """usage: typedcoll <command> [options]

commands:
  demo     run the executor model in raw, typed and symmetric modes under mpiexec
  trace    find the first divergent collective in per-rank flight-recorder dumps
  lint     find collectives under rank-local conditions in Python sources

'typedcoll <command> --help' for a command's options; 'typedcoll --version'."""


def _command(name: str) -> Optional[Callable[[List[str]], int]]:
    if name == "demo":
        from .demo.demo import main as demo
        return demo
    if name == "trace":
        from .diagnostics.trace import main as trace
        return trace
    if name == "lint":
        from .lint import main as lint
        return lint
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "--version":
        from ._version import __version__
        print(f"typedcoll {__version__}")
        return 0
    run = _command(args[0])
    if run is None:
        print(f"typedcoll: expected a command (demo, trace, lint), got {args[0]!r}\n\n{USAGE}",
              file=sys.stderr)
        return 2
    return run(args[1:])
