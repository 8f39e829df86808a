"""``typedcoll demo`` end to end: it launches itself under mpiexec, runs the three modes on one
fault plan and exits 0 when each behaved as expected; every run is bounded by a timeout."""

from __future__ import annotations

import re
import subprocess
import sys

from launch import REPO


def demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "typedcoll", "demo", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_shows_the_three_outcomes_and_exits_zero():
    out = demo("--cost-rounds", "1", "--timeout", "90")
    text = out.stdout
    assert out.returncode == 0, text + out.stderr
    assert text.startswith("typedcoll demo: launching 4 ranks under mpiexec ...\n"), text
    assert ("Attention-DP executor model, overlap loop: 4 ranks, 40 iterations, fault-plan "
            "seed 3\n") in text, text
    # 1. raw: the engine's failure as users saw it, and a peer left blocked.
    assert re.search(r"1\. raw: mpi4py pickle collectives, matched by position \(the engine "
                     r"before the fix\)\n   ranks? [\d,-]+: +TypeError: RankState\.__init__\(\) "
                     r"takes from 2 to 4 positional arguments but 27 were given\n", text), text
    assert "waiting for peers that had crashed; the job was aborted" in text, text
    # 2. typed: one DesyncError on every rank, with both call sites and the decisions.
    assert re.search(
        r"   every rank raised, in the same collective \(#(\d+)\):\n"
        r"     typedcoll\.DesyncError: collective #\1 on tp diverged \(call site, schema, step\):\n"
        r"       ranks? [\d,-]+: +allgather\[\w+\] at typedcoll/demo/model\.py:\d+"
        r"(?: called from typedcoll/demo/model\.py:\d+)+, its \d+\w\w call, step \d+\n"
        r"       ranks? [\d,-]+: +allgather\[\w+\] at typedcoll/demo/model\.py:\d+"
        r"(?: called from typedcoll/demo/model\.py:\d+)+, its \d+\w\w call, step \d+\n"
        r"       decisions that differ:\n"
        r"         can_queue_this_rank at typedcoll/demo/model\.py:\d+ — "
        r"ranks? [\d,-]+: (True|False); "
        r"ranks? [\d,-]+: (True|False)\n", text), text
    # 3. symmetric: to the end, every message conserved.
    assert re.search(r"   ran all 40 iterations on every rank: 41 flushes, (\d+) messages posted "
                     r"\(\d+ rank_state, 0 timeouts, \d+ iter_stats\),\n"
                     r"   (\d+) deliveries = \1 x 4 ranks: every message reached every rank "
                     r"exactly once \(checked\)\.\n", text), text
    # The control plane's cost, both fixes side by side.
    assert re.search(r"   one collective per channel, pickle \(the engine's fix\) +: 3 collectives "
                     r"+[\d.]+ us\n"
                     r"   one collective per channel, typed +: 3 collectives +[\d.]+ us\n"
                     r"   coalesced SymmetricFlush +: 1 collective +[\d.]+ us   "
                     r"\([\d.]+x the engine's fix, [\d.]+x typed per channel\)\n", text), text
    assert text.rstrip().endswith("result: every mode behaved as expected"), text


def test_demo_refuses_bad_arguments():
    out = demo("--ranks", "1", timeout=30)
    assert out.returncode == 2
    assert out.stderr == ("typedcoll demo: expected --ranks of at least 2 (a desync needs two "
                          "ranks)\n")
    out = demo("--modes", "raw,fast", timeout=30)
    assert out.returncode != 0
    assert "typedcoll demo: expected modes among raw, typed, symmetric, got 'fast'" in out.stderr
