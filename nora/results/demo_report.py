"""The offline digits demo's tables (``results/demo.md``/``.csv``): one section per target task, the paired
differences NoRA − linear probe and NoRA++ − LoRA, and a summary across tasks. Not a CIFAR or LLaMA result.
The shared report model and formatting helpers are :mod:`nora.results.tables`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from nora.app.config import CONFIG_DIR
from nora.results import paper
from nora.results.collect import Collection, Run, collect
from nora.results.stats import paired_difference, summarize
from nora.results.tables import (
    CI_NOTE,
    Report,
    Section,
    by_seed,
    diff_fields,
    fmt_int,
    fmt_share,
    method_label,
    num,
    ordered_methods,
    params_of,
    stats_fields,
    vision_row_cells,
)

# the two questions the demo exists to answer: does NoRA add anything to the probe it sits on, and NoRA++ to LoRA
DEMO_PAIRS = (("nora", "linear_probe"), ("nora_pp", "lora"))
DEMO_REFERENCE = "full"  # each task's Δ column is to it


DEMO_SETTINGS = CONFIG_DIR / "demo" / "demo.yaml"


def demo_settings() -> dict:
    """What the demo is (``configs/demo/demo.yaml`` as plain containers): source task, pretraining, target tasks
    with their seeds, methods. The demo runs it (:mod:`nora.demo.runner`); the reports group runs by its tasks."""
    return OmegaConf.to_container(OmegaConf.load(DEMO_SETTINGS), resolve=True)


def demo_task(r: Run, tasks: dict) -> str | None:
    """The demo task (configs/demo/demo.yaml) a test-split run belongs to, by its classes and transform."""
    d = r.config.get("dataset") or {}
    if r.dataset != "digits_target" or d.get("eval_split", "test") != "test":
        return None
    return next(
        (
            name
            for name, t in tasks.items()
            if list(d.get("classes") or []) == list(t["classes"]) and d.get("transform", "none") == t["transform"]
        ),
        None,
    )


def _demo_task_section(name: str, task: dict, runs: Sequence[Run], methods: Sequence[str], reference: str) -> Section:
    ref = by_seed([r for r in runs if r.method == reference], lambda r: r.accuracy)
    rows, csv_rows = [], []
    for m in methods:
        mine = [r for r in runs if r.method == m]
        s, d, cells = vision_row_cells(mine, ref if ref else None, m == reference)
        trainable, pct = params_of(mine)
        t = summarize([r.summary.get("wall_time_s") for r in mine])
        rows.append(
            [
                method_label(m),
                *cells,
                fmt_int(trainable),
                fmt_share(pct),
                "missing" if t.mean is None else f"{t.mean:.1f}",
            ]
        )
        csv_rows.append(
            {
                "task": name,
                "method": m,
                "n": s.n,
                **stats_fields("accuracy", s),
                **diff_fields(f"delta_vs_{reference}", d),
                "trainable": trainable,
                "share_percent": num(pct, 6),
                "time_per_run_s": num(t.mean, 2),
            }
        )
    epochs = sorted({r.summary.get("epochs") for r in runs if r.summary.get("epochs") is not None})
    heading = (
        f"Task `{name}`: {task.get('description', '')} (digits {task['classes']}, transform "
        f"`{task['transform']}`; {'/'.join(map(str, epochs)) or '?'} epochs)"
    )
    cols = [
        "method",
        "n",
        "accuracy (%)",
        f"Δ vs {method_label(reference)} (95% CI)",
        "trainable params",
        "share",
        "time / run (s)",
    ]
    return Section(heading, cols, rows, csv_rows)


def _demo_pairs_section(by_task: dict[str, list[Run]]) -> Section:
    rows, csv_rows = [], []
    for name, runs in by_task.items():
        cells = []
        for a, b in DEMO_PAIRS:
            d = paired_difference(
                by_seed([r for r in runs if r.method == a], lambda r: r.accuracy),
                by_seed([r for r in runs if r.method == b], lambda r: r.accuracy),
            )
            cells.append(d.fmt())
            csv_rows.append({"task": name, "method": a, **diff_fields(f"delta_vs_{b}", d)})
        rows.append([f"`{name}`", *cells])
    cols = ["task"] + [f"{method_label(a)} − {method_label(b)} (95% CI)" for a, b in DEMO_PAIRS]
    note = (
        "Each cell: the per-seed differences in test accuracy (points), paired by seed (same backbone, same data "
        "order, same head initialisation), their mean and t-based 95% interval. An interval that contains 0 "
        "means these seeds cannot tell the two methods apart on that task."
    )
    return Section("Paired differences: NoRA − linear probe and NoRA++ − LoRA", cols, rows, csv_rows, [note])


def _demo_summary_section(by_task: dict[str, list[Run]], methods: Sequence[str]) -> Section:
    rows = []
    for m in methods:
        cells = []
        for runs in by_task.values():
            s = summarize(by_seed([r for r in runs if r.method == m], lambda r: r.accuracy).values())
            cells.append(s.fmt(1) + (f" (n={s.n})" if s.n else ""))
        trainable, _pct = params_of([r for runs in by_task.values() for r in runs if r.method == m])
        rows.append([method_label(m), fmt_int(trainable), *cells])
    return Section(
        "Summary across tasks (test accuracy %, mean ± std over seeds)",
        ["method", "trainable params"] + [f"`{t}`" for t in by_task],
        rows,
        [],
    )


def demo_report(
    col: Collection,
    methods: Sequence[str] | None = None,
    reference: str = DEMO_REFERENCE,
    source: str = "runs/demo",
    tasks: dict | None = None,
    full: bool = False,
) -> Report:
    """results/demo.md (``full``: results/demo_full/demo.md, make demo-full's): one section per target task, the
    paired differences, a summary across tasks."""
    if tasks is None:
        tasks = demo_settings()["tasks"]
    by_task = {name: [r for r in col.runs if demo_task(r, tasks) == name] for name in tasks}
    runs = [r for rs in by_task.values() for r in rs]
    methods = list(methods) if methods else ordered_methods(r.method for r in runs)
    sections = [_demo_task_section(name, tasks[name], rs, methods, reference) for name, rs in by_task.items()]
    sections += [_demo_pairs_section(by_task), _demo_summary_section(by_task, methods)]
    up = "../" if full else ""  # results/demo_full/ links back to results/
    intro = [
        (
            "**Offline digits demo, not a CIFAR or LLaMA result.** A small ViT is pretrained here on upright "
            "scikit-learn digits 0-4 (the source) and fine-tuned with each method on three target tasks with "
            "different kinds of shift (configs/demo/demo.yaml); see `nora/demo.py`. Produced by "
            + (
                "`make demo-full` (`python -m nora.demo --full`: each task's `full_seeds`; `make demo` runs fewer, "
                "results/demo.md)"
                if full
                else "`make demo` (`python -m nora.demo`; `make demo-full` runs more seeds, results/demo_full/)"
            )
            + ". Learning rates: `configs/demo/learning_rates.yaml`, tuned on a "
            f"validation split (`{up}demo_lr_sweep.md`). What limits NoRA here, measured: "
            f"[demo_diagnosis.md]({up}demo_diagnosis.md)."
        ),
        (
            "Accuracy: final test accuracy (%), mean ± std over seeds. "
            + CI_NOTE.replace("the reference", f"{method_label(reference)}")
        ),
        (f"For scale only: the paper's CIFAR numbers ({paper.TABLE1_NOTE}) are not comparable to these tasks."),
    ]
    return Report(
        "demo",
        "Offline demo: fine-tuning on scikit-learn digits (CPU)" + (", more seeds" if full else ""),
        intro,
        sections,
        runs,
        [source],
        make="make demo-full" if full else "make demo",
    )


def render_demo_table(
    root: str | Path,
    out: str | Path | None = None,
    methods: list[str] | None = None,
    reference: str = DEMO_REFERENCE,
    tasks: dict | None = None,
) -> str:
    """Markdown tables of the digits demo; writes ``out`` and the CSV beside it."""
    report = demo_report(collect(root), methods, reference, source=str(root), tasks=tasks)
    text = report.markdown()
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".csv").write_text(report.csv())
    return text
