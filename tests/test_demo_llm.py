"""The offline LLM demo: its generated world (deterministic, splits disjoint, MMLU layout eval.py reads with its own
subjects and categories), the continuation protocol against a hand computation, and a one-step run of the whole
pipeline (pretrain -> train.py's run_training -> eval.py's run_eval -> results/demo_llm.md)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nora.data import world as W
from nora.eval.mmlu import build_prompt, evaluate_mmlu
from nora.eval.mmlu_data import category_names, load_mmlu, resolve_subjects, subject_categories

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_world_is_deterministic_and_its_splits_are_disjoint(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    info = W.write_world(W.make_world(0), a)
    W.write_world(W.make_world(0), b)
    W.write_world(W.make_world(1), c)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)
    world = W.make_world(0)
    splits = {s: {p.name for p in world.in_split(s)} for s in W.SPLITS}
    assert sum(map(len, splits.values())) == 48 and all(splits.values())
    assert not set.intersection(*splits.values())
    sums = {s: set(world.sums[s]) for s in W.SPLITS}
    assert sum(map(len, sums.values())) == 13 * 13 and not (sums["tune"] & sums["test"])
    # instruction tuning asks only about the tuning people; the test people's facts are in the pretraining prose
    recs = json.loads((a / "alpaca.json").read_text())
    assert len(recs) == info["instructions"] and set(recs[0]) == {"instruction", "input", "output"}
    asked = {n for r in recs for n in W.NAMES if f" {n}?" in r["instruction"] or f"of {n} " in r["instruction"]}
    assert asked and asked <= splits["tune"]
    text = (a / "pretrain.txt").read_text()
    for p in world.in_split("test"):
        assert (
            f"{p.name} lives in {p.city}." in text
            or f"{p.name} has a home in {p.city}." in text
            or any(t.format(n=p.name, v=p.city) in text for t in W.FACT_TEMPLATES["city"])
        )
    for p in world.in_split("test"):  # the evaluated people and pairs are never questioned in pretraining
        assert f"Where does {p.name} live?" not in text and f"the job of {p.name}?" not in text
    for a, b in world.sums["test"]:
        assert f"What is {a} + {b}?" not in text
    # its quiz pages ask about the tuning split, in the question-answer form that the evaluation scores
    assert any(f"Question: Where does {p.name} live?\nAnswer: {p.city}" in text for p in world.in_split("tune"))
    assert "expression" in text  # the standard library's prose is in


def test_world_questions_are_mmlu_csv_with_their_own_subjects(tmp_path):
    counts = W.write_mmlu(W.make_world(0), tmp_path)
    assert counts["dev"] == {s: 5 for s in W.SUBJECTS}
    table = json.loads((tmp_path / "subjects.json").read_text())
    assert {s: v["category"] for s, v in table.items()} == W.SUBJECTS
    assert category_names(tmp_path) == ("STEM", "knowledge")
    assert subject_categories(path=tmp_path) == W.SUBJECTS
    data = load_mmlu(tmp_path, subjects="all", k=5)
    assert sorted(data) == sorted(W.SUBJECTS)
    for s, d in data.items():
        assert len(d.test) == counts["test"][s] and len(d.dev) == 5
        for q in d.test:
            assert len(set(q.choices)) == 4 and 0 <= q.answer < 4
    val = load_mmlu(tmp_path, subjects="available", k=0, split="val")
    assert {s: len(d.test) for s, d in val.items()} == counts["val"]
    with pytest.raises(ValueError, match="unknown subject 'anatomy'.*valid .*arithmetic, facts, relations, units"):
        resolve_subjects(["anatomy"], tmp_path)
    # MMLU itself keeps its 57 subjects and four categories
    assert len(resolve_subjects(None)) == 57 and category_names(None)[0] == "STEM"


def test_a_world_too_small_for_four_choices_is_refused():
    with pytest.raises(ValueError, match="max_amount=3, max_addend=12: a question needs three wrong answers"):
        W.make_world(0, max_amount=3)


def test_a_malformed_subjects_file_is_one_clear_error(tmp_path):
    W.write_mmlu(W.make_world(0), tmp_path)
    (tmp_path / "subjects.json").write_text('{"arithmetic": "STEM"}')
    with pytest.raises(ValueError, match=r'subjects.json: expected \{"<subject>": \{"category"'):
        load_mmlu(tmp_path, subjects="all", k=5)


class _Bigram(torch.nn.Module):
    """A deterministic toy LM: logits depend on the last token only (so log-likelihoods are easy to compute)."""

    def __init__(self, vocab: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def forward(self, input_ids, attention_mask=None, **_):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_continuation_protocol_scores_each_answer_text(tmp_path):
    from nora.models.tokenizer import train_bpe_tokenizer

    W.write_mmlu(W.make_world(0), tmp_path)
    data = load_mmlu(tmp_path, subjects=["units", "facts"], k=2)
    tok = train_bpe_tokenizer(
        [q.question + " " + " ".join(q.choices) for d in data.values() for q in d.test + d.dev],
        300,
        uniform_word_starts=True,
    )
    model = _Bigram(len(tok))
    res = evaluate_mmlu(
        model,
        tok,
        tmp_path,
        subjects=["units", "facts"],
        k=2,
        protocol="continuation",
        progress=False,
        keep_logits=False,
    )
    assert res.category_order == ("STEM", "knowledge")
    d = res.to_dict(include_predictions=True)
    assert d["categories"]["STEM"]["subjects"] == ["units"] and d["protocol"]["name"] == "continuation"
    logp = torch.log_softmax(model.table.detach().double(), -1)
    for subject, sd in data.items():
        for qi, q in enumerate(sd.test[:6]):
            ctx = build_prompt(subject, sd.dev[:2], q, "continuation")
            assert ctx.endswith(f"Question: {q.question}\nAnswer:") and "A. " not in ctx
            scores = []
            for c in q.choices:
                c_ids = tok(ctx).input_ids
                whole = tok(ctx + " " + c).input_ids
                cont = whole[len(c_ids) :]
                seq = whole
                scores.append(sum(float(logp[seq[len(c_ids) + t - 1], tok_id]) for t, tok_id in enumerate(cont)))
            assert res.subjects[subject].logprobs[qi] == pytest.approx(scores, abs=1e-4)
            assert d["predictions"][subject][qi] == max(range(4), key=lambda j: (scores[j], -j))
    with pytest.raises(ValueError, match="unknown MMLU protocol 'cloze'; valid: letters, continuation"):
        evaluate_mmlu(model, tok, tmp_path, protocol="cloze")


TINY = """
world: {seed: 0, n_people: 12, max_addend: 3, max_amount: 4}
tokenizer: {vocab_size: 400}
backbone: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
           num_key_value_heads: 2, max_position_embeddings: 512, tie_word_embeddings: true}
pretrain: {steps: 3, batch_size: 4, seq_len: 32, lr: 1.0e-3, warmup: 1, weight_decay: 0.1, seed: 0, threads: 1}
methods: [nora, nora_pp]
seeds: 1
full_seeds: 2
epochs: 1
eval: {k: 2, protocol: continuation, batch_size: 16}
tune: {seeds: [0], grids: {nora: {lr: [1.0e-3, 1.0e-2, 1.0e-1]}, nora_pp: {nora_lr: [1.0e-3, 1.0e-2, 1.0e-1]}}}
"""


@pytest.mark.slow  # 86 s here: end to end (make test-slow, CI)
def test_one_step_pipeline_writes_the_report_with_train_and_eval_outputs(tmp_path):
    settings = tmp_path / "demo_llm.yaml"
    settings.write_text(TINY)
    env = dict(os.environ, NORA_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="disabled")
    out, res = tmp_path / "runs", tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "nora.demo.llm",
        "--settings",
        str(settings),
        "--out",
        str(out),
        "--results",
        str(res),
        "--jobs",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretraining the LLM demo's backbone" in proc.stdout
    run = out / "nora_pp_s0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["method"] == "nora_pp" and summary["model"] == "llama_demo"
    mmlu = json.loads((run / "mmlu.json").read_text())
    assert mmlu["split"] == "test" and mmlu["protocol"]["name"] == "continuation" and mmlu["k"] == 2
    assert set(mmlu["categories"]) == {"STEM", "knowledge"} and mmlu["adapter"] is not None
    base = json.loads((out / "base" / "mmlu.json").read_text())
    assert base["model"]["method"] == "base"
    md = (res / "demo_llm.md").read_text()
    assert "| base model (no tuning) | 1 |" in md and "| NoRA++ | 1 |" in md
    assert f"{100 * mmlu['overall']['accuracy']:.1f}" in md
    rows = list(
        csv.DictReader(line for line in (res / "demo_llm.csv").read_text().splitlines() if not line.startswith("#"))
    )
    assert {r["method"] for r in rows} >= {"base", "nora_pp"}
    assert (res / "figures" / "demo_llm_activations_nora_pp.png").exists()
    # a second run reuses the cached backbone and the finished run
    proc2 = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc2.returncode == 0 and "pretraining the LLM demo" not in proc2.stdout
    assert json.loads((run / "summary.json").read_text())["date"] == summary["date"]
    assert not math.isnan(mmlu["overall"]["accuracy"])
    # the diagnosis measures those runs and trains the init experiment's run beside them
    proc3 = subprocess.run(cmd + ["--diagnose"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc3.returncode == 0, proc3.stderr[-3000:]
    diag = (res / "demo_llm_diagnosis.md").read_text()
    for heading in (
        "## What the table can resolve",
        "## Gate pre-activations",
        "## Is the NoRA part of NoRA++ used?",
        "## Does the calibrated init matter?",
        "## Step 0: does NoRA start at the pretrained model?",
        "## Outside the fit range, after training",
        "## Does the start change the results?",
    ):
        assert heading in diag
    fit_run = tmp_path / "runs_diagnosis" / "nora_fit_s0"
    assert json.loads((fit_run / "summary.json").read_text())["status"] == "complete"
    assert "init: fit" in (fit_run / "config.yaml").read_text()
    # step 0 in the residual form (the default) is the backbone, to float32's resolution
    step0 = diag.split("## Step 0")[1].split("\n## ")[0]
    for init in ("fit", "calibrated"):
        row = next(line for line in step0.splitlines() if line.startswith(f"| residual (default) | {init} |"))
        assert abs(float(row.split("|")[4].strip().rstrip("%"))) < 1e-3 and float(row.split("|")[5]) < 1e-5
    paper_run = tmp_path / "runs_diagnosis" / "nora_pp_paper_form_s0"
    assert "residual: false" in (paper_run / "config.yaml").read_text()
    assert "residual: true" in (out / "nora_pp_s0" / "config.yaml").read_text()
