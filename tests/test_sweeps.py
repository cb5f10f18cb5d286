"""Sweep configs (sweeps/*.yaml) compose for every job without launching training (Hydra compose API)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from nora.results.sweep import (
    SWEEP_DIR,
    SWEEPS,
    CachedComposer,
    all_sweeps,
    job_overrides,
    job_run_dir,
    plan,
    sweep_hydra,
)
from nora.results.tables import ABLATIONS
from nora.runs.identity import config_hash

ROOT = Path(__file__).resolve().parents[1]

# expected jobs per sweep (and the output root every job writes under)
EXPECTED = {
    "table1": (6 * 2 * 3, "runs/table1"),  # 6 methods x 2 datasets x 3 seeds
    "table1_low_budget": (6 * 2 * 3, "runs/table1"),  # probe, NoRA and 4 baselines x 2 datasets x 3 seeds
    "table2": (3 * 2 * 3, "runs/table2"),  # 3 methods x 2 datasets x 3 seeds
    "ablation_variant": (3 * 3, "runs/ablations"),  # rational_ft, zero_init_ft, nora
    "ablation_rank": (5 * 3, "runs/ablations"),  # r = 1, 2, 3, 4, 8
    "ablation_groups": (7 * 3, "runs/ablations"),  # G = 1, 2, 4, 8, 16, 96, 768 (one per channel)
    "ablation_form": (2 * 3, "runs/ablations"),  # A, B
    "ablation_numerator": (2 * 3, "runs/ablations"),  # shared, group
    "ablation_init": (2 * 3, "runs/ablations"),  # fit, calibrated
    "ablation_residual": (2 * 3, "runs/ablations"),  # the paper's form, residual
    "matched_vit": (5 * 2 * 3, "runs/table1"),  # 5 arms x 2 datasets x 3 seeds
    "matched_llama": (5 * 2 * 3, "runs/table2"),
}


@pytest.fixture(scope="module")
def composed():
    """Every job of every sweep, composed once: {sweep: [(overrides, cfg), ...]}."""
    from omegaconf import OmegaConf as OC

    out = {}
    with sweep_hydra():
        compose = CachedComposer()
        for name in all_sweeps():
            base = compose(name, [])
            params = OC.to_container(base.hydra.sweeper.params, resolve=False)
            out[name] = [(ov, compose(name, ov)) for ov in job_overrides(params, [])]
    return out


def test_every_sweep_file_is_registered():
    files = {p.stem for p in SWEEP_DIR.glob("*.yaml")}
    assert files == set(all_sweeps()) == set(EXPECTED)
    assert set(SWEEPS) == {"table1", "table2", "ablations", "matched_budget"}


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.slow  # 54 s here: end to end (make test-slow, CI)
def test_job_count_and_unique_run_dirs(composed, name):
    n, root = EXPECTED[name]
    jobs = composed[name]
    assert len(jobs) == n
    dirs = [job_run_dir(cfg) for _ov, cfg in jobs]
    assert len(set(dirs)) == n, "two jobs of one sweep would share a run directory"
    assert all(d.parent == Path(root) for d in dirs)
    for ov, cfg in jobs:
        # the job's config resolves (what train.py would receive), and the swept values are in it
        job = OmegaConf.to_container(cfg, resolve=False)
        hydra = job.pop("hydra")
        c = OmegaConf.to_container(OmegaConf.create(job), resolve=True)
        assert hydra["sweep"] == {"dir": "${output_root}", "subdir": "${run_name}"}
        for o in ov:
            key, value = o.split("=", 1)
            if key in ("method", "dataset"):
                assert c[key]["name"] == value
            elif key == "seed":
                assert c["seed"] == int(value)
            elif key.startswith("method.nora."):
                assert str(OmegaConf.select(cfg, key)) == value
        assert c["model"]["name"] in ("vit_tiny", "llama3_8b")
        assert hydra["callbacks"]["sweep_plan"]["_target_"] == "nora.results.sweep.SweepPlanCallback"


def test_table1_and_table2_settings(composed):
    t1 = {(c.dataset.name, c.method.name, c.seed) for _ov, c in composed["table1"]}
    assert {m for _d, m, _s in t1} == {"full", "linear_probe", "lora", "dora", "nora", "nora_pp"}
    assert {d for d, _m, _s in t1} == {"cifar10", "cifar100"} and {s for *_x, s in t1} == {0, 1, 2}
    assert all(c.model.name == "vit_tiny" for _ov, c in composed["table1"])
    t2 = composed["table2"]
    assert {(c.model.name, c.dataset.name) for _ov, c in t2} == {("llama3_8b", "alpaca"), ("llama3_8b", "openorca")}
    assert {c.method.name for _ov, c in t2} == {"lora", "dora", "nora_pp"}
    # the experiment recipes are in force (128 sequences per optimizer step on one GPU)
    assert {c.trainer.batch_size * c.trainer.grad_accum for _ov, c in t2} == {128}


@pytest.mark.slow  # 12 s here: end to end (make test-slow, CI)
def test_matched_budget_arms_reuse_table_runs(composed):
    """Arms at the default rank are the same directory *and* the same config as Table 1/2's jobs, so a matched
    sweep after Table 1/2 skips them; the other ranks get their own directories."""
    for table, matched in (("table1", "matched_vit"), ("table2", "matched_llama")):
        table_jobs = {job_run_dir(c): config_hash(c) for _ov, c in composed[table]}
        arms = {}
        for _ov, c in composed[matched]:
            d = job_run_dir(c)
            arm = (c.method.name, c.method.lora.r)
            arms.setdefault(arm, []).append(d)
            if arm in (("lora", 8), ("dora", 8), ("nora_pp", 8)):
                assert table_jobs[d] == config_hash(c)
            else:
                assert d not in table_jobs and f"_r{arm[1]}_" in d.name
        assert set(arms) == {("nora_pp", 8), ("lora", 8), ("lora", 9), ("dora", 7), ("dora", 8)}
        assert {c.method.lora.use_dora for _ov, c in composed[matched] if c.method.name == "dora"} == {True}


@pytest.mark.slow  # 20 s here: end to end (make test-slow, CI)
def test_ablation_sweeps_match_the_table_and_share_the_default(composed):
    default_dirs = {}
    for sweep, _heading, key, values in ABLATIONS:
        jobs = composed[f"ablation_{sweep}"]
        swept = yaml.safe_load((SWEEP_DIR / f"ablation_{sweep}.yaml").read_text())["hydra"]["sweeper"]["params"]
        assert [str(v).lower() for v in str(swept[key]).split(",")] == [str(v).lower() for v in values]
        for _ov, c in jobs:
            assert (c.model.name, c.dataset.name) == ("vit_tiny", "cifar100")
            assert c.method.nora.alpha == 6.0
            if all(
                str(OmegaConf.select(c, k) if k != "method" else c.method.name) == str(v)
                for k, v in {
                    "method": "nora",
                    "method.nora.r": 3,
                    "method.nora.groups": 8,
                    "method.nora.form": "A",
                    "method.nora.numerator": "group",
                    "method.nora.init": "fit",
                    "method.nora.residual": False,
                }.items()
            ):
                default_dirs.setdefault(c.seed, set()).add((job_run_dir(c), config_hash(c)))
    # the default setting is one directory (and one config) per seed across the seven ablation sweeps
    assert sorted(default_dirs) == [0, 1, 2] and all(len(v) == 1 for v in default_dirs.values())
    all_dirs = {job_run_dir(c) for s in ABLATIONS for _ov, c in composed[f"ablation_{s[0]}"]}
    assert len(all_dirs) == 51  # 57 jobs, the default setting shared by the seven sweeps (3 seeds)


def test_command_line_overrides_restrict_a_sweep():
    jobs = plan("table1", ["seed=0", "method=lora,nora"])
    assert [j.run_dir.name for j in jobs] == [
        "vit_tiny_cifar10_lora_s0",
        "vit_tiny_cifar10_nora_s0",
        "vit_tiny_cifar100_lora_s0",
        "vit_tiny_cifar100_nora_s0",
    ]
    assert all(j.status == "new" for j in jobs)


def test_plan_reports_complete_and_resumable(tmp_path):
    done = tmp_path / "vit_tiny_cifar10_nora_s0"
    done.mkdir()
    (done / "summary.json").write_text('{"status": "complete"}')
    half = tmp_path / "vit_tiny_cifar100_nora_s0" / "checkpoints"
    half.mkdir(parents=True)
    (half / "last.pt").write_bytes(b"")
    jobs = plan("table1", ["seed=0", "method=nora", f"output_root={tmp_path}"])
    assert [(j.run_dir.name, j.status) for j in jobs] == [
        ("vit_tiny_cifar10_nora_s0", "complete"),
        ("vit_tiny_cifar100_nora_s0", "resumable"),
    ]
    # a run directory started with another configuration is reported as such, not as skippable/resumable
    with sweep_hydra():
        compose = CachedComposer()
        for ov, d in ((["dataset=cifar10"], done), (["dataset=cifar100", "trainer.epochs=3"], half.parent)):
            job = OmegaConf.to_container(
                compose("table1", ["seed=0", "method=nora", f"output_root={tmp_path}"] + ov), resolve=False
            )
            job.pop("hydra")
            (d / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(job), resolve=True))
    jobs = plan("table1", ["seed=0", "method=nora", f"output_root={tmp_path}"])
    assert [j.status for j in jobs] == ["complete", "changed"]
    from nora.results.sweep import format_plan

    assert "1 run directory holds a run of another configuration" in format_plan("table1", jobs)


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with sweep_hydra():
        compose = CachedComposer()
        for launcher, gpus in (("slurm", None), ("slurm_1gpu", 1)):
            cfg = compose("table1", [f"hydra/launcher={launcher}"])
            assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
            if gpus:
                assert cfg.hydra.launcher.gpus_per_node == gpus == cfg.hydra.launcher.tasks_per_node
        cfg = compose("table2", ["hydra/launcher=slurm_1gpu", "experiment=llama3_openorca", "method=nora_pp"])
        assert job_run_dir(cfg) == Path("runs/table2/llama3_8b_openorca_nora_pp_s0")


@pytest.mark.slow  # 10 s here: end to end (make test-slow, CI)
def test_train_py_dry_run_lists_the_jobs(tmp_path):
    """The real entry point: `python train.py -m --config-dir sweeps --config-name <sweep>` with the dry-run
    switch prints the plan and launches nothing."""
    env = dict(os.environ, NORA_SWEEP_DRY_RUN="1", WANDB_MODE="disabled")
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "--config-dir",
            "sweeps",
            "--config-name",
            "ablation_form",
            f"output_root={tmp_path / 'r'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "sweep ablation_form: 6 jobs (0 complete: skipped, 0 resumable from a checkpoint, 6 to run)" in out.stdout
    assert "dry run: nothing launched" in out.stdout
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_matched_budget_ranks_bracket_nora_pp():
    """The counts quoted in sweeps/README.md, recomputed on the real shapes (timm ViT-Tiny; LLaMA-3-8B on the
    meta device), and the arms of the matched sweeps bracket NoRA++ on both."""
    from nora.results.budget import bracket, count

    readme = (SWEEP_DIR / "README.md").read_text()
    for model, expected in (
        (
            "vit_tiny",
            {"nora_pp": 295_848, "lora_r8": 294_912, "lora_r9": 331_776, "dora_r7": 278_784, "dora_r8": 315_648},
        ),
        (
            "llama3_8b",
            {
                "nora_pp": 20_974_016,
                "lora_r8": 20_971_520,
                "lora_r9": 23_592_960,
                "dora_r7": 19_726_336,
                "dora_r8": 22_347_776,
            },
        ),
    ):
        counts = [count(model, "nora_pp")] + [
            count(model, m, r) for m, r in (("lora", 8), ("lora", 9), ("dora", 7), ("dora", 8))
        ]
        assert {c.arm: c.adapter for c in counts} == expected
        assert all(f"{v:,}" in readme for v in expected.values())
        for m, (lo, hi) in (("lora", (8, 9)), ("dora", (7, 8))):
            below, above = bracket(counts, counts[0].adapter, m)
            assert (below.rank, above.rank) == (lo, hi)


# ------------------------------------------------------------------ sweeps over any key: the run name
def _name(overrides, config="train"):
    with sweep_hydra():
        return job_run_dir(CachedComposer()(config, overrides)).name


def test_run_name_carries_the_overrides_it_does_not_spell():
    base = ["model=vit_test", "dataset=digits", "method=nora"]
    assert _name(base) == "vit_test_digits_nora_s0"
    # value overrides that change the result, sorted by key, with the composed value (1e-3 and 0.001 are one run)
    assert (
        _name(base + ["trainer.lr=1e-3", "method.nora.r=2"])
        == "vit_test_digits_nora_s0_method.nora.r=2,trainer.lr=0.001"
    )
    assert _name(base + ["method.nora.r=2", "trainer.lr=0.001"]) == _name(base + ["trainer.lr=1e-3", "method.nora.r=2"])
    # left out: group choices, keys the name spells, outputs/logging/progress, where inputs are read from, hydra.*
    same = [
        "seed=0",
        "logger=wandb",
        "output_root=elsewhere",
        "trainer.progress=false",
        "trainer.log_every=7",
        "trainer.checkpoint_every=3",
        "trainer.strategy=fsdp",
        "data.path=/some/where/alpaca.json",
        "hydra.job.chdir=false",
        "force=true",
        "on_config_change=rerun",
    ]
    assert _name(base + same) == "vit_test_digits_nora_s0"
    assert _name(base + ["seed=2", "trainer.epochs=3"]) == "vit_test_digits_nora_s2_trainer.epochs=3"
    # list values stay one path component; a suffix too long for a file name becomes a hash of itself
    assert _name(base + ["+method.nora.extra=[a/b,c]"]) == "vit_test_digits_nora_s0_method.nora.extra=[a_b,c]"
    long = [f"trainer.lr={v}" for v in ("0.000123456789",)] + [f"+trainer.x{i}=value_number_{i}" for i in range(12)]
    name = _name(base + long)
    assert re.fullmatch(r"vit_test_digits_nora_s0_cfg-[0-9a-f]{12}", name) and name != _name(base + long[:-1])


def test_sweep_run_names_keep_their_directories_and_gain_unspelled_overrides():
    # the ablations' run_name spells method.nora.r: not repeated; trainer.epochs is not spelled: appended
    assert (
        _name(["method.nora.r=2", "seed=1"], "ablation_rank")
        == "vit_tiny_cifar100_nora_r2_G8_formA_numgroup_initfit_residualFalse_s1"
    )
    assert (
        _name(["method.nora.r=2", "seed=1", "trainer.epochs=1"], "ablation_rank")
        == "vit_tiny_cifar100_nora_r2_G8_formA_numgroup_initfit_residualFalse_s1_trainer.epochs=1"
    )
    assert _name(["budget=lora_r9", "dataset=cifar10"], "matched_vit") == "vit_tiny_cifar10_lora_r9_s0"
    assert (
        _name(["experiment=llama3_alpaca", "method=lora", "data.path=/data/alpaca.json"], "table2")
        == "llama3_8b_alpaca_lora_s0"
    )
    jobs = plan("table1", ["seed=0", "method=nora", "trainer.epochs=1"])
    assert [j.run_dir.name for j in jobs] == [
        "vit_tiny_cifar10_nora_s0_trainer.epochs=1",
        "vit_tiny_cifar100_nora_s0_trainer.epochs=1",
    ]


def test_a_config_composed_without_its_hydra_node_gets_the_plain_name():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        plain = compose("train", overrides=["model=vit_test", "trainer.lr=1e-3"])
        with_hydra = compose("train", overrides=["model=vit_test", "trainer.lr=1e-3"], return_hydra_config=True)
    assert plain.run_name == "vit_test_cifar100_nora_s0"
    assert job_run_dir(with_hydra).name == "vit_test_cifar100_nora_s0_trainer.lr=0.001"


@pytest.mark.slow
def test_multirun_over_any_key_gives_one_directory_per_configuration(tmp_path):
    """`python train.py -m trainer.lr=1e-3,5e-4 method.nora.r=2,3 ...` (a real Hydra multirun): 4 complete runs in
    4 directories, named as the sweep plan names them, each its own W&B run in one group; re-running skips all 4."""
    from wandb_files import offline_runs

    out = tmp_path / "runs"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "trainer.lr=1e-3,5e-4",
        "method.nora.r=2,3",
        "model=vit_test",
        "dataset=digits",
        "method=nora",
        "dataset.limit_train=64",
        "dataset.limit_eval=32",
        "trainer.epochs=1",
        "trainer.batch_size=32",
        "trainer.eval_batch_size=32",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.checkpoint_every=0",
        "logger=wandb",
        f"output_root={out}",
    ]
    env = dict(os.environ, WANDB_MODE="offline", NORA_SWEEP_DRY_RUN="0")
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    expected = {
        f"vit_test_digits_nora_s0_dataset.limit_eval=32,dataset.limit_train=64,method.nora.r={r},"
        f"trainer.batch_size=32,trainer.epochs=1,trainer.eval_batch_size=32,trainer.lr={lr}"
        for r in (2, 3)
        for lr in ("0.001", "0.0005")
    }
    runs = {p.name for p in out.iterdir() if p.is_dir()}
    assert runs == expected
    summaries = {}
    for name in runs:
        s = json.loads((out / name / "summary.json").read_text())
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        assert s["status"] == "complete" and s["run_name"] == cfg["run_name"] == name
        assert f"method.nora.r={cfg['method']['nora']['r']}" in name and f"trainer.lr={cfg['trainer']['lr']}" in name
        summaries[name] = s
        (wb,) = offline_runs(out / name)
        assert (wb.name, wb.group, wb.exit_code) == (name, "train", 0)
        assert wb.summary["final/accuracy"] == s["final_accuracy"]
    assert len({s["config_hash"] for s in summaries.values()}) == 4
    # the compose path (the sweep plan's) names the same directories
    overrides = [a for a in cmd[3:] if "," not in a]
    with sweep_hydra():
        compose = CachedComposer()
        planned = {
            job_run_dir(compose("train", overrides + [f"trainer.lr={lr}", f"method.nora.r={r}"])).name
            for lr in ("1e-3", "5e-4")
            for r in (2, 3)
        }
    assert planned == expected

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skip:") == 4
    for name in runs:
        assert json.loads((out / name / "summary.json").read_text()) == summaries[name]
        assert len(offline_runs(out / name)) == 1  # a skipped job opens no W&B run
