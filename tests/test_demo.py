"""The demo's settings come from configs/demo/ (not module globals), its jobs are ordered seed by seed, and the
diagnosis measures a real trained NoRA run (pre-activation ranges, coefficient movement, update ablations)."""

from pathlib import Path

import pytest
import torch
from fixtures import write_cifar
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nora.demo.runner as demo
from nora.app.training import run_training
from nora.demo import diagnosis as diag

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
    jobs = demo.demo_jobs(
        ["nora", "lora"],
        ["rot90", "invert"],
        {"rot90": 2, "invert": 1},
        {"rot90": 10, "invert": 5},
        Path("w"),
        Path("runs/demo"),
        ["x=1"],
    )
    assert [(j["task"], j["seed"], j["method"]) for j in jobs] == [
        ("rot90", 0, "nora"),
        ("rot90", 0, "lora"),
        ("invert", 0, "nora"),
        ("invert", 0, "lora"),
        ("rot90", 1, "nora"),
        ("rot90", 1, "lora"),
    ]
    assert jobs[0]["extra"] == ["trainer.epochs=10", "x=1"] and jobs[2]["extra"] == ["trainer.epochs=5", "x=1"]


def test_the_kernel_builds_once_on_a_thread_and_run_jobs_waits_for_it(monkeypatch):
    import threading
    import time

    from nora.kernels import cpu

    calls = []

    def slow_build():
        time.sleep(0.2)
        calls.append(threading.current_thread().name)
        return True

    monkeypatch.setattr(cpu, "available", slow_build)
    monkeypatch.setattr(demo, "_kernel_build", None)
    demo.build_kernels_in_background()
    demo.build_kernels_in_background()  # a second call starts no second build
    assert calls == []  # still building: the caller goes on (to pretrain the backbone)
    done = demo.run_jobs(
        [{"method": "m", "seed": 0}],
        1,
        run=lambda job: (calls.append("job"), {"job": job, "accuracy": 1.0, "trainable": 1, "wall_time_s": 0.0})[1],
    )
    assert calls == ["nora-kernel-build", "job"] and len(done) == 1  # the build finished before the first run


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
    ov = [
        "method=nora",
        "model=vit_test",
        "dataset=cifar10",
        f"dataset.root={data}",
        "dataset.download=false",
        "dataset.verify_md5=false",
        f"output_root={tmp}",
        "logger=disabled",
        "trainer.epochs=1",
        "trainer.batch_size=32",
        "trainer.eval_batch_size=64",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.checkpoint_every=0",
        "trainer.lr=0.5",
        "trainer.data_path=batched",
    ]
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
    from nora.app.reload import load_trained_model

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


def test_the_source_backbone_cache_key_follows_the_composed_config():
    base = demo.compose(["experiment=demo", "method=full", "seed=0"])
    assert demo.source_key(base) == demo.source_key(demo.compose(["experiment=demo", "method=full", "seed=0"]))
    for change in ("model.kwargs.img_size=32", "dataset.augment.crop_padding=2", "trainer.epochs=3", "seed=1"):
        other = demo.compose(["experiment=demo", "method=full", "seed=0", change])
        assert demo.source_key(other) != demo.source_key(base), change


def test_sweep_widens_a_grid_whose_best_is_at_an_edge(monkeypatch):
    import math

    calls = []

    def fake_runs(peak):
        def runs(method, key, values, seeds, base, common, n_procs, run=None):
            calls.append(list(values))
            return {v: [100 - (math.log10(v) - math.log10(peak)) ** 2 + s * 1e-3 for s in seeds] for v in values}

        return runs

    monkeypatch.setattr(demo, "_grid_runs", fake_runs(10.0))
    results, best = demo.sweep_method("m", "lr", [0.1, 0.3, 1.0], [0, 1], {}, {}, 1)
    assert best == 10.0 and sorted(results) == [0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
    assert calls == [[0.1, 0.3, 1.0], [3.0], [10.0], [30.0]]  # widened one value at a time until 10 is inside

    calls.clear()
    monkeypatch.setattr(demo, "_grid_runs", fake_runs(1e-3))
    results, best = demo.sweep_method("m", "lr", [0.1, 0.3, 1.0], [0], {}, {}, 1, max_widen=2)
    assert calls == [[0.1, 0.3, 1.0], [0.03], [0.01]] and best == 0.01  # stops after max_widen, at the edge
    assert demo.next_value(0.25, up=True, ratio=2.0) == 0.5 and demo.next_value(0.25, up=False, ratio=2.0) == 0.125

    calls.clear()
    monkeypatch.setattr(demo, "_grid_runs", fake_runs(0.3))
    assert demo.sweep_method("m", "lr", [0.1, 0.3, 1.0], [0], {}, {}, 1)[1] == 0.3 and len(calls) == 1


def test_lp_ft_starts_from_the_probe_head(tmp_path):
    """LP-FT: a linear probe's trained head, put on the source backbone (probe_backbone), is where NoRA starts with
    model.checkpoint_head=true; with the head frozen it is still the probe's head after training."""
    from safetensors.torch import load_file, save_file

    from nora.errors import UserError
    from nora.models import build_model

    data = write_cifar(tmp_path / "cifar10", "cifar10", n_train=64, n_test=32)
    common = [
        "model=vit_test",
        "dataset=cifar10",
        f"dataset.root={data}",
        "dataset.download=false",
        "dataset.verify_md5=false",
        "logger=disabled",
        "trainer.epochs=1",
        "trainer.batch_size=32",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.checkpoint_every=0",
        "trainer.lr=0.5",
        "trainer.data_path=batched",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        probe_cfg = compose("train", overrides=["method=linear_probe", *common])
    source = tmp_path / "source.safetensors"
    torch.manual_seed(3)
    save_file({k: v.contiguous() for k, v in build_model(probe_cfg.model, 7).state_dict().items()}, str(source))
    run_training(OmegaConf.merge(probe_cfg, {"model": {"checkpoint": str(source)}}), run_dir=tmp_path / "probe")
    start = diag.probe_backbone(source, tmp_path / "probe", tmp_path / "start.safetensors")
    probe_head = load_file(str(tmp_path / "probe" / "adapter" / "trainable.safetensors"))
    merged = load_file(str(start))
    assert torch.equal(merged["head.weight"], probe_head["head.weight"])
    assert torch.equal(merged["blocks.0.mlp.fc1.weight"], load_file(str(source))["blocks.0.mlp.fc1.weight"])

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "method=nora",
                f"model.checkpoint={start}",
                "model.checkpoint_head=true",
                "method.train_head=false",
                *common,
            ],
        )
    built = build_model(cfg.model, 10)
    assert torch.equal(built.head.weight, probe_head["head.weight"])  # kept, not re-initialised
    run_training(cfg, run_dir=tmp_path / "lpft")
    from nora.app.reload import load_trained_model

    trained = load_trained_model(tmp_path / "lpft").model
    head = dict(trained.named_parameters())
    key = next(k for k in head if k.endswith("head.weight"))
    assert torch.equal(head[key], probe_head["head.weight"])  # frozen: still the probe's head

    with pytest.raises(UserError, match=r"checkpoint_head=true but .* this task needs"):
        build_model(cfg.model, 7)  # another number of classes than the probe's head has
    fresh = build_model(OmegaConf.merge(cfg.model, {"checkpoint_head": False}), 10)
    assert not torch.equal(fresh.head.weight, probe_head["head.weight"])  # the default: a new head


def test_the_stability_and_lp_ft_sections_report_what_they_were_given():
    table = {
        ("lora", 0.01): {0: 91.0, 1: 67.0, 2: 93.0},
        ("lora", 0.003): {0: 90.0, 1: 91.0, 2: 92.0},
        ("nora_pp", 0.01): {0: 92.0, 1: 90.0, 2: 94.0},
        ("nora_pp", 0.003): {0: 90.0, 1: 92.0, 2: 92.0},
    }
    text = "\n".join(diag.stability_section(table))
    assert "| lora | 0.01 | 3 | 83.67 ± 14.47 | 67.0 (seed 1) | 1 |" in text
    assert "| lora | 0.003 | 3 | 91.00 ± 1.00 | 90.0 (seed 0) | 0 |" in text
    assert "| 0.01 | +8.33 [" in text and "(n=3) |" in text  # (1 + 23 + 1) / 3
    lpft = {
        "linear probe": {0: 60.0, 1: 62.0},
        "NoRA (new head)": {0: 61.0, 1: 62.0},
        "LP-FT: NoRA from the probe's head, head frozen": {0: 63.0, 1: 66.0},
    }
    text = "\n".join(diag.lpft_section(lpft))
    assert "| linear probe | 61.00 ± 1.41 |  |" in text
    assert "| LP-FT: NoRA from the probe's head, head frozen | 64.50 ± 2.12 | +3.50 [" in text
