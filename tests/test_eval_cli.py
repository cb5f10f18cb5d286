"""eval.py end to end: a base tiny LLaMA and a tiny NoRA++ training run scored on an MMLU fixture,
offline, writing mmlu.json; clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from instruct_fixtures import alpaca_records, tiny_nora_pp_run, write_alpaca_json
from mmlu_fixtures import make_fixture, write_csv

from nora.app.evaluation import run_eval
from nora.app.reload import load_trained_model
from nora.app.training import run_training
from nora.errors import MissingFileError, UserError
from nora.eval import evaluate_mmlu

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = str(ROOT / "configs")


def compose_cfg(name, overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("mmlu"), make_fixture())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_nora_pp_run(tmp_path_factory.mktemp("llmrun"), max_steps=3)


def test_eval_py_base_model_writes_mmlu_json(mmlu_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            "model=llama_tiny",
            f"mmlu.path={mmlu_dir}",
            f"output_root={tmp_path}",
            "device=cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "eval" / "llama_tiny" / "mmlu.json").read_text())
    assert out["k"] == 5 and out["model"]["name"] == "llama_tiny" and out["model"]["method"] == "base"
    assert out["adapter"] is None
    n = sum(s["n"] for s in out["subjects"].values())
    assert out["overall"]["n"] == n > 0 and 0 <= out["overall"]["accuracy"] <= 1
    assert "MMLU 5-shot (letters) on" in proc.stdout and "evaluated 4 of 57 subjects" in proc.stderr
    assert not list(tmp_path.glob("**/.hydra"))  # eval.py writes no Hydra folder anywhere


def test_eval_py_names_an_mmlu_csv_that_is_not_utf8(tmp_path):
    data = write_csv(tmp_path / "mmlu", make_fixture())
    bad = data / "test" / "anatomy_test.csv"
    bad.write_bytes(bad.read_bytes() + '"Which bone is the fémur?",a,b,c,d,A\n'.encode("latin-1"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            "model=llama_tiny",
            f"mmlu.path={data}",
            f"output_root={tmp_path}",
            "device=cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    offset = bad.read_bytes().index(b"\xe9")
    # 6 fixture rows, one with a newline inside its quoted question: the appended row starts on line 8
    assert lines[-1] == (
        f"error: {bad}, line 8: not UTF-8 text (byte 0xe9 at offset {offset}); the MMLU CSV files "
        "are UTF-8, re-encode this one (e.g. iconv -f latin1 -t utf-8)"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "eval" / "llama_tiny" / "mmlu.json").exists()


def test_eval_of_a_training_run_uses_its_adapters(mmlu_dir, tiny_run):
    cfg = compose_cfg(
        "eval", [f"run_dir={tiny_run}", f"mmlu.path={mmlu_dir}", "device=cpu", "mmlu.save_predictions=true"]
    )
    d = run_eval(cfg)
    on_disk = json.loads((tiny_run / "mmlu.json").read_text())
    assert on_disk["overall"] == d["overall"]
    assert on_disk["adapter"]["kind"] == "nora++" and set(on_disk["adapter"]["components"]) == {"lora", "nora"}
    assert on_disk["model"]["method"] == "nora_pp" and on_disk["model"]["run_dir"] == str(tiny_run.resolve())
    # the same numbers as scoring the reloaded trained model directly
    trained = load_trained_model(tiny_run)
    direct = evaluate_mmlu(trained.model, trained.tokenizer, mmlu_dir, subjects="available", progress=False)
    assert direct.predictions() == on_disk["predictions"]
    assert direct.accuracy == on_disk["overall"]["accuracy"]


def test_eval_rejects_vision_models_and_missing_data(tmp_path, tiny_run):
    with pytest.raises(UserError, match="is a vision model; MMLU needs a causal LM"):
        run_eval(compose_cfg("eval", ["model=vit_test", f"mmlu.path={tmp_path}"]))
    with pytest.raises(MissingFileError, match="MMLU data directory not found"):
        run_eval(compose_cfg("eval", [f"run_dir={tiny_run}", f"mmlu.path={tmp_path}/nowhere", "device=cpu"]))
    with pytest.raises(UserError, match="no config.yaml"):
        run_eval(compose_cfg("eval", [f"run_dir={tmp_path}", f"mmlu.path={tmp_path}"]))


def test_eval_refuses_an_adapter_that_is_not_the_runs_own(mmlu_dir, tiny_run, tmp_path):
    """eval.py scores the adapter the run saved or nothing: a plain LoRA adapter in a nora_pp run's folder (NoRA
    silently absent) or a LoRA file of the same shapes but other weights (another run's, another model's) is one
    line naming the file, and no mmlu.json is written under the run's name."""
    import shutil

    from safetensors.torch import load_file, save_file

    data = write_alpaca_json(tmp_path / "alpaca_data.json", alpaca_records(12))
    lora = tmp_path / "lora_run"
    run_training(
        compose_cfg(
            "train",
            [
                "method=lora",
                "model=llama_tiny",
                "dataset=alpaca",
                f"data.path={data}",
                f"output_root={tmp_path}",
                "logger=disabled",
                "trainer.device=cpu",
                "trainer.batch_size=4",
                "trainer.num_workers=0",
                "trainer.max_steps=1",
                "trainer.eval_every=0",
                "trainer.checkpoint_every=0",
                "trainer.progress=false",
                "dataset.val_size=4",
                "dataset.max_length=128",
                f"dataset.cache_dir={tmp_path / 'cache'}",
            ],
        ),
        run_dir=lora,
    )
    for damage in ("a plain lora adapter", "other lora weights"):
        run = tmp_path / damage.replace(" ", "_")
        shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("mmlu.json"))
        adir = run / "adapter"
        if damage == "a plain lora adapter":
            shutil.rmtree(adir)
            shutil.copytree(lora / "adapter", adir)
            expected = f"{adir} holds a lora adapter, but method=nora_pp saves a nora++ adapter"
        else:
            f = adir / "adapter_model.safetensors"
            save_file({k: v * 1.5 for k, v in load_file(str(f)).items()}, str(f))
            expected = f"{f} is not the file this run saved (sha256 "
        with pytest.raises(UserError) as err:
            run_eval(compose_cfg("eval", [f"run_dir={run}", f"mmlu.path={mmlu_dir}", "device=cpu"]))
        assert str(err.value).startswith(expected), str(err.value)
        assert not (run / "mmlu.json").exists()
