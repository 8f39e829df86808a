"""Types flow through the collectives: mypy sees ``allgather(x: T) -> list[T]``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SNIPPET = '''
from typing import Optional
import msgspec
import typedcoll as tc
from mpi4py import MPI

class RankState(msgspec.Struct):
    rank: int
    num_active_requests: int
    num_active_tokens: int

comm = tc.TypedComm(MPI.COMM_WORLD)
reveal_type(comm.allgather(RankState(0, 3, 17)))
reveal_type(comm.allgather(None, schema=RankState))
reveal_type(comm.gather(RankState(0, 3, 17), root=0))
reveal_type(comm.bcast(None, root=0, schema=RankState))
reveal_type(comm.allreduce(3, op="sum"))
reveal_type(comm.split(0))
reveal_type(comm.seq)
'''

EXPECTED = [
    "list[snippet.RankState]",
    "list[snippet.RankState]",
    "list[snippet.RankState] | None",
    "snippet.RankState",
    "int",
    "typedcoll._comm.TypedComm | None",
    "int",
]
REPO = Path(__file__).resolve().parent.parent


def test_reveal_types(tmp_path, request):
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    (tmp_path / "snippet.py").write_text(textwrap.dedent(SNIPPET))
    provider = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = provider.mkdir("typedcoll-mypy") if provider is not None else tmp_path
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(cache),
         "--follow-imports=silent", "snippet.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        # mypy does not follow setuptools' editable-install import hook: point it at the repo.
        env={**os.environ, "MYPYPATH": str(REPO / "src")})
    revealed = re.findall(r'Revealed type is "([^"]+)"', out.stdout)
    # Older mypy spells "builtins.list" and "Union[X, None]": normalise to mypy 2's spelling.
    revealed = [re.sub(r"Union\[(.*), None\]", r"\1 | None", t).replace("builtins.", "")
                for t in revealed]
    assert revealed == EXPECTED, out.stdout + out.stderr
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert not errors, out.stdout
