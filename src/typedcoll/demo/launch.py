"""Relaunch a Python module under ``mpiexec``: for commands that start themselves on N ranks.

``typedcoll demo`` (and the benchmarks) run as a plain process, then relaunch themselves under
``mpiexec -n N``, bounded by a timeout so a hang ends the command instead of blocking it.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence, Union

Output = Union[None, int, IO[Any]]


def find_mpiexec() -> str:
    """The ``mpiexec`` beside this Python first (the ``mpich`` wheel's), else the one on PATH.

    Beside-the-interpreter first: a system MPI earlier on PATH would start processes whose
    mpi4py is bound to another MPI, each alone in a world of size 1.
    """
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("expected an mpiexec beside python or on PATH, found none "
                                "(pip install 'typedcoll[mpich]')")
    return found


@functools.lru_cache(maxsize=None)
def is_open_mpi(mpiexec: str) -> bool:
    """Whether ``mpiexec`` is Open MPI's, which refuses more ranks than cores by default."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def mpiexec_command(nranks: int, argv: Sequence[str], mpiexec: Optional[str] = None) -> List[str]:
    """``[mpiexec, (--oversubscribe), -n, N, *argv]``."""
    exe = mpiexec or find_mpiexec()
    extra = ["--oversubscribe"] if is_open_mpi(exe) else []
    return [exe, *extra, "-n", str(nranks), *argv]


def relaunch(module_argv: Sequence[str], nranks: int, timeout: float, *,
             env: Optional[Dict[str, str]] = None, stdout: Output = None,
             stderr: Output = None) -> int:
    """Run ``python -m <module_argv...>`` on ``nranks`` ranks; its return code.

    After ``timeout`` seconds the whole process group is killed and -9 is returned.
    ``stdout``/``stderr`` go to ``subprocess.Popen`` (None: inherit).
    """
    run_env = dict(os.environ)
    run_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        run_env.update(env)
    cmd = mpiexec_command(nranks, [sys.executable, "-m", *module_argv])
    # A new session, so a timeout kills mpiexec *and* every rank it started.
    proc = subprocess.Popen(cmd, env=run_env, stdout=stdout, stderr=stderr,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9
