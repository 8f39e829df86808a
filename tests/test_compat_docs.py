"""Every snippet of docs/migrating.md runs: ``mpiexec`` ones under mpiexec, ``gloo`` ones as torch
processes, ``testing`` ones on in-process ranks (their ``main(comm)``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launch import run_spmd
from typedcoll.testing import run

DOC = Path(__file__).resolve().parent.parent / "docs" / "migrating.md"
SNIPPET = re.compile(r"<!-- run: (\w+) (\d+) -->\n```python\n(.*?)```", re.S)
SNIPPETS = [(kind, int(n), code) for kind, n, code in SNIPPET.findall(DOC.read_text())]


def test_every_python_block_is_run():
    assert len(SNIPPETS) == DOC.read_text().count("```python") == 9


@pytest.mark.parametrize("kind, n, code", SNIPPETS,
                         ids=[f"{i}-{kind}" for i, (kind, _, _) in enumerate(SNIPPETS)])
def test_snippet_runs(tmp_path, kind, n, code):
    if kind == "testing":
        namespace: dict = {"__name__": "migrating_snippet"}
        exec(compile(code, str(DOC), "exec"), namespace)
        run(n, namespace["main"], timeout=30)
    elif kind == "mpiexec":
        result = run_spmd(code, n, timeout=120, tmp_path=tmp_path)
        assert not result.timed_out and result.returncode == 0, repr(result)
    else:
        pytest.importorskip("torch")
        _run_gloo(code, n, tmp_path)


def _run_gloo(code: str, n: int, tmp_path: Path) -> None:
    from typedcoll.transports.gloo import free_port
    script = tmp_path / "snippet.py"
    # After the snippet: skip the interpreter's teardown, where gloo's threads now and then abort
    # a process that already finished ("terminate called without an active exception").
    script.write_text(code + "\nimport os, sys\nsys.stdout.flush()\nos._exit(0)\n")
    port = free_port()
    src = str(DOC.parent.parent / "src")
    procs = []
    for rank in range(n):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(n), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        outputs = [proc.communicate(timeout=90)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it exited: no group is left to signal
                pass
        pytest.fail("the gloo snippet hung")
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank}:\n{out[-3000:]}"
