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
    lines = sorted(result.stdout.splitlines())
    assert [line.split()[0] for line in lines] == ["0", "1"], repr(result)
    assert all("{'it': 2} 4" in line for line in lines), repr(result)
