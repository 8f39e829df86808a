"""Run SPMD test programs under ``mpiexec`` with a hard timeout.

Every multi-rank test goes through :func:`run_spmd`: a hang becomes a failed test after
``timeout`` seconds (the whole process group is killed), never a blocked CI. The program is run
with ``python -m mpi4py`` so an uncaught exception on any rank aborts every rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Optional, Sequence

from typedcoll.demo.launch import is_open_mpi, mpiexec_command

REPO = Path(__file__).resolve().parent.parent


class SpmdResult:
    def __init__(self, returncode: int, stdout: str, stderr: str, timed_out: bool) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out

    def __repr__(self) -> str:
        return (f"SpmdResult(rc={self.returncode}, timed_out={self.timed_out})\n--- stdout\n"
                f"{self.stdout}\n--- stderr\n{self.stderr}")


def run_spmd(code: str, nranks: int, *, timeout: float = 60.0, tmp_path: Optional[Path] = None,
             env: Optional[Dict[str, str]] = None, abort_on_error: bool = True,
             args: Sequence[str] = (),
             rank_env: Optional[Sequence[Dict[str, str]]] = None) -> SpmdResult:
    """Run ``code`` (a Python program, dedented) on ``nranks`` ranks; kill all after ``timeout``.

    ``args`` follow the script on every rank; ``rank_env`` gives each rank variables of its own
    (one launch of several single-rank parts: MPI's MPMD form), e.g. one rank on the C fast path
    and its peer on the pure-Python one.
    """
    directory = Path(tmp_path) if tmp_path is not None else Path(os.environ.get("TMPDIR", "/tmp"))
    script = directory / f"spmd_{os.getpid()}_{abs(hash(code)) % 10**8}_{nranks}.py"
    script.write_text(textwrap.dedent(code))
    run_env = dict(os.environ)
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO / "tests"),
                                                          run_env.get("PYTHONPATH", "")]))
    run_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        run_env.update(env)
    argv = ([sys.executable] + (["-m", "mpi4py"] if abort_on_error else []) + [str(script)]
            + list(args))
    command = mpiexec_command(nranks, argv)
    if rank_env is not None:
        command = command[:-len(argv) - 2]  # mpiexec (and its options), then one part per rank
        for r, extra in enumerate(rank_env):
            if r:
                command.append(":")
            command += ["-n", "1"]
            for key, value in extra.items():  # Open MPI and MPICH's hydra name it differently
                command += (["-x", f"{key}={value}"] if is_open_mpi(command[0])
                            else ["-env", key, value])
            command += argv
    proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=run_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return SpmdResult(proc.returncode, out, err, False)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return SpmdResult(-9, out, err, True)
