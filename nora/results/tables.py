"""Result tables (Markdown + CSV) rendered from run directories only (``summary.json``, ``config.yaml``,
``mmlu.json``); nothing is re-trained or re-evaluated.

Every table groups runs by method and setting and reports the mean ± sample std over seeds with the number of
seeds n, and each method's difference to the reference (full fine-tuning; LoRA and the base model for MMLU)
paired by seed with a t-based 95% confidence interval. A cell without a complete run says ``missing``, never 0.
Each file starts with a header naming the runs behind it (directory, config hash, date, hardware); the
paper's numbers, where the abstract gives any, sit in their own column, labelled as quoted from the abstract.

=====================  ============================================================================
demo.md/.csv           the offline digits demo (runs/demo): nora.results.demo_report
table1.md/.csv         ViT-Tiny on CIFAR-10/100 (runs/table1)
table2.md/.csv         LLaMA-3-8B on Alpaca/OpenOrca, MMLU per category (runs/table2, runs/eval)
ablations.md/.csv      NoRA ablations on ViT-Tiny/CIFAR-100 (runs/ablations; full FT from runs/table1)
matched_budget.md/.csv NoRA++ vs LoRA/DoRA at bracketing ranks (runs/table1, runs/table2)
=====================  ============================================================================
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from nora.methods import METHODS
from nora.methods.registry import methods_using
from nora.results import paper
from nora.results.collect import BaseEval, Collection, Run, mmlu_accuracy
from nora.results.stats import PairedDiff, Summary, difference_to_constant, paired_difference, summarize

DEFAULT_LORA_RANK = 8  # configs/method/{lora,dora,nora_pp}.yaml (checked by tests/test_results.py)
MMLU_CATEGORIES = ("STEM", "humanities", "social_sciences", "other")
CI_NOTE = (
    "Δ: this row minus the reference, paired by seed (the mean of the per-seed differences, in points), "
    "with a t-based 95% confidence interval (n-1 degrees of freedom, n = pairs); a single pair has no "
    "interval. n: seeds with a complete run."
)


# ----------------------------------------------------------------------------- report model
@dataclass
class Section:
    heading: str | None
    columns: list[str]
    rows: list[list[str]]
    csv_rows: list[dict]
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    name: str  # file stem in results/
    title: str
    intro: list[str]
    sections: list[Section]
    runs: list[Run]
    sources: Sequence[str]  # where the runs were read from
    expected: int | None = None  # runs the sweeps define (None: not fixed)
    make: str | None = None  # the command that produces the runs
    base_evals: list[BaseEval] = field(default_factory=list)
    footnotes: list[str] = field(default_factory=list)

    # -- provenance
    def duplicates(self) -> list[str]:
        """Runs of this report that a newer run of the same seed replaced in a cell (:func:`duplicate_notes`)."""
        mine = {id(r) for r in self.runs}
        return duplicate_notes([r for r in self.runs if id(r.shadowed_by) in mine])

    @property
    def where(self) -> str:
        srcs = [self.sources] if isinstance(self.sources, str) else list(self.sources)
        return " and ".join(f"`{s}`" for s in srcs)

    def provenance(self) -> str:
        n = len(self.runs)
        if n == 0 and not self.base_evals:
            how = f" `{self.make}` produces them." if self.make else ""
            exp = f" (the sweeps define {self.expected})" if self.expected else ""
            return f"Runs: none yet under {self.where}{exp}; every cell below is missing.{how}"
        of = f" of the {self.expected} the sweeps define" if self.expected else ""
        dates = sorted({r.date for r in self.runs} | {b.date for b in self.base_evals})
        span = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        hw = Counter(r.hardware for r in self.runs)
        hw_txt = ", ".join(f"{k} ({v} run{'s' if v != 1 else ''})" for k, v in sorted(hw.items()))
        parts = [f"Runs: {n}{of}, read from {self.where}"]
        if self.base_evals:
            parts.append(f"plus {len(self.base_evals)} base-model evaluation(s)")
        parts.append(f"dated {span}")
        if hw_txt:
            parts.append(f"on {hw_txt}")
        return ", ".join(parts) + ". Each run's config hash, date and hardware: see Runs below."

    def markdown(self) -> str:
        out = [f"# {self.title}", "", *(p for para in self.intro for p in (para, "")), self.provenance(), ""]
        for s in self.sections:
            if s.heading:
                out += [f"## {s.heading}", ""]
            out.append("| " + " | ".join(s.columns) + " |")
            out.append("|" + "---|" * len(s.columns))
            out += ["| " + " | ".join(str(c) for c in row) + " |" for row in s.rows]
            out.append("")
            for note in s.notes:
                out += [note, ""]
        for note in self.footnotes:
            out += [note, ""]
        dups = self.duplicates()
        if dups:
            out += [
                f"**{len(dups)} run folder(s) repeat a seed of the same setting**; each cell counts one run per "
                "seed, the newest (move or delete the folder you do not want counted):",
                "",
                *[f"- {d}" for d in dups],
                "",
            ]
        out += ["## Runs", ""]
        if self.runs or self.base_evals:
            out += [
                "| run | method | dataset | seed | config hash | date | hardware |",
                "|---|---|---|---|---|---|---|",
            ]
            out += [
                f"| {r.dir.name} | {r.method} | {r.dataset} | {r.seed} | {r.config_hash} | {r.date} | {r.hardware} |"
                for r in self.runs
            ]
            out += [f"| {b.dir.name} (base model, MMLU) | — | — | — | — | {b.date} | — |" for b in self.base_evals]
        else:
            out.append("none")
        return "\n".join(out).rstrip("\n") + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        buf.write(f"# {self.title}\n# {self.provenance()}\n")
        for r in self.runs:
            buf.write(f"# run {r.dir.name}: config_hash={r.config_hash} date={r.date} hardware={r.hardware}\n")
        for b in self.base_evals:
            buf.write(f"# base-model evaluation {b.dir.name}: date={b.date}\n")
        for d in self.duplicates():
            buf.write(f"# same seed twice: {d.replace('`', '')}\n")
        fields: list[str] = []
        rows = [row for s in self.sections for row in s.csv_rows]
        for row in sorted(rows, key=len, reverse=True):  # the fullest row sets the column order
            fields += [k for k in row if k not in fields]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for s in self.sections:
            for row in s.csv_rows:
                w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        return buf.getvalue()

    def write(self, out_dir: str | Path) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        md, cs = out_dir / f"{self.name}.md", out_dir / f"{self.name}.csv"
        md.write_text(self.markdown())
        cs.write_text(self.csv())
        return [md, cs]


# ----------------------------------------------------------------------------- helpers
def by_seed(runs: Sequence[Run], value: Callable[[Run], float | None]) -> dict:
    """{seed: value}. Two runs of one seed in one cell (a run repeated into another folder, a copy): the newest
    (by its summary's date, then folder) is used and the other is marked ``shadowed_by`` it, so that the report
    names both folders (:func:`duplicate_notes`) instead of silently taking one."""
    out: dict = {}
    used: dict = {}
    for r in sorted(runs, key=lambda r: (str(r.summary.get("date", "")), str(r.dir))):
        v = value(r)
        if v is not None:
            if r.seed in used and used[r.seed] is not r:
                used[r.seed].shadowed_by = r
            out[r.seed] = v
            used[r.seed] = r
    return out


def duplicate_notes(runs: Sequence[Run]) -> list[str]:
    """One line per run that a newer run of the same seed replaced in a cell of this report (:func:`by_seed`),
    naming both folders."""
    out = []
    for r in sorted((r for r in runs if r.shadowed_by is not None), key=lambda r: str(r.dir)):
        newer = r.shadowed_by
        while newer.shadowed_by is not None:  # three or more copies: the one in the table
            newer = newer.shadowed_by
        out.append(f"{r.method} seed {r.seed}: `{newer.dir}` ({newer.date}) is counted, `{r.dir}` ({r.date}) is not")
    return out


def fmt_int(v) -> str:
    return "missing" if v is None else f"{int(v):,}"


def fmt_share(p) -> str:
    if p is None:
        return "missing"
    return f"{p:.2f}%" if p >= 0.01 or p == 0 else f"{p:.1e}%"


def num(x, digits: int = 4):
    return None if x is None else round(float(x), digits)


def stats_fields(prefix: str, s: Summary) -> dict:
    return {f"{prefix}_mean": num(s.mean), f"{prefix}_std": num(s.std)}


def diff_fields(prefix: str, d: PairedDiff | None) -> dict:
    if d is None:
        return {f"{prefix}": None, f"{prefix}_ci_lo": None, f"{prefix}_ci_hi": None, f"{prefix}_n": None}
    return {f"{prefix}": num(d.mean), f"{prefix}_ci_lo": num(d.lo), f"{prefix}_ci_hi": num(d.hi), f"{prefix}_n": d.n}


def lora_rank(r: Run) -> int:
    return int(r.setting("method.lora.r", DEFAULT_LORA_RANK))


def default_arm(r: Run) -> bool:
    """LoRA-style methods at their default rank (the matched-budget sweeps add other ranks to the same roots)."""
    return r.method not in methods_using("uses_lora") or lora_rank(r) == DEFAULT_LORA_RANK


def method_label(name: str) -> str:
    """A method's label in tables and figures (its registry entry's; an unregistered name as it is)."""
    return METHODS[name].label if name in METHODS else name


def ordered_methods(names) -> list[str]:
    """``names`` in the registry's order (the paper's methods first), unregistered names last."""
    names = list(dict.fromkeys(names))
    return [m for m in METHODS if m in names] + sorted(m for m in names if m not in METHODS)


def _ignored_note(all_runs: Sequence[Run], used: Sequence[Run], what: str) -> list[str]:
    ignored = [r for r in all_runs if r not in used]
    if not ignored:
        return []
    kinds = Counter(f"{r.model}/{r.dataset}/{r.method}" for r in ignored)
    return [f"Not counted here ({what}): " + ", ".join(f"{k} ({v})" for k, v in sorted(kinds.items())) + "."]


def vision_row_cells(
    runs: Sequence[Run], ref: dict | None, is_ref: bool
) -> tuple[Summary, PairedDiff | None, list[str]]:
    acc = by_seed(runs, lambda r: r.accuracy)
    s = summarize(acc.values())
    d = None if is_ref or ref is None else paired_difference(acc, ref)
    return s, d, [str(s.n), s.fmt(), "reference" if is_ref else (d.fmt() if d else "missing")]


def params_of(runs: Sequence[Run]) -> tuple[int | None, float | None]:
    for r in runs:
        if r.trainable is not None:
            return r.trainable, r.percent
    return None, None


# ----------------------------------------------------------------------------- table 1
TABLE1_METHODS = ("full", "linear_probe", "lora", "dora", "nora", "nora_pp")
TABLE1_REFERENCE = "full"  # every row's Δ is to it
TABLE1_DATASETS = ("cifar10", "cifar100")
DATASET_LABEL = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "alpaca": "Alpaca", "openorca": "OpenOrca"}


def table1_report(col: Collection, seeds: int = 3, source: str = "runs/table1") -> Report:
    runs = [
        r
        for r in col.runs
        if r.model == "vit_tiny" and r.dataset in TABLE1_DATASETS and r.method in TABLE1_METHODS and default_arm(r)
    ]
    rows, csv_rows = [], []
    for ds in TABLE1_DATASETS:
        ref = by_seed([r for r in runs if r.dataset == ds and r.method == TABLE1_REFERENCE], lambda r: r.accuracy)
        for m in TABLE1_METHODS:
            mine = [r for r in runs if r.dataset == ds and r.method == m]
            s, d, cells = vision_row_cells(mine, ref, m == TABLE1_REFERENCE)
            trainable, pct = params_of(mine)
            quoted = paper.TABLE1.get((ds, m), "—")
            rows.append([DATASET_LABEL[ds], method_label(m), *cells, quoted, fmt_int(trainable), fmt_share(pct)])
            csv_rows.append(
                {
                    "dataset": ds,
                    "method": m,
                    "n": s.n,
                    **stats_fields("accuracy", s),
                    **diff_fields("delta_vs_full", d),
                    "paper_delta_vs_full_abstract": paper.TABLE1.get((ds, m)),
                    "trainable": trainable,
                    "share_percent": num(pct, 6),
                }
            )
    intro = [
        (
            "ViT-Tiny/16 (timm `vit_tiny_patch16_224`, pretrained weights) fine-tuned on CIFAR-10 and CIFAR-100 "
            "with each method: `sweeps/table1.yaml` (hyper-parameters: `configs/method/*.yaml`, "
            "`configs/trainer/default.yaml`; LoRA/DoRA rank 8). Only runs of `vit_tiny` on CIFAR are counted: "
            "the digits demo and tiny test models never enter this table."
        ),
        "Accuracy: final test accuracy (%), mean ± std over seeds. "
        + CI_NOTE.replace("the reference", "full fine-tuning"),
        f"Paper column: {paper.SOURCE}; {paper.TABLE1_NOTE}.",
    ]
    sec = Section(
        None,
        [
            "dataset",
            "method",
            "n",
            "accuracy (%)",
            "Δ vs full FT (95% CI)",
            "paper: Δ vs full FT (quoted from the abstract)",
            "trainable params",
            "share of total",
        ],
        rows,
        csv_rows,
        _ignored_note([r for r in col.runs], runs, "other models, datasets or ranks"),
    )
    return Report(
        "table1",
        "Table 1: ViT-Tiny on CIFAR-10 and CIFAR-100",
        intro,
        [sec],
        runs,
        [source],
        expected=len(TABLE1_METHODS) * len(TABLE1_DATASETS) * seeds,
        make="make table1",
    )


# Table 1's low-budget companion (sweeps/table1_low_budget.yaml): NoRA among the methods of its own size
LOW_BUDGET_METHODS = ("linear_probe", "nora", "bitfit", "ln_tuning", "ia3", "vera")
LOW_BUDGET_REFERENCE = "nora"  # every row's Δ is NoRA minus it


def low_budget_section(runs: Sequence[Run], datasets, heading: str | None) -> Section:
    """One row per (dataset, method): accuracy, NoRA minus the method paired by seed, trainable count."""
    rows, csv_rows = [], []
    for ds in datasets:
        ref = by_seed([r for r in runs if r.dataset == ds and r.method == LOW_BUDGET_REFERENCE], lambda r: r.accuracy)
        for m in LOW_BUDGET_METHODS:
            mine = [r for r in runs if r.dataset == ds and r.method == m]
            acc = by_seed(mine, lambda r: r.accuracy)
            s = summarize(acc.values())
            d = None if m == LOW_BUDGET_REFERENCE else paired_difference(ref, acc)
            trainable, pct = params_of(mine)
            rows.append(
                [
                    DATASET_LABEL.get(ds, ds),
                    method_label(m),
                    fmt_int(trainable),
                    fmt_share(pct),
                    str(s.n),
                    s.fmt(),
                    "reference" if m == LOW_BUDGET_REFERENCE else d.fmt(),
                ]
            )
            csv_rows.append(
                {
                    "dataset": ds,
                    "method": m,
                    "trainable": trainable,
                    "share_percent": num(pct, 6),
                    "n": s.n,
                    **stats_fields("accuracy", s),
                    **diff_fields("nora_minus_method", d),
                }
            )
    cols = [
        "dataset",
        "method",
        "trainable params",
        "share of total",
        "n",
        "accuracy (%)",
        "NoRA minus this method (95% CI)",
    ]
    return Section(heading, cols, rows, csv_rows)


def table1_low_budget_report(col: Collection, seeds: int = 3, source: str = "runs/table1") -> Report:
    runs = [
        r for r in col.runs if r.model == "vit_tiny" and r.dataset in TABLE1_DATASETS and r.method in LOW_BUDGET_METHODS
    ]
    intro = [
        (
            "Table 1's low-budget companion: NoRA on ViT-Tiny / CIFAR next to the methods that train as few "
            "parameters as it does (`sweeps/table1_low_budget.yaml`, Table 1's seeds and recipe; the linear probe "
            "and NoRA rows are Table 1's runs). BitFit trains the biases, LN tuning the norm layers, (IA)3 "
            "scaling vectors on qkv and fc2, VeRA per-layer scaling vectors over shared random projections "
            "(r=64); every method also trains the new head (`configs/method/*.yaml`)."
        ),
        (
            "Accuracy: final test accuracy (%), mean ± std over seeds. Last column: NoRA minus the method, paired "
            "by seed, with a t-based 95% CI; positive favours NoRA."
        ),
    ]
    sec = low_budget_section(runs, TABLE1_DATASETS, None)
    return Report(
        "table1_low_budget",
        "Table 1, low budget: NoRA vs methods of its size (ViT-Tiny, CIFAR)",
        intro,
        [sec],
        runs,
        [source],
        expected=len(LOW_BUDGET_METHODS) * len(TABLE1_DATASETS) * seeds,
        make="python train.py -m --config-dir sweeps --config-name table1_low_budget",
    )


# ----------------------------------------------------------------------------- table 2
TABLE2_METHODS = ("lora", "dora", "nora_pp")
TABLE2_REFERENCE = "lora"  # the methods' Δ columns are to it (and to the base model)
TABLE2_DATASETS = ("alpaca", "openorca")
TABLE2_MODEL = "llama3_8b"
TABLE2_MODEL_NAMES = ("llama3_8b", "meta-llama/Meta-Llama-3-8B")


MMLU_SUBJECTS, MMLU_SHOTS = 57, 5


def _mmlu(cat: str | None) -> Callable[[Run], float | None]:
    return lambda r: r.mmlu_accuracy(cat)


def mmlu_protocol_problem(m: dict | None) -> str | None:
    """Why an ``mmlu.json`` does not belong in Table 2 (a subset of the subjects, another number of shots,
    another split), or None. Fields the file does not record are not held against it."""
    if not m:
        return None
    n = (m.get("data") or {}).get("n_subjects")
    if n is not None and int(n) < MMLU_SUBJECTS:
        return f"{n} of {MMLU_SUBJECTS} subjects"
    if m.get("k") is not None and int(m["k"]) != MMLU_SHOTS:
        return f"{m['k']}-shot"
    if m.get("split") not in (None, "test"):
        return f"split {m['split']}"
    name = (m.get("protocol") or {}).get("name")
    if name not in (None, "letters"):
        return f"protocol {name}"
    return None


def table2_report(
    col: Collection, seeds: int = 3, source: str = "runs/table2", eval_source: str = "runs/eval"
) -> Report:
    runs = [
        r
        for r in col.runs
        if r.model == TABLE2_MODEL and r.dataset in TABLE2_DATASETS and r.method in TABLE2_METHODS and default_arm(r)
    ]
    off_protocol = [(r.name, mmlu_protocol_problem(r.mmlu)) for r in runs if mmlu_protocol_problem(r.mmlu)]
    evaluated = [r for r in runs if r.mmlu and not mmlu_protocol_problem(r.mmlu)]
    unevaluated = [r for r in runs if not r.mmlu]
    base = col.base_eval(*TABLE2_MODEL_NAMES)
    if base is not None and mmlu_protocol_problem(base.mmlu):
        off_protocol.append((f"{base.dir.name} (base model)", mmlu_protocol_problem(base.mmlu)))
        base = None
    base_avg = mmlu_accuracy(base.mmlu) if base else None
    cat_cols = ["STEM", "humanities", "social sciences", "other", "average"]
    columns = [
        "dataset",
        "method",
        "n",
        *cat_cols,
        "Δ average vs base (95% CI)",
        "Δ average vs LoRA (95% CI)",
        "Δ STEM vs LoRA (95% CI)",
        "paper (quoted from the abstract)",
        "trainable params",
    ]
    rows, csv_rows = [], []
    cats = [*MMLU_CATEGORIES, None]
    base_cells = [
        f"{mmlu_accuracy(base.mmlu, c):.2f}" if base and mmlu_accuracy(base.mmlu, c) is not None else "missing"
        for c in cats
    ]
    rows.append(
        ["—", "base model (no fine-tuning)", "1" if base else "0", *base_cells, "reference", "—", "—", "—", "0"]
    )
    csv_rows.append(
        {
            "dataset": "",
            "method": "base",
            "n": 1 if base else 0,
            **{f"{c or 'average'}_mean": num(mmlu_accuracy(base.mmlu, c)) if base else None for c in cats},
        }
    )
    for ds in TABLE2_DATASETS:
        lora_runs = [r for r in evaluated if r.dataset == ds and r.method == TABLE2_REFERENCE]
        lora_avg, lora_stem = by_seed(lora_runs, _mmlu(None)), by_seed(lora_runs, _mmlu("STEM"))
        for m in TABLE2_METHODS:
            mine = [r for r in evaluated if r.dataset == ds and r.method == m]
            trained = [r for r in runs if r.dataset == ds and r.method == m]
            per_cat = {c: by_seed(mine, _mmlu(c)) for c in cats}
            sums = {c: summarize(per_cat[c].values()) for c in cats}
            n = sums[None].n
            n_txt = f"{n} ({len(trained)} trained)" if len(trained) > n else str(n)
            d_base = difference_to_constant(per_cat[None], base_avg)
            is_ref = m == TABLE2_REFERENCE
            d_lora = None if is_ref else paired_difference(per_cat[None], lora_avg)
            d_stem = None if is_ref else paired_difference(per_cat["STEM"], lora_stem)
            trainable, _pct = params_of(trained)
            rows.append(
                [
                    DATASET_LABEL[ds],
                    method_label(m),
                    n_txt,
                    *(sums[c].fmt() for c in cats),
                    d_base.fmt(),
                    "reference" if is_ref else d_lora.fmt(),
                    "reference" if is_ref else d_stem.fmt(),
                    paper.TABLE2.get((ds, m), "—"),
                    fmt_int(trainable),
                ]
            )
            row = {"dataset": ds, "method": m, "n": n, "trained": len(trained)}
            for c in cats:
                row.update(stats_fields(c or "average", sums[c]))
            row.update(diff_fields("delta_average_vs_base", d_base))
            row.update(diff_fields("delta_average_vs_lora", d_lora))
            row.update(diff_fields("delta_stem_vs_lora", d_stem))
            row.update({"paper_abstract": paper.TABLE2.get((ds, m)), "trainable": trainable})
            csv_rows.append(row)
    notes = []
    if unevaluated:
        notes.append(
            "Trained but without `mmlu.json` yet (counted as missing; `make table2` or "
            "`python eval.py run_dir=<run>` evaluates them): " + ", ".join(f"`{r.name}`" for r in unevaluated) + "."
        )
    if off_protocol:
        notes.append(
            "Not counted (evaluated off the table's protocol, full MMLU test set 5-shot): "
            + ", ".join(f"`{name}` ({why})" for name, why in off_protocol)
            + "."
        )
    if base is None:
        notes.append("Base model: no `runs/eval/llama3_8b/mmlu.json` yet (`python eval.py model=llama3_8b`).")
    notes += _ignored_note(col.runs, runs, "other models, datasets or ranks")
    intro = [
        (
            "LLaMA-3-8B instruction-tuned on Alpaca and on OpenOrca (`sweeps/table2.yaml`; recipes: "
            "`configs/experiment/llama3_{alpaca,openorca}.yaml`), then scored on MMLU (5-shot, log-likelihood "
            "of the answer letter, `nora/eval/mmlu.py`). Accuracy (%) per category and over all questions "
            '("average", micro-averaged), mean ± std over seeds. Only `llama3_8b` runs are counted: tiny test '
            "models never enter this table."
        ),
        CI_NOTE.replace("the reference", "the base model's single evaluation or LoRA's run of the same seed"),
        f"Paper column: {paper.SOURCE}; {paper.TABLE2_NOTE}.",
    ]
    sec = Section(None, columns, rows, csv_rows, notes)
    return Report(
        "table2",
        "Table 2: LLaMA-3-8B instruction tuning, MMLU",
        intro,
        [sec],
        evaluated + unevaluated,
        [source, eval_source],
        expected=len(TABLE2_METHODS) * len(TABLE2_DATASETS) * seeds,
        make="make table2",
        base_evals=[base] if base else [],
    )


# ----------------------------------------------------------------------------- ablations
ABLATION_VARIANTS = ("rational_ft", "zero_init_ft", "nora")  # the variant ablation's methods
ABLATION_REFERENCE = "full"  # full FT (from runs/table1): the ablations' reference
ABLATION_DEFAULTS = {
    "method": "nora",
    "method.nora.r": 3,
    "method.nora.groups": 8,
    "method.nora.form": "A",
    "method.nora.numerator": "group",
    "method.nora.init": "fit",
    "method.nora.residual": False,
}
# (sweep, heading, factor, values): the values of sweeps/ablation_<sweep>.yaml (checked by tests/test_sweeps.py)
ABLATIONS = (
    ("variant", "Rational FT vs zero-init FT vs NoRA", "method", ABLATION_VARIANTS),
    ("rank", "Rank r of the coefficient update (alpha = 6)", "method.nora.r", (1, 2, 3, 4, 8)),
    ("groups", "Groups G", "method.nora.groups", (1, 2, 4, 8, 16, 96, 768)),
    ("form", "Denominator form (A: 1+Σ|b_j||x|^j, B: 1+|Σ b_j x^j|)", "method.nora.form", ("A", "B")),
    ("numerator", "Numerator update shared vs per group", "method.nora.numerator", ("shared", "group")),
    ("init", "Initialisation: range-fitted vs calibrated", "method.nora.init", ("fit", "calibrated")),
    (
        "residual",
        "Form: the paper's (the rational replaces GELU) vs residual (GELU + the rational's change, exact at step 0)",
        "method.nora.residual",
        (False, True),
    ),
)
ABLATION_MODEL, ABLATION_DATASET = "vit_tiny", "cifar100"


def _factor(r: Run, key: str):
    return r.method if key == "method" else r.setting(key)


def at_setting(r: Run, key: str, value) -> bool:
    return str(_factor(r, key)) == str(value)


def ablation_report(
    col: Collection,
    reference_col: Collection | None = None,
    seeds: int = 3,
    source: str = "runs/ablations",
    reference_source: str = "runs/table1",
) -> Report:
    runs = [
        r
        for r in col.runs
        if r.model == ABLATION_MODEL and r.dataset == ABLATION_DATASET and r.method in ABLATION_VARIANTS
    ]
    ref_runs = [
        r
        for r in (reference_col or Collection()).runs
        if r.model == ABLATION_MODEL and r.dataset == ABLATION_DATASET and r.method == ABLATION_REFERENCE
    ]
    full = by_seed(ref_runs, lambda r: r.accuracy)
    default = by_seed(
        [r for r in runs if all(at_setting(r, k, v) for k, v in ABLATION_DEFAULTS.items())], lambda r: r.accuracy
    )
    sections, used = [], set()
    for sweep, heading, key, values in ABLATIONS:
        rows, csv_rows = [], []
        others = {k: v for k, v in ABLATION_DEFAULTS.items() if k != key}
        for v in values:
            mine = [r for r in runs if at_setting(r, key, v) and all(at_setting(r, k, w) for k, w in others.items())]
            used.update(id(r) for r in mine)
            acc = by_seed(mine, lambda r: r.accuracy)
            s = summarize(acc.values())
            is_default = str(v) == str(ABLATION_DEFAULTS[key])
            d_def = None if is_default else paired_difference(acc, default)
            d_full = paired_difference(acc, full)
            nora_params = next(
                (
                    r.summary["parameters"]["components"].get("nora")
                    for r in mine
                    if (r.summary.get("parameters") or {}).get("components")
                ),
                None,
            )
            label = method_label(v) if key == "method" else f"{key.rsplit('.', 1)[-1]}={v}"
            label += " (default)" if is_default else ""
            rows.append(
                [
                    label,
                    str(s.n),
                    s.fmt(),
                    "reference" if is_default else d_def.fmt(),
                    d_full.fmt(),
                    fmt_int(nora_params),
                ]
            )
            csv_rows.append(
                {
                    "ablation": sweep,
                    "factor": key,
                    "value": v,
                    "default": is_default,
                    "n": s.n,
                    **stats_fields("accuracy", s),
                    **diff_fields("delta_vs_default", d_def),
                    **diff_fields("delta_vs_full", d_full),
                    "nora_params": nora_params,
                }
            )
        sections.append(
            Section(
                heading,
                ["setting", "n", "accuracy (%)", "Δ vs default NoRA (95% CI)", "Δ vs full FT (95% CI)", "NoRA params"],
                rows,
                csv_rows,
            )
        )
    used_runs = [r for r in runs if id(r) in used]
    intro = [
        (
            "NoRA ablations on ViT-Tiny/CIFAR-100 (`sweeps/ablation_*.yaml`): one factor varied at a time, the "
            "others at NoRA's defaults (r=3, alpha=6, G=8, form A, per-group numerator, range-fitted init, the "
            "paper's form as in Table 1); "
            "the head trains in every run. Δ vs full FT pairs each seed with Table 1's full fine-tuning run "
            "of the same seed."
        ),
        "Accuracy: final test accuracy (%), mean ± std over seeds. "
        + CI_NOTE.replace("the reference", "the default NoRA setting or full fine-tuning"),
    ]
    # the default setting appears in all seven sweeps but is one directory per seed; + Table 1's full FT runs
    settings = 1 + sum(len(values) - 1 for _s, _h, _k, values in ABLATIONS)
    return Report(
        "ablations",
        "Ablations: NoRA on ViT-Tiny / CIFAR-100",
        intro,
        sections,
        used_runs + ref_runs,
        [source, reference_source],
        expected=settings * seeds + seeds,
        make="make ablations",
    )


# ----------------------------------------------------------------------------- matched budget
ARMS = (("nora_pp", DEFAULT_LORA_RANK), ("lora", 8), ("lora", 9), ("dora", 7), ("dora", 8))


def arm_label(method: str, rank: int) -> str:
    if method in METHODS and METHODS[method].uses_nora:  # NoRA++: LoRA at ``rank`` plus NoRA
        return f"{method_label(method)} (LoRA r={rank} + NoRA)"
    return f"{method_label(method)} r={rank}"


def _matched_section(runs: Sequence[Run], datasets, metric: Callable[[Run], float | None], heading: str) -> Section:
    rows, csv_rows = [], []
    for ds in datasets:
        here = [r for r in runs if r.dataset == ds]
        arm_runs = {a: [r for r in here if r.method == a[0] and lora_rank(r) == a[1]] for a in ARMS}
        ref_runs = arm_runs[ARMS[0]]
        ref = by_seed(ref_runs, metric)
        ref_params, _ = params_of(ref_runs)
        for a in ARMS:
            mine = arm_runs[a]
            vals = by_seed(mine, metric)
            s = summarize(vals.values())
            is_ref = a == ARMS[0]
            d = None if is_ref else paired_difference(ref, vals)
            trainable, _ = params_of(mine)
            vs = (
                "—"
                if is_ref
                else ("missing" if trainable is None or ref_params is None else f"{trainable - ref_params:+,}")
            )
            rows.append(
                [
                    DATASET_LABEL.get(ds, ds),
                    arm_label(*a),
                    fmt_int(trainable),
                    vs,
                    str(s.n),
                    s.fmt(),
                    "reference" if is_ref else d.fmt(),
                ]
            )
            csv_rows.append(
                {
                    "section": heading,
                    "dataset": ds,
                    "method": a[0],
                    "rank": a[1],
                    "trainable": trainable,
                    "trainable_minus_nora_pp": None
                    if is_ref or trainable is None or ref_params is None
                    else trainable - ref_params,
                    "n": s.n,
                    **stats_fields("metric", s),
                    **diff_fields("nora_pp_minus_arm", d),
                }
            )
    return Section(
        heading,
        ["dataset", "arm", "trainable params", "vs NoRA++", "n", "metric (%)", "NoRA++ minus this arm (95% CI)"],
        rows,
        csv_rows,
    )


def matched_report(
    vit: Collection, llama: Collection, seeds: int = 3, sources: Sequence[str] = ("runs/table1", "runs/table2")
) -> Report:
    vit_runs = [
        r
        for r in vit.runs
        if r.model == "vit_tiny" and r.dataset in TABLE1_DATASETS and r.method in methods_using("uses_lora")
    ]
    llama_runs = [
        r
        for r in llama.runs
        if r.model == TABLE2_MODEL
        and r.dataset in TABLE2_DATASETS
        and r.method in methods_using("uses_lora")
        and r.mmlu
    ]
    low = [
        r for r in vit.runs if r.model == "vit_tiny" and r.dataset in TABLE1_DATASETS and r.method in LOW_BUDGET_METHODS
    ]
    sections = [
        _matched_section(vit_runs, TABLE1_DATASETS, lambda r: r.accuracy, "ViT-Tiny: test accuracy (%)"),
        _matched_section(llama_runs, TABLE2_DATASETS, _mmlu(None), "LLaMA-3-8B: MMLU average (%)"),
        low_budget_section(
            low,
            TABLE1_DATASETS,
            "ViT-Tiny at NoRA's own budget: NoRA vs BitFit, LN tuning, (IA)3, VeRA (test accuracy %)",
        ),
    ]
    used = [r for r in vit_runs + llama_runs if any(r.method == a[0] and lora_rank(r) == a[1] for a in ARMS)] + low
    intro = [
        (
            "NoRA++ against LoRA and DoRA at the two ranks whose trainable counts bracket NoRA++'s "
            "(`sweeps/matched_vit.yaml`, `sweeps/matched_llama.yaml`; the arithmetic is in `sweeps/README.md`, "
            "`python -m nora.results budget`). The rank-8 arms and NoRA++ are Table 1/2's runs. Same training "
            "recipe (steps, batch, schedule) for every arm."
        ),
        (
            "Last column: NoRA++ minus the arm, paired by seed, with a t-based 95% CI over the paired "
            "differences; positive favours NoRA++."
        ),
        (
            "The last section compares NoRA (0.02M trainable on CIFAR-100, head included) with the methods of its "
            "own size (`sweeps/table1_low_budget.yaml`); there the last column is NoRA minus the method."
        ),
        f"Paper: {paper.SOURCE}: {paper.MATCHED_NOTE}.",
    ]
    return Report(
        "matched_budget",
        "Matched budget: NoRA++ vs LoRA/DoRA at bracketing ranks",
        intro,
        sections,
        used,
        list(sources),
        expected=len(ARMS) * 2 * seeds * 2,
        make="python train.py -m --config-dir sweeps --config-name matched_vit (or matched_llama)",
    )
