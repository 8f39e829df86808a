"""``typedcoll`` command line: ``demo``, ``trace`` and ``bench`` subcommands.

Each subcommand lives in its own module and is imported only when asked for, so ``typedcoll
trace`` works on a machine without MPI or torch.
"""

from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """usage: typedcoll <command> [options]

commands:
  demo     run the executor model in raw, typed and symmetric modes under mpiexec
  trace    find the first divergent collective in per-rank flight-recorder dumps
  bench    gather-overhead microbenchmarks against the raw floor and pickle-based peers

'typedcoll <command> --help' for a command's options."""


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from .executor._demo import main as run
    elif command == "trace":
        from ._trace import main as run
    elif command == "bench":
        from ._bench import main as run
    else:
        print(f"typedcoll: expected a command (demo, trace, bench), got {command!r}\n\n{USAGE}",
              file=sys.stderr)
        return 2
    return run(rest)
