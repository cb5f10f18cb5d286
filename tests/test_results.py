"""Result tables, figures and analyses rendered from a fixture set of run directories with known numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nora.results import paper
from nora.results.collect import collect
from nora.results.demo_report import demo_report, render_demo_table
from nora.results.stats import difference_to_constant, paired_difference, summarize
from nora.results.tables import (
    ABLATION_DEFAULTS,
    DEFAULT_LORA_RANK,
    ablation_report,
    matched_report,
    table1_report,
    table2_report,
)

CPU = {"cpu": "Test CPU", "cpu_cores": 2, "gpu": None}
GPU = {"cpu": "x", "cpu_cores": 64, "gpu": "NVIDIA H200"}


def write_run(
    root: Path,
    name: str,
    *,
    method: str,
    model: str,
    dataset: str,
    seed: int,
    acc: float | None = None,
    trainable: int = 100,
    total: int = 1000,
    wall: float = 10.0,
    hardware=CPU,
    date="2026-01-02T10:00:00+00:00",
    config: dict | None = None,
    mmlu: dict | None = None,
    status: str = "complete",
    family="vision",
    world_size: int = 1,
    components: dict | None = None,
) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    summary = {
        "status": status,
        "run_name": name,
        "method": method,
        "model": model,
        "dataset": dataset,
        "family": family,
        "seed": seed,
        "config_hash": f"h{abs(hash((name,))) % 10**6:06d}"[:7],
        "parameters": {
            "total": total,
            "trainable": trainable,
            "percent": 100.0 * trainable / total,
            "components": components or {"nora": 0, "lora": 0, "head": 0, "base": 0},
        },
        "metric": "accuracy",
        "final": {"accuracy": acc},
        "best": {"value": acc, "step": 1},
        "wall_time_s": wall,
        "hardware": hardware,
        "date": date,
        "world_size": world_size,
    }
    summary["config_hash"] = f"c{seed}{method[:3]}{dataset[:3]}"
    if acc is not None:
        summary["final_accuracy"] = acc
    (d / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        import yaml

        (d / "config.yaml").write_text(yaml.safe_dump(config))
    if mmlu is not None:
        (d / "mmlu.json").write_text(json.dumps(mmlu))
    return d


def mmlu(
    stem: float, hum: float, soc: float, other: float, overall: float, date="2026-01-03T00:00:00+00:00", model=None
) -> dict:
    cats = {"STEM": stem, "humanities": hum, "social_sciences": soc, "other": other}
    return {
        "format": "nora.mmlu/1",
        "date": date,
        "overall": {"accuracy": overall, "correct": 0, "n": 100},
        "categories": {k: {"accuracy": v, "correct": 0, "n": 25, "subjects": []} for k, v in cats.items()},
        "model": model,
        "adapter": None,
    }


# ------------------------------------------------------------------------------------ statistics
def test_stats_known_values():
    s = summarize([90.0, 92.0, 94.0])
    assert (s.n, s.mean, s.std) == (3, 92.0, 2.0)
    assert s.fmt() == "92.00 ± 2.00"
    assert summarize([5.0]).fmt() == "5.00" and summarize([]).fmt() == "missing"
    d = paired_difference({0: 91.0, 1: 92.5, 2: 94.5}, {0: 90.0, 1: 92.0, 2: 94.0})
    # diffs 1.0, 0.5, 0.5: mean 2/3, sd sqrt(1/12), t(0.975, 2) = 4.302653
    half = 4.302653 * (1 / 12) ** 0.5 / 3**0.5
    assert d.n == 3 and abs(d.mean - 2 / 3) < 1e-12 and abs(d.hi - (2 / 3 + half)) < 1e-5
    assert d.fmt() == "+0.67 [-0.05, +1.38] (n=3)"
    assert paired_difference({0: 1.0}, {0: 0.5}).fmt() == "+0.50 (n=1, no CI)"
    assert paired_difference({0: 1.0}, {1: 0.5}).fmt() == "missing"
    assert difference_to_constant({0: 60.0, 1: 62.0}, 59.0).fmt() == "+2.00 [-10.71, +14.71] (n=2)"
    assert difference_to_constant({0: 60.0}, None).fmt() == "missing"


# ------------------------------------------------------------------------------------ demo table
DEMO_TASKS = {
    "rot90": {"description": "new classes, rotated", "classes": [5, 6, 7, 8, 9], "transform": "rot90"},
    "transpose": {"description": "source classes, transposed", "classes": [0, 1, 2, 3, 4], "transform": "transpose"},
}


def demo_config(task: str, split: str = "test") -> dict:
    t = DEMO_TASKS[task]
    return {
        "dataset": {"name": "digits_target", "classes": t["classes"], "transform": t["transform"], "eval_split": split}
    }


def demo_runs(root: Path) -> Path:
    rot = root / "rot90"
    for seed, acc, wall in ((0, 90.0, 10.0), (1, 92.0, 12.0), (2, 94.0, 14.0)):
        write_run(
            rot,
            f"full_s{seed}",
            method="full",
            model="vit_demo",
            dataset="digits_target",
            seed=seed,
            acc=acc,
            trainable=1000,
            wall=wall,
            config=demo_config("rot90"),
        )
    for seed, acc in ((0, 91.0), (1, 92.5), (2, 94.5)):
        write_run(
            rot,
            f"nora_s{seed}",
            method="nora",
            model="vit_demo",
            dataset="digits_target",
            seed=seed,
            acc=acc,
            trainable=20,
            config=demo_config("rot90"),
        )
    for seed, acc in ((0, 89.0), (1, 91.0), (2, 95.0)):
        write_run(
            rot,
            f"linear_probe_s{seed}",
            method="linear_probe",
            model="vit_demo",
            dataset="digits_target",
            seed=seed,
            acc=acc,
            trainable=10,
            config=demo_config("rot90"),
        )
    write_run(
        rot,
        "lora_s0",
        method="lora",
        model="vit_demo",
        dataset="digits_target",
        seed=0,
        acc=89.0,
        trainable=150,
        config=demo_config("rot90"),
    )
    write_run(
        root / "transpose",
        "nora_s0",
        method="nora",
        model="vit_demo",
        dataset="digits_target",
        seed=0,
        acc=80.0,
        trainable=20,
        config=demo_config("transpose"),
    )
    # not counted: the source pretraining run, an incomplete run, a tuning run on the validation split
    write_run(root, "source", method="full", model="vit_demo", dataset="digits_source", seed=0, acc=99.0)
    write_run(
        rot,
        "lora_s1",
        method="lora",
        model="vit_demo",
        dataset="digits_target",
        seed=1,
        acc=50.0,
        status="running",
        config=demo_config("rot90"),
    )
    write_run(
        root.parent / "demo_tune" / "rot90",
        "nora_lr0.1_s0",
        method="nora",
        model="vit_demo",
        dataset="digits_target",
        seed=0,
        acc=10.0,
        config=demo_config("rot90", "validation"),
    )
    write_run(
        rot,
        "nora_val_s3",
        method="nora",
        model="vit_demo",
        dataset="digits_target",
        seed=3,
        acc=10.0,
        config=demo_config("rot90", "validation"),
    )
    return root


def test_demo_table_sections_pairs_and_summary(tmp_path):
    root = demo_runs(tmp_path / "demo")
    out = tmp_path / "results" / "demo.md"
    text = render_demo_table(root, out, methods=["linear_probe", "full", "lora", "nora"], tasks=DEMO_TASKS)
    assert out.read_text() == text
    assert f"Runs: 11, read from `{root}`, dated 2026-01-02" in text  # 10 of rot90 + 1 of transpose
    sections = text.split("\n## ")
    rot, tra, pairs, summary = sections[1:5]
    assert rot.startswith("Task `rot90`: new classes, rotated (digits [5, 6, 7, 8, 9], transform `rot90`;")
    assert "| full FT | 3 | 92.00 ± 2.00 | reference | 1,000 | 100.00% | 12.0 |" in rot
    assert "| LoRA | 1 | 89.00 | -1.00 (n=1, no CI) | 150 | 15.00% | 10.0 |" in rot
    # NoRA - full: diffs 1.0, 0.5, 0.5 (see test_stats_known_values)
    assert "| NoRA | 3 | 92.67 ± 1.76 | +0.67 [-0.05, +1.38] (n=3) | 20 | 2.00% | 10.0 |" in rot
    assert "| NoRA | 1 | 80.00 | missing | 20 | 2.00% | 10.0 |" in tra
    assert "| linear probe | 0 | missing | missing | missing | missing | missing |" in tra
    # NoRA - probe on rot90: diffs 2.0, 1.5, -0.5: mean 1.0, sd sqrt(1.75), t(0.975, 2) = 4.302653
    half = 4.302653 * 1.75**0.5 / 3**0.5
    assert f"| `rot90` | +1.00 [{1 - half:+.2f}, {1 + half:+.2f}] (n=3) | missing |" in pairs
    assert "| `transpose` | missing | missing |" in pairs
    assert "| NoRA | 20 | 92.7 ± 1.8 (n=3) | 80.0 (n=1) |" in summary
    csv_text = out.with_suffix(".csv").read_text()
    assert "# run nora_s2: config_hash=c2nordig date=2026-01-02 hardware=CPU: Test CPU (2 cores)\n" in csv_text
    lines = [line for line in csv_text.splitlines() if not line.startswith("#")]
    assert lines[0].startswith("task,method,n,accuracy_mean,accuracy_std,delta_vs_full,delta_vs_full_ci_lo")
    assert lines[1].startswith("rot90,linear_probe,3,91.6667,")
    assert any(line.startswith("rot90,nora,3,92.6667,1.7559,0.6667,-0.0504,1.3838,3,20,2.0,10.0,") for line in lines)
    header = lines[0].split(",")
    pair = next(dict(zip(header, x.split(","))) for x in lines if x.startswith("rot90,nora,,"))  # NoRA - probe
    assert pair["delta_vs_linear_probe"] == "1.0" and pair["delta_vs_linear_probe_n"] == "3"
    assert "nora_val_s3" not in text and "nora_lr0.1_s0" not in text


def test_demo_table_default_methods_and_empty(tmp_path):
    text = demo_report(collect(demo_runs(tmp_path / "demo")), tasks=DEMO_TASKS).markdown()
    rot = text.split("\n## ")[1]
    rows = [line.split(" | ")[0] for line in rot.splitlines() if line.startswith("| ")]
    assert rows == ["| method", "| full FT", "| linear probe", "| LoRA", "| NoRA"]
    empty = demo_report(
        collect(tmp_path / "nothing"), ["full", "nora"], source="runs/demo", tasks=DEMO_TASKS
    ).markdown()
    assert "Runs: none yet under `runs/demo`; every cell below is missing. `make demo` produces them." in empty
    assert "| NoRA | 0 | missing | missing | missing | missing | missing |" in empty
    assert empty.endswith("## Runs\n\nnone\n")


def test_demo_tasks_are_the_configured_ones():
    from nora.demo.runner import learning_rates
    from nora.results.demo_report import demo_settings as settings

    conf = settings()
    assert len(conf["tasks"]) >= 3 and len(
        {(tuple(t["classes"]), t["transform"]) for t in conf["tasks"].values()}
    ) == len(conf["tasks"])
    methods = set(conf["methods"])
    assert {
        "linear_probe",
        "full",
        "lora",
        "dora",
        "nora",
        "nora_pp",
        "rational_ft",
        "zero_init_ft",
        "bitfit",
        "ln_tuning",
        "ia3",
        "vera",
    } <= methods
    lrs = learning_rates()
    assert set(lrs["methods"]) == methods and lrs["head_lr"] > 0
    for m, grid in conf["tune"]["grids"].items():  # the same tuning budget for every method
        assert len(next(iter(grid.values()))) == len(next(iter(conf["tune"]["grids"]["nora"].values()))), m


# ------------------------------------------------------------------------------------ low budget
def test_low_budget_table_and_matched_section(tmp_path):
    from nora.results.tables import table1_low_budget_report

    root = tmp_path / "table1"
    accs = {
        "nora": (80.0, 82.0, 84.0),
        "linear_probe": (70.0, 71.0, 75.0),
        "ia3": (79.0, 80.0, 81.0),
        "bitfit": (81.0,),
        "lora": (90.0, 90.0, 90.0),
    }
    trainable = {"nora": 20_236, "linear_probe": 19_300, "ia3": 35_428, "bitfit": 45_028, "lora": 500_000}
    for m, vals in accs.items():
        for seed, acc in enumerate(vals):
            write_run(
                root,
                f"vit_tiny_cifar100_{m}_s{seed}",
                method=m,
                model="vit_tiny",
                dataset="cifar100",
                seed=seed,
                acc=acc,
                trainable=trainable[m],
                total=5_544_652,
            )
    write_run(root, "vit_demo_ia3", method="ia3", model="vit_demo", dataset="digits_target", seed=0, acc=1.0)
    rep = table1_low_budget_report(collect(root))
    md = rep.markdown()
    assert "Runs: 10 of the 36 the sweeps define" in md  # LoRA and the digits run are not counted
    # NoRA - probe: diffs 10, 11, 9 -> mean 10, sd 1, t(0.975, 2) = 4.302653
    half = 4.302653 / 3**0.5
    assert (
        f"| CIFAR-100 | linear probe | 19,300 | 0.35% | 3 | 72.00 ± 2.65 | +10.00 [{10 - half:+.2f}, "
        f"{10 + half:+.2f}] (n=3) |"
    ) in md
    assert "| CIFAR-100 | NoRA | 20,236 | 0.36% | 3 | 82.00 ± 2.00 | reference |" in md
    assert "| CIFAR-100 | BitFit | 45,028 | 0.81% | 1 | 81.00 | -1.00 (n=1, no CI) |" in md
    assert "| CIFAR-100 | VeRA | missing | missing | 0 | missing | missing |" in md
    assert "| CIFAR-10 | NoRA | missing | missing | 0 | missing | reference |" in md
    assert "| CIFAR-10 | (IA)3 | missing | missing | 0 | missing | missing |" in md
    matched = matched_report(collect(root), collect(tmp_path / "none")).markdown()
    assert "## ViT-Tiny at NoRA's own budget: NoRA vs BitFit, LN tuning, (IA)3, VeRA (test accuracy %)" in matched
    assert "| CIFAR-100 | (IA)3 | 35,428 | 0.64% | 3 | 80.00 ± 1.00 | +2.00 [" in matched


# ------------------------------------------------------------------------------------ table 1
TABLE1_ROWS = """\
| dataset | method | n | accuracy (%) | Δ vs full FT (95% CI) | paper: Δ vs full FT (quoted from the abstract) | trainable params | share of total |
|---|---|---|---|---|---|---|---|
| CIFAR-10 | full FT | 2 | 98.00 ± 0.00 | reference | — | 5,717,416 | 100.00% |
| CIFAR-10 | linear probe | 0 | missing | missing | — | missing | missing |
| CIFAR-10 | LoRA | 0 | missing | missing | — | missing | missing |
| CIFAR-10 | DoRA | 0 | missing | missing | — | missing | missing |
| CIFAR-10 | NoRA | 2 | 98.25 ± 0.07 | +0.25 [-0.39, +0.89] (n=2) | +0.17 | 2,866 | 0.05% |
| CIFAR-10 | NoRA++ | 0 | missing | missing | — | missing | missing |
| CIFAR-100 | full FT | 0 | missing | reference | — | missing | missing |
| CIFAR-100 | linear probe | 0 | missing | missing | — | missing | missing |
| CIFAR-100 | LoRA | 0 | missing | missing | — | missing | missing |
| CIFAR-100 | DoRA | 0 | missing | missing | — | missing | missing |
| CIFAR-100 | NoRA | 1 | 90.10 | missing | +0.27 | 20,236 | 0.37% |
| CIFAR-100 | NoRA++ | 0 | missing | missing | — | missing | missing |

Not counted here (other models, datasets or ranks): vit_test/cifar10/nora (1), vit_tiny/cifar10/lora (1).
"""


def table1_runs(root: Path) -> Path:
    for seed, acc in ((0, 98.0), (1, 98.0)):
        write_run(
            root,
            f"vit_tiny_cifar10_full_s{seed}",
            method="full",
            model="vit_tiny",
            dataset="cifar10",
            seed=seed,
            acc=acc,
            trainable=5_717_416,
            total=5_717_416,
            hardware=GPU,
        )
    for seed, acc in ((0, 98.2), (1, 98.3)):
        write_run(
            root,
            f"vit_tiny_cifar10_nora_s{seed}",
            method="nora",
            model="vit_tiny",
            dataset="cifar10",
            seed=seed,
            acc=acc,
            trainable=2_866,
            total=5_526_922,
            hardware=GPU,
        )
    write_run(
        root,
        "vit_tiny_cifar100_nora_s0",
        method="nora",
        model="vit_tiny",
        dataset="cifar100",
        seed=0,
        acc=90.1,
        trainable=20_236,
        total=5_543_296,
        hardware=GPU,
    )
    # a matched-budget arm (rank 9) in the same root, and a tiny test model: neither enters Table 1
    write_run(
        root,
        "vit_tiny_cifar10_lora_r9_s0",
        method="lora",
        model="vit_tiny",
        dataset="cifar10",
        seed=0,
        acc=97.0,
        hardware=GPU,
        config={"method": {"name": "lora", "lora": {"r": 9}}},
    )
    write_run(root, "vit_test_cifar10_nora_s0", method="nora", model="vit_test", dataset="cifar10", seed=0, acc=10.0)
    return root


def test_table1_exact(tmp_path):
    report = table1_report(collect(table1_runs(tmp_path / "table1")), source="runs/table1")
    md = report.markdown()
    assert TABLE1_ROWS in md
    assert (
        "Runs: 5 of the 36 the sweeps define, read from `runs/table1`, dated 2026-01-02, on NVIDIA H200 (5 runs). "
        "Each run's config hash, date and hardware: see Runs below."
    ) in md
    assert "| vit_tiny_cifar10_nora_s1 | nora | cifar10 | 1 | c1norcif | 2026-01-02 | NVIDIA H200 |" in md
    assert f"Paper column: {paper.SOURCE}" in md
    assert "vit_tiny_cifar10_lora_r9_s0 |" not in md


# ------------------------------------------------------------------------------------ table 2
TABLE2_ROWS = """\
| dataset | method | n | STEM | humanities | social sciences | other | average | Δ average vs base (95% CI) | Δ average vs LoRA (95% CI) | Δ STEM vs LoRA (95% CI) | paper (quoted from the abstract) | trainable params |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| — | base model (no fine-tuning) | 1 | 50.00 | 60.00 | 70.00 | 65.00 | 61.00 | reference | — | — | — | 0 |
| Alpaca | LoRA | 2 | 52.00 ± 1.41 | 61.00 ± 0.00 | 71.00 ± 0.00 | 66.00 ± 0.00 | 62.00 ± 0.00 | +1.00 [+1.00, +1.00] (n=2) | reference | reference | — | 20,971,520 |
| Alpaca | DoRA | 0 (1 trained) | missing | missing | missing | missing | missing | missing | missing | missing | — | 22,347,776 |
| Alpaca | NoRA++ | 2 | 54.00 ± 0.00 | 60.50 ± 0.71 | 71.00 ± 0.00 | 66.00 ± 0.00 | 62.50 ± 0.71 | +1.50 [-4.85, +7.85] (n=2) | +0.50 [-5.85, +6.85] (n=2) | +2.00 [-10.71, +14.71] (n=2) | average +0.3 to +0.8; STEM +1.6 | 20,974,016 |
| OpenOrca | LoRA | 0 (1 trained) | missing | missing | missing | missing | missing | missing | reference | reference | — | 20,971,520 |
| OpenOrca | DoRA | 0 | missing | missing | missing | missing | missing | missing | missing | missing | — | missing |
| OpenOrca | NoRA++ | 1 | 55.00 | 62.00 | 72.00 | 67.00 | 63.00 | +2.00 (n=1, no CI) | missing | missing | average +0.3 to +0.8; +1.3 (category not stated) | 20,974,016 |

Trained but without `mmlu.json` yet (counted as missing; `make table2` or `python eval.py run_dir=<run>` evaluates them): `llama3_8b_alpaca_dora_s0`.
"""


def table2_runs(root: Path) -> Path:
    t2 = root / "table2"
    kw = dict(model="llama3_8b", family="causal_lm", total=8_051_232_768, hardware=GPU)
    write_run(
        t2,
        "llama3_8b_alpaca_lora_s0",
        method="lora",
        dataset="alpaca",
        seed=0,
        trainable=20_971_520,
        mmlu=mmlu(0.51, 0.61, 0.71, 0.66, 0.62),
        **kw,
    )
    write_run(
        t2,
        "llama3_8b_alpaca_lora_s1",
        method="lora",
        dataset="alpaca",
        seed=1,
        trainable=20_971_520,
        mmlu=mmlu(0.53, 0.61, 0.71, 0.66, 0.62),
        **kw,
    )
    write_run(
        t2,
        "llama3_8b_alpaca_nora_pp_s0",
        method="nora_pp",
        dataset="alpaca",
        seed=0,
        trainable=20_974_016,
        mmlu=mmlu(0.54, 0.60, 0.71, 0.66, 0.62),
        **kw,
    )
    write_run(
        t2,
        "llama3_8b_alpaca_nora_pp_s1",
        method="nora_pp",
        dataset="alpaca",
        seed=1,
        trainable=20_974_016,
        mmlu=mmlu(0.54, 0.61, 0.71, 0.66, 0.63),
        **kw,
    )
    write_run(t2, "llama3_8b_alpaca_dora_s0", method="dora", dataset="alpaca", seed=0, trainable=22_347_776, **kw)
    write_run(
        t2,
        "llama3_8b_openorca_nora_pp_s2",
        method="nora_pp",
        dataset="openorca",
        seed=2,
        trainable=20_974_016,
        mmlu=mmlu(0.55, 0.62, 0.72, 0.67, 0.63),
        **kw,
    )
    # evaluated on a subset of MMLU: not counted, and said so
    partial = mmlu(0.9, 0.9, 0.9, 0.9, 0.9)
    partial["data"] = {"n_subjects": 3}
    write_run(
        t2,
        "llama3_8b_openorca_lora_s0",
        method="lora",
        dataset="openorca",
        seed=0,
        trainable=20_971_520,
        mmlu=partial,
        **kw,
    )
    # a tiny test model's run: never in Table 2
    write_run(
        t2,
        "llama_tiny_alpaca_nora_pp_s0",
        method="nora_pp",
        dataset="alpaca",
        seed=0,
        model="llama_tiny",
        family="causal_lm",
        mmlu=mmlu(0.25, 0.25, 0.25, 0.25, 0.25),
    )
    base = root / "eval" / "llama3_8b"
    base.mkdir(parents=True)
    (base / "mmlu.json").write_text(json.dumps(mmlu(0.50, 0.60, 0.70, 0.65, 0.61, model={"name": "llama3_8b"})))
    return root


def test_table2_exact(tmp_path):
    root = table2_runs(tmp_path)
    report = table2_report(collect(root / "table2", root / "eval"), source="runs/table2", eval_source="runs/eval")
    md = report.markdown()
    assert TABLE2_ROWS in md, md
    assert (
        "Not counted (evaluated off the table's protocol, full MMLU test set 5-shot): "
        "`llama3_8b_openorca_lora_s0` (3 of 57 subjects)." in md
    )
    assert (
        "Runs: 6 of the 18 the sweeps define, read from `runs/table2` and `runs/eval`, plus 1 base-model "
        "evaluation(s), dated 2026-01-02 to 2026-01-03, on NVIDIA H200 (6 runs)."
    ) in md
    assert "| llama3_8b (base model, MMLU) | — | — | — | — | 2026-01-03 | — |" in md
    assert "Not counted here (other models, datasets or ranks): llama_tiny/alpaca/nora_pp (1)." in md
    # without a base evaluation the base row is missing, not zero
    md2 = table2_report(collect(root / "table2")).markdown()
    assert "| — | base model (no fine-tuning) | 0 | missing | missing | missing | missing | missing |" in md2
    assert (
        "| Alpaca | LoRA | 2 | 52.00 ± 1.41 | 61.00 ± 0.00 | 71.00 ± 0.00 | 66.00 ± 0.00 | 62.00 ± 0.00 | missing |"
        in md2
    )


def test_mmlu_jobs(tmp_path):
    from nora.results.__main__ import mmlu_jobs

    root = table2_runs(tmp_path)
    assert mmlu_jobs(root / "table2", "llama3_8b", root / "eval") == [
        f"run_dir={root / 'table2' / 'llama3_8b_alpaca_dora_s0'}"
    ]
    assert mmlu_jobs(root / "table2", "qwen2_7b", root / "eval")[-1] == "model=qwen2_7b"


@pytest.mark.slow  # 14 s here: end to end (make test-slow, CI)
def test_mmlu_jobs_lines_reach_eval_py_intact(tmp_path):
    """Every printed line, run as the Makefile runs it (`eval "python eval.py $line"`), gives eval.py exactly the
    run directory: run names carrying overrides (`=`, `,`), output roots with spaces, quotes, `$` and unicode."""
    import os
    import subprocess
    import sys

    from nora.results.__main__ import mmlu_jobs

    root = tmp_path / "out root" / "ünïcode it's $HOME ${x}"
    names = [
        "llama3_8b_alpaca_lora_s0_trainer.grad_accum=4",
        "llama3_8b_alpaca_lora_s1_method.lora.r=4,trainer.lr=0.001",
    ]
    for seed, name in enumerate(names):
        write_run(root, name, method="lora", dataset="alpaca", seed=seed, model="llama3_8b", family="causal_lm")
    lines = mmlu_jobs(root, None, tmp_path / "eval")
    assert len(lines) == 2
    repo = Path(__file__).resolve().parent.parent
    loop = (
        'while read -r job; do eval "$PY eval.py $job --cfg job --resolve" || exit 1; echo ---; done'  # the Makefile's
    )
    proc = subprocess.run(
        ["bash", "-c", loop],
        input="\n".join(lines) + "\n",
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PY": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    printed = [yaml.safe_load(doc)["run_dir"] for doc in proc.stdout.split("---\n") if doc.strip()]
    assert printed == [str(root / name) for name in names]


# ------------------------------------------------------------------------------------ ablations
ABLATION_RANK_ROWS = """\
## Rank r of the coefficient update (alpha = 6)

| setting | n | accuracy (%) | Δ vs default NoRA (95% CI) | Δ vs full FT (95% CI) | NoRA params |
|---|---|---|---|---|---|
| r=1 | 1 | 89.00 | -1.00 (n=1, no CI) | -1.50 (n=1, no CI) | 312 |
| r=2 | 0 | missing | missing | missing | missing |
| r=3 (default) | 2 | 90.50 ± 0.71 | reference | -1.00 [-7.35, +5.35] (n=2) | 936 |
| r=4 | 0 | missing | missing | missing | missing |
| r=8 | 0 | missing | missing | missing | missing |
"""


def nora_cfg(method="nora", **over) -> dict:
    n = {"r": 3, "groups": 8, "form": "A", "numerator": "group", "init": "fit", "residual": False}
    n.update(over)
    return {"method": {"name": method, "nora": n}}


def ablation_runs(root: Path) -> Path:
    ab = root / "ablations"
    kw = dict(model="vit_tiny", dataset="cifar100", hardware=GPU)
    for seed, acc in ((0, 90.0), (1, 91.0)):
        write_run(
            ab,
            f"default_s{seed}",
            method="nora",
            seed=seed,
            acc=acc,
            config=nora_cfg(),
            components={"nora": 936, "head": 19_300, "lora": 0, "base": 0},
            **kw,
        )
    write_run(
        ab,
        "r1_s0",
        method="nora",
        seed=0,
        acc=89.0,
        config=nora_cfg(r=1),
        components={"nora": 312, "head": 19_300, "lora": 0, "base": 0},
        **kw,
    )
    write_run(
        ab,
        "rational_s0",
        method="rational_ft",
        seed=0,
        acc=88.0,
        config=nora_cfg("rational_ft"),
        components={"nora": 960, "head": 19_300, "lora": 0, "base": 0},
        **kw,
    )
    write_run(
        ab,
        "formB_s1",
        method="nora",
        seed=1,
        acc=92.0,
        config=nora_cfg(form="B"),
        components={"nora": 936, "head": 19_300, "lora": 0, "base": 0},
        **kw,
    )
    write_run(
        ab,
        "residual_s0",
        method="nora",
        seed=0,
        acc=90.25,
        config=nora_cfg(residual=True),
        components={"nora": 936, "head": 19_300, "lora": 0, "base": 0},
        **kw,
    )
    t1 = root / "table1"
    for seed, acc in ((0, 90.5), (1, 92.5)):
        write_run(t1, f"vit_tiny_cifar100_full_s{seed}", method="full", seed=seed, acc=acc, **kw)
    return root


def test_ablations_exact(tmp_path):
    root = ablation_runs(tmp_path)
    report = ablation_report(collect(root / "ablations"), collect(root / "table1"))
    md = report.markdown()
    assert ABLATION_RANK_ROWS in md, md
    assert "| rational FT | 1 | 88.00 | -2.00 (n=1, no CI) | -2.50 (n=1, no CI) | 960 |" in md
    assert "| zero-init FT | 0 | missing | missing | missing | missing |" in md
    assert "| form=B | 1 | 92.00 | +1.00 (n=1, no CI) | -0.50 (n=1, no CI) | 936 |" in md
    assert "| form=A (default) | 2 | 90.50 ± 0.71 | reference | -1.00 [-7.35, +5.35] (n=2) | 936 |" in md
    assert "| residual=True | 1 | 90.25 | +0.25 (n=1, no CI) | -0.25 (n=1, no CI) | 936 |" in md
    assert "| residual=False (default) | 2 | 90.50 ± 0.71 | reference |" in md
    assert "Runs: 8 of the 54 the sweeps define, read from `runs/ablations` and `runs/table1`" in md
    assert ABLATION_DEFAULTS["method.nora.r"] == 3


# ------------------------------------------------------------------------------------ matched budget
def test_matched_budget_exact(tmp_path):
    t1 = tmp_path / "table1"
    kw = dict(model="vit_tiny", dataset="cifar10", hardware=GPU)
    for seed, acc in ((0, 98.0), (1, 98.4)):
        write_run(t1, f"nora_pp_s{seed}", method="nora_pp", seed=seed, acc=acc, trainable=305_458, **kw)
        write_run(t1, f"lora_s{seed}", method="lora", seed=seed, acc=acc - 0.2, trainable=304_522, **kw)
    write_run(
        t1,
        "lora_r9_s0",
        method="lora",
        seed=0,
        acc=98.1,
        trainable=342_346,
        config={"method": {"name": "lora", "lora": {"r": 9}}},
        **kw,
    )
    rep = matched_report(collect(t1), collect(tmp_path / "none"))
    md = rep.markdown()
    expected = """\
## ViT-Tiny: test accuracy (%)

| dataset | arm | trainable params | vs NoRA++ | n | metric (%) | NoRA++ minus this arm (95% CI) |
|---|---|---|---|---|---|---|
| CIFAR-10 | NoRA++ (LoRA r=8 + NoRA) | 305,458 | — | 2 | 98.20 ± 0.28 | reference |
| CIFAR-10 | LoRA r=8 | 304,522 | -936 | 2 | 98.00 ± 0.28 | +0.20 [+0.20, +0.20] (n=2) |
| CIFAR-10 | LoRA r=9 | 342,346 | +36,888 | 1 | 98.10 | -0.10 (n=1, no CI) |
| CIFAR-10 | DoRA r=7 | missing | missing | 0 | missing | missing |
| CIFAR-10 | DoRA r=8 | missing | missing | 0 | missing | missing |
| CIFAR-100 | NoRA++ (LoRA r=8 + NoRA) | missing | — | 0 | missing | reference |
"""
    assert expected in md, md
    assert "| OpenOrca | DoRA r=8 | missing | missing | 0 | missing | missing |" in md
    assert "Runs: 5 of the 60 the sweeps define" in md


# ------------------------------------------------------------------------------------ adapters, subspace, figures
def _nora_model(variant: str, seed: int, tmp: Path, train_steps: int = 0) -> Path:
    """A 2-block toy model with GELU MLP activations, NoRA applied, its update set to known random values, and
    the adapter saved as run_training saves it."""
    import nora
    from nora.adapter.config import NoraConfig

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential()
            self.mlp.act = nn.GELU()

    model = nn.Module()
    model.blocks = nn.ModuleList([Block(), Block()])
    cfg = NoraConfig(variant=variant, r=3, alpha=6.0, groups=8, target_modules=[r"blocks\.\d+\.mlp\.act"])
    nora.apply_nora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in nora.nora_modules(model).values():
            for p in mod.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    run = tmp / f"{variant}_s{seed}"
    nora.save_nora(model, run / "adapter")
    return run, model


def test_curves_of_a_calibrated_adapter_span_each_layers_own_range(tmp_path):
    """A calibrated base is fitted over its layer's recorded inputs: the saved adapter keeps that range per layer
    (layer_specs) and the curves are drawn over it, not over the config's fit_range."""
    import nora
    from nora.adapter.curves import load_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8))
    cfg = nora.NoraConfig(init="calibrated", groups=4, target_modules=[r"[13]"])
    batches = [torch.randn(64, 16) * 4 for _ in range(2)]
    nora.apply_nora(model, cfg, calibration_batches=batches)
    nora.save_nora(model, tmp_path / "adapter")
    layers = load_layers(tmp_path / "adapter")
    mods = nora.nora_modules(model)
    assert set(layers) == set(mods) == {"1", "3"}
    for name, mod in mods.items():
        assert layers[name].fit_range == pytest.approx(mod.fit_range, rel=1e-6)
    assert layers["1"].fit_range != layers["3"].fit_range != tuple(cfg.fit_range)


@pytest.mark.parametrize("variant", ["nora", "rational_ft", "zero_init_ft"])
def test_adapter_reconstruction_matches_the_modules(tmp_path, variant):
    import nora
    from nora.adapter.curves import group_curves as rational
    from nora.adapter.curves import load_layers
    from nora.rational.functional import rational_reference
    from nora.results.subspace import layer_stats
    from nora.runs.layout import RunDir

    run, model = _nora_model(variant, 0, tmp_path)
    layers = load_layers(RunDir(run).adapter)
    mods = nora.nora_modules(model)
    assert set(layers) == set(mods) == {"blocks.0.mlp.act", "blocks.1.mlp.act"}
    for name, mod in mods.items():
        num, den = (t.detach().double().numpy() for t in mod.coefficients())
        lay = layers[name]
        np.testing.assert_allclose(lay.num, num, rtol=0, atol=1e-7)
        np.testing.assert_allclose(lay.den, den, rtol=0, atol=1e-7)
        dn, dd = (t.detach().double().numpy() for t in mod.delta())
        np.testing.assert_allclose(lay.delta, np.concatenate([dn, dd], 1), atol=1e-7)
        x = torch.linspace(-3, 3, 7, dtype=torch.float64)
        ref = rational_reference(
            x[:, None].expand(-1, 8).contiguous(), torch.as_tensor(lay.num), torch.as_tensor(lay.den), lay.form
        ).T.numpy()
        np.testing.assert_allclose(rational(x.numpy(), lay.num, lay.den, lay.form), ref, rtol=1e-10, atol=1e-12)
        st = layer_stats(lay)
        assert st.update_norm > 0 and st.function_l2 > 0 and 1.0 <= st.effective_rank <= 8.0
        if variant == "nora":  # rank <= r = 3 for the numerator and for the denominator update
            assert np.linalg.matrix_rank(lay.delta[:, :6], tol=1e-5) <= 3
            assert np.linalg.matrix_rank(lay.delta[:, 6:], tol=1e-5) <= 3


def test_subspace_analysis_and_figures(tmp_path):
    from nora.adapter.curves import activation_figure
    from nora.results import figures
    from nora.results.render import subspace_report
    from nora.results.subspace import analyse_method, identical_methods, summary_rows
    from nora.runs.layout import RunDir

    analyses = []
    for variant in ("nora", "zero_init_ft", "rational_ft"):
        dirs = [_nora_model(variant, seed, tmp_path)[0] for seed in (0, 1)]
        analyses.append(analyse_method(variant, dirs))
    # the same perturbation of c (rational FT) and of δ (zero-init FT) is the same update
    assert identical_methods(analyses) == [("zero_init_ft", "rational_ft")]
    assert analyse_method("nora", [tmp_path / "nothing"]) is None
    a = analyses[0]
    assert a.layers == ["blocks.0.mlp.act", "blocks.1.mlp.act"] and len(a.per_seed) == 2
    rows = summary_rows(a)
    assert [r["layer"] for r in rows] == ["blocks.0.mlp.act", "blocks.1.mlp.act", "all layers"]
    assert all(-1.0 <= r["cross_seed_cos_coef"] <= 1.0 for r in rows)
    rep = subspace_report("s", "Subspace", "Toy runs.", analyses, [], "x")
    md = rep.markdown()
    assert "| NoRA | all layers | 2 |" in md and "| zero-init FT | blocks.1.mlp.act | 2 |" in md
    assert "**zero-init FT and rational FT learnt identical updates in every run here**" in md
    png = figures.subspace_figure(analyses, tmp_path / "f" / "sub.png", "toy")
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    act = activation_figure(RunDir(a.runs[0]).adapter, tmp_path / "f" / "act.png", "toy")
    assert act.exists() and act.stat().st_size > 1000
    assert activation_figure(RunDir(tmp_path / "nothing").adapter, tmp_path / "f" / "none.png") is None
    pts = {"d": [figures.Point("A", 10, 50.0, 1.0, 3), figures.Point("B", 1000, 60.0, None, 1)]}
    assert figures.accuracy_vs_params(pts, tmp_path / "f" / "acc.png", "t").exists()
    assert figures.accuracy_vs_params({"d": []}, tmp_path / "f" / "none.png", "t") is None


def test_render_all_from_fixture_tree(tmp_path):
    from nora.results.render import render_all

    runs = tmp_path / "runs"
    demo = demo_runs(runs / "demo")
    for variant in ("nora", "rational_ft", "zero_init_ft"):
        for seed in (0, 1):
            run, _ = _nora_model(variant, seed, tmp_path / "adapters")
            d = write_run(
                demo / "rot90",
                f"{variant}_s{seed}",
                method=variant,
                model="vit_demo",
                dataset="digits_target",
                seed=seed,
                acc=90.0 + seed,
                trainable=20,
                config=demo_config("rot90"),
            )
            import shutil

            shutil.rmtree(d / "adapter", ignore_errors=True)
            shutil.copytree(run / "adapter", d / "adapter")
    table1_runs(runs / "table1")
    table2_runs(runs)
    ablation_runs(runs)
    out = tmp_path / "results"
    made = render_all(runs, out)
    names = sorted(p.name for p in made["tables"])
    assert names == sorted(
        f"{s}.{e}"
        for s in (
            "demo",
            "demo_subspace",
            "demo_llm",
            "table1",
            "table1_low_budget",
            "table2",
            "ablations",
            "matched_budget",
        )
        for e in ("md", "csv")
    )
    figs = sorted(p.name for p in made["figures"])
    assert figs == [
        "demo_accuracy_vs_params.png",
        "demo_activations_nora.png",
        "demo_activations_rational_ft.png",
        "demo_activations_zero_init_ft.png",
        "demo_subspace.png",
        "table1_accuracy_vs_params.png",
        "table2_mmlu_vs_params.png",
    ]
    index = (out / "README.md").read_text()
    assert "| [table1.md](table1.md) ([csv](table1.csv)) |" in index
    assert "ablations_subspace.md (not generated yet)" in index
    assert "![demo_subspace](figures/demo_subspace.png)" in index
    demo_md = (out / "demo.md").read_text()
    assert "| rational FT | 2 | 90.50 ± 0.71 |" in demo_md
    sub = (out / "demo_subspace.md").read_text()
    assert "not a CIFAR or LLaMA result" in sub and "| rational FT | all layers | 2 |" in sub


def test_defaults_match_the_configs():
    from hydra import compose, initialize_config_dir

    cfgdir = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=cfgdir, version_base="1.3"):  # method files compose their blocks
        composed = {
            m: compose("train", overrides=[f"method={m}", "model=vit_tiny"])
            for m in ("lora", "dora", "nora_pp", "nora")
        }
    for m in ("lora", "dora", "nora_pp"):
        assert composed[m].method.lora.r == DEFAULT_LORA_RANK
    n = composed["nora"].method.nora
    assert (n.r, n.groups, n.form, n.numerator) == (
        ABLATION_DEFAULTS["method.nora.r"],
        ABLATION_DEFAULTS["method.nora.groups"],
        ABLATION_DEFAULTS["method.nora.form"],
        ABLATION_DEFAULTS["method.nora.numerator"],
    )
    assert n.init == ABLATION_DEFAULTS["method.nora.init"]


def test_cli(tmp_path, capsys):
    from nora.results.__main__ import main

    assert main(["demo-table", "--check", "--runs", str(tmp_path / "none")]) == 1
    root = demo_runs(tmp_path / "demo")
    assert main(["demo-table", "--check", "--runs", str(root)]) == 0
    assert main(["demo-table", "--runs", str(root), "--out", str(tmp_path / "out")]) == 0
    assert "| NoRA | 3 | 92.67 ± 1.76 |" in capsys.readouterr().out
    assert (tmp_path / "out" / "demo.csv").exists() and (tmp_path / "out" / "README.md").exists()


def test_the_demo_report_keeps_to_its_own_seeds(tmp_path):
    """make demo and make demo-full share runs/demo: each report counts only the seeds it runs (render_demo)."""
    from nora.results.collect import collect
    from nora.results.render import render_demo

    root = demo_runs(tmp_path / "demo")
    render_demo(
        collect(root), tmp_path / "two", str(root), ["linear_probe", "full", "nora"], seeds={"rot90": 2, "transpose": 1}
    )
    two = (tmp_path / "two" / "demo.md").read_text()
    assert "| NoRA | 2 | 91.75 ± 1.06 |" in two and "| full FT | 2 | 91.00 ± 1.41 |" in two  # seeds 0 and 1
    render_demo(
        collect(root),
        tmp_path / "all",
        str(root),
        ["linear_probe", "full", "nora"],
        seeds={"rot90": 10, "transpose": 10},
    )
    assert "| NoRA | 3 | 92.67 ± 1.76 |" in (tmp_path / "all" / "demo.md").read_text()


def test_make_tables_renders_demo_full_only_when_its_extra_seeds_exist(tmp_path):
    from nora.results.render import render_all

    root = demo_runs(tmp_path / "runs" / "demo")
    render_all(tmp_path / "runs", tmp_path / "out", demo_methods=["linear_probe", "full", "nora"])
    assert not (tmp_path / "out" / "demo_full").exists()  # seeds 0-2 only: nothing beyond make demo's 5
    index = (tmp_path / "out" / "README.md").read_text()
    assert "| demo_full/demo.md (not generated yet) |" in index
    write_run(
        root / "rot90",
        "nora_s7",
        method="nora",
        model="vit_demo",
        dataset="digits_target",
        seed=7,
        acc=99.0,
        trainable=20,
        config=demo_config("rot90"),
    )
    render_all(tmp_path / "runs", tmp_path / "out", demo_methods=["linear_probe", "full", "nora"])
    assert "| NoRA | 3 | 92.67 ± 1.76 |" in (tmp_path / "out" / "demo.md").read_text()  # seed 7 left out
    full = (tmp_path / "out" / "demo_full" / "demo.md").read_text()
    assert "| NoRA | 4 | " in full and "Produced by `make demo-full`" in full and "](../demo_diagnosis.md)" in full
    assert (
        "| [demo_full/demo.md](demo_full/demo.md) ([csv](demo_full/demo.csv)) |"
        in (tmp_path / "out" / "README.md").read_text()
    )
