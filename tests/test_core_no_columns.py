"""Call identity where code keeps no column positions (``-X no_debug_ranges``).

There a site is its line and which of the line's calls it is (``sites.calls_by_line``), a role
branch's call is found by its line and the name it calls (``arms.branch_calls``), and a stepper's
callee is read from the stack (``sites.callee_by_stack``). These are the identity tests that must
hold without columns, run in one process of their own under ``-X no_debug_ranges``, each on the
C fast path and the Python steps as the suite runs them. Tests that check messages' columns, or
calls that only columns tell apart (two role branches on one line), are left out: there a call
is given a ``name=`` (README).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

WITHOUT_COLUMNS = [
    "test_core_columns.py::test_two_votes_on_one_line_raise_without_column_positions",
    "test_core_tasks.py::test_a_coroutine_stepped_by_hand_keeps_its_steppers_line",
    "test_core_callers.py::test_a_skipped_vote_through_a_helper_without_a_loop_raises",
    "test_core_callers.py::test_a_context_manager_voting_on_exit_by_an_exception_is_one_call",
    "test_core_callers.py::test_a_root_that_skips_a_call_of_sglangs_broadcast_pyobj_raises",
    "test_core_arms.py::test_the_root_and_its_receivers_in_two_arms_are_one_call",
    "test_core_arms.py::test_nested_arms_and_elif_receivers_are_one_call",
    "test_core_arms.py::test_a_root_that_skips_a_call_in_its_arm_raises_everywhere",
    "test_core_semantics.py::test_a_root_and_its_receivers_in_a_role_branch_match_without_a_name",
]


def test_identity_holds_without_column_positions() -> None:
    """Before, without columns two votes on one line were one call, and so were two votes
    through a coroutine stepped by hand from two lines (a rank took another call's vote without
    an error), while every role branch (``if rank == root: bcast(x)`` / ``else: bcast(None)``)
    raised a DesyncError on a correct program."""
    done = subprocess.run(
        [sys.executable, "-X", "no_debug_ranges", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *(str(HERE / test) for test in WITHOUT_COLUMNS)],
        capture_output=True, text=True, timeout=540, cwd=HERE.parent)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0 and " passed" in last and "skipped" not in last, \
        done.stdout[-4000:] + done.stderr[-2000:]
