"""The demo's settings come from configs/demo/ (not module globals), its jobs are ordered seed by seed, and the
diagnosis measures a real trained NoRA run (pre-activation ranges, coefficient movement, update ablations)."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nora.demo as demo
from fixtures import write_cifar
from nora import demo_diagnosis as diag
from nora.run import run_training

ROOT = Path(__file__).resolve().parent.parent


def test_learning_rates_come_from_the_config_file(tmp_path, monkeypatch):
    lrs = tmp_path / "learning_rates.yaml"
    lrs.write_text("head_lr: 0.7\nmethods:\n  nora: {lr: 0.004}\n  lora: {lr: 0.002}\n  linear_probe: {lr: 0.5}\n")
    monkeypatch.setattr(demo, "LEARNING_RATES", lrs)
    assert demo.lr_overrides("nora") == ["trainer.lr=0.004", "trainer.head_lr=0.7"]
    assert demo.lr_overrides("lora") == ["trainer.lr=0.002", "trainer.head_lr=0.7", "method.lora.dropout=0.0"]
    assert demo.lr_overrides("linear_probe") == ["trainer.lr=0.5"]  # the probe's head lr is its own lr
    assert not hasattr(demo, "DEMO_LR") and not hasattr(demo, "HEAD_LR")


def test_write_learning_rates_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "LEARNING_RATES", tmp_path / "lr.yaml")
    demo.write_learning_rates({"head_lr": 1.0, "methods": {"nora": {"lr": 0.01}}}, "rot90", [0, 1])
    assert demo.learning_rates() == {"head_lr": 1.0, "methods": {"nora": {"lr": 0.01}}}
    assert (tmp_path / "lr.yaml").read_text().startswith("# The demo's learning rates, written by")


def test_jobs_run_seed_by_seed_across_tasks():
    jobs = demo.demo_jobs(["nora", "lora"], ["rot90", "invert"], {"rot90": 2, "invert": 1}, {"rot90": 10, "invert": 5},
                          Path("w"), Path("runs/demo"), ["x=1"])
    assert [(j["task"], j["seed"], j["method"]) for j in jobs] == [
        ("rot90", 0, "nora"), ("rot90", 0, "lora"), ("invert", 0, "nora"), ("invert", 0, "lora"),
        ("rot90", 1, "nora"), ("rot90", 1, "lora")]
    assert jobs[0]["extra"] == ["trainer.epochs=10", "x=1"] and jobs[2]["extra"] == ["trainer.epochs=5", "x=1"]


def test_unknown_task_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as err:
        demo.main(["--tasks", "rot180"])
    assert err.value.code == 2
    assert "unknown task 'rot180'; valid: rot90, invert, transpose" in capsys.readouterr().err


def test_range_stats_known_values():
    t = torch.cat([torch.full((90,), 0.5), torch.full((5,), -4.0), torch.full((5,), 5.0)])
    s = diag.range_stats(t, (-3.0, 3.0))
    assert s["outside"] == pytest.approx(10.0) and s["absmax"] == 5.0
    assert s["p001"] == pytest.approx(-4.0) and s["p999"] == pytest.approx(5.0)


@pytest.fixture(scope="module")
def nora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nora_run")
    data = write_cifar(tmp / "cifar10", "cifar10", n_train=64, n_test=32)
    ov = ["method=nora", "model=vit_test", "dataset=cifar10", f"dataset.root={data}", "dataset.download=false",
          "dataset.verify_md5=false", f"output_root={tmp}", "logger=disabled", "trainer.epochs=1",
          "trainer.batch_size=32", "trainer.eval_batch_size=64", "trainer.num_workers=0", "trainer.progress=false",
          "trainer.checkpoint_every=0", "trainer.lr=0.5", "trainer.data_path=batched"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=ov)
    summary = run_training(cfg, run_dir=tmp / "run")
    return tmp / "run", summary


def test_analyse_run_measures_a_trained_nora_run(nora_run):
    run_dir, summary = nora_run
    a = diag.analyse_run(run_dir)
    # the rebuilt model reproduces the run's own test accuracy on the same images
    assert a["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-6)
    assert set(a["before"]) == set(a["after"]) == {"blocks.0.mlp.act", "blocks.1.mlp.act"}
    # block 0's pre-activations do not depend on any activation, so NoRA cannot move them
    assert a["before"]["blocks.0.mlp.act"] == a["after"]["blocks.0.mlp.act"]
    c = a["coefficients"]["blocks.0.mlp.act"]
    assert c["num_rel"] > 0 and c["den_rel"] > 0 and c["max_dev_fit"] > 0  # two steps at lr 0.5 moved it
    assert 0 <= a["without_num_update"] <= 100 and 0 <= a["without_den_update"] <= 100


def test_without_update_removes_exactly_one_part_and_restores_it(nora_run):
    from nora.adapter.inject import nora_modules
    from nora.runs import load_trained_model

    model = load_trained_model(nora_run[0]).model
    mod = next(iter(nora_modules(model).values()))
    num, den = (t.detach().clone() for t in mod.coefficients())
    with diag.without_update(model, "den"):
        n2, d2 = mod.coefficients()
        assert torch.equal(n2, num) and torch.equal(d2, mod.base_denominator)
    with diag.without_update(model, "num"):
        n3, d3 = mod.coefficients()
        assert torch.equal(n3, mod.base_numerator.expand_as(num)) and torch.equal(d3, den)
    assert all(torch.equal(a, b) for a, b in zip(mod.coefficients(), (num, den)))


def test_untrained_nora_has_not_moved():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["method=nora", "model=vit_test", "dataset=cifar10"])
    OmegaConf.resolve(cfg)
    from nora.methods import apply_method
    from nora.models import build_model

    model = apply_method(build_model(cfg.model, 10), cfg.method, cfg.model).model
    for stats in diag.coefficient_stats(model).values():
        assert stats["num_rel"] == stats["den_rel"] == stats["max_dev_fit"] == stats["mean_dev_at_4"] == 0.0
