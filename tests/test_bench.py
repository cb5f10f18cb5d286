"""Benchmarks run end to end (tiny shapes) and write the JSON the README and the sweep plans quote."""

import json

import pytest
from hydra import compose, initialize_config_dir

from nora.bench import mlp_block, train_step
from nora.results.sweep import CONFIG_DIR, Job, estimate_seconds, format_plan


def test_mlp_block_benchmark_writes_ratios(tmp_path):
    out = tmp_path / "mlp.json"
    assert mlp_block.main(["--device", "cpu", "--shapes", "tiny", "--repeats", "2", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    rows = {r["variant"]: r for r in rep["shapes"][0]["rows"]}
    assert set(rows) == {"silu", "nora", "lora", "nora_pp"}
    assert rows["silu"]["vs_silu"] == 1.0 and all(r["step_ms"] > 0 for r in rows.values())


@pytest.mark.slow  # 34 s here: end to end (make test-slow, CI)
def test_train_step_benchmark_through_the_real_loop(tmp_path):
    out = tmp_path / "train.json"
    assert (
        train_step.main(
            [
                "--model",
                "vit_test",
                "--methods",
                "lora,nora",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--batch-size",
                "8",
                "--num-workers",
                "0",
                "--device",
                "cpu",
                "--compile-methods",
                "nora",
                "--out",
                str(out),
            ]
        )
        == 0
    )
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
    jobs = [
        Job(["seed=0"], "runs/a", "new", 3600.0),
        Job(["seed=1"], "runs/b", "complete", 3600.0),
        Job(["seed=2"], "runs/c", "new", None),
    ]
    text = format_plan("t", jobs)
    assert "estimated device time for the 2 jobs to run: ~60min (1 without an estimate" in text


def test_kernel_benchmark_times_every_form(tmp_path):
    """python -m nora.bench kernels: the fused backend's residual form (phi = the shape's activation) next to the
    plain rational in the main table and in the sweep over G, ratios to GELU from the same rounds, targets for both."""
    from fixtures import require_cpu_extension

    from nora.bench import kernels

    require_cpu_extension()
    out = tmp_path / "kernels.json"
    assert (
        kernels.main(
            [
                "--device",
                "cpu",
                "--shapes",
                "4x10x48:8",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--impls",
                "gelu,cpu,cpu_residual",
                "--residual-activation",
                "silu",
                "--bandwidth-mb",
                "16",
                "--groups-sweep",
                "4x10x48:1/48",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rep = json.loads(out.read_text())
    (shape,) = rep["shapes"]
    rows = {r["impl"]: r for r in shape["rows"]}
    assert set(rows) == {"gelu", "cpu", "cpu_residual"} and shape["residual_activation"] == "silu"
    res = rows["cpu_residual"]
    assert res["activation"] == "silu" and res["fwd_bwd_ms"] > 0 and res["max_abs_diff_vs_reference"] < 1e-5
    # saved for backward: x and the four (8, 6) + (8, 4) float32 coefficient tensors (trained and fit)
    assert res["saved_bytes"] - rows["gelu"]["saved_bytes"] == 2 * 4 * 8 * 10
    (sweep,) = rep["groups_sweep"]
    assert set(sweep["by_groups"]) == {"1", "48"} and sweep["residual_activation"] == "silu"
    for cell in sweep["by_groups"].values():
        assert cell["fwd_bwd_ratio_vs_gelu"] > 0 and cell["residual"]["fwd_bwd_ratio_vs_gelu"] > 0
    keys = {
        "cpu_residual_fwd_bwd_ratio_vs_gelu@4x10x48:float32",
        "cpu_residual_saved_bytes_minus_gelu@4x10x48:float32",
        "cpu_residual_fwd_bwd_ratio_vs_gelu@4x10x48:float32:G=1",
        "cpu_fwd_bwd_ratio_vs_gelu@4x10x48:float32:G=48",
    }
    assert keys <= set(rep["targets"])
    forms = {(e["source"], e["groups"], e["form"]) for e in rep["forms_summary"]}
    assert forms == {
        ("shapes", 8, "plain"),
        ("shapes", 8, "residual"),
        ("groups_sweep", 1, "plain"),
        ("groups_sweep", 1, "residual"),
        ("groups_sweep", 48, "plain"),
        ("groups_sweep", 48, "residual"),
    }
