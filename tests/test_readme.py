"""The README's usage example runs as written, under mpiexec at 2 ranks."""

from __future__ import annotations

import re
from pathlib import Path

from launch import run_spmd

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_usage_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if b.startswith("# example.py"))
    result = run_spmd(example, 2, timeout=120, tmp_path=tmp_path)
    assert not result.timed_out and result.returncode == 0, repr(result)
    # Each rank prints its line in one write (the newline is a second one): mpiexec may put the
    # other rank's output between the two, so count rather than split.
    assert result.stdout.count("{'it': 2} 4") == 2, repr(result)
    assert result.stdout.count("RankState(rank=1, num_active_requests=2)") == 2, repr(result)
