"""Benchmarks run end to end (tiny shapes) and write the JSON the README and the sweep plans quote."""
import json

from hydra import compose, initialize_config_dir

from nora.bench import mlp_block, train_step
from nora.results.sweep import CONFIG_DIR, estimate_seconds, format_plan, Job


def test_mlp_block_benchmark_writes_ratios(tmp_path):
    out = tmp_path / "mlp.json"
    assert mlp_block.main(["--device", "cpu", "--shapes", "tiny", "--repeats", "2", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    rows = {r["variant"]: r for r in rep["shapes"][0]["rows"]}
    assert set(rows) == {"silu", "nora", "lora", "nora_pp"}
    assert rows["silu"]["vs_silu"] == 1.0 and all(r["step_ms"] > 0 for r in rows.values())


def test_train_step_benchmark_through_the_real_loop(tmp_path):
    out = tmp_path / "train.json"
    assert train_step.main(["--model", "vit_test", "--methods", "lora,nora", "--steps", "2", "--warmup", "1",
                            "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--compile-methods", "nora",
                            "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["methods"]) == {"lora", "nora"} and rep["image_size"] == 32
    for r in rep["methods"].values():
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_share"] <= 1 and 0 < r["mfu"] < 1
        assert r["flops_per_image"] > 0
    assert rep["methods"]["lora"]["step_time_vs_lora"] == 1.0
    # the same run also trains NoRA with trainer.compile=true and reports compiled / eager
    assert rep["compiled_methods"] == ["nora"] and "compiled" not in rep["methods"]["lora"]
    nora_row = rep["methods"]["nora"]
    assert nora_row["compiled"]["step_time_s"] > 0
    assert nora_row["compiled_vs_eager_step_time"] == nora_row["compiled"]["step_time_s"] / nora_row["step_time_s"]


def test_sweep_plan_estimates_device_time_from_the_benchmark():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=vit_tiny", "method=nora", "dataset=cifar100"])
    bench = {"model": "vit_tiny", "methods": {"nora": {"images_per_s": 1000.0}}}
    steps = 10 * (50_000 // 64)  # default trainer: 10 epochs of batch 64
    assert estimate_seconds(cfg, bench) == steps * 64 / 1000.0
    assert estimate_seconds(cfg, {"model": "vit_small", "methods": bench["methods"]}) is None  # another model
    assert estimate_seconds(cfg, None) is None  # nothing measured
    jobs = [Job(["seed=0"], "runs/a", "new", 3600.0), Job(["seed=1"], "runs/b", "complete", 3600.0),
            Job(["seed=2"], "runs/c", "new", None)]
    text = format_plan("t", jobs)
    assert "estimated device time for the 2 jobs to run: ~60min (1 without an estimate" in text
