"""Sweep configs (sweeps/*.yaml) compose for every job without launching training (Hydra compose API)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from nora.config import config_hash
from nora.results.sweep import SWEEPS, SWEEP_DIR, CachedComposer, all_sweeps, job_overrides, job_run_dir, plan, sweep_hydra
from nora.results.tables import ABLATIONS

ROOT = Path(__file__).resolve().parents[1]

# expected jobs per sweep (and the output root every job writes under)
EXPECTED = {
    "table1": (6 * 2 * 3, "runs/table1"),           # 6 methods x 2 datasets x 3 seeds
    "table2": (3 * 2 * 3, "runs/table2"),           # 3 methods x 2 datasets x 3 seeds
    "ablation_variant": (3 * 3, "runs/ablations"),  # rational_ft, zero_init_ft, nora
    "ablation_rank": (5 * 3, "runs/ablations"),     # r = 1, 2, 3, 4, 8
    "ablation_groups": (5 * 3, "runs/ablations"),   # G = 1, 2, 4, 8, 16
    "ablation_form": (2 * 3, "runs/ablations"),     # A, B
    "ablation_numerator": (2 * 3, "runs/ablations"),  # shared, group
    "ablation_init": (2 * 3, "runs/ablations"),     # fit, calibrated
    "matched_vit": (5 * 2 * 3, "runs/table1"),      # 5 arms x 2 datasets x 3 seeds
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


def test_ablation_sweeps_match_the_table_and_share_the_default(composed):
    default_dirs = {}
    for sweep, _heading, key, values in ABLATIONS:
        jobs = composed[f"ablation_{sweep}"]
        swept = yaml.safe_load((SWEEP_DIR / f"ablation_{sweep}.yaml").read_text())["hydra"]["sweeper"]["params"]
        assert [str(v) for v in str(swept[key]).split(",")] == [str(v) for v in values]
        for _ov, c in jobs:
            assert (c.model.name, c.dataset.name) == ("vit_tiny", "cifar100")
            assert c.method.nora.alpha == 6.0
            if all(str(OmegaConf.select(c, k) if k != "method" else c.method.name) == str(v)
                   for k, v in {"method": "nora", "method.nora.r": 3, "method.nora.groups": 8, "method.nora.form": "A",
                                "method.nora.numerator": "group", "method.nora.init": "fit"}.items()):
                default_dirs.setdefault(c.seed, set()).add((job_run_dir(c), config_hash(c)))
    # the default setting is one directory (and one config) per seed across the six ablation sweeps
    assert sorted(default_dirs) == [0, 1, 2] and all(len(v) == 1 for v in default_dirs.values())
    all_dirs = {job_run_dir(c) for s in ABLATIONS for _ov, c in composed[f"ablation_{s[0]}"]}
    assert len(all_dirs) == 42


def test_command_line_overrides_restrict_a_sweep():
    jobs = plan("table1", ["seed=0", "method=lora,nora"])
    assert [j.run_dir.name for j in jobs] == ["vit_tiny_cifar10_lora_s0", "vit_tiny_cifar10_nora_s0",
                                              "vit_tiny_cifar100_lora_s0", "vit_tiny_cifar100_nora_s0"]
    assert all(j.status == "new" for j in jobs)


def test_plan_reports_complete_and_resumable(tmp_path):
    done = tmp_path / "vit_tiny_cifar10_nora_s0"
    done.mkdir()
    (done / "summary.json").write_text('{"status": "complete"}')
    half = tmp_path / "vit_tiny_cifar100_nora_s0" / "checkpoints"
    half.mkdir(parents=True)
    (half / "last.pt").write_bytes(b"")
    jobs = plan("table1", ["seed=0", "method=nora", f"output_root={tmp_path}"])
    assert [(j.run_dir.name, j.status) for j in jobs] == [("vit_tiny_cifar10_nora_s0", "complete"),
                                                          ("vit_tiny_cifar100_nora_s0", "resumable")]
    # a run directory started with another configuration is reported as such, not as skippable/resumable
    with sweep_hydra():
        compose = CachedComposer()
        for ov, d in ((["dataset=cifar10"], done), (["dataset=cifar100", "trainer.epochs=3"], half.parent)):
            job = OmegaConf.to_container(compose("table1", ["seed=0", "method=nora", f"output_root={tmp_path}"] + ov),
                                         resolve=False)
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


def test_train_py_dry_run_lists_the_jobs(tmp_path):
    """The real entry point: `python train.py -m --config-dir sweeps --config-name <sweep>` with the dry-run
    switch prints the plan and launches nothing."""
    env = dict(os.environ, NORA_SWEEP_DRY_RUN="1", WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, "train.py", "-m", "--config-dir", "sweeps", "--config-name", "ablation_form",
                          f"output_root={tmp_path / 'r'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
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
    for model, expected in (("vit_tiny", {"nora_pp": 295_848, "lora_r8": 294_912, "lora_r9": 331_776,
                                          "dora_r7": 278_784, "dora_r8": 315_648}),
                            ("llama3_8b", {"nora_pp": 20_974_016, "lora_r8": 20_971_520, "lora_r9": 23_592_960,
                                           "dora_r7": 19_726_336, "dora_r8": 22_347_776})):
        counts = [count(model, "nora_pp")] + [count(model, m, r) for m, r in (("lora", 8), ("lora", 9),
                                                                                ("dora", 7), ("dora", 8))]
        assert {c.arm: c.adapter for c in counts} == expected
        assert all(f"{v:,}" in readme for v in expected.values())
        for m, (lo, hi) in (("lora", (8, 9)), ("dora", (7, 8))):
            below, above = bracket(counts, counts[0].adapter, m)
            assert (below.rank, above.rank) == (lo, hi)
