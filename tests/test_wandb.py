"""W&B the way its users expect, checked in the offline run files (tests/wandb_files.py decodes them): a fresh start
is a new W&B run and only a resume continues one; the summary and the activation figure are sent before the run
finishes; eval.py adds MMLU to the training run's W&B run."""

import json
from pathlib import Path

import pytest
from fixtures import write_cifar
from hydra import compose, initialize_config_dir
from instruct_fixtures import alpaca_records, write_alpaca_json
from mmlu_fixtures import make_fixture, write_csv
from wandb_files import offline_runs

from nora.app.training import run_training
from nora.runs.logger import flat_scalars, wandb_run_id_path

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def make_cfg(name, overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(name, overrides=overrides)


def vision(root, out, extra=()):
    return make_cfg(
        "train",
        [
            "method=nora",
            "model=vit_test",
            "dataset=cifar10",
            f"dataset.root={root}",
            "dataset.download=false",
            "dataset.verify_md5=false",
            f"output_root={out}",
            "logger=wandb",
            "trainer.epochs=2",
            "trainer.batch_size=32",
            "trainer.eval_batch_size=64",
            "trainer.num_workers=0",
            "trainer.log_every=1",
            "trainer.progress=false",
            "trainer.checkpoint_every=1",
            *extra,
        ],
    )


def test_fresh_start_is_a_new_wandb_run_and_only_a_resume_continues_one(tmp_path):
    root = write_cifar(tmp_path / "cifar10", "cifar10", n_train=64, n_test=32)
    run = tmp_path / "run"
    part = run_training(vision(root, tmp_path, ["trainer.stop_after_steps=2"]), run_dir=run)
    assert part == {"status": "incomplete", "step": 2}
    done = run_training(vision(root, tmp_path), run_dir=run)  # resumes at step 2
    forced = run_training(vision(root, tmp_path, ["force=true"]), run_dir=run)
    first, resumed, fresh = offline_runs(run)
    assert first.run_id == resumed.run_id != fresh.run_id
    assert wandb_run_id_path(run).read_text().strip() == fresh.run_id
    # the resumed W&B run continues at the checkpoint's step; the fresh one starts again from the first step
    assert [h["_step"] for h in first.history if "loss" in h][:2] == [1, 2]
    assert min(h["_step"] for h in resumed.history) == 3
    assert min(h["_step"] for h in fresh.history) == 1
    assert all(
        r.name == done["run_name"] == "vit_test_cifar10_nora_s0" and r.exit_code == 0 for r in (first, resumed, fresh)
    )
    assert first.group == "" and "final/accuracy" not in first.summary  # an interrupted run has no summary yet
    for r, s in ((resumed, done), (fresh, forced)):
        # the summary went out before finish: final and best metrics, parameters, throughput
        assert r.summary["final/accuracy"] == s["final_accuracy"] and r.summary["best/value"] == s["best"]["value"]
        assert r.summary["parameters/trainable"] == s["parameters"]["trainable"] > 0
        assert r.summary["images_per_s"] == pytest.approx(s["images_per_s"])
        assert r.summary["status"] == "complete"
        (image,) = [h for h in r.history if "activations/_type" in h]
        assert image["activations/_type"] == "image-file" and image["activations/format"] == "png"
    assert fresh.config["method"]["name"] == "nora" and fresh.config["trainer"]["epochs"] == 2


def test_flat_scalars():
    assert flat_scalars(
        {
            "final": {"accuracy": 1.5, "loss": float("nan")},
            "a": [1],
            "b": None,
            "c": "x",
            "p": {"components": {"nora": 3}},
        }
    ) == {"final/accuracy": 1.5, "c": "x", "p/components/nora": 3}


@pytest.mark.slow
def test_eval_py_adds_mmlu_to_the_training_runs_wandb_run(tmp_path):
    from nora.app.evaluation import run_eval

    data = write_alpaca_json(tmp_path / "alpaca_data.json", alpaca_records(12))
    run = tmp_path / "run"
    run_training(
        make_cfg(
            "train",
            [
                "method=nora_pp",
                "model=llama_tiny",
                "dataset=alpaca",
                f"data.path={data}",
                f"output_root={tmp_path}",
                "logger=wandb",
                "trainer.device=cpu",
                "trainer.batch_size=4",
                "trainer.num_workers=0",
                "trainer.max_steps=2",
                "trainer.eval_every=0",
                "trainer.checkpoint_every=0",
                "trainer.progress=false",
                "dataset.val_size=4",
                "dataset.max_length=128",
                f"dataset.cache_dir={tmp_path / 'cache'}",
                "method.nora.calibration_batches=1",
            ],
        ),
        run_dir=run,
    )
    mmlu = write_csv(tmp_path / "mmlu", make_fixture())
    d = run_eval(make_cfg("eval", [f"run_dir={run}", f"mmlu.path={mmlu}", "device=cpu"]))
    train, evaluation = offline_runs(run)
    assert evaluation.run_id == train.run_id  # the same W&B run
    on_disk = json.loads((run / "mmlu.json").read_text())
    assert evaluation.summary["mmlu/overall/accuracy"] == on_disk["overall"]["accuracy"] == d["overall"]["accuracy"]
    assert evaluation.summary["mmlu/k"] == 5
    for cat, v in on_disk["categories"].items():
        if v["accuracy"] is not None:
            assert evaluation.summary[f"mmlu/categories/{cat}/accuracy"] == v["accuracy"]


def test_recorded_run_id(tmp_path):
    import hashlib

    from nora.runs.logger import recorded_run_id

    assert recorded_run_id(tmp_path) is None  # never logged to W&B
    (tmp_path / "wandb").mkdir()
    # a run directory from before ids were recorded: the id was derived from its path (a resume continues that run)
    assert recorded_run_id(tmp_path) == hashlib.sha1(str(tmp_path.resolve()).encode()).hexdigest()[:16]
    wandb_run_id_path(tmp_path).write_text("abc123\n")
    assert recorded_run_id(tmp_path) == "abc123"
