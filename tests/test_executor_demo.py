"""``typedcoll demo`` end to end: launches itself under mpiexec and exits 0."""

from __future__ import annotations

import subprocess
import sys


def test_demo_exits_zero():
    out = subprocess.run([sys.executable, "-m", "typedcoll", "demo", "--ranks", "2",
                          "--iterations", "30", "--cost-rounds", "1", "--timeout", "120"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "TypeError: " in text and "typedcoll.DesyncError: collective #" in text, text
    assert "every message reached every rank exactly once (checked)" in text, text
    assert "one collective per channel, pickle (the engine's fix) : 3 collectives" in text, text
    assert "coalesced SymmetricFlush                              : 1 collective" in text, text
    assert "x the engine's fix, " in text and "x typed per channel)" in text, text
    assert text.rstrip().endswith("result: every mode behaved as expected"), text
