"""The benchmarks never rot: every script under bench/ runs at tiny sizes and writes the
document docs/bench.md describes.

The MPI scripts run one after another in one 2-rank launch (one MPI start-up for all of them),
each with one round of at most two calls per cell; the others as plain processes. Every run is
bounded by a timeout.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from launch import REPO, run_spmd

BENCH = REPO / "bench"
HAS_TORCH = importlib.util.find_spec("torch") is not None
TINY = ["--rounds", "1", "--iters", "2", "--budget", "0.01"]
MPI_SCRIPTS = {
    "core_overhead": [],
    "collectives": [],
    "core_decompose": [],
    "recorder_cost": [],
    "compat_allgather": [],
    "bcast_schema": [],
    # torch's gloo can abort a process in its teardown, after the run (tests/test_torch.py and
    # bench/torch_gloo.py cover the gloo rows): the MPI rows only, here.
    "peers": ["--payloads", "RankState", "2,048 ints", "64 KiB", "--no-torch"],
}
DOCUMENT = {"kind", "schema_version", "script", "title", "created", "argv", "ranks", "versions",
            "machine", "settings", "results", "ratios", "unavailable", "notes"}
RESULT = {"case", "method", "iters", "warmup", "rounds_us", "median_us", "p10_us", "p90_us"}
RATIO = {"case", "num", "den", "value", "goal", "met"}


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Dict[str, Any]]:
    """Every MPI script's document from one 2-rank launch."""
    tmp = tmp_path_factory.mktemp("bench")
    runs = [(str(BENCH / f"{name}.py"), [*TINY, *args, "--json", str(tmp / f"{name}.json")])
            for name, args in MPI_SCRIPTS.items()]
    code = f"""
    import runpy, sys
    sys.path.insert(0, {str(BENCH)!r})
    for script, args in {runs!r}:
        sys.argv = [script, *args]
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
    """
    result = run_spmd(code, 2, timeout=240, tmp_path=tmp)
    assert not result.timed_out and result.returncode == 0, repr(result)
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in MPI_SCRIPTS}


def check_document(doc: Dict[str, Any], script: str, ranks: int) -> None:
    assert DOCUMENT <= set(doc), sorted(DOCUMENT - set(doc))
    assert (doc["kind"], doc["script"], doc["ranks"]) == ("typedcoll-bench", script, ranks)
    for key in ("typedcoll", "fast_path", "python", "msgspec", "numpy"):
        assert doc["versions"][key], key
    assert doc["machine"]["cores"] >= 1 and doc["settings"]["rounds"] == 1
    for r in doc["results"]:
        assert RESULT <= set(r), r
        assert len(r["rounds_us"]) == 1 and 1 <= r["iters"] <= 2, r
        assert 0 < r["p10_us"] <= r["median_us"] <= r["p90_us"], r
    for r in doc["ratios"]:
        assert RATIO <= set(r) and r["value"] > 0, r
        assert (r["met"] is None) == (r["goal"] is None), r


@pytest.mark.parametrize("script, cases, methods", [
    ("core_overhead", {"RankState"}, {"raw", "pickle", "typed", "timed", "hooked",
                                          "declared"}),
    ("collectives", {"allgather", "gather", "bcast", "allreduce", "reduce", "barrier", "scatter",
                     "alltoall"}, {"typed", "mpi4py"}),
    ("core_decompose", {"RankState", "64 KiB array", "1 MiB array", "2,048 ints"},
     {"raw64", "raw", "typed", "pickle", "exchange", "encode", "allgatherv", "decode",
      "copy_free", "py_decode"}),
    ("recorder_cost", {"RankState"}, {"on", "off"}),
    ("compat_allgather", {"dict[3]", "allreduce int", "gather dict[3]"},
     {"pickle", "typed", "drop-in"}),
    ("bcast_schema", {"RankState"}, {"schema", "no_schema", "branch", "pickle"}),
])
def test_mpi_script_document(docs: Dict[str, Dict[str, Any]], script: str, cases: set,
                             methods: set) -> None:
    doc = docs[script]
    check_document(doc, script, 2)
    assert {r["case"] for r in doc["results"]} == cases
    assert methods <= {r["method"] for r in doc["results"]}
    assert doc["ratios"], "every script holds its figures against a peer"


def test_peers_document(docs: Dict[str, Dict[str, Any]]) -> None:
    doc = docs["peers"]
    check_document(doc, "peers", 2)
    keys = [m["key"] for m in doc["methods"]]
    assert keys == ["mpi_raw", "mpi_pickle", "mpi_pkl5", "typed_mpi", "gloo_raw",
                    "gloo_detail", "gloo_object", "typed_gloo"]
    ran = {r["method"] for r in doc["results"]}
    # Every method ran, or says why not; none does both.
    assert ran | set(doc["unavailable"]) == set(keys) and not ran & set(doc["unavailable"])
    assert {"mpi_raw", "mpi_pickle", "mpi_pkl5", "typed_mpi"} <= ran
    if not HAS_TORCH:
        assert all("torch" in doc["unavailable"][k]
                   for k in keys if k.startswith(("gloo", "typed_g")))
    assert [p["name"] for p in doc["payloads"]] == ["RankState", "2,048 ints", "64 KiB"]
    assert doc["payloads"][2]["floor_bytes"] == 64 << 10


def test_scale_model_with_measured_points(docs: Dict[str, Dict[str, Any]],
                                          tmp_path: Path) -> None:
    measured = tmp_path / "collectives.json"
    measured.write_text(json.dumps(docs["collectives"]))
    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    args = ["--measured", str(measured), "--json", str(out)]
    if importlib.util.find_spec("matplotlib") is not None:
        args += ["--png", str(png)]
    proc = subprocess.run([sys.executable, str(BENCH / "scale.py"), *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert DOCUMENT <= set(doc) and doc["script"] == "scale"
    rows = {(r["op"], r["side"], r["n"]): r for r in doc["model"]["rows"]}
    # Bruck's allgather of 128-byte slots at 16,384 ranks: 2 MiB into every rank, in 14 rounds.
    assert rows["allgather", "typed", 16384]["steps"] == 14
    assert rows["allgather", "typed", 16384]["bytes"] == 14 * 8 + 16383 * 128
    assert rows["barrier", "typed", 16384]["bytes"] == 14 * 136
    assert (rows["barrier", "mpi", 16384]["steps"], rows["barrier", "mpi", 16384]["bytes"]) \
        == (14, 0)
    assert {(m["op"], m["side"], m["n"]) for m in doc["measured"]} == {
        (op, side, 2) for op in doc["model"]["ops"] for side in ("typed", "mpi4py")}
    assert rows["bcast", "typed", 2]["model_us"] is not None
    if png.exists():
        assert png.stat().st_size > 10_000


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_gloo_document(tmp_path: Path) -> None:
    out = tmp_path / "gloo.json"
    proc = subprocess.run([sys.executable, str(BENCH / "torch_gloo.py"), "--ranks", "2", *TINY,
                           "--json", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    check_document(doc, "torch_gloo", 2)
    ran = {r["method"] for r in doc["results"]}
    assert {"raw", "object", "detail"} <= ran
    assert ("typed" in ran) != ("typed" in doc["unavailable"])
    assert ("drop-in" in ran) != ("drop-in" in doc["unavailable"])
    assert {r["case"] for r in doc["results"]} == {"RankState", "int64 vote"}


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_gpu_script_imports() -> None:
    """Its run needs a GPU (tests/test_torch_gpu.py's machine); here: the API it uses exists."""
    proc = subprocess.run([sys.executable, str(BENCH / "torch_gpu.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--rounds" in proc.stdout, proc.stderr
