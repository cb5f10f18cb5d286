"""Measurements behind results/demo_diagnosis.md: what limits NoRA and NoRA++ in the digits demo.

Read from finished demo runs (nothing here is guessed or re-trained, except the runs ``--experiments`` adds):

* **pre-activation range**: the inputs of every replaced activation on the test images, before training (the
  source backbone with GELU) and after (the trained run): the share outside the fit range the base rational was
  fitted over, and the 0.1 / 99.9 percentiles;
* **coefficient movement**: per layer, how far the numerator and denominator coefficients moved (relative to the
  base rational's), and how far the learnt activations moved from the base one inside the fit range and at
  |x| = 4;
* **which part of the update matters**: test accuracy of the trained run with its numerator update, or its
  denominator update, removed;
* **learning curves**: test accuracy after every epoch of the demo's runs (the demo evaluates each epoch; nothing
  is chosen by it);
* **split sizes**: how many images the validation and test accuracies rest on;
* ``--experiments``: on the validation split, NoRA at other head learning rates and the linear probe at the same
  ones (does the shared head lr decide the NoRA - probe gap?), LP-FT (NoRA started from the trained probe's head),
  and NoRA at smaller learning rates (does a smaller step keep the update small, and does that help?); and, on
  the test split, LoRA and NoRA++ one lr step below their tuned one (is a collapsed seed the lr's doing?), and the
  rational methods in the paper's form against the demo's residual-form runs (does the exact start matter?).

    python -m nora.demo.diagnosis                 # analyse runs/demo (make demo first), write the report
    python -m nora.demo.diagnosis --experiments   # plus those runs (runs/demo_diagnosis)
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from nora.adapter.inject import nora_modules
from nora.adapter.io import FULL_FT_NAME
from nora.app.config import compose
from nora.app.reload import build_base_model, load_trained_model
from nora.data.batched import BatchedAugment, as_uint8_tensors
from nora.data.vision import load_vision_dataset
from nora.demo.runner import digits_overrides, learning_rates, next_value, one_thread_worker, pretrain_source, run_jobs
from nora.errors import UserError, user_errors
from nora.logs import setup_logging
from nora.methods import get_method
from nora.models.vision import input_size, pretrained_cfg
from nora.rational.functional import rational_reference
from nora.results.demo_report import demo_settings
from nora.results.stats import paired_difference, summarize
from nora.runs.layout import RunDir, is_complete, read_summary

HEAD_LR_METHODS = ("linear_probe", "nora")  # the head-lr experiment
STABILITY_METHODS = ("lora", "nora_pp")  # the lr-stability experiment
FORM_METHODS = ("nora", "nora_pp", "rational_ft", "zero_init_ft")  # the form experiment
MEASURED_METHODS = ("nora", "nora_pp")  # the demo runs whose ranges and coefficients the measurements analyse


# ----------------------------------------------------------------------------- rebuilding a run
def eval_images(cfg, model) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's evaluation images, normalised as its evaluation saw them, and their labels."""

    _train, evaluation, _k = load_vision_dataset(cfg.dataset)
    images, labels = as_uint8_tensors(evaluation)
    pcfg = pretrained_cfg(model)
    aug = BatchedAugment(
        input_size(model),
        pcfg.get("mean", (0.5,) * 3),
        pcfg.get("std", (0.5,) * 3),
        pcfg.get("interpolation"),
        train=False,
    )
    return aug(images, torch.Generator().manual_seed(0)), labels


def act_inputs(model, x: torch.Tensor, suffix: str = "mlp.act") -> dict[str, torch.Tensor]:
    """The input of every MLP activation (``*.mlp.act``) for images ``x``: one flat tensor per layer."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if name.endswith(suffix):
            key = name[name.index("blocks") :] if "blocks" in name else name
            hooks.append(mod.register_forward_hook(lambda m, inp, out, k=key: seen.__setitem__(k, inp[0].detach())))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.flatten() for k, v in sorted(seen.items())}


def range_stats(t: torch.Tensor, fit_range: tuple[float, float]) -> dict:
    lo, hi = fit_range
    q = torch.quantile(
        t[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(0))[:200_000]].double(),
        torch.tensor([0.001, 0.999], dtype=torch.float64),
    )
    return {
        "outside": float(((t < lo) | (t > hi)).double().mean()) * 100,
        "p001": float(q[0]),
        "p999": float(q[1]),
        "absmax": float(t.abs().max()),
    }


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).double().mean()) * 100


@contextmanager
def without_update(model, part: str):
    """Temporarily zero NoRA's low-rank update of the numerator (``num``), the denominator (``den``) or both
    (``all``: the trained head and, for NoRA++, LoRA, over the base rationals)."""
    saved = []
    for mod in nora_modules(model).values():
        for p in [mod.nora_B_num, mod.nora_B_den] if part == "all" else [getattr(mod, f"nora_B_{part}")]:
            saved.append((p, p.detach().clone()))
            with torch.no_grad():
                p.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)


def coefficient_stats(model, data_range: dict[str, tuple[float, float]] | None = None) -> dict[str, dict]:
    """Per NoRA layer: relative coefficient change and how far the groups' curves left the base curve (over the
    fit range, over ``data_range[layer]`` (where the layer's inputs lie), and at |x| = 4)."""

    out = {}
    x = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)
    for name, mod in nora_modules(model).items():
        with torch.no_grad():
            num, den = (t.detach().double() for t in mod.coefficients())
            bnum, bden = mod.base_numerator.double().expand_as(num), mod.base_denominator.double()
            g = num.shape[0]
            y = rational_reference(x[:, None].expand(-1, g).contiguous(), num, den, mod.form)
            base = rational_reference(x[:, None].expand(-1, g).contiguous(), bnum, bden, mod.form)
        lo, hi = mod.fit_range or (-3.0, 3.0)
        inside = (x >= lo) & (x <= hi)
        dev = (y - base).abs()
        edge = dev[(x.abs() - 4.0).abs() < 1e-9]
        key = name[name.index("blocks") :] if "blocks" in name else name
        dlo, dhi = (data_range or {}).get(key, (lo, hi))
        in_data = (x >= dlo) & (x <= dhi)
        out[key] = {
            "max_dev_data": float(dev[in_data].max()) if bool(in_data.any()) else 0.0,
            "num_rel": float((num - bnum).norm() / bnum.norm()),
            "den_rel": float((den - bden).norm() / bden.norm()),
            "max_dev_fit": float(dev[inside].max()),
            "mean_dev_at_4": float(edge.mean()),
        }
    return out


def analyse_run(run_dir: Path) -> dict:
    """Everything measured on one trained NoRA / NoRA++ run (test images of its task)."""
    trained = load_trained_model(run_dir)
    cfg = trained.config
    base, _tok = build_base_model(cfg)
    x, y = eval_images(cfg, base)
    fit_range = tuple(cfg.method.nora.fit_range)
    before = {k: range_stats(v, fit_range) for k, v in act_inputs(base, x).items()}
    after = {k: range_stats(v, fit_range) for k, v in act_inputs(trained.model, x).items()}
    acc = accuracy(trained.model, x, y)
    with without_update(trained.model, "num") as m:
        no_num = accuracy(m, x, y)
    with without_update(trained.model, "den") as m:
        no_den = accuracy(m, x, y)
    with without_update(trained.model, "all") as m:
        no_nora = accuracy(m, x, y)
    return {
        "run": run_dir.name,
        "seed": int(cfg.seed),
        "fit_range": fit_range,
        "before": before,
        "after": after,
        "coefficients": coefficient_stats(trained.model, {k: (v["p001"], v["p999"]) for k, v in after.items()}),
        "accuracy": acc,
        "without_num_update": no_num,
        "without_den_update": no_den,
        "without_nora_update": no_nora,
        "n_test": int(y.numel()),
    }


# ----------------------------------------------------------------------------- split sizes
def split_sizes(task: str) -> dict[str, int]:
    """Images in the task's training, validation (tuning) and test splits."""

    t = demo_settings()["tasks"][task]
    sizes = {}
    for split in ("test", "validation"):
        cfg = compose(["experiment=demo", f"dataset.eval_split={split}"] + digits_overrides(t))
        train, evaluation, _k = load_vision_dataset(cfg.dataset)
        sizes[f"train ({'all training images' if split == 'test' else 'tuning'})"] = len(train)
        sizes[split] = len(evaluation)
    return sizes


def split_section(sizes: dict[str, int], p: float = 0.7) -> list[str]:
    lines = [
        "### How many images decide a number",
        "",
        f"Binomial standard error of one run's accuracy at {p:.0%} (sqrt(p(1-p)/n), in points): the noise of a "
        "single evaluation, before any seed-to-seed variation.",
        "",
        "| split | images | standard error (points) |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {n} | {100 * (p * (1 - p) / n) ** 0.5:.1f} |" for k, n in sizes.items()]
    return lines + [""]


# ----------------------------------------------------------------------------- learning curves
def learning_curve(run_dir: Path) -> list[float]:
    """The test accuracy after each epoch, from the run's ``metrics.jsonl``; a line that is not a JSON record (a
    torn last line of a copy, an edit) is a :class:`UserError` naming the file and the line."""
    path = RunDir(run_dir).metrics
    recs = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            raise UserError(
                f"{path}, line {i + 1}: not a JSON record ({line[:60]!r}; cut short?); the learning "
                "curve of this complete run cannot be read: remove that line or rerun the run"
            )
        recs.append(rec)
    return [r["eval/accuracy"] for r in recs if "eval/accuracy" in r]


def demo_curves(task_root: Path, methods) -> dict[str, list[list[float]]]:
    """Per method: the test-accuracy curve (after each epoch) of every demo run of it on the task."""
    out = {}
    for method in methods:
        runs = sorted(d for d in task_root.glob(f"{method}_s*") if is_complete(d))
        curves = [learning_curve(r) for r in runs]
        if curves:
            out[method] = curves
    return out


# ----------------------------------------------------------------------------- head-lr experiment
def accuracy_table(jobs: list[dict], n_procs: int, key) -> dict:
    """Run the demo ``jobs`` and return ``{key(job): {seed: final test or validation accuracy}}``."""
    table = {}
    for r in run_jobs(jobs, n_procs):
        table.setdefault(key(r["job"]), {})[r["job"]["seed"]] = r["accuracy"]
    return table


EXPERIMENT_SEEDS = (0, 1, 2, 3, 4)


def head_lrs() -> tuple[float, float]:
    """The demo's shared head lr (the linear probe's tuned lr) and a tenth of it."""
    h = float(learning_rates()["head_lr"])
    return (float(f"{h / 10:.3g}"), h)


def head_lr_experiment(weights: Path, out_root: Path, seeds=EXPERIMENT_SEEDS, n_procs: int = 2) -> dict:
    """NoRA and the linear probe at several head learning rates (validation split of the main task)."""
    task = next(iter(demo_settings()["tasks"]))
    jobs = [
        dict(
            method=m,
            task=task,
            seed=s,
            weights=weights,
            out_root=out_root,
            extra=["dataset.eval_split=validation"],
            name=f"{m}_head{h:g}_s{s}",
            head_lr=h,
            lrs=(None if get_method(m).head_lr else {"lr": h}),  # the probe: the head lr is its lr
        )
        for h in head_lrs()
        for m in HEAD_LR_METHODS
        for s in seeds
    ]
    return accuracy_table(jobs, n_procs, lambda j: (j["method"], j["head_lr"]))


# ----------------------------------------------------------------------------- LP-FT experiment
def probe_backbone(weights: Path, probe_run: Path, out: Path) -> Path:
    """The source backbone with the head of a trained linear-probe run: where LP-FT's second stage starts."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    head = load_file(str(RunDir(probe_run).adapter / FULL_FT_NAME))
    state.update(head)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out


LPFT_VARIANTS = {"head frozen": ["method.train_head=false"], "head at a tenth of the head lr": []}


def lpft_experiment(weights: Path, out_root: Path, head_table: dict, seeds=EXPERIMENT_SEEDS, n_procs: int = 2) -> dict:
    """LP-FT (validation split of the main task): NoRA trained from the linear probe's trained head (the probe
    runs of ``head_lr_experiment`` at the shared head lr), with that head frozen or at a tenth of the head lr.
    Returns per variant the per-seed accuracies, beside the probe's and NoRA's own (from ``head_table``)."""
    task = next(iter(demo_settings()["tasks"]))
    low, h = head_lrs()
    jobs = []
    for s in seeds:
        start = probe_backbone(
            weights,
            out_root / task / f"linear_probe_head{h:g}_s{s}",
            out_root / "lpft_start" / f"probe_s{s}.safetensors",
        )
        for i, extra in enumerate(LPFT_VARIANTS.values()):
            jobs.append(
                dict(
                    method="nora",
                    task=task,
                    seed=s,
                    weights=start,
                    out_root=out_root,
                    head_lr=low,
                    extra=["dataset.eval_split=validation", "model.checkpoint_head=true", *extra],
                    name=f"lpft{i}_nora_s{s}",
                )
            )
    table = {"linear probe": head_table[("linear_probe", h)], "NoRA (new head)": head_table[("nora", h)]}
    variants = list(LPFT_VARIANTS)
    table.update(
        accuracy_table(jobs, n_procs, lambda j: f"LP-FT: NoRA from the probe's head, {variants[int(j['name'][4])]}")
    )
    return table


def lpft_section(table: dict) -> list[str]:
    if not table:
        return []
    probe = table["linear probe"]
    lines = [
        "### LP-FT: NoRA started from the trained linear probe (validation split, main task)",
        "",
        "Stage 1 is the linear probe run at the shared head lr (the row above); stage 2 trains NoRA at its "
        "tuned lr from that head, for the demo's epochs again (so LP-FT has twice the training steps).",
        "",
        "| run | validation accuracy (%) | − linear probe (paired, 95% CI) |",
        "|---|---|---|",
    ]
    for label, accs in table.items():
        diff = "" if accs is probe else paired_difference(accs, probe).fmt()
        lines.append(f"| {label} | {summarize(accs.values()).fmt()} | {diff} |")
    return lines + [""]


def nora_lrs() -> tuple[float, ...]:
    """NoRA's tuned lr and smaller steps (a tenth and about a third of it)."""
    lr = float(learning_rates()["methods"]["nora"]["lr"])
    return (float(f"{lr / 10:.1g}"), float(f"{lr / 3:.1g}"), lr)


def nora_lr_experiment(weights: Path, out_root: Path, seeds=EXPERIMENT_SEEDS, n_procs: int = 2) -> dict:
    """NoRA at smaller learning rates (validation split of the main task): accuracy and how far the update moves."""
    task = next(iter(demo_settings()["tasks"]))
    jobs = [
        dict(
            method="nora",
            task=task,
            seed=s,
            weights=weights,
            out_root=out_root,
            extra=["dataset.eval_split=validation"],
            name=f"nora_lr{lr:g}_s{s}",
            lrs={"lr": lr},
        )
        for lr in nora_lrs()
        for s in seeds
    ]
    run_jobs(jobs, n_procs)
    table = {}
    for lr in nora_lrs():
        for s in seeds:
            a = analyse_run(out_root / task / f"nora_lr{lr:g}_s{s}")
            table.setdefault(lr, []).append(a)
    return table


def nora_lr_section(table: dict) -> list[str]:
    if not table:
        return []
    lines = [
        "### NoRA's learning rate: accuracy and update size (validation split, main task)",
        "",
        "Mean over seeds and layers: relative denominator change, and the largest deviation of a group's curve "
        "from the base curve where the inputs lie.",
        "",
        "| NoRA lr | n | validation accuracy (%) | rel. numerator change | rel. denominator change | "
        "max abs(F - F_base) where inputs lie |",
        "|---|---|---|---|---|---|",
    ]
    for lr, analyses in table.items():
        acc = summarize([a["accuracy"] for a in analyses])
        per = {
            f: summarize([v[f] for a in analyses for v in a["coefficients"].values()]).mean
            for f in ("num_rel", "den_rel", "max_dev_data")
        }
        lines.append(
            f"| {lr:g} | {acc.n} | {acc.fmt()} | {per['num_rel']:.2f} | {per['den_rel']:.2f} | "
            f"{per['max_dev_data']:.2f} |"
        )
    return lines + [""]


# ----------------------------------------------------------------------------- lr stability (test split)
def stability_experiment(weights: Path, demo_root: Path, out_root: Path, n_procs: int = 2) -> dict:
    """LoRA and NoRA++ at their tuned LoRA lr (the demo's own runs) and one step below it on the 1-3-10 ladder, on
    the demo seeds of the main task's *test* split: is a low outlier seed a property of the method or of an lr at
    the edge of stability? Nothing is chosen from these numbers. Returns {(method, lr): {seed: accuracy}}."""
    task = next(iter(demo_settings()["tasks"]))
    table, jobs = {}, []
    for m in STABILITY_METHODS:
        tuned = dict(learning_rates()["methods"][m])
        lower = next_value(tuned["lr"], up=False, ratio=3.0)
        for d in sorted(demo_root.glob(f"{m}_s*")):
            if is_complete(d):
                summary = read_summary(d)
                table.setdefault((m, tuned["lr"]), {})[summary["seed"]] = summary["final_accuracy"]
        jobs += [
            dict(
                method=m,
                task=task,
                seed=s,
                weights=weights,
                out_root=out_root,
                extra=[],
                lrs=dict(tuned, lr=lower),
                name=f"{m}_lr{lower:g}_test_s{s}",
            )
            for s in sorted(table.get((m, tuned["lr"]), {}))
        ]
    table.update(accuracy_table(jobs, n_procs, lambda j: (j["method"], j["lrs"]["lr"])))
    return table


def stability_section(table: dict) -> list[str]:
    if not table:
        return []
    lines = [
        "### LoRA's learning rate: the tuned value and one step below (test split, main task)",
        "",
        "The demo's runs at the tuned lr, and the same seeds one step lower on the 1-3-10 ladder (NoRA++ keeps "
        "its NoRA lr). Measured after the fact, on the test images: nothing is chosen from it.",
        "",
        "| method | LoRA lr | n | test accuracy (%) | lowest seed | seeds below 80% |",
        "|---|---|---|---|---|---|",
    ]
    for (m, lr), accs in sorted(table.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        low = min(accs, key=accs.get)
        lines.append(
            f"| {m} | {lr:g} | {len(accs)} | {summarize(accs.values()).fmt()} | {accs[low]:.1f} (seed {low}) "
            f"| {sum(a < 80 for a in accs.values())} |"
        )
    lrs = sorted({lr for (_m, lr) in table}, reverse=True)
    lines += ["", "| LoRA lr | NoRA++ − LoRA (paired, 95% CI) |", "|---|---|"]
    lines += [
        f"| {lr:g} | {paired_difference(table.get(('nora_pp', lr), {}), table.get(('lora', lr), {})).fmt()} |"
        for lr in lrs
    ]
    return lines + [""]


# ----------------------------------------------------------------------------- the form (test split)
def form_experiment(weights: Path, demo_root: Path, out_root: Path, n_procs: int = 2) -> dict:
    """The demo's rational methods (residual form, nora's default) against the same runs in the paper's form (the
    rational in place of GELU), on the demo seeds of the main task's *test* split: does the exact start change the
    results? Returns {(method, form): {seed: accuracy}}."""
    task = next(iter(demo_settings()["tasks"]))
    table, jobs = {}, []
    for m in FORM_METHODS:
        for d in sorted(demo_root.glob(f"{m}_s*")):
            if is_complete(d):
                summary = read_summary(d)
                table.setdefault((m, "residual"), {})[summary["seed"]] = summary["final_accuracy"]
        jobs += [
            dict(
                method=m,
                task=task,
                seed=s,
                weights=weights,
                out_root=out_root,
                extra=["nora_residual=false"],
                name=f"{m}_paper_form_s{s}",
            )
            for s in sorted(table.get((m, "residual"), {}))
        ]
    table.update(accuracy_table(jobs, n_procs, lambda j: (j["method"], "paper")))
    return table


def form_section(table: dict) -> list[str]:
    if not table:
        return []
    lines = [
        "### The form: residual (the demo's) vs the paper's (test split, main task)",
        "",
        "The demo's runs in the residual form (GELU plus the change of its fitted rational: step 0 is the "
        "backbone) and the same seeds in the paper's form (the fitted rational in place of GELU), same learning "
        "rates; measured on the test images, nothing is chosen from it.",
        "",
        "| method | n | residual (%) | paper's form (%) | residual − paper's (paired, 95% CI) |",
        "|---|---|---|---|---|",
    ]
    for m in FORM_METHODS:
        res, paper = table.get((m, "residual"), {}), table.get((m, "paper"), {})
        if res:
            lines.append(
                f"| {m} | {len(res)} | {summarize(res.values()).fmt()} | {summarize(paper.values()).fmt()} "
                f"| {paired_difference(res, paper).fmt()} |"
            )
    return lines + [""]


# ----------------------------------------------------------------------------- report
def _fmt_range(s: dict) -> str:
    return f"{s['outside']:.1f}% [{s['p001']:+.1f}, {s['p999']:+.1f}]"


def range_section(analyses: list[dict], label: str) -> list[str]:
    a0 = analyses[0]
    lines = [
        f"### {label}: pre-activations vs the fit range {list(a0['fit_range'])} (seed {a0['seed']}, test images)",
        "",
        "Share of MLP pre-activations outside the fit range, and their 0.1 / 99.9 percentiles.",
        "",
        "| layer | before training (source backbone, GELU) | after training |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {_fmt_range(a0['before'][k])} | {_fmt_range(a0['after'][k])} |" for k in a0["before"]]
    return lines + [""]


def coefficient_section(analyses: list[dict], label: str) -> list[str]:
    keys = list(analyses[0]["coefficients"])
    lines = [
        f"### {label}: how far the coefficients and curves moved (mean over {len(analyses)} seeds)",
        "",
        "Relative change of the numerator and denominator coefficient matrices (norm of the update over the norm "
        "of the base coefficients); largest deviation of any group's curve from the base curve where the "
        "layer's inputs lie (their 0.1-99.9 percentile range after training), over the whole fit range, and "
        "mean over groups at |x| = 4 (where no input goes).",
        "",
        "| layer | rel. numerator change | rel. denominator change | max abs(F - F_base) where inputs lie | "
        "max abs(F - F_base) in fit range | abs(F - F_base) at x = ±4 |",
        "|---|---|---|---|---|---|",
    ]
    for k in keys:
        vals = [
            summarize([a["coefficients"][k][f] for a in analyses]).mean
            for f in ("num_rel", "den_rel", "max_dev_data", "max_dev_fit", "mean_dev_at_4")
        ]
        lines.append(f"| {k} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    return lines + [""]


def ablation_section(by_method: dict[str, list[dict]]) -> list[str]:
    lines = [
        "### Which part of the update matters (test accuracy %, mean over seeds; Δ: paired by seed, 95% CI)",
        "",
        "The trained run, and the same run with a part of its NoRA update set to zero (everything else, the head "
        "and for NoRA++ LoRA, as trained).",
        "",
        "| method | n | trained | numerator update removed (Δ) | denominator update removed (Δ) | "
        "whole NoRA update removed (Δ) |",
        "|---|---|---|---|---|---|",
    ]
    for label, analyses in by_method.items():
        full = {a["seed"]: a["accuracy"] for a in analyses}
        cells = [
            paired_difference({a["seed"]: a[k] for a in analyses}, full).fmt()
            for k in ("without_num_update", "without_den_update", "without_nora_update")
        ]
        lines.append(f"| {label} | {len(analyses)} | {summarize(full.values()).fmt()} | " + " | ".join(cells) + " |")
    return lines + [""]


def curves_section(curves: dict[str, list[list[float]]]) -> list[str]:
    if not curves:
        return ["### Learning curves", "", "Not measured: no demo runs with per-epoch evaluation were found.", ""]
    n = max(len(c) for cs in curves.values() for c in cs)
    lines = [
        "### Learning curves (test accuracy % after each epoch, mean over the demo's seeds)",
        "",
        "| method | " + " | ".join(str(e + 1) for e in range(n)) + " |",
        "|---|" + "---|" * n,
    ]
    for m, cs in curves.items():
        means = [summarize([c[e] for c in cs if len(c) > e]).mean for e in range(n)]
        lines.append(f"| {m} | " + " | ".join("" if v is None else f"{v:.0f}" for v in means) + " |")
    return lines + [""]


def head_lr_section(table: dict) -> list[str]:
    if not table:
        return []
    lines = [
        "### Head learning rate (validation split, main task; NoRA at its tuned lr)",
        "",
        "| head lr | linear probe | NoRA | NoRA − linear probe (paired, 95% CI) |",
        "|---|---|---|---|",
    ]
    for h in head_lrs():
        lp, nr = table.get(("linear_probe", h), {}), table.get(("nora", h), {})
        lines.append(
            f"| {h:g} | {summarize(lp.values()).fmt()} | {summarize(nr.values()).fmt()} | "
            f"{paired_difference(nr, lp).fmt()} |"
        )
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/demo")
    ap.add_argument("--out", default="results/demo_diagnosis_measurements.md")
    ap.add_argument("--experiments", action="store_true", help="also run the head-lr, LP-FT and NoRA-lr experiments")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    with user_errors():
        return diagnosis(args)


def diagnosis(args) -> int:
    """``main`` after its arguments: measure, write ``args.out``, print it."""
    one_thread_worker()
    conf = demo_settings()
    task = next(iter(conf["tasks"]))
    root = Path(args.runs) / task
    lines = [
        f"# Digits demo: diagnosis measurements (task `{task}`)",
        "",
        "Written by `python -m nora.demo.diagnosis` from the runs under "
        f"`{args.runs}`; read with [demo_diagnosis.md](demo_diagnosis.md).",
        "",
    ]
    by_method = {}
    for method in MEASURED_METHODS:
        label = get_method(method).label
        dirs = sorted(d for d in root.glob(f"{method}_s*") if is_complete(d))
        if not dirs:
            continue
        by_method[label] = [analyse_run(d) for d in dirs]
        lines += range_section(by_method[label], label) + coefficient_section(by_method[label], label)
    if by_method:
        lines += ablation_section(by_method)
    lines += split_section(split_sizes(task))
    lines += curves_section(demo_curves(root, conf["methods"]))
    if args.experiments:
        weights = pretrain_source(Path(args.runs))
        out_root = Path(str(args.runs) + "_diagnosis")
        heads = head_lr_experiment(weights, out_root, n_procs=args.jobs)
        lines += head_lr_section(heads)
        lines += lpft_section(lpft_experiment(weights, out_root, heads, n_procs=args.jobs))
        lines += nora_lr_section(nora_lr_experiment(weights, out_root, n_procs=args.jobs))
        lines += stability_section(stability_experiment(weights, root, out_root, n_procs=args.jobs))
        lines += form_section(form_experiment(weights, root, out_root, n_procs=args.jobs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines).rstrip("\n") + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
