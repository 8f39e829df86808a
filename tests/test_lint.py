"""``typedcoll lint``: the labelled corpus in tests/lint/, and the command line's contract.

Every corpus program marks each line that must be reported with ``# expect: RULE``; a corpus
directory is linted as one program. Findings are compared exactly: nothing missing, nothing extra.
"""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from typedcoll.lint import (RANK_LOCAL_GATE, RULES, UNBALANCED_RANK_BRANCH, Config, ConfigError,
                            LintInputError, lint_paths, load_config, main)
from typedcoll.lint._config import config_from_mapping

CORPUS = Path(__file__).resolve().parent / "lint"
SRC = Path(__file__).resolve().parent.parent / "src"
EXPECT = re.compile(r"#\s*expect:\s*([\w-]+)")
CONFIG_LINE = re.compile(r"^#\s*lint-config:\s*(\{.*\})\s*$")
ENTRIES = sorted(p for p in CORPUS.iterdir()
                 if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith(("_", ".")))


def _files(entry: Path):
    return sorted(entry.rglob("*.py")) if entry.is_dir() else [entry]


def expectations(entry: Path):
    return {(str(path), number, match.group(1))
            for path in _files(entry)
            for number, line in enumerate(path.read_text().splitlines(), start=1)
            if (match := EXPECT.search(line))}


def entry_config(entry: Path):
    first = _files(entry)[0].read_text().splitlines()[0]
    match = CONFIG_LINE.match(first)
    return config_from_mapping(json.loads(match.group(1))) if match else None


def found(entry: Path, config=None):
    return {(f.path, f.line, f.rule) for f in lint_paths([str(entry)], config)}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda p: p.name)
def test_corpus(entry):
    assert found(entry, entry_config(entry)) == expectations(entry)


def test_corpus_covers_every_rule_with_positives_and_clean_programs():
    expected = set().union(*(expectations(e) for e in ENTRIES))
    assert {rule for _, _, rule in expected} == set(RULES)
    clean = [e.name for e in ENTRIES if not expectations(e)]
    assert {"seed_after_fix.py", "precision.py"} <= set(clean)


def test_wrappers_come_from_configuration():
    entry = CORPUS / "engine_wrappers.py"
    lines = {line for _, line, _ in found(entry)}
    assert 22 not in lines and 25 not in lines  # sync_batch_stats, scheduler_tp_vote
    assert {23, 24, 28} <= lines  # tp_allgather, broadcast_pyobj: no configuration needed


def test_finding_names_call_chain_and_gate():
    (finding,) = [f for f in lint_paths([str(CORPUS / "seed_before_fix.py")]) if f.line == 51]
    assert finding.to_json() == {
        "path": str(CORPUS / "seed_before_fix.py"),
        "line": 51,
        "column": 17,
        "rule": RANK_LOCAL_GATE,
        "function": "OverlapExecutor.loop",
        "collective": "self.dist.tp_gather",
        "chain": ["OverlapExecutor.loop", "OverlapExecutor._process_previous_batch",
                  "self.dist.tp_gather"],
        "gates": [{
            "line": 50,
            "kind": "if",
            "text": "if previous_batch is not None and (can_queue or not can_queue_this_rank)",
            "source": "OverlapExecutor._schedule() at line 43: returns self.active_requests "
                      "(per-rank state, changed in OverlapExecutor._fetch_new_requests, line 17)",
        }],
    }


def test_early_exit_gate_names_the_exit():
    (finding,) = lint_paths([str(CORPUS / "early_exits.py")])[:1]
    assert finding.gates[0].to_json() == {
        "line": 16, "kind": "early-return", "text": "if not self.pending", "exit_line": 17,
        "source": "self.pending (per-rank state, changed in Worker.add, line 13)"}


def test_text_report(capsys):
    path = str(CORPUS / "rank_roles.py")
    assert main([path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{path}:31:9: {UNBALANCED_RANK_BRANCH}: comm.bcast reached in "
                      "only_root_talks")
    assert out[1] == ("    gate (line 29, if): `if rank == 0` -- comm.Get_rank() "
                      "(rank identity, line 6)")
    assert out[-2:] == ["a gate every rank takes alike is accepted by `# typedcoll: symmetric "
                        "(why)` on its line (docs/lint.md, Accepting a gate)",
                        "3 findings in 1 of 1 file checked"]


def test_text_report_shows_the_chain(capsys):
    assert main([str(CORPUS / "call_graph.py")]) == 1
    out = capsys.readouterr().out
    assert ("    via: Executor.deep -> two_levels_down -> sync_flags -> comm.allgather"
            in out.splitlines())


def test_json_report(capsys):
    path = str(CORPUS / "gates.py")
    assert main(["--json", path]) == 1
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["findings"]
    assert [(f["path"], f["line"]) for f in report["findings"]] == [
        (path, 13), (path, 18), (path, 23), (path, 28)]
    assert set(report["findings"][0]) == {"path", "line", "column", "rule", "function",
                                          "collective", "chain", "gates"}


def test_clean_input_exits_0(capsys):
    assert main([str(CORPUS / "precision.py")]) == 0
    assert capsys.readouterr().out == "0 findings in 0 of 1 file checked\n"
    assert main(["--json", str(CORPUS / "seed_after_fix.py")]) == 0
    assert json.loads(capsys.readouterr().out) == {"findings": []}


def test_missing_file_exits_2(capsys, tmp_path):
    missing = str(tmp_path / "absent.py")
    assert main([missing, str(CORPUS / "gates.py")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"typedcoll lint: {missing}: no such file or directory\n"
    assert captured.out == ""


def test_syntax_error_exits_2_naming_file_and_line(capsys, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\ndef f(:\n    pass\n")
    assert main([str(broken)]) == 2
    assert re.fullmatch(rf"typedcoll lint: {re.escape(str(broken))}: syntax error at line 2: .+\n",
                        capsys.readouterr().err)


def test_lint_paths_reports_every_unreadable_input(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(LintInputError, match=r"absent\.py: no such file or directory; .*"
                                             r"broken\.py: not UTF-8") as info:
        lint_paths([str(tmp_path / "absent.py"), str(broken)])
    assert [path for path, _ in info.value.problems] == [str(tmp_path / "absent.py"),
                                                         str(broken)]


def test_a_byte_order_mark_is_read_past(tmp_path):
    # Editors on Windows write UTF-8 with a BOM; Python itself runs such files.
    marked = tmp_path / "marked.py"
    marked.write_bytes(b"\xef\xbb\xbf" + b"import time\nfrom mpi4py import MPI\n\n\n"
                       b"def poll(deadline):\n    while time.monotonic() < deadline:\n"
                       b"        MPI.COMM_WORLD.Barrier()\n")
    assert [(f.line, f.column, f.rule) for f in lint_paths([str(marked)])] == [
        (7, 9, RANK_LOCAL_GATE)]


@pytest.mark.parametrize("clause, shown", [
    ("except (OSError, ValueError):", "except (OSError, ValueError)"),
    pytest.param("except* OSError:", "except* OSError", marks=pytest.mark.skipif(
        sys.version_info < (3, 11), reason="except* is Python 3.11's")),
])
def test_an_except_gate_names_its_clause(tmp_path, clause, shown):
    path = tmp_path / "handler.py"
    path.write_text("import torch.distributed as dist\n\n\ndef load(read):\n    try:\n"
                    f"        read()\n    {clause}\n        dist.barrier()\n")
    (finding,) = lint_paths([str(path)])
    assert finding.gates[0].to_json() == {
        "line": 7, "kind": "except", "text": shown,
        "source": f"{shown} (caught exception, line 7)"}


def test_a_gate_on_a_ranks_own_part_says_so(tmp_path):
    # A reduce-scatter's output was described as "only the root receives it".
    path = tmp_path / "shards.py"
    path.write_text("import torch.distributed as dist\n\n\ndef step(out, parts, hidden):\n"
                    "    dist.reduce_scatter_tensor(out, parts)\n    if out.sum() > 0:\n"
                    "        dist.all_reduce(hidden)\n")
    (finding,) = lint_paths([str(path)])
    assert finding.gates[0].to_json()["source"] == (
        "dist.reduce_scatter_tensor (differs by rank: each rank receives its own part, line 5)")


def test_a_marker_without_a_reason_is_named_on_stderr(tmp_path, capsys):
    # It accepted nothing, silently: the finding stayed and nothing said why.
    path = tmp_path / "bare.py"
    path.write_text("import torch.distributed as dist\n\n\ndef step(pending):\n"
                    "    if pending:  # typedcoll: symmetric\n        dist.barrier()\n")
    assert main([str(path)]) == 1
    assert capsys.readouterr().err == (
        f"typedcoll lint: {path}:5: `# typedcoll: symmetric` without a reason accepts nothing: "
        f"write `# typedcoll: symmetric (why every rank takes this branch alike)`\n")


def test_json_configuration(tmp_path, capsys):
    config = tmp_path / "lint.json"
    config.write_text(json.dumps({"wrappers": ["sync_batch_stats", "*_tp_vote"]}))
    entry = CORPUS / "engine_wrappers.py"
    assert found(entry, load_config(str(config))) == expectations(entry)
    assert main(["--config", str(config), str(entry)]) == 1
    assert capsys.readouterr().out.endswith("5 findings in 1 of 1 file checked\n")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_toml_configuration_and_pyproject_table(tmp_path):
    config = tmp_path / "pyproject.toml"
    config.write_text('[tool.typedcoll.lint]\nenvironment_is_rank_local = false\n')
    loaded = load_config(str(config))
    assert loaded.environment_is_rank_local is False
    assert found(CORPUS / "acceptance.py", loaded) == {
        (str(CORPUS / "acceptance.py"), 23, RANK_LOCAL_GATE)}


@pytest.mark.parametrize("content, message", [
    ({"wrapper": ["x"]}, r"unknown key 'wrapper' \(known: clock_calls, "),
    ({"wrappers": "tp_allgather"}, r"wrappers must be a list of strings, got 'tp_allgather'"),
    ({"resolve_methods_by_name": "yes"}, r"resolve_methods_by_name must be true or false"),
])
def test_bad_configuration_exits_2(tmp_path, capsys, content, message):
    config = tmp_path / "lint.json"
    config.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        load_config(str(config))
    assert main(["--config", str(config), str(CORPUS / "gates.py")]) == 2
    assert re.match(rf"typedcoll lint: {re.escape(str(config))}: {message}",
                    capsys.readouterr().err)


def test_missing_configuration_exits_2(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "none.json"), str(CORPUS / "gates.py")]) == 2
    assert capsys.readouterr().err.startswith(
        f"typedcoll lint: cannot read configuration {tmp_path / 'none.json'}: ")


def test_usage(capsys):
    assert main(["--help"]) == 0
    assert "usage: typedcoll lint [-h] [--json] [--config FILE] PATH [PATH ...]" in (
        capsys.readouterr().out)
    assert main([]) == 2
    assert "the following arguments are required: PATH" in capsys.readouterr().err


def test_module_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["typedcoll.lint", str(CORPUS / "seed_before_fix.py")])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("typedcoll.lint", run_name="__main__")
    assert info.value.code == 1
    assert capsys.readouterr().out.endswith("2 findings in 1 of 1 file checked\n")


def test_default_config_is_the_documented_one():
    assert Config().matches("wrappers", "tp_allgather")
    assert Config().matches("wrappers", "broadcast_pyobj")
    assert not Config().matches("wrappers", "reduce")


def test_lint_imports_nothing_else_from_typedcoll():
    """A leaf: importable as a top-level package with the rest of typedcoll out of reach."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import lint; "
            "assert not [m for m in sys.modules if m.startswith('typedcoll')]; "
            "print(len(lint.lint_paths([sys.argv[2]])))")
    result = subprocess.run([sys.executable, "-c", code, str(SRC / "typedcoll"),
                             str(CORPUS / "gates.py")], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "4\n", "")
