"""Command line of :mod:`nora.results` (the Makefile's table targets call it).

python -m nora.results tables [--runs runs] [--out results]       render every table, figure and the index
python -m nora.results demo-table [--runs runs/demo] [--out results] [--check]
python -m nora.results plan <sweep> [overrides ...]               a sweep's jobs and their state (nothing runs)
python -m nora.results mmlu-jobs [--runs runs/table2] [--base llama3_8b] [--eval-root runs/eval]
                                                                  eval.py arguments still to run, one per line
python -m nora.results budget                                     matched-budget parameter counts
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from pathlib import Path

from nora.errors import MissingFileError, user_errors
from nora.logs import setup_logging
from nora.models.config import FAMILIES
from nora.results.budget import budget_table
from nora.results.collect import collect
from nora.results.render import render_all, render_demo, write_index
from nora.results.sweep import compose_sweep, format_plan, override_error, plan, sweep_names
from nora.results.tables import duplicate_notes

log = logging.getLogger(__name__)


def _list_unreadable(col, runs) -> int:
    """Name the run files ``collect`` could not read (warnings, on stderr); the exit status: 1 if there are any."""
    for path, why in sorted(col.unreadable.items()):
        log.warning(f"unreadable: {path}: {why}")
    if col.unreadable:
        log.warning(
            f"{len(col.unreadable)} run file(s) under {runs} could not be read; their runs are left out of "
            "every table (fix or remove them, or rerun those runs)",
        )
    return 1 if col.unreadable else 0


def _list_duplicates(notes: list[str]) -> None:
    """Warn (on stderr) which run folders repeat a seed (the tables count the newest and say so in a note)."""
    for note in notes:
        log.warning(f"same seed twice: {note.replace('`', '')}")


def _tables(args) -> int:
    """Render everything, after checking what there is to render: the run files that could not be read are
    listed (their runs are in no table; exit status 1), and with no usable run at all nothing is written, so
    the committed ``results/`` stay as they are."""

    col = collect(args.runs)
    status = _list_unreadable(col, args.runs)
    if not col.runs and not col.base_evals:
        log.info(
            f"no complete runs or base-model evaluations under {args.runs}; nothing rendered, {args.out}/ left "
            "as it is (make demo, make table1, ... produce runs)"
        )
        return status
    made = render_all(args.runs, args.out)
    for p in made["tables"]:
        log.info(f"wrote {p}")
    for p in made["figures"]:
        log.info(f"wrote {p}")
    log.info(f"wrote {made['index']}")
    _list_duplicates(made["duplicates"])
    return status


def _demo_table(args) -> int:
    col = collect(args.runs)
    found = any(r.dataset == "digits_target" for r in col.runs)
    if args.check:
        return 0 if found else 1
    status = _list_unreadable(col, args.runs)
    if not found:
        log.error(f"no complete demo runs under {args.runs}; run `make demo` first")
        return 1
    made = render_demo(col, Path(args.out), str(args.runs))
    for p in made["tables"] + made["figures"]:
        log.info(f"wrote {p}")
    write_index(Path(args.out), made)
    print((Path(args.out) / "demo.md").read_text())
    _list_duplicates(duplicate_notes(col.runs))
    return status


def _plan(args) -> int:
    names = sweep_names(args.sweep)
    total = 0
    for name in names:
        try:
            jobs = plan(name, args.overrides)
        except Exception as exc:  # a Hydra error for a bad override: one line naming it and what is valid
            err = override_error(exc, args.overrides, lambda ov, name=name: compose_sweep(name, ov))
            if err is None:
                raise
            raise err from None
        total += len(jobs)
        print(format_plan(name, jobs, verbose=not args.quiet))
    if len(names) > 1:
        print(f"{args.sweep}: {total} jobs in {len(names)} sweeps")
    return 0


def hydra_value(value: str) -> str:
    """``value`` as a Hydra override value: as it is when it holds only plain characters, else single-quoted with
    quotes, the backslashes before them and ``${`` escaped (run names carrying overrides hold ``=`` and ``,``,
    output roots may hold spaces or non-ASCII letters, which Hydra's lexer refuses unquoted)."""
    if re.fullmatch(r"[A-Za-z0-9_./+-]+", value):
        return value
    value = re.sub(r"\\+(?='|$)", lambda m: m.group(0) * 2, value)
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"


def mmlu_jobs(runs: str | Path, base: str | None, eval_root: str | Path) -> list[str]:
    """``eval.py`` arguments for every complete LLM run without a readable ``mmlu.json`` and for the base model
    (unless ``eval_root`` holds a readable evaluation of it), one job per line, each argument quoted for the shell
    and for Hydra (``eval "python eval.py $line"`` runs it; the Makefile's table2 does)."""
    if not Path(runs).is_dir():
        raise MissingFileError(
            f"--runs {runs}: no such directory (the training runs to evaluate; `make table2` "
            "writes them to runs/table2)"
        )
    col = collect(runs)
    language_models = [name for name, family in FAMILIES.items() if family.language_model]
    out = [
        f"run_dir={hydra_value(str(r.dir))}"
        for r in col.runs
        if r.summary.get("family") in language_models and not r.mmlu
    ]
    if base and collect(eval_root).base_eval(base) is None:
        out.append(f"model={hydra_value(base)}")
    return [shlex.quote(arg) for arg in out]


def _mmlu_jobs(args) -> int:
    for line in mmlu_jobs(args.runs, args.base, args.eval_root):
        print(line)
    return 0


def _budget(args) -> int:
    for model in args.models.split(","):
        text, _ = budget_table(model)
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    ap = argparse.ArgumentParser(prog="python -m nora.results", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tables", help="render every table, figure and results/README.md")
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="results")
    p.set_defaults(fn=_tables)
    p = sub.add_parser("demo-table", help="the offline digits demo's table and figures")
    p.add_argument("--runs", default="runs/demo")
    p.add_argument("--out", default="results")
    p.add_argument("--check", action="store_true", help="only exit 0 if complete demo runs exist, 1 otherwise")
    p.set_defaults(fn=_demo_table)
    p = sub.add_parser("plan", help="a sweep's jobs (or a group: table1, table2, ablations, matched_budget)")
    p.add_argument("sweep")
    p.add_argument("overrides", nargs="*")
    p.add_argument("-q", "--quiet", action="store_true", help="counts only")
    p.set_defaults(fn=_plan)
    p = sub.add_parser("mmlu-jobs", help="eval.py arguments still to run for Table 2")
    p.add_argument("--runs", default="runs/table2")
    p.add_argument("--base", default="llama3_8b", help="base model config name ('' for none)")
    p.add_argument("--eval-root", default="runs/eval")
    p.set_defaults(fn=_mmlu_jobs)
    p = sub.add_parser("budget", help="matched-budget parameter counts (real shapes)")
    p.add_argument("--models", default="vit_tiny,llama3_8b")
    p.set_defaults(fn=_budget)
    args = ap.parse_args(argv)
    with user_errors():  # a bad sweep name or override, a missing --runs, an --out that cannot be written: one line
        return args.fn(args)


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
