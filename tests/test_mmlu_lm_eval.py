"""Agreement with lm-evaluation-harness (skipped when lm_eval is not installed).

The static checks read lm_eval's own mmlu task yamls; the agreement test runs lm_eval's ``hf`` model
and its ``mmlu_<subject>`` tasks (redirected to a local parquet fixture) on a tiny random LLaMA and
compares every prediction with nora.eval (``scripts/mmlu_agreement.py`` prints the same comparison).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

lm_eval = pytest.importorskip("lm_eval")

from nora.app.evaluation import run_eval  # noqa: E402
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


def lm_eval_cli(tmp_path, names, model: str, model_args: str) -> dict:
    """lm_eval's own CLI (through nora's entry point) on the fixture tasks, 5-shot, with samples logged under
    ``tmp_path/out``; returns its per-task results."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=str(ROOT),
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nora.integrations.lm_eval",
            "--model",
            model,
            "--model_args",
            model_args,
            "--tasks",
            ",".join(names),
            "--include_path",
            str(tmp_path / "tasks"),
            "--num_fewshot",
            "5",
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--output_path",
            str(tmp_path / "out"),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]


def eval_py_mmlu(tmp_path, run_dir, data_dir) -> dict:
    """eval.py's job on ``run_dir`` over the fixture data, with every prediction saved; returns its mmlu.json."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "eval",
            [
                f"run_dir={run_dir}",
                f"mmlu.path={data_dir}",
                "device=cpu",
                f"output_dir={tmp_path / 'eval'}",
                "mmlu.save_predictions=true",
            ],
        )
    run_eval(cfg)
    return json.loads((tmp_path / "eval" / "mmlu.json").read_text())


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
    tag_to_cat = {
        "mmlu_stem_tasks": "STEM",
        "mmlu_humanities_tasks": "humanities",
        "mmlu_social_sciences_tasks": "social_sciences",
        "mmlu_other_tasks": "other",
    }
    for s in all_subjects():
        cfg = _yaml(TASKS / f"mmlu_{s}.yaml")
        assert cfg["dataset_name"] == s and cfg["description"] == description(s)
        assert tag_to_cat[cfg["tag"]] == cats[s], s


@pytest.mark.parametrize("protocol", ["letters", "continuation"])
@pytest.mark.slow  # 21 s here: end to end (make test-slow, CI)
def test_predictions_and_accuracies_equal_lm_eval_5_shot(tmp_path, protocol):
    """letters against lm_eval's ``mmlu`` tasks, continuation against its ``mmlu_continuation`` tasks."""
    mod = _agreement_module()
    rep = mod.agreement(tmp_path, k=5, n_test=6, batch_size=4, protocol=protocol)
    assert rep["protocol"] == protocol and rep["same_prompt_text"]
    assert rep["same_predictions"] == rep["questions"] == 24
    for row in rep["subjects"]:
        assert row["ours_acc"] == row["lm_eval_acc"] and row["same_per_question_correct"], row
    assert rep["max_abs_loglik_diff"] < 1e-4
    assert rep["ok"]


# ------------------------------------------------------------------ lm_eval's own CLI on a nora training run
@pytest.fixture(scope="module")
def nora_pp_run(tmp_path_factory):
    from hydra import compose, initialize_config_dir
    from instruct_fixtures import alpaca_records, write_alpaca_json

    from nora.app.training import run_training

    root = tmp_path_factory.mktemp("lmeval_run")
    data = write_alpaca_json(root / "alpaca_data.json", alpaca_records(12))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            [
                "method=nora_pp",
                "model=llama_tiny",
                "dataset=alpaca",
                f"data.path={data}",
                f"output_root={root}",
                "logger=disabled",
                "trainer.device=cpu",
                "trainer.batch_size=4",
                "trainer.num_workers=0",
                "trainer.max_steps=3",
                "trainer.eval_every=0",
                "trainer.checkpoint_every=0",
                "trainer.progress=false",
                "dataset.val_size=4",
                "dataset.max_length=128",
                f"dataset.cache_dir={root / 'cache'}",
                "method.nora.calibration_batches=1",
            ],
        )
    run_training(cfg, run_dir=root / "run")
    return root / "run"


@pytest.mark.slow  # 17 s here: end to end (make test-slow, CI)
def test_lm_eval_cli_nora_model_scores_a_nora_pp_run_as_eval_py(tmp_path, nora_pp_run):
    """The README command (lm_eval's own CLI, model ``nora``) on a NoRA++ training run, offline, gives eval.py's
    MMLU accuracy on every subject of the fixture."""
    import json

    from mmlu_fixtures import make_fixture, write_parquet

    mod = _agreement_module()
    subjects = mod.SUBJECTS
    data_dir = write_parquet(tmp_path / "data", make_fixture(subjects, n_dev=5, n_test=6, seed=1))
    names = mod.write_lm_eval_tasks(tmp_path / "tasks", data_dir, subjects)
    results = lm_eval_cli(tmp_path, names, "nora", f"run_dir={nora_pp_run}")
    ours = eval_py_mmlu(tmp_path, nora_pp_run, data_dir)
    assert ours["adapter"]["kind"] == "nora++"
    assert sum(ours["subjects"][s]["n"] for s in subjects) == 24
    for s in subjects:
        assert results[f"nora_fixture_mmlu_{s}"]["acc,none"] == ours["subjects"][s]["accuracy"], s
        rows = [
            json.loads(line)
            for f in (tmp_path / "out").rglob(f"samples_nora_fixture_mmlu_{s}_*.jsonl")
            for line in f.read_text().splitlines()
        ]
        lls = [[float(x[0]) for x in r["filtered_resps"]] for r in sorted(rows, key=lambda r: r["doc_id"])]
        assert [max(range(4), key=lambda j, v=v: (v[j], -j)) for v in lls] == ours["predictions"][s], s


@pytest.mark.slow  # 14 s here: end to end (make test-slow, CI)
def test_lm_eval_cli_nora_model_needs_a_run_or_a_model(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nora.integrations.lm_eval",
            "--model",
            "nora",
            "--tasks",
            "mmlu_anatomy",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error: lm_eval model nora: pass either run_dir=<training run> or pretrained=<model>" in proc.stderr


def test_nora_lm_eval_model_from_a_base_model_and_an_adapter_dir(tmp_path):
    """``pretrained=<model dir>,adapter=<adapter dir>``: the lm_eval model holds the NoRA activations (it is not
    peft's half-load), so its log-likelihoods are the adapted model's."""
    import torch

    import nora
    from nora.integrations.lm_eval import NoraLM

    mod = _agreement_module()
    model, _ = mod.build_tiny_model(tmp_path / "base")
    nora.apply_nora(model)
    with torch.no_grad():
        for m in nora.nora_modules(model).values():
            m.nora_B_num.add_(0.3)
    nora.save_nora(model, tmp_path / "adapter")
    lm = NoraLM(pretrained=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"), device="cpu", batch_size=2)
    assert len(nora.nora_modules(lm.model)) == 2
    ids = torch.randint(3, 200, (1, 16))
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, model(ids).logits)
        base = type(model).from_pretrained(str(tmp_path / "base"))
        assert not torch.allclose(base(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.slow  # 22 s here: end to end (make test-slow, CI)
def test_lm_eval_hf_model_with_peft_scores_a_nora_pp_run_as_eval_py(tmp_path, nora_pp_run):
    """lm_eval's own ``hf`` model with ``peft=<run>/adapter``: a NoRA++ run is one peft adapter (peft type NORA) that
    peft loads once nora is imported, so lm_eval's CLI (through ``python -m nora.integrations.lm_eval``) and
    ``lm_eval.simple_evaluate`` after ``import nora`` give eval.py's MMLU on every question."""
    import json

    from mmlu_fixtures import make_fixture, write_parquet

    import nora  # noqa: F401 - registers the peft method, as a user's script does
    from nora.app.reload import build_base_model, read_run_config

    mod = _agreement_module()
    subjects = mod.SUBJECTS
    data_dir = write_parquet(tmp_path / "data", make_fixture(subjects, n_dev=5, n_test=6, seed=1))
    names = mod.write_lm_eval_tasks(tmp_path / "tasks", data_dir, subjects)
    base, tok = build_base_model(read_run_config(nora_pp_run))  # the run's base model, as a model directory
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    adapter = nora_pp_run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "NORA"
    model_args = f"pretrained={tmp_path / 'base'},peft={adapter},dtype=float32"
    results = lm_eval_cli(tmp_path, names, "hf", model_args)
    ours = eval_py_mmlu(tmp_path, nora_pp_run, data_dir)
    assert ours["adapter"]["kind"] == "nora++"
    assert sum(ours["subjects"][s]["n"] for s in subjects) == 24

    import lm_eval
    from lm_eval.tasks import TaskManager

    api = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=names,
        num_fewshot=5,
        batch_size=4,
        device="cpu",
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True,
        verbosity="ERROR",
        bootstrap_iters=0,
    )
    # lm_eval's hf model holds both parts: its logits are the run's trained model's, not the base model's
    import torch
    from lm_eval.models.huggingface import HFLM

    from nora.app.reload import load_trained_model
    from nora.tuner import nora_layers

    lm = HFLM(pretrained=str(tmp_path / "base"), peft=str(adapter), dtype="float32", device="cpu", batch_size=4)
    assert len(nora_layers(lm.model)) == 2 and any("lora_A" in n for n, _ in lm.model.named_parameters())
    ids = torch.randint(3, len(tok), (1, 16))
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, load_trained_model(nora_pp_run).model(ids).logits)
        assert (lm.model(ids).logits - base(ids).logits).abs().max() > 1e-6
    for s in subjects:
        name = f"nora_fixture_mmlu_{s}"
        assert results[name]["acc,none"] == ours["subjects"][s]["accuracy"], s
        assert api["results"][name]["acc,none"] == ours["subjects"][s]["accuracy"], s
        rows = [
            json.loads(line)
            for f in (tmp_path / "out").rglob(f"samples_{name}_*.jsonl")
            for line in f.read_text().splitlines()
        ]
        for samples in (rows, api["samples"][name]):
            lls = [[float(x[0]) for x in r["filtered_resps"]] for r in sorted(samples, key=lambda r: r["doc_id"])]
            assert [max(range(4), key=lambda j, v=v: (v[j], -j)) for v in lls] == ours["predictions"][s], s
