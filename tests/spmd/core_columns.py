"""SPMD: ranks that disagree on column positions, which every call site's identity holds.

Run by tests/test_core_columns.py with PYTHONNODEBUGRANGES=1 on the last rank only: its
interpreter compiles no columns, so every unnamed call would read as another site there. Every
rank raises the same DesyncError (settings) when the communicator is created, naming that rank
and why, instead of a false alarm at its first collective.
"""

from mpi4py import MPI

import typedcoll as tc
from spmd.harness import Checker

chk = Checker("core_columns")
last = MPI.COMM_WORLD.size - 1

with chk.expect(tc.DesyncError, "columns differ at creation") as err:
    tc.TypedComm(MPI.COMM_WORLD, timeout=20.0)
text = str(err.error)
chk.same("one error on every rank", text)
# The creation's own call site differs too (a column on one side only): both are named.
chk.eq("kinds", tuple(err.error.kinds), (tc.MismatchKind.CALL, tc.MismatchKind.SETTINGS))
chk.eq("head", text.splitlines()[0], "creation on COMM_WORLD diverged (call site, settings):")
chk.true(f"the rank without columns named ({text})", any(
    line.startswith(f"  rank {last}:") and "timeout=20, no column positions" in line
    for line in text.splitlines()))
chk.done()
