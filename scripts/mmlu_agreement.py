"""Agreement of nora.eval.mmlu with lm-evaluation-harness (lm_eval) on a tiny model and a fixture.

Builds a tiny random LLaMA (saved with ``save_pretrained`` next to the offline byte-level BPE
tokenizer, so lm_eval's ``hf`` model loads it with ``pretrained=<dir>``) and a small MMLU-format
fixture (real subject names, cais/mmlu parquet layout). lm_eval is run on its own default ``mmlu``
tasks, redirected to the local parquet files by one task yaml per subject that ``include``s
lm_eval's ``tasks/mmlu/default/mmlu_<subject>.yaml`` (so description, ``doc_to_text``,
``doc_to_choice``, ``fewshot_split: dev`` and the ``first_n`` sampler are lm_eval's own) and only
overrides ``task``, ``tag``, ``dataset_path: parquet``, ``dataset_name`` and ``dataset_kwargs.data_files``.
Then both are compared question by question: predicted letter, the four log-likelihoods, accuracy
per subject.

    .venv/bin/python scripts/mmlu_agreement.py [--k 5] [--n-test 8] [--batch-size 4] [--protocol letters] [--out DIR]

Needs ``lm_eval`` (``pip install lm_eval==0.4.13``); runs offline on CPU in a few seconds.
Exit status 0 when every prediction and accuracy agrees.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from nora.logs import setup_logging

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SUBJECTS = ("abstract_algebra", "anatomy", "high_school_biology", "philosophy")


def build_tiny_model(out_dir, seed: int = 0, initializer_range: float = 0.3, max_position_embeddings: int = 2048):
    """A random tiny LLaMA plus the offline tokenizer, saved to ``out_dir``; returns (model, tokenizer).

    ``initializer_range=0.3`` (not 0.02) so that the random model's answers differ between questions
    and the four letters' scores are well separated (gaps >> float32 rounding)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nora.models.tokenizer import build_offline_tokenizer

    tok = build_offline_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return model, tok


LM_EVAL_TASKS = {"letters": "default", "continuation": "continuation"}  # nora's protocol -> lm_eval's mmlu folder


def lm_eval_task_dir(protocol: str = "letters") -> Path:
    """lm_eval's own task folder of ``protocol``: ``mmlu`` (letters) or ``mmlu_continuation``."""
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks" / "mmlu" / LM_EVAL_TASKS[protocol]


def write_lm_eval_tasks(task_dir, data_dir, subjects, protocol: str = "letters") -> list[str]:
    """One task yaml per subject: lm_eval's own mmlu task of ``protocol``, reading the local parquet fixture."""
    task_dir, data_dir = Path(task_dir), Path(data_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for s in subjects:
        name = f"nora_fixture_mmlu_{s}"
        files = {split: str(next((data_dir / s).glob(f"{split}-*.parquet"))) for split in ("dev", "test")}
        cfg = {
            "include": str(lm_eval_task_dir(protocol) / f"mmlu_{s}.yaml"),
            "task": name,
            "tag": "nora_fixture_mmlu",
            "dataset_path": "parquet",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files, "cache_dir": str(task_dir / "hf_cache")},
        }
        (task_dir / f"{name}.yaml").write_text(json.dumps(cfg, indent=1))  # JSON is valid YAML
        names.append(name)
    return names


def run_lm_eval(model_dir, task_dir, task_names, k: int = 5, batch_size: int = 4) -> dict:
    """``{subject: {"acc": float, "pred": [..], "ll": [[4 floats], ..], "ctx": [first prompt]}}`` from lm_eval."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tm = TaskManager(include_path=str(task_dir))
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=list(task_names),
        num_fewshot=k,
        batch_size=batch_size,
        device="cpu",
        task_manager=tm,
        log_samples=True,
        verbosity="ERROR",
        bootstrap_iters=0,
    )
    res = {}
    for name in task_names:
        subject = name[len("nora_fixture_mmlu_") :]
        samples = sorted(out["samples"][name], key=lambda r: r["doc_id"])
        lls = [[float(x[0]) for x in r["filtered_resps"]] for r in samples]
        preds = [max(range(4), key=lambda j, v=v: (v[j], -j)) for v in lls]
        res[subject] = {
            "acc": float(out["results"][name]["acc,none"]),
            "pred": preds,
            "ll": lls,
            "acc_per_question": [float(r["acc"]) for r in samples],
            "ctx": samples[0]["arguments"][0][0] if samples else "",
        }
    return res


def run_ours(model, tokenizer, data_dir, subjects, k: int = 5, batch_size: int = 4, protocol: str = "letters") -> dict:
    from nora.eval import evaluate_mmlu

    r = evaluate_mmlu(
        model,
        tokenizer,
        data_dir,
        source="hf",
        subjects=list(subjects),
        k=k,
        batch_size=batch_size,
        progress=False,
        protocol=protocol,
    )
    return {
        s: {
            "acc": sr.accuracy,
            "pred": list(sr.predictions),
            "ll": [list(v) for v in sr.logprobs],
            "correct": [p == a for p, a in zip(sr.predictions, sr.answers)],
        }
        for s, sr in r.subjects.items()
    }


def compare(ours: dict, ref: dict) -> dict:
    rows, n, same, max_ll = [], 0, 0, 0.0
    for s in sorted(ref):
        o, r = ours[s], ref[s]
        agree = sum(a == b for a, b in zip(o["pred"], r["pred"]))
        diff = max(abs(a - b) for lo, lr in zip(o["ll"], r["ll"]) for a, b in zip(lo, lr))
        rows.append(
            {
                "subject": s,
                "n": len(r["pred"]),
                "ours_acc": o["acc"],
                "lm_eval_acc": r["acc"],
                "same_predictions": agree,
                "max_abs_loglik_diff": diff,
                "same_per_question_correct": [float(c) for c in o["correct"]] == r["acc_per_question"],
            }
        )
        n += len(r["pred"])
        same += agree
        max_ll = max(max_ll, diff)
    ok = all(
        x["same_predictions"] == x["n"] and x["ours_acc"] == x["lm_eval_acc"] and x["same_per_question_correct"]
        for x in rows
    )
    return {"ok": ok, "questions": n, "same_predictions": same, "max_abs_loglik_diff": max_ll, "subjects": rows}


def agreement(
    work_dir,
    k: int = 5,
    n_test: int = 8,
    batch_size: int = 4,
    subjects=SUBJECTS,
    seed: int = 0,
    protocol: str = "letters",
) -> dict:
    """Build model and fixture in ``work_dir``, run both under ``protocol`` (``letters``: lm_eval's ``mmlu``;
    ``continuation``: its ``mmlu_continuation``), return :func:`compare`'s report."""
    from mmlu_fixtures import make_fixture, write_parquet

    from nora.eval.mmlu import build_prompt
    from nora.eval.mmlu_data import load_mmlu

    work_dir = Path(work_dir)
    model, tok = build_tiny_model(work_dir / "model", seed=seed)
    data_dir = write_parquet(work_dir / "data", make_fixture(subjects, n_dev=max(k, 5), n_test=n_test, seed=seed))
    names = write_lm_eval_tasks(work_dir / "tasks", data_dir, subjects, protocol)
    t0 = time.perf_counter()
    ref = run_lm_eval(work_dir / "model", work_dir / "tasks", names, k=k, batch_size=batch_size)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = run_ours(model, tok, data_dir, subjects, k=k, batch_size=batch_size, protocol=protocol)
    t_ours = time.perf_counter() - t0
    report = compare(ours, ref)
    # the prompt text itself, for the first question of each subject
    data = load_mmlu(data_dir, source="hf", subjects=list(subjects), k=k)
    report["same_prompt_text"] = all(
        build_prompt(s, data[s].dev[:k], data[s].test[0], protocol) == ref[s]["ctx"] for s in subjects
    )
    report["ok"] = report["ok"] and report["same_prompt_text"]
    report.update({"k": k, "protocol": protocol, "lm_eval_s": round(t_ref, 2), "ours_s": round(t_ours, 2)})
    import lm_eval

    report["lm_eval_version"] = getattr(lm_eval, "__version__", "?")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--n-test", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--protocol",
        default="letters",
        choices=sorted(LM_EVAL_TASKS),
        help="letters: lm_eval's mmlu; continuation: its mmlu_continuation",
    )
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        log.error("lm_eval is not installed: .venv/bin/pip install lm_eval==0.4.13")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rep = agreement(
            args.out or tmp,
            k=args.k,
            n_test=args.n_test,
            batch_size=args.batch_size,
            seed=args.seed,
            protocol=args.protocol,
        )
    print(
        f"lm_eval {rep['lm_eval_version']}, {rep['k']}-shot, protocol {rep['protocol']}, {rep['questions']} "
        f"questions (lm_eval {rep['lm_eval_s']} s, nora.eval {rep['ours_s']} s)"
    )
    print(f"{'subject':<22} {'n':>3} {'nora acc':>9} {'lm_eval acc':>12} {'same pred':>10} {'max |dll|':>10}")
    for x in rep["subjects"]:
        print(
            f"{x['subject']:<22} {x['n']:>3} {x['ours_acc']:>9.4f} {x['lm_eval_acc']:>12.4f} "
            f"{x['same_predictions']:>6}/{x['n']:<3} {x['max_abs_loglik_diff']:>10.2e}"
        )
    print(
        f"same prompt text: {rep['same_prompt_text']}; predictions equal on {rep['same_predictions']}/"
        f"{rep['questions']}; max |loglik diff| {rep['max_abs_loglik_diff']:.2e}; "
        f"{'AGREE' if rep['ok'] else 'DISAGREE'}"
    )
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
