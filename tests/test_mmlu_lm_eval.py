"""Agreement with lm-evaluation-harness (skipped when lm_eval is not installed).

The static checks read lm_eval's own mmlu task yamls; the agreement test runs lm_eval's ``hf`` model
and its ``mmlu_<subject>`` tasks (redirected to a local parquet fixture) on a tiny random LLaMA and
compares every prediction with nora.eval (``scripts/mmlu_agreement.py`` prints the same comparison).
"""
import importlib.util
from pathlib import Path

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")

from nora.eval.mmlu import description, format_question, format_shot  # noqa: E402
from nora.eval.mmlu_data import MMLUQuestion, all_subjects, subject_categories  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = Path(lm_eval.__file__).resolve().parent / "tasks" / "mmlu" / "default"


def _agreement_module():
    spec = importlib.util.spec_from_file_location("mmlu_agreement", ROOT / "scripts" / "mmlu_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _yaml(path):
    return yaml.safe_load(path.read_text())


def test_template_and_descriptions_match_lm_eval():
    tmpl = _yaml(TASKS / "_default_template_yaml")
    assert tmpl["dataset_path"] == "cais/mmlu" and tmpl["fewshot_split"] == "dev"
    assert tmpl["fewshot_config"] == {"sampler": "first_n"} and tmpl["output_type"] == "multiple_choice"
    assert tmpl["doc_to_choice"] == ["A", "B", "C", "D"] and tmpl["doc_to_target"] == "answer"
    assert "target_delimiter" not in tmpl and "fewshot_delimiter" not in tmpl  # defaults " " and "\n\n"
    # render lm_eval's jinja doc_to_text and compare with ours
    import jinja2

    q = MMLUQuestion("anatomy", "  What is it?\nThink. ", ("one", " two", "three ", "four"), 1)
    doc = {"question": q.question, "choices": list(q.choices), "answer": q.answer}
    assert jinja2.Template(tmpl["doc_to_text"]).render(**doc) == format_question(q)
    assert format_shot(q) == format_question(q) + " B\n\n"
    cats = subject_categories("lm_eval")
    tag_to_cat = {"mmlu_stem_tasks": "STEM", "mmlu_humanities_tasks": "humanities",
                  "mmlu_social_sciences_tasks": "social_sciences", "mmlu_other_tasks": "other"}
    for s in all_subjects():
        cfg = _yaml(TASKS / f"mmlu_{s}.yaml")
        assert cfg["dataset_name"] == s and cfg["description"] == description(s)
        assert tag_to_cat[cfg["tag"]] == cats[s], s


def test_predictions_and_accuracies_equal_lm_eval_5_shot(tmp_path):
    mod = _agreement_module()
    rep = mod.agreement(tmp_path, k=5, n_test=6, batch_size=4)
    assert rep["same_prompt_text"]
    assert rep["same_predictions"] == rep["questions"] == 24
    for row in rep["subjects"]:
        assert row["ours_acc"] == row["lm_eval_acc"] and row["same_per_question_correct"], row
    assert rep["max_abs_loglik_diff"] < 1e-4
    assert rep["ok"]
