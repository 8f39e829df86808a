"""The benchmark never rots: a tiny 2-rank run covers every method and payload with real numbers.

Also: the DETAIL row really ran under torch's DETAIL wrapper (the engine's own shape-mismatch
probe was caught), the scale simulation measures a correct allgather, and saved results render.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import msgspec
import pytest

from typedcoll import _bench, _bench_scale
from typedcoll._bench_methods import METHOD_KEYS
from typedcoll._bench_payloads import PAYLOAD_NAMES, PAYLOADS

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TYPED_TORCH = HAS_TORCH and importlib.util.find_spec("typedcoll._torch") is not None


@pytest.fixture(scope="module")
def quick_doc(tmp_path_factory):
    """One ``typedcoll bench --quick`` at 2 ranks, through the self-launcher, bounded in time."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    cmd = [sys.executable, "-m", "typedcoll", "bench", "--ranks", "2", "--quick", "--json",
           str(out), "--png", "", "--no-progress", "--timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "median us/call (x MPI floor)" in proc.stdout
    return json.loads(out.read_text())


def test_quick_run_has_every_method_and_payload(quick_doc):
    doc = quick_doc
    assert doc["ranks"] == 2
    assert [m["key"] for m in doc["methods"]] == METHOD_KEYS
    assert [p["name"] for p in doc["payloads"]] == PAYLOAD_NAMES
    for key in ("typedcoll", "mpi4py", "mpi_library", "msgspec", "numpy"):
        assert doc["versions"][key]
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["cpu_model"]
    allowed_skips = set()
    if not HAS_TORCH:
        allowed_skips |= {k for k in METHOD_KEYS if k.startswith(("gloo", "typed_gloo"))}
    if not HAS_TYPED_TORCH:
        allowed_skips.add("typed_gloo")
    cells = {(r["method"], r["payload"]): r for r in doc["results"]}
    for method in doc["methods"]:
        if method["skipped"]:
            assert method["key"] in allowed_skips, method
            assert not any(m == method["key"] for m, _ in cells)
            continue
        for payload in PAYLOAD_NAMES:
            r = cells[(method["key"], payload)]
            assert len(r["rounds_us"]) == doc["settings"]["rounds"]
            assert all(us > 0 for us in r["rounds_us"]), r
            assert 0 < r["p10_us"] <= r["median_us"] <= r["p90_us"], r
            assert r["x_floor"] > 0 and r["iters"] >= 1
            if method["key"] == "mpi_raw":
                assert r["x_floor"] == 1.0


def test_saved_result_renders(quick_doc, tmp_path, capsys):
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(quick_doc))
    png = tmp_path / "doc.png"
    assert _bench.main(["--render", str(path), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "typedcoll on MPI" in text and "1 MiB" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 10_000


def test_detail_row_ran_under_a_live_detail_wrapper(quick_doc):
    """The engine proves DETAIL on every run: disagreeing shapes on a DETAIL group are caught."""
    if not HAS_TORCH:
        pytest.skip("torch is not installed")
    assert doc_method(quick_doc, "gloo_detail")["skipped"] is None
    assert quick_doc["detail_check"].startswith("caught: Detected mismatch between collectives")


def doc_method(doc, key):
    return next(m for m in doc["methods"] if m["key"] == key)


def test_scale_simulation_measures_a_correct_allgather():
    t = _bench_scale.measure("IterStats", 64, rounds=1, budget=0.001, max_iters=5)
    assert t["n"] == 64 and t["slot"] >= 256
    for key in ("check_us", "check_min_us", "decode_us", "hot_us", "full_us", "deliver_us",
                "unpickle_us"):
        assert t[key] > 0, t


def test_wire_bytes_follow_the_slot_policy():
    wire = {w["payload"]: w for w in _bench_scale.wire_bytes()}
    assert wire["RankState"]["typed_overflow_per_peer"] == 0
    assert wire["RankState"]["typed_phase1_per_peer"] == wire["RankState"]["slot"]
    one_mib = wire["1 MiB"]
    assert one_mib["typed_overflow_per_peer"] > 1 << 20  # the blob plus its msgpack header
    assert one_mib["pickle_per_peer"] > 1 << 20


def test_scale_cli_quick(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert _bench.main(["--scale", "--quick", "--json", str(out), "--png", "",
                        "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    assert doc["n_values"] == [8, 16, 32, 64]
    assert doc["goal"]["check_us"] is None  # N = 4096 is not simulated in quick mode
    assert "wire bytes" in capsys.readouterr().out


@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_NAMES)
def test_payload_forms_agree(payload):
    typed, native = payload.typed(1), payload.native(1)
    assert payload.typed(1) == typed  # deterministic: every rank can rebuild every other's
    if isinstance(typed, msgspec.Struct):
        assert native == msgspec.structs.asdict(typed)
        assert payload.raw_size(1) == len(msgspec.msgpack.encode(typed))
    else:
        assert native == typed and payload.raw_size(1) == len(typed)
