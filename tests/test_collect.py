"""Collecting run directories honestly: files that do not parse are listed (never silently dropped), and
``python -m nora.results tables`` (a real subprocess) says so, and leaves the committed results/ alone when there
are no runs. Run trees are written with the helpers of test_results.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_results import demo_runs, table2_runs, write_run

from nora.results.__main__ import mmlu_jobs
from nora.results.collect import collect

ROOT = Path(__file__).resolve().parents[1]
TRUNCATED = "not a JSON object (truncated or corrupted?)"


def truncate(path: Path) -> Path:
    """Cut a file in half, as a full disk or a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def nora_results(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")  # this checkout's nora, from any cwd
    return subprocess.run(
        [sys.executable, "-m", "nora.results", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_collect_lists_every_file_it_cannot_read(tmp_path):
    demo = demo_runs(tmp_path / "demo")
    bad_summary = truncate(demo / "rot90" / "nora_s2" / "summary.json")
    latin1 = b'{"status": "complete", "method": "nor\xe9"}'
    (demo / "rot90" / "nora_s1" / "summary.json").write_bytes(latin1)
    col = collect(demo)
    # the unreadable rot90 seeds 1 and 2 are left out; the other NoRA runs of the fixture stay
    assert sorted(str(r.dir.relative_to(demo)) for r in col.runs if r.method == "nora") == [
        "rot90/nora_s0",
        "rot90/nora_val_s3",
        "transpose/nora_s0",
    ]
    assert col.unreadable == {bad_summary: TRUNCATED, demo / "rot90" / "nora_s1" / "summary.json": TRUNCATED}
    assert [p.name for p in col.incomplete] == ["lora_s1"]  # a running run is incomplete, not unreadable

    root = table2_runs(tmp_path / "llm")
    t2 = root / "table2"
    bad_mmlu = truncate(t2 / "llama3_8b_alpaca_lora_s1" / "mmlu.json")
    bad_base = truncate(root / "eval" / "llama3_8b" / "mmlu.json")
    cfg_run = write_run(
        t2,
        "llama3_8b_openorca_dora_s1",
        method="dora",
        model="llama3_8b",
        dataset="openorca",
        seed=1,
        family="causal_lm",
        config={"method": {"name": "dora"}},
    )
    (cfg_run / "config.yaml").write_text("method: {name: dora\nseed: [1\n")  # YAML that does not parse
    col = collect(t2, root / "eval")
    assert col.unreadable == {
        bad_mmlu: f"{TRUNCATED}; the run counts as not evaluated on MMLU",
        bad_base: TRUNCATED,
        cfg_run / "config.yaml": "does not parse as YAML (expected ',' or '}', but got ':' at line 2)",
    }
    # the run with a truncated mmlu.json stays (trained, not evaluated); the one whose config is unreadable goes
    lora_s1 = [r for r in col.runs if r.dir.name == "llama3_8b_alpaca_lora_s1"]
    assert len(lora_s1) == 1 and lora_s1[0].mmlu is None
    assert cfg_run not in [r.dir for r in col.runs] and col.base_evals == []
    # so mmlu-jobs evaluates it again, and the base model (its evaluation is unreadable) too
    assert mmlu_jobs(t2, "llama3_8b", root / "eval") == [
        f"run_dir={t2 / 'llama3_8b_alpaca_dora_s0'}",
        f"run_dir={t2 / 'llama3_8b_alpaca_lora_s1'}",
        "model=llama3_8b",
    ]


def test_tables_lists_unreadable_runs_and_renders_the_rest(tmp_path):
    runs = tmp_path / "runs"
    bad = truncate(demo_runs(runs / "demo") / "rot90" / "nora_s2" / "summary.json")
    proc = nora_results(["tables", "--runs", "runs", "--out", "out"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"warning: unreadable: {bad.relative_to(tmp_path)}: {TRUNCATED}",
        "warning: 1 run file(s) under runs could not be read; their runs are left out of every table (fix or remove "
        "them, or rerun those runs)",
    ]
    demo_md = (tmp_path / "out" / "demo.md").read_text()
    assert "| NoRA | 2 | 91.75 ± 1.06 |" in demo_md  # seeds 0 and 1 (91.0, 92.5); seed 2 is the unreadable one
    assert "wrote out/demo.md" in proc.stdout and (tmp_path / "out" / "README.md").exists()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow  # 14 s here: end to end (make test-slow, CI)
def test_tables_on_a_checkout_without_runs_leaves_results_byte_identical(tmp_path):
    shutil.copytree(ROOT / "results", tmp_path / "results")  # the committed tables, figures and index
    before = _tree_hashes(tmp_path / "results")
    assert "table1.md" in before and "README.md" in before
    proc = nora_results(["tables"], tmp_path)  # defaults: --runs runs (absent here) --out results
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == (
        "no complete runs or base-model evaluations under runs; nothing rendered, results/ left "
        "as it is (make demo, make table1, ... produce runs)\n"
    )
    assert _tree_hashes(tmp_path / "results") == before
    # the same with a runs/ that holds only an unfinished run: nothing to render either
    write_run(
        tmp_path / "runs" / "demo",
        "nora_s0",
        method="nora",
        model="vit_demo",
        dataset="digits_target",
        seed=0,
        acc=90.0,
        status="running",
    )
    proc = nora_results(["tables"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("no complete runs") and proc.stderr == ""
    assert _tree_hashes(tmp_path / "results") == before


def test_demo_table_lists_unreadable_runs_too(tmp_path, capsys, logged):
    from nora.results.__main__ import main

    root = demo_runs(tmp_path / "demo")
    bad = truncate(root / "rot90" / "full_s1" / "summary.json")
    assert main(["demo-table", "--check", "--runs", str(root)]) == 0  # there are demo runs to render
    assert main(["demo-table", "--runs", str(root), "--out", str(tmp_path / "out")]) == 1
    assert logged().splitlines()[0] == f"warning: unreadable: {bad}: {TRUNCATED}"
    assert "| full FT | 2 | 92.00 ± 2.83 |" in capsys.readouterr().out  # seeds 0 and 2 (90.0, 94.0)


@pytest.mark.slow  # 10 s here: end to end (make test-slow, CI)
def test_symlinked_run_folders_are_collected_once_and_a_link_loop_ends(tmp_path):
    """runs/demo -> /scratch/...: a symlinked folder's runs enter the tables; a link back up the tree (or a second
    link to the same folder) neither loops nor counts a run twice."""
    scratch = demo_runs(tmp_path / "scratch" / "demo")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "demo").symlink_to(scratch, target_is_directory=True)
    (runs / "demo_again").symlink_to(scratch, target_is_directory=True)
    (scratch / "rot90" / "up").symlink_to(runs, target_is_directory=True)  # a loop
    direct = collect(scratch)
    col = collect(runs)
    assert len(direct.runs) > 0 and col.unreadable == {}
    assert sorted(str(r.dir.resolve()) for r in col.runs) == sorted(str(r.dir.resolve()) for r in direct.runs)
    assert len(col.incomplete) == len(direct.incomplete) == 1
    proc = nora_results(["tables", "--runs", "runs", "--out", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no complete runs" not in proc.stdout and (tmp_path / "out" / "demo.md").exists()


@contextlib.contextmanager
def another_user_of_the_group():
    """This process as another user (uid 65534) of root's group, as a colleague on a shared group directory: the
    kernel then checks the files' real permission bits. Needs root (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_another_user_of_the_group_reads_the_runs_and_an_unreadable_folder_is_listed(tmp_path):
    from nora.files import write_json_atomic

    shared = Path(tempfile.mkdtemp(prefix="nora-shared-", dir="/tmp"))  # pytest's tmp_path is 0700
    try:
        shared.chmod(0o755)
        demo = demo_runs(shared / "demo")
        for summary in demo.glob("**/summary.json"):  # as run_training writes them, under the usual umask
            old = os.umask(0o022)
            try:
                write_json_atomic(summary, json.loads(summary.read_text()))
            finally:
                os.umask(old)
            assert summary.stat().st_mode & 0o777 == 0o644
        private = demo / "rot90"
        private.chmod(0o700)  # a folder its owner keeps to themself
        everyone = collect(demo)
        with another_user_of_the_group():
            col = collect(demo)
        assert col.unreadable == {private: "cannot be read (Permission denied); its runs are left out"}
        assert sorted(r.dir for r in col.runs) == sorted(r.dir for r in everyone.runs if private not in r.dir.parents)
        assert len(col.runs) > 0
    finally:
        shutil.rmtree(shared)
