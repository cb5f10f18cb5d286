"""Render everything in results/ from whatever runs exist (``make tables``): tables, figures, analyses, index.

Sources (relative to the runs root, ``runs/`` by default)::

    demo/        the offline digits demo (make demo)            -> demo.md, demo_subspace.md, figures/demo_*.png
    table1/      sweeps/table1.yaml (+ matched_vit arms)        -> table1.md, figures/table1_*.png
    table2/      sweeps/table2.yaml (+ matched_llama arms)      -> table2.md, figures/table2_*.png
    eval/        base-model MMLU evaluations (eval.py model=..) -> table2.md's base row
    ablations/   sweeps/ablation_*.yaml                          -> ablations.md, ablations_subspace.md,
                                                                    figures/ablations_*.png
    table1/ + table2/                                           -> matched_budget.md
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from nora.adapter.curves import activation_figure
from nora.methods import get_method
from nora.methods.registry import methods_using
from nora.results import figures, paper
from nora.results.collect import Collection, Run, collect
from nora.results.demo_llm_report import demo_llm_runs, demo_llm_settings, render_demo_llm
from nora.results.demo_report import demo_report, demo_settings, demo_task
from nora.results.stats import summarize
from nora.results.subspace import METRICS, MethodAnalysis, analyse_method, identical_methods, summary_rows
from nora.results.tables import (
    ABLATION_DATASET,
    ABLATION_DEFAULTS,
    ABLATION_MODEL,
    ABLATION_VARIANTS,
    DATASET_LABEL,
    TABLE1_DATASETS,
    TABLE1_METHODS,
    TABLE2_DATASETS,
    TABLE2_METHODS,
    Report,
    Section,
    ablation_report,
    at_setting,
    by_seed,
    duplicate_notes,
    matched_report,
    method_label,
    ordered_methods,
    table1_low_budget_report,
    table1_report,
    table2_report,
)
from nora.runs.layout import RunDir

SUBSPACE_METHODS = ("nora", "rational_ft", "zero_init_ft", "nora_pp")  # the subspace analyses' methods, in order
SUBSPACE_REFERENCE = "nora"  # the demo's subspace report needs it and one of the contrasts
SUBSPACE_CONTRASTS = ("rational_ft", "zero_init_ft")


# ----------------------------------------------------------------------------- subspace report
def _g(v, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}g}"


def _ms(mean, std, digits: int = 3) -> str:
    if mean is None:
        return "missing"
    return _g(mean, digits) if std is None else f"{_g(mean, digits)} ± {_g(std, 2)}"


def subspace_report(
    name: str, title: str, where: str, analyses: Sequence[MethodAnalysis], runs: list[Run], source: str
) -> Report:
    rows, csv_rows = [], []
    for a in analyses:
        for row in summary_rows(a):
            cells = [method_label(a.method), row["layer"], str(row["n"])]
            cells += [_ms(row[f"{k}_mean"], row[f"{k}_std"]) for k, _l in METRICS]
            cells += [_g(row["cross_seed_cos_coef"]), _g(row["cross_seed_cos_function"])]
            rows.append(cells)
            csv_rows.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    columns = [
        "method",
        "layer",
        "n",
        "‖Δ‖_F (coefficients)",
        "effective rank of Δ",
        "energy in top-3 σ",
        "RMS F−F_base (fit range)",
        "relative to RMS F_base",
        "cos across seeds (coefficients)",
        "cos across seeds (function)",
    ]
    intro = [
        where,
        (
            "Per replaced activation, from the saved adapters alone: Δ = the G x 10 matrix of per-group "
            "coefficient updates (numerator a0..a5, denominator b1..b4) relative to the frozen base rational. "
            "‖Δ‖_F: its Frobenius norm; effective rank: exp(entropy) of its normalised singular values "
            "(1 to G); energy in top-3 σ: share of Σσ² in the three largest (NoRA's rank r = 3 bounds the "
            "numerator's and the denominator's update to rank 3 each); RMS F−F_base: the change of the "
            "activation function itself, RMS over the groups and an even grid of the fit range; cosines: the "
            "update's direction compared across seeds (mean over seed pairs), in coefficient and in function "
            'space. Mean ± std over seeds; "all layers" averages the layers of each seed first. Method details '
            "in `nora/results/subspace.py`."
        ),
        f"The claim under test ({paper.SOURCE}): {paper.SUBSPACE_NOTE}.",
    ]
    notes = [IDENTICAL_NOTE.format(a=method_label(x), b=method_label(y)) for x, y in identical_methods(analyses)]
    sec = Section(None, columns, rows, csv_rows, notes)
    return Report(name, title, intro, [sec], runs, [source], make=None)


IDENTICAL_NOTE = (
    "**{a} and {b} learnt identical updates in every run here** (per-seed coefficient updates equal "
    "to 1e-6), so their rows coincide: training the coefficients c from c_base and training δ from 0 "
    "with c = c_base + δ give the same gradients, and without weight decay on these parameters the "
    "optimizer takes the same steps. The two ablations differ only if something acts on the "
    "parameter's value, e.g. weight decay, which pulls c toward 0 but δ toward 0, i.e. c toward c_base."
)


def _by_seed_dirs(runs: Sequence[Run]) -> list[Path]:
    return [r.dir for r in sorted(runs, key=lambda r: (r.seed if r.seed is not None else 1 << 30, str(r.dir)))]


def _first_seed(runs: Sequence[Run]) -> Run | None:
    return min(runs, key=lambda r: (r.seed if r.seed is not None else 1 << 30, str(r.dir))) if runs else None


def _activation_figure(runs: Sequence[Run], path: Path, title) -> list[Path]:
    """The learned activations of the first seed among ``runs`` (``title(run)`` on top); none without runs."""
    run = _first_seed(runs)
    f = activation_figure(RunDir(run.dir).adapter, path, title(run)) if run is not None else None
    return [f] if f else []


def _points(runs: Sequence[Run], methods: Sequence[str], metric) -> list[figures.Point]:
    pts = []
    for m in methods:
        mine = [r for r in runs if r.method == m]
        vals = by_seed(mine, metric)
        s = summarize(vals.values())
        params = next((r.trainable for r in mine if r.trainable), None)
        if s.n and params:
            pts.append(figures.Point(method_label(m), int(params), s.mean, s.std, s.n))
    return pts


# ----------------------------------------------------------------------------- per source
def render_demo(
    col: Collection,
    out: Path,
    source: str,
    methods: Sequence[str] | None = None,
    seeds: dict[str, int] | None = None,
    full: bool = False,
) -> dict:
    """The demo's tables and figures in ``out`` from the runs of ``col`` with seed below ``seeds[task]`` (default:
    each task's ``seeds`` in configs/demo/demo.yaml, what ``make demo`` runs; ``make demo-full`` passes its
    ``full_seeds`` and ``full``): the two share one runs directory, and ``results/demo.md`` never takes in
    demo-full's extra seeds."""
    made = {"tables": [], "figures": []}
    tasks = demo_settings()["tasks"]
    n_seeds = seeds or {t: conf["seeds"] for t, conf in tasks.items()}
    col = dataclasses.replace(
        col,
        runs=[
            r for r in col.runs if (t := demo_task(r, tasks)) is None or r.seed is None or r.seed < n_seeds.get(t, 0)
        ],
    )
    report = demo_report(col, methods, source=source, tasks=tasks, full=full)
    made["tables"] += report.write(out)
    if not report.runs:
        return made
    label = "digits demo (CPU), not CIFAR/LLaMA"
    methods_present = ordered_methods(r.method for r in report.runs)
    by_task = {t: [r for r in report.runs if demo_task(r, tasks) == t] for t in tasks}
    f = figures.accuracy_vs_params(
        {f"task {t}": _points(rs, methods_present, lambda r: r.accuracy) for t, rs in by_task.items() if rs},
        out / "figures" / "demo_accuracy_vs_params.png",
        f"Accuracy vs trainable parameters: {label}",
    )
    made["figures"] += [f] if f else []
    main_task = next(iter(tasks))  # the activation figures and the subspace analysis: the first (main) task
    runs = by_task[main_task]
    for m in methods_using("uses_nora"):  # the methods with rational activations
        made["figures"] += _activation_figure(
            [r for r in runs if r.method == m],
            out / "figures" / f"demo_activations_{m}.png",
            lambda run, m=m: (
                f"{method_label(m)}: learned activations per layer and group, task {main_task}, seed "
                f"{run.seed} ({label}); shaded: fit range"
            ),
        )
    analyses = [analyse_method(m, _by_seed_dirs([r for r in runs if r.method == m])) for m in SUBSPACE_METHODS]
    analyses = [a for a in analyses if a is not None]
    have = {a.method for a in analyses}
    if set(SUBSPACE_CONTRASTS) & have and SUBSPACE_REFERENCE in have:
        used = [r for r in runs if r.method in have]
        rep = subspace_report(
            "demo_subspace",
            "Functional subspace of the coefficient updates: digits demo",
            "**Offline digits demo (CPU), not a CIFAR or LLaMA result** (`runs/demo`).",
            analyses,
            used,
            source,
        )
        made["tables"] += rep.write(out)
        f = figures.subspace_figure(
            analyses,
            out / "figures" / "demo_subspace.png",
            f"Coefficient updates of NoRA vs rational FT vs zero-init FT: {label}",
        )
        made["figures"] += [f] if f else []
    return made


def render_table1(col: Collection, out: Path, source: str) -> dict:
    report = table1_report(col, source=source)
    made = {"tables": report.write(out), "figures": []}
    runs = report.runs
    panels = {
        DATASET_LABEL[ds]: _points(
            [r for r in runs if r.dataset == ds], ordered_methods(r.method for r in runs), lambda r: r.accuracy
        )
        for ds in TABLE1_DATASETS
    }
    f = figures.accuracy_vs_params(
        panels,
        out / "figures" / "table1_accuracy_vs_params.png",
        "ViT-Tiny: accuracy vs trainable parameters (Table 1 runs)",
    )
    made["figures"] += [f] if f else []
    for ds in TABLE1_DATASETS:
        for m in (m for m in TABLE1_METHODS if get_method(m).uses_nora):
            made["figures"] += _activation_figure(
                [r for r in runs if r.dataset == ds and r.method == m],
                out / "figures" / f"table1_activations_{m}_{ds}.png",
                lambda run, m=m, ds=ds: (
                    f"{method_label(m)} on ViT-Tiny / {DATASET_LABEL[ds]}, seed {run.seed}: "
                    "learned activations per layer and group; shaded: fit range"
                ),
            )
    return made


def render_table2(col: Collection, out: Path, source: str, eval_source: str = "runs/eval") -> dict:
    report = table2_report(col, source=source, eval_source=eval_source)
    made = {"tables": report.write(out), "figures": []}
    runs = [r for r in report.runs if r.mmlu]
    panels = {
        DATASET_LABEL[ds]: _points(
            [r for r in runs if r.dataset == ds], TABLE2_METHODS, lambda r: r.mmlu_accuracy(None)
        )
        for ds in TABLE2_DATASETS
    }
    f = figures.accuracy_vs_params(
        panels,
        out / "figures" / "table2_mmlu_vs_params.png",
        "LLaMA-3-8B: MMLU average vs trainable parameters (Table 2 runs)",
        ylabel="MMLU average (%)",
    )
    made["figures"] += [f] if f else []
    for ds in TABLE2_DATASETS:
        for m in (m for m in TABLE2_METHODS if get_method(m).uses_nora):
            made["figures"] += _activation_figure(
                [r for r in report.runs if r.dataset == ds and r.method == m],
                out / "figures" / f"table2_activations_{m}_{ds}.png",
                lambda run, m=m, ds=ds: (
                    f"{method_label(m)} on LLaMA-3-8B / {DATASET_LABEL[ds]}, seed {run.seed}: learned SiLU "
                    "rationals (12 of 32 layers); shaded: fit range"
                ),
            )
    return made


def render_ablations(
    col: Collection, ref: Collection, out: Path, source: str, reference_source: str = "runs/table1"
) -> dict:
    report = ablation_report(col, ref, source=source, reference_source=reference_source)
    made = {"tables": report.write(out), "figures": []}
    others = {k: v for k, v in ABLATION_DEFAULTS.items() if k != "method"}
    variant_runs = [
        r
        for r in col.runs
        if r.model == ABLATION_MODEL
        and r.dataset == ABLATION_DATASET
        and r.method in ABLATION_VARIANTS
        and all(at_setting(r, k, v) for k, v in others.items())
    ]
    analyses = [
        analyse_method(m, _by_seed_dirs([r for r in variant_runs if r.method == m]))
        for m in SUBSPACE_METHODS
        if m in ABLATION_VARIANTS
    ]
    analyses = [a for a in analyses if a is not None]
    if len(analyses) >= 2:
        rep = subspace_report(
            "ablations_subspace",
            "Functional subspace of the coefficient updates: ViT-Tiny / CIFAR-100",
            "ViT-Tiny on CIFAR-100, the variant ablation's runs (`runs/ablations`).",
            analyses,
            [r for r in variant_runs if r.method in {a.method for a in analyses}],
            source,
        )
        made["tables"] += rep.write(out)
        f = figures.subspace_figure(
            analyses,
            out / "figures" / "ablations_subspace.png",
            "Coefficient updates of NoRA vs rational FT vs zero-init FT: ViT-Tiny / CIFAR-100",
        )
        made["figures"] += [f] if f else []
    return made


# ----------------------------------------------------------------------------- everything
INDEX = (
    ("demo", "Offline digits demo (CPU; not a CIFAR or LLaMA result)", "make demo"),
    (
        "demo_full/demo",
        "The digits demo with more seeds on every task (results/demo_full/: tables and figures)",
        "make demo-full",
    ),
    (
        "demo_subspace",
        "Functional-subspace analysis of the digits demo's NoRA / rational FT / zero-init FT runs",
        "make demo (with rational_ft and zero_init_ft among its methods)",
    ),
    (
        "demo_diagnosis",
        "What limits NoRA in the digits demo, measured (pre-activation ranges, coefficient "
        "movement, update ablations, learning curves, head lr, LP-FT, NoRA's and LoRA's lr; raw tables in "
        "demo_diagnosis_measurements.md)",
        "python -m nora.demo.diagnosis --experiments",
    ),
    (
        "demo_llm",
        "Offline LLM demo: a small LLaMA pretrained here on a generated world, instruction-tuned with every "
        "LLM method through train.py, scored by eval.py on MMLU-layout questions (CPU; not an MMLU result)",
        "make demo",
    ),
    ("demo_llm_full/demo_llm", "The LLM demo with more seeds (results/demo_llm_full/)", "make demo-full"),
    ("demo_llm_lr_sweep", "The LLM demo's learning-rate sweep (val/ questions)", "python -m nora.demo.llm --tune"),
    (
        "demo_llm_diagnosis",
        "What the LLM demo's numbers do and do not show (gate pre-activation ranges, the NoRA part "
        "of NoRA++, calibrated vs fit init)",
        "python -m nora.demo.llm --diagnose",
    ),
    ("table1", "Table 1: ViT-Tiny on CIFAR-10/100, six methods", "make table1"),
    (
        "table1_low_budget",
        "Table 1, low budget: NoRA vs BitFit, LN tuning, (IA)3, VeRA on ViT-Tiny/CIFAR",
        "make table1",
    ),
    ("table2", "Table 2: LLaMA-3-8B on Alpaca/OpenOrca, MMLU per category", "make table2"),
    ("ablations", "Ablations: variant, rank, groups, denominator form, numerator, initialisation", "make ablations"),
    ("ablations_subspace", "Functional-subspace analysis on ViT-Tiny/CIFAR-100", "make ablations"),
    (
        "matched_budget",
        "Matched budget: NoRA++ vs LoRA/DoRA at bracketing ranks",
        "python train.py -m --config-dir sweeps --config-name matched_vit (or matched_llama)",
    ),
)


FIGURE_SOURCES = {
    "demo_llm": "offline LLM demo (CPU), not an MMLU or LLaMA-3 result",
    "demo": "offline digits demo (CPU), not a CIFAR or LLaMA result",
    "table1": "ViT-Tiny on CIFAR (Table 1 runs)",
    "table2": "LLaMA-3-8B (Table 2 runs)",
    "ablations": "ViT-Tiny on CIFAR-100 (ablation runs)",
}
FIGURE_KINDS = {
    "accuracy_vs_params": "accuracy (mean ± std over seeds) against trainable parameters",
    "mmlu_vs_params": "MMLU average (mean ± std over seeds) against trainable parameters",
    "activations": "learned activation curves per layer and group against the original activation and "
    "the fitted base rational (top), and each group's change (bottom), lowest seed",
    "subspace": "coefficient-update norm, singular values, function-space change and cross-seed "
    "direction per layer for NoRA vs rational FT vs zero-init FT",
}


def figure_caption(stem: str) -> str:
    source = next((v for k, v in FIGURE_SOURCES.items() if stem.startswith(k + "_")), "")
    kind = next((v for k, v in FIGURE_KINDS.items() if k in stem), stem)
    detail = stem.split("activations_", 1)[1] if "activations_" in stem else ""
    return f"{kind}{f' ({detail})' if detail else ''}; {source}" if source else kind


def write_index(out: Path, made: dict) -> Path:
    lines = [
        "# results/",
        "",
        "Generated by `make tables` (`python -m nora.results tables`) from the run directories under `runs/` "
        "(their `summary.json`, `config.yaml`, `mmlu.json` and saved adapters; nothing is re-trained). Each "
        "table's header names the runs behind it (config hash, date, hardware). Missing runs show as "
        '"missing", never as zeros. Only the digits demo runs on a CPU without network; the other tables '
        "stay empty until their sweeps have run (see `sweeps/README.md`).",
        "",
        "## Tables",
        "",
        "| file | what | runs from |",
        "|---|---|---|",
    ]
    for stem, what, how in INDEX:
        md = out / f"{stem}.md"
        if md.exists():
            csv = f" ([csv]({stem}.csv))" if (out / f"{stem}.csv").exists() else ""
            lines.append(f"| [{stem}.md]({stem}.md){csv} | {what} | `{how}` |")
        else:
            lines.append(f"| {stem}.md (not generated yet) | {what} | `{how}` |")
    figs = sorted((out / "figures").glob("*.png")) if (out / "figures").exists() else []
    lines += ["", "## Figures", ""]
    if figs:
        for p in figs:
            lines += [f"**{p.name}**: {figure_caption(p.stem)}", "", f"![{p.stem}](figures/{p.name})", ""]
    else:
        lines.append("none yet")
    others = sorted(
        p.name
        for p in out.glob("*")
        if p.is_file() and p.name != "README.md" and p.stem not in {s for s, _w, _h in INDEX}
    )
    if others:
        lines += ["", "## Other files", "", *[f"- [{n}]({n})" for n in others]]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def render_all(
    runs: str | Path = "runs", out: str | Path = "results", demo_methods: Sequence[str] | None = None
) -> dict:
    runs, out = Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = {"tables": [], "figures": []}

    def add(d):
        for k in made:
            made[k] += d.get(k, [])

    t1 = collect(runs / "table1")
    t2 = collect(runs / "table2", runs / "eval")
    demo = collect(runs / "demo")
    add(render_demo(demo, out, str(runs / "demo"), demo_methods))

    tasks = demo_settings()["tasks"]
    if any((t := demo_task(r, tasks)) and r.seed is not None and r.seed >= tasks[t]["seeds"] for r in demo.runs):
        # make demo-full's extra seeds exist: its report too, in its own directory
        render_demo(
            demo,
            out / "demo_full",
            str(runs / "demo"),
            demo_methods,
            seeds={t: c["full_seeds"] for t, c in tasks.items()},
            full=True,
        )
    llm, conf = collect(runs / "demo_llm"), demo_llm_settings()
    add(render_demo_llm(llm, out, str(runs / "demo_llm"), conf["methods"], conf["seeds"]))
    if any(r.seed is not None and r.seed >= conf["seeds"] for r in demo_llm_runs(llm, conf["full_seeds"])):
        render_demo_llm(
            llm, out / "demo_llm_full", str(runs / "demo_llm"), conf["methods"], conf["full_seeds"], full=True
        )
    add(render_table1(t1, out, str(runs / "table1")))
    made["tables"] += table1_low_budget_report(t1, source=str(runs / "table1")).write(out)
    add(render_table2(t2, out, str(runs / "table2"), str(runs / "eval")))
    ablations = collect(runs / "ablations")
    add(render_ablations(ablations, t1, out, str(runs / "ablations"), str(runs / "table1")))
    rep = matched_report(t1, t2, sources=(str(runs / "table1"), str(runs / "table2")))
    made["tables"] += rep.write(out)
    made["index"] = write_index(out, made)
    made["duplicates"] = duplicate_notes([r for c in (demo, llm, t1, t2, ablations) for r in c.runs])
    return made
