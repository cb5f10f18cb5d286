"""The data and results readers refuse what no writer produces, and the demos and ``python -m nora.results`` end a
bad argument in one line (issue 32, part C).

* Instruction data: a number, bool, list or object in an Alpaca/OpenOrca text field (which ``datasets`` would
  JSON-encode or cast for every record) is refused naming the file, the record and the field, before anything is
  tokenised; the same through a real ``train.py``.
* MMLU: a UTF-8 byte-order mark at the start of a CSV is not part of the first question.
* Results: ``final_accuracy`` NaN / Infinity / 1e9 / "abc" (and an ``mmlu.json`` accuracy out of range) leave the
  run out, listed as unreadable with the file; two folders with one seed of one setting are named in the table and
  on stderr; ``plan`` with a typo'd sweep, key or option, ``mmlu-jobs --runs <missing>`` and ``--out`` on a
  read-only file system are one line each.
* Demos: ``--methods nrao`` and override typos are one line before anything starts; the digits diagnosis on a torn
  ``metrics.jsonl`` names the file and line; the LLM ``--diagnose`` without NoRA++ runs says what is missing and
  leaves the diagnosis file as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from instruct_fixtures import (
    alpaca_records,
    build_instruct,
    openorca_records,
    write_alpaca_json,
    write_alpaca_jsonl,
    write_openorca_parquet,
)
from mmlu_fixtures import make_fixture, write_csv
from test_results import demo_runs, mmlu, write_run

ROOT = Path(__file__).resolve().parents[1]
ALPACA_FIELDS = "['instruction', 'input', 'output']"


def _env(**extra) -> dict:
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )


def _python(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600
    )


def _main_error(main, argv, capsys) -> str:
    """Run a command's ``main`` in this process; it must exit 2 with one ``error:`` line and no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, (out, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


# ------------------------------------------------------------------------------------------ instruction data


@pytest.mark.parametrize(
    "value,shown,kind",
    [
        (5, "5", "int"),
        (["Paris"], "['Paris']", "list"),
        ({"city": "Paris"}, "{'city': 'Paris'}", "dict"),
        (True, "True", "bool"),
        (2.5, "2.5", "float"),
    ],
)
@pytest.mark.parametrize("writer", [write_alpaca_json, write_alpaca_jsonl])
def test_a_non_string_alpaca_value_is_refused_naming_record_and_field(tmp_path, tok, writer, value, shown, kind):
    """One non-string output in a real alpaca_data.json / .jsonl: datasets would read the field as JSON and every
    response would train with literal quotes. Refused naming the file, record 4 and the field; nothing cached."""
    from nora.data.instruct import DataError

    recs = alpaca_records(8)
    recs[4] = dict(recs[4], output=value)
    path = writer(tmp_path / f"alpaca{'.json' if writer is write_alpaca_json else '.jsonl'}", recs)
    with pytest.raises(DataError) as err:
        build_instruct(tmp_path, tok, path=str(path))
    assert str(err.value) == (
        f"{path}: record 4 (counting from 0) has output={shown} ({kind}), not text; dataset=alpaca needs strings in "
        f"{ALPACA_FIELDS} (1 record(s) with a non-string output; the field mixes text with other values); write it "
        "as a string in the file"
    )
    assert not list((tmp_path / "cache").glob("alpaca-*"))  # nothing tokenised or cached


def test_a_non_string_input_and_a_numeric_field_are_refused(tmp_path, tok):
    """An int in one `input` (empty inputs would become `""`), and a field that is numbers throughout (read as
    int64, it would be cast to text): both refused; the same file with the value quoted trains as before."""
    from nora.data.instruct import DataError

    recs = alpaca_records(6)
    recs[2] = dict(recs[2], input=7)
    path = write_alpaca_jsonl(tmp_path / "inputs.jsonl", recs)
    with pytest.raises(
        DataError,
        match=r"inputs\.jsonl: record 2 \(counting from 0\) has input=7 \(int\), not "
        r"text; .*the field mixes text with other values",
    ):
        build_instruct(tmp_path, tok, path=str(path))
    numeric = [dict(r, output=i) for i, r in enumerate(alpaca_records(4))]
    path = write_alpaca_json(tmp_path / "numbers.json", numeric)
    with pytest.raises(
        DataError,
        match=r"numbers\.json: record 0 \(counting from 0\) has output=0 \(int\), not text; "
        r".*\(4 record\(s\) with a non-string output; the field was read as int64\)",
    ):
        build_instruct(tmp_path, tok, path=str(path))
    recs[2] = dict(recs[2], input="7")  # quoted: text, as the error says
    train, _, stats = build_instruct(tmp_path, tok, path=str(write_alpaca_jsonl(tmp_path / "fixed.jsonl", recs)))
    assert stats["num_train"] == 6 and len(train) == 6
    ids = train[2]["input_ids"]
    assert '"' not in tok.decode(ids) and "\n7\n" in tok.decode(ids)


def test_an_openorca_int64_column_in_one_of_two_parquet_files_is_refused(tmp_path, tok):
    """A directory of two parquet files whose schemas differ (response string in one, int64 in the other): the
    int64 file is named with its column, instead of being cast to text and merged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nora.data.instruct import DataError

    d = tmp_path / "orca"
    write_openorca_parquet(d / "a.parquet", openorca_records(4))
    recs = openorca_records(3)
    pq.write_table(
        pa.table(
            {
                "id": [r["id"] for r in recs],
                "system_prompt": [r["system_prompt"] for r in recs],
                "question": [r["question"] for r in recs],
                "response": pa.array([41, 42, 43], pa.int64()),
            }
        ),
        str(d / "b.parquet"),
    )
    with pytest.raises(DataError) as err:
        build_instruct(tmp_path, tok, name="openorca", path=str(d))
    assert str(err.value) == (
        f"{d / 'b.parquet'}: record 0 (counting from 0) has response=41 (int), not text; dataset=openorca needs "
        "strings in ['system_prompt', 'question', 'response'] (3 record(s) with a non-string response; the field was "
        "read as int64); write it as a string in the file"
    )


def test_train_py_refuses_a_non_string_alpaca_field_in_one_line(tmp_path):
    """The real command: train.py with an alpaca_data.json whose record 3 has a list as output exits 2 with one
    error line naming the file, the record and the field; nothing is tokenised into the cache."""
    recs = alpaca_records(12)
    recs[3] = dict(recs[3], output=["Paris", "Lyon"])
    path = write_alpaca_json(tmp_path / "alpaca_data.json", recs)
    cache = tmp_path / "cache"
    proc = _python(
        [
            str(ROOT / "train.py"),
            "model=llama_tiny",
            "dataset=alpaca",
            "method=lora",
            f"data.path={path}",
            "logger=disabled",
            f"output_root={tmp_path / 'runs'}",
            "trainer.device=cpu",
            "trainer.max_steps=1",
            "trainer.num_workers=0",
            "trainer.progress=false",
            f"dataset.cache_dir={cache}",
        ],
        ROOT,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: {path}: record 3 (counting from 0) has output=['Paris', 'Lyon'] (list), not text; "
        f"dataset=alpaca needs strings in {ALPACA_FIELDS} (1 record(s) with a non-string output; the "
        "field mixes text with other values); write it as a string in the file"
    ]
    assert "Traceback" not in proc.stderr and not list(cache.glob("alpaca-*"))


# ------------------------------------------------------------------------------------------ MMLU CSV
def test_a_byte_order_mark_is_not_part_of_the_first_question(tmp_path):
    """A dev CSV re-saved by a spreadsheet program starts with the UTF-8 BOM: the first question (a shot in every
    prompt of the subject) and the test questions read exactly as without it, and no prompt holds U+FEFF."""
    from nora.eval.mmlu import build_prompt
    from nora.eval.mmlu_data import custom_subjects, load_mmlu

    fx = make_fixture(["anatomy", "philosophy"])
    plain, bom = write_csv(tmp_path / "plain", fx), write_csv(tmp_path / "bom", fx)
    for f in (bom / "dev" / "anatomy_dev.csv", bom / "test" / "anatomy_test.csv"):
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    assert (bom / "dev" / "anatomy_dev.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    a, b = load_mmlu(plain, subjects="anatomy", k=5), load_mmlu(bom, subjects="anatomy", k=5)
    assert b["anatomy"].dev == a["anatomy"].dev and b["anatomy"].test == a["anatomy"].test
    assert b["anatomy"].dev[0].question == fx["anatomy"]["dev"][0][0]
    prompt = build_prompt("anatomy", b["anatomy"].dev, b["anatomy"].test[0])
    assert "\ufeff" not in prompt and prompt == build_prompt("anatomy", a["anatomy"].dev, a["anatomy"].test[0])
    # a subjects.json written with a BOM reads too
    (bom / "subjects.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"anatomy": {"category": "bio"}}).encode())
    assert custom_subjects(bom) == {"anatomy": {"category": "bio"}}


# ------------------------------------------------------------------------------------------ results readers
BAD_ACCURACY = [("NaN", "nan"), ("Infinity", "inf"), ("1e9", "1000000000.0"), ('"abc"', "'abc'"), ("-3.0", "-3.0")]


def test_an_accuracy_no_run_writes_leaves_the_run_out_naming_the_file(tmp_path):
    """final_accuracy NaN, Infinity, 1e9, "abc", -3 written into a real summary.json: the run is listed as
    unreadable with the file and the value, and `tables` (a real subprocess) renders the rest: no nan, inf or
    >100% cell, no traceback, exit status 1."""
    from nora.results.collect import collect

    runs = tmp_path / "runs"
    demo = demo_runs(runs / "demo")
    rot = demo / "rot90"
    bad = {}
    for i, (raw, shown) in enumerate(BAD_ACCURACY):
        d = write_run(
            rot,
            f"nora_bad{i}_s{5 + i}",
            method="nora",
            model="vit_demo",
            dataset="digits_target",
            seed=5 + i,
            acc=90.0,
            config={"dataset": {"classes": [5, 6, 7, 8, 9], "transform": "rot90"}},
        )
        text = (d / "summary.json").read_text().replace('"final_accuracy": 90.0', f'"final_accuracy": {raw}')
        (d / "summary.json").write_text(text)
        bad[d / "summary.json"] = (
            f"final_accuracy={shown} is not an accuracy (a finite number of percent in [0, 100]); the run is left out"
        )
    # an mmlu.json with a NaN accuracy: that run counts as not evaluated
    llm = write_run(
        runs / "table2",
        "llama3_8b_alpaca_lora_s0",
        method="lora",
        model="llama3_8b",
        dataset="alpaca",
        seed=0,
        family="causal_lm",
        mmlu=mmlu(0.5, 0.5, 0.5, 0.5, 0.5),
    )
    (llm / "mmlu.json").write_text(
        (llm / "mmlu.json")
        .read_text()
        .replace('"accuracy": 0.5, "correct": 0, "n": 100', '"accuracy": NaN, "correct": 0, "n": 100')
    )
    col = collect(demo)
    assert col.unreadable == bad
    assert not any(r.dir.name.startswith("nora_bad") for r in col.runs)
    col2 = collect(runs / "table2")
    assert col2.unreadable == {
        llm / "mmlu.json": "overall.accuracy=nan is not an accuracy (a finite fraction in "
        "[0, 1]); the run counts as not evaluated on MMLU"
    }
    assert [r.mmlu for r in col2.runs] == [None]

    proc = _python(["-m", "nora.results", "tables", "--runs", "runs", "--out", "out"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    for path, why in bad.items():
        assert f"warning: unreadable: {path.relative_to(tmp_path)}: {why}" in lines
    md = (tmp_path / "out" / "demo.md").read_text()
    assert "| NoRA | 3 | 92.67 ± 1.76 |" in md  # seeds 0-2 only (91.0, 92.5, 94.5)
    assert "nan" not in md.lower() and "inf" not in md.replace("info", "")


def test_two_folders_of_one_seed_are_named_in_the_table_and_on_stderr(tmp_path, logged):
    """A run repeated into a second folder (same method, task and seed, newer, another accuracy): the table counts
    the newer one, as before, but says so naming both folders (the table's note, the CSV header, stderr)."""
    from nora.results.__main__ import main

    demo = demo_runs(tmp_path / "demo")
    old = demo / "rot90" / "nora_s0"
    new = write_run(
        demo / "rot90",
        "nora_s0_again",
        method="nora",
        model="vit_demo",
        dataset="digits_target",
        seed=0,
        acc=99.0,
        trainable=20,
        date="2026-02-01T10:00:00+00:00",
        config={"dataset": {"classes": [5, 6, 7, 8, 9], "transform": "rot90"}},
    )
    out = tmp_path / "out"
    assert main(["demo-table", "--runs", str(demo), "--out", str(out)]) == 0
    line = f"nora seed 0: {new} (2026-02-01) is counted, {old} (2026-01-02) is not"
    assert [ln for ln in logged().splitlines() if ln.startswith("warning:")] == [f"warning: same seed twice: {line}"]
    md = (out / "demo.md").read_text()
    assert "| NoRA | 3 | 95.33 ± 3.33 |" in md  # 99.0 (the newer seed 0), 92.5, 94.5
    assert "**1 run folder(s) repeat a seed of the same setting**" in md
    assert f"- nora seed 0: `{new}` (2026-02-01) is counted, `{old}` (2026-01-02) is not" in md
    assert f"# same seed twice: {line}" in (out / "demo.csv").read_text()
    # without the copy: no note
    shutil.rmtree(new)
    assert main(["demo-table", "--runs", str(demo), "--out", str(out)]) == 0
    assert "warning:" not in logged() and "repeat a seed" not in (out / "demo.md").read_text()


def test_tables_names_two_folders_of_one_seed_in_a_subprocess(tmp_path):
    runs = tmp_path / "runs"
    demo_runs(runs / "demo")
    shutil.copytree(runs / "demo" / "rot90" / "full_s1", runs / "demo" / "rot90" / "full_s1_copy")
    proc = _python(["-m", "nora.results", "tables", "--runs", "runs", "--out", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # same date: the later folder name is counted
    assert proc.stderr.splitlines() == [
        "warning: same seed twice: full seed 1: runs/demo/rot90/full_s1_copy (2026-01-02) is counted, "
        "runs/demo/rot90/full_s1 (2026-01-02) is not"
    ]


def test_results_cli_arguments_are_one_line(tmp_path, capsys):
    """plan with a sweep name, a key or an option that does not exist; mmlu-jobs on a missing --runs (it listed
    the base job alone and exited 0)."""
    from nora.results.__main__ import main

    assert _main_error(main, ["plan", "tabel1"], capsys) == (
        "error: unknown sweep 'tabel1'; valid: table1, table2, ablations, matched_budget (groups) or ablation_form, "
        "ablation_groups, ablation_init, ablation_numerator, ablation_rank, ablation_residual, ablation_variant, "
        "matched_llama, matched_vit, table1, table1_low_budget, table2 (sweeps/*.yaml)"
    )
    err = _main_error(main, ["plan", "table1", "trainer.lrr=0.1"], capsys)
    assert err.startswith("error: trainer.lrr=0.1: no such key; valid keys of trainer: device, precision, epochs, ")
    assert ", lr, head_lr, nora_lr, " in err
    assert _main_error(main, ["plan", "table1", "model=vit_tinyy"], capsys) == (
        "error: model=vit_tinyy: no such option of model; valid: llama3_8b, llama_demo, llama_tiny, mistral_7b, "
        "qwen2_7b, qwen2_tiny, vit_base, vit_demo, vit_small, vit_test, vit_tiny"
    )
    assert _main_error(main, ["plan", "table1", "seed"], capsys) == (
        "error: cannot parse the override(s) seed: Error parsing override 'seed'; missing EQUAL at '<EOF>' (the form "
        "is key=value, e.g. trainer.lr=0.01)"
    )
    missing = tmp_path / "runs" / "table2"
    assert _main_error(main, ["mmlu-jobs", "--runs", str(missing), "--eval-root", str(tmp_path / "eval")], capsys) == (
        f"error: --runs {missing}: no such directory (the training runs to evaluate; "
        "`make table2` writes them to runs/table2)"
    )


def test_plan_typo_in_a_subprocess_is_one_line(tmp_path):
    proc = _python(["-m", "nora.results", "plan", "tabel1"], ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: unknown sweep 'tabel1'; valid: table1, table2,")
    assert len(proc.stderr.splitlines()) == 1


def test_demo_table_on_a_read_only_out_is_one_line(tmp_path, capsys):
    """--out on a real read-only bind mount: one line naming the file, exit 2, nothing there changed."""
    from test_reliability import mounted

    from nora.results.__main__ import main

    demo = demo_runs(tmp_path / "demo")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "demo.md").write_text("the committed table\n")
    with mounted(tmp_path / "ro", source="bind") as ro:
        err = _main_error(main, ["demo-table", "--runs", str(demo), "--out", str(ro)], capsys)
        assert err == f"error: {ro / 'demo.md'}: [Errno 30] Read-only file system"
        assert (ro / "demo.md").read_text() == "the committed table\n"


# ------------------------------------------------------------------------------------------ demos
def test_the_vision_demo_refuses_bad_methods_and_overrides_before_anything_starts(tmp_path, capsys):
    import nora.demo.runner as demo

    out = tmp_path / "runs"
    valid = "linear_probe, full, lora, dora, nora, nora_pp, rational_ft, zero_init_ft, bitfit, ln_tuning, ia3, vera"
    cases = [
        (["--methods", "lora,nrao"], f"error: --methods: unknown method 'nrao'; valid: {valid}"),
        (["--methods", "nora", "trainer.lrr=0.1"], None),
        (
            ["--methods", "nora", "model=vit_dem"],
            "error: model=vit_dem: no such option of model; valid: llama3_8b, "
            "llama_demo, llama_tiny, mistral_7b, qwen2_7b, qwen2_tiny, vit_base, vit_demo, vit_small, "
            "vit_test, vit_tiny "
            "(the fine-tuning runs of method=nora)",
        ),
        (
            ["--methods", "lora,linear_probe", "method.lora.r=4"],
            "error: method.lora.r=4: no such key (method.lora is "
            "null in this config) (the fine-tuning runs of method=linear_probe)",
        ),
        (["--methods", "nora", "trainer.lr=abc"], "error: trainer.lr='abc': could not be converted to Float"),
    ]
    for argv, expected in cases:
        err = _main_error(demo.main, ["--out", str(out), *argv], capsys)
        if expected is None:
            assert err.startswith("error: trainer.lrr=0.1: no such key; valid keys of trainer: device, ")
            assert err.endswith("(the fine-tuning runs of method=nora)")
        else:
            assert err == expected
    assert not out.exists()  # nothing pretrained, nothing written


def test_the_vision_demo_typo_in_a_subprocess_is_one_line(tmp_path):
    proc = _python(["-m", "nora.demo", "--out", str(tmp_path / "runs"), "--methods", "nrao"], ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "error: --methods: unknown method 'nrao'; valid: linear_probe, full, lora, "
        "dora, nora, nora_pp, rational_ft, zero_init_ft, bitfit, ln_tuning, ia3, vera"
    ]
    assert not (tmp_path / "runs").exists()


def test_the_digits_diagnosis_names_a_torn_metrics_line(tmp_path):
    """A complete run whose metrics.jsonl ends in a torn line (a killed copy): the diagnosis (a real subprocess)
    exits 2 naming the file and the line; its output file is not written."""
    runs = tmp_path / "runs" / "demo"
    run = write_run(
        runs / "rot90",
        "linear_probe_s0",
        method="linear_probe",
        model="vit_demo",
        dataset="digits_target",
        seed=0,
        acc=90.0,
    )
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "eval/accuracy": 50.0}\n{"step": 2, "eval/accuracy": 60.0}\n{"step": 3, "eval/acc'
    )
    out = tmp_path / "diag.md"
    proc = _python(
        ["-m", "nora.demo.diagnosis", "--runs", str(runs), "--out", str(out)],
        ROOT,
        NORA_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f'error: {run / "metrics.jsonl"}, line 3: not a JSON record (\'{{"step": 3, "eval/acc\'; cut short?); the '
        "learning curve of this complete run cannot be read: remove that line or rerun the run"
    ]
    assert not out.exists()


def test_the_llm_diagnosis_without_nora_pp_says_so_and_keeps_the_file(tmp_path, capsys):
    """NoRA and LoRA runs, no NoRA++: the LLM demo's --diagnose said "no NoRA runs" and overwrote the diagnosis
    file; now one line names what is missing and what is there, before any backbone is built."""
    import nora.demo.llm as llm

    out, res = tmp_path / "runs", tmp_path / "results"
    for method in ("lora", "nora"):
        write_run(
            out,
            f"{method}_s0",
            method=method,
            model="llama_demo",
            dataset="alpaca",
            seed=0,
            family="causal_lm",
            mmlu=dict(mmlu(0.3, 0.3, 0.3, 0.3, 0.3), split="test"),
        )
    res.mkdir()
    (res / "demo_llm_diagnosis.md").write_text("the last diagnosis\n")
    err = _main_error(llm.main, ["--diagnose", "--out", str(out), "--results", str(res)], capsys)
    assert err == (
        f"error: the diagnosis needs scored NoRA and NoRA++ runs under {out}; there are no NoRA++ "
        "(nora_pp) runs (found: lora, nora): run `python -m nora.demo.llm` (its default methods include "
        "both) first; the diagnosis file was not written"
    )
    assert (res / "demo_llm_diagnosis.md").read_text() == "the last diagnosis\n"
    assert sorted(p.name for p in out.iterdir()) == ["lora_s0", "nora_s0"]  # no backbone, no base evaluation
