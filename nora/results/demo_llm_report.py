"""The offline LLM demo's tables and figures (``results/demo_llm.md``/``.csv``, ``results/figures/demo_llm_*``):
per-method accuracy on the world's held-out four-choice questions (overall, STEM, knowledge) scored by eval.py, the
base model's row, the paired differences NoRA++ − LoRA and NoRA++ − DoRA. Not an MMLU or LLaMA-3 result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from nora.adapter.curves import activation_figure
from nora.app.config import CONFIG_DIR
from nora.methods.registry import methods_using
from nora.results import figures
from nora.results.collect import Collection, Run, mmlu_accuracy
from nora.results.stats import difference_to_constant, paired_difference, summarize
from nora.results.tables import (
    Report,
    Section,
    by_seed,
    diff_fields,
    fmt_int,
    fmt_share,
    method_label,
    num,
    params_of,
    stats_fields,
)

DEMO_LLM_SETTINGS = CONFIG_DIR / "demo" / "demo_llm.yaml"
CATEGORIES = ("STEM", "knowledge")  # nora/data/world.py SUBJECTS
PAIRS = (("nora_pp", "lora"), ("nora_pp", "dora"))
MODEL = "llama_demo"


def demo_llm_settings(path: str | Path | None = None) -> dict:
    """configs/demo/demo_llm.yaml (or ``path``) as plain containers: world, backbone, pretraining, methods, seeds,
    evaluation."""
    return OmegaConf.to_container(OmegaConf.load(path or DEMO_LLM_SETTINGS), resolve=True)


def _acc(cat: str | None):
    return lambda r: mmlu_accuracy(r.mmlu, cat)


def demo_llm_runs(col: Collection, n_seeds: int) -> list[Run]:
    """The demo's scored runs: the demo model, seeds below ``n_seeds``, evaluated on ``test/``."""
    return [
        r
        for r in col.runs
        if r.model == MODEL and r.seed is not None and r.seed < n_seeds and r.mmlu and r.mmlu.get("split") == "test"
    ]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def demo_llm_report(
    col: Collection,
    methods: Sequence[str],
    n_seeds: int,
    source: str,
    backbone: Path | None,
    data: Path | None,
    full: bool = False,
    conf: dict | None = None,
) -> Report:
    runs = demo_llm_runs(col, n_seeds)
    base = next((b for b in col.base_evals if b.dir.name == "base" and b.mmlu.get("split") == "test"), None)
    cats = (None, *CATEGORIES)
    rows, csv_rows = [], []
    if base is not None:
        rows.append(
            ["base model (no tuning)", "1", *(f"{mmlu_accuracy(base.mmlu, c):.1f}" for c in cats), "—", "0", "0%", "—"]
        )
        csv_rows.append(
            {"method": "base", "n": 1, **{f"{c or 'overall'}_mean": num(mmlu_accuracy(base.mmlu, c)) for c in cats}}
        )
    base_overall = mmlu_accuracy(base.mmlu, None) if base else None
    for m in methods:
        mine = [r for r in runs if r.method == m]
        stats = {c: summarize(by_seed(mine, _acc(c)).values()) for c in cats}
        d = difference_to_constant(by_seed(mine, _acc(None)), base_overall)
        trainable, pct = params_of(mine)
        t = summarize([r.summary.get("wall_time_s") for r in mine])
        rows.append(
            [
                method_label(m),
                str(stats[None].n),
                *(stats[c].fmt(1) for c in cats),
                d.fmt(1),
                fmt_int(trainable),
                fmt_share(pct),
                "missing" if t.mean is None else f"{t.mean:.1f}",
            ]
        )
        csv_rows.append(
            {
                "method": m,
                "n": stats[None].n,
                **{k: v for c in cats for k, v in stats_fields(c or "overall", stats[c]).items()},
                **diff_fields("delta_vs_base", d),
                "trainable": trainable,
                "share_percent": num(pct, 6),
                "time_per_run_s": num(t.mean, 2),
            }
        )
    cols = [
        "method",
        "n",
        "overall (%)",
        "STEM (%)",
        "knowledge (%)",
        "Δ overall vs base (95% CI)",
        "trainable params",
        "share",
        "time / run (s)",
    ]
    main = Section(
        "Accuracy on the held-out questions (test/, 5-shot, eval.py)",
        cols,
        rows,
        csv_rows,
        [
            "Accuracy (%): mean ± std over seeds of eval.py's `mmlu.json` (micro-averaged over questions; STEM = "
            "arithmetic + units, knowledge = facts + relations). Chance is 25%. Δ vs base: the per-seed difference to "
            "the base model's single evaluation, t-based 95% interval over seeds. Time: training only "
            "(`summary.json`), "
            "not the evaluation."
        ],
    )
    pair_rows, pair_csv = [], []
    for a, b in PAIRS:
        cells = []
        for c in cats:
            d = paired_difference(
                by_seed([r for r in runs if r.method == a], _acc(c)),
                by_seed([r for r in runs if r.method == b], _acc(c)),
            )
            cells.append(d.fmt(1))
            pair_csv.append({"method": a, "versus": b, "category": c or "overall", **diff_fields(f"delta_vs_{b}", d)})
        pair_rows.append([f"{method_label(a)} − {method_label(b)}", *cells])
    pairs = Section(
        "Paired differences (points; the paper's claim is NoRA++ > LoRA, most on STEM)",
        ["pair", "overall", "STEM", "knowledge"],
        pair_rows,
        pair_csv,
        [
            "Each cell: per-seed differences paired by seed (same backbone, same data order), mean and "
            "t-based 95% interval. An interval that contains 0 means these seeds cannot tell the two "
            "apart."
        ],
    )
    subjects = sorted({s for r in runs for s in (r.mmlu.get("subjects") or {})})
    sub_rows = []
    for m in methods:
        mine = [r for r in runs if r.method == m]
        cells = []
        for s in subjects:
            vals = [100 * r.mmlu["subjects"][s]["accuracy"] for r in mine if s in (r.mmlu.get("subjects") or {})]
            cells.append(summarize(vals).fmt(1))
        sub_rows.append([method_label(m), *cells])
    if base is not None and subjects:
        sub_rows.insert(
            0,
            [
                "base model",
                *(
                    f"{100 * base.mmlu['subjects'][s]['accuracy']:.1f}"
                    if s in base.mmlu.get("subjects", {})
                    else "missing"
                    for s in subjects
                ),
            ],
        )
    per_subject = Section("Per subject (%)", ["method", *subjects], sub_rows, [])
    if runs and (backbone is None or data is None):  # what the runs were trained from (their config.yaml)
        cfg = runs[0].config
        backbone = backbone or Path(str((cfg.get("model") or {}).get("path") or "."))
        data = data or Path(str((cfg.get("data") or {}).get("path") or "./x")).parent
    pre = _read(backbone / "pretraining.json") if backbone else {}
    world = _read(data / "DONE") if data else {}
    conf = conf or demo_llm_settings()
    n_test = sum((world.get("mmlu") or {}).get("test", {}).values()) if world else None
    k, made_by = (
        conf["eval"]["k"],
        (
            "`make demo-full` (`python -m nora.demo.llm --full`)"
            if full
            else "`make demo` (`python -m nora.demo.llm`; `make demo-full` runs more seeds)"
        ),
    )
    intro = [
        "**Offline LLM demo, not an MMLU or LLaMA-3 result.** A small LLaMA (`LlamaConfig`, gated SiLU MLP, "
        f"{fmt_int(pre.get('parameters'))} parameters) is pretrained here for {pre.get('steps', '?')} steps "
        f"({fmt_int(pre.get('tokens_seen'))} tokens, final loss {pre.get('final_loss', float('nan')):.2f}) on a "
        "generated world (people with a city, a job and a mentor; sums; unit conversions; `nora/data/world.py`), "
        "with quiz pages (`Question: ...` / `Answer: ...`, as web text shows a real base model) about one group of "
        "people and number pairs, and standard-library prose. "
        "It is then instruction-tuned through `train.py`'s `run_training` on Alpaca-format questions about that "
        f"group ({world.get('instructions', '?')} records, {conf['epochs']} epochs) and scored through `eval.py`'s "
        f"`run_eval` on {n_test or '?'} four-choice questions about other people and pairs, in MMLU's CSV layout "
        "(`subjects.json`: two categories), whose facts the model saw only described, never questioned.",
        f"Protocol: {k} shots, lm_eval's `mmlu_continuation` (each option's text scored after `Answer:`; a model "
        "this small cannot bind letters to options, so MMLU's lettered protocol leaves every row at chance). "
        f"Produced by {made_by}; {n_seeds} seed{'s' if n_seeds != 1 else ''} per method. Learning rates: "
        "`configs/demo/learning_rates_llm.yaml` (tuned on val/, `demo_llm_lr_sweep.md`). What the numbers do and "
        f"do not show: [demo_llm_diagnosis.md]({'../' if full else ''}demo_llm_diagnosis.md).",
    ]
    return Report(
        "demo_llm",
        "Offline LLM demo: instruction tuning on a generated world, scored like MMLU (CPU)"
        + (", more seeds" if full else ""),
        intro,
        [main, pairs, per_subject],
        runs,
        [source],
        make="make demo-full" if full else "make demo",
        base_evals=[base] if base else [],
    )


def render_demo_llm(
    col: Collection,
    out: Path,
    source: str,
    methods: Sequence[str],
    n_seeds: int,
    backbone: Path | None = None,
    data: Path | None = None,
    full: bool = False,
    conf: dict | None = None,
) -> dict:
    """Write ``demo_llm.md``/``.csv`` and the figures into ``out``."""
    report = demo_llm_report(col, methods, n_seeds, source, backbone, data, full, conf)
    made = {"tables": report.write(out), "figures": []}
    pts = []
    for m in methods:
        mine = [r for r in report.runs if r.method == m]
        s = summarize(by_seed(mine, _acc(None)).values())
        trainable, _ = params_of(mine)
        if s.n and trainable:
            pts.append(figures.Point(method_label(m), int(trainable), s.mean, s.std, s.n))
    f = figures.accuracy_vs_params(
        {"world questions (test/)": pts},
        out / "figures" / "demo_llm_accuracy_vs_params.png",
        "LLM demo: accuracy vs trainable parameters (not MMLU)",
        ylabel="accuracy (%)",
    )
    made["figures"] += [f] if f else []
    for m in (m for m in methods if m in methods_using("uses_nora")):  # the methods with rational activations
        mine = sorted((r for r in report.runs if r.method == m), key=lambda r: r.seed)
        if mine:
            f = activation_figure(
                mine[0].dir / "adapter",
                out / "figures" / f"demo_llm_activations_{m}.png",
                f"{method_label(m)} on the LLM demo, seed {mine[0].seed}: learned SiLU rationals per "
                "layer; shaded: fit range",
            )
            made["figures"] += [f] if f else []
    return made
