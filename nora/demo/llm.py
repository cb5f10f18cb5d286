"""The offline LLM demo: the paper's second half (instruction tuning scored on MMLU-format questions) on a model
that knows something, on 2 CPU cores.

1. **World** (:mod:`nora.data.world`): people with a city, a job and a mentor, sums and unit conversions, rendered
   as varied prose, plus standard-library prose; Alpaca-format instructions about one group of people and number
   pairs; four-choice questions about other groups in MMLU's CSV layout (``dev/``, ``val/``, ``test/``,
   ``subjects.json``: STEM = arithmetic, units; knowledge = facts, relations).
2. **Pretrain** (cached): a byte-level BPE tokenizer (``tokenizers``) and a small ``LlamaConfig`` model (gated SiLU
   MLP) trained on the world's text, saved with ``save_pretrained`` (configs/demo/demo_llm.yaml).
3. **Instruction-tune** through ``run_training`` (what ``train.py`` runs), composed with ``experiment=demo_llm``,
   for every method over several seeds, at the learning rates in configs/demo/learning_rates_llm.yaml.
4. **Score** through ``run_eval`` (what ``eval.py`` runs): 5-shot, lm_eval's ``mmlu_continuation`` protocol, on
   ``test/`` (``--tune``: ``val/``); the base model is a row too. Report: ``results/demo_llm.md``.

    python -m nora.demo.llm                  # part of make demo
    python -m nora.demo.llm --full           # 10 seeds (make demo-full): results/demo_llm_full/
    python -m nora.demo.llm --tune           # the learning-rate sweep behind configs/demo/learning_rates_llm.yaml
    python -m nora.demo.llm --diagnose       # results/demo_llm_diagnosis.md (nora/demo/llm_diagnosis.py)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from nora.app.config import CONFIG_DIR, compose
from nora.app.evaluation import run_eval
from nora.app.training import run_training
from nora.demo.llm_backbone import pretrain_backbone, world_data
from nora.demo.llm_diagnosis import diagnose, diagnosis_runs
from nora.demo.runner import build_kernels_in_background, one_thread_worker, run_jobs, sweep_method, sweep_rows
from nora.errors import UserError, user_errors
from nora.files import write_text_atomic
from nora.logs import setup_logging
from nora.methods import get_method
from nora.results.collect import collect
from nora.results.demo_llm_report import demo_llm_settings, render_demo_llm

log = logging.getLogger(__name__)

LEARNING_RATES = CONFIG_DIR / "demo" / "learning_rates_llm.yaml"


def learning_rates() -> dict:
    return OmegaConf.to_container(OmegaConf.load(LEARNING_RATES), resolve=True)


def lr_overrides(method: str, lrs: dict | None = None) -> list[str]:
    lrs = learning_rates()["methods"].get(method, {}) if lrs is None else lrs
    out = [f"trainer.{k}={v}" for k, v in lrs.items()]
    if get_method(method).uses_lora:
        out.append("method.lora.dropout=0.0")  # as the vision demo: dropout masks cost more than they give here
    return out


def finetune(
    method: str,
    seed: int,
    backbone: str,
    data: str,
    out_root: str,
    epochs: int,
    eval_split: str,
    eval_conf: dict,
    lrs: dict | None = None,
    name: str | None = None,
    extra: tuple = (),
) -> dict:
    """Instruction-tune ``method`` (``run_training``, as train.py) and score it (``run_eval``, as eval.py); returns
    the run's summary with its ``mmlu`` result."""
    run_dir = Path(out_root) / (name or f"{method}_s{seed}")
    cfg = compose(
        [
            "experiment=demo_llm",
            f"method={method}",
            f"seed={seed}",
            f"model.path={backbone}",
            f"data.path={Path(data) / 'alpaca.json'}",
            f"output_root={out_root}",
            "on_config_change=rerun",
            f"trainer.epochs={epochs}",
            "dataset.cache_dir=" + str(Path(out_root) / "cache"),
        ]
        + lr_overrides(method, lrs)
        + list(extra)
    )
    summary = run_training(cfg, run_dir=run_dir)
    mmlu = score(run_dir, data, eval_split, eval_conf)
    return {**summary, "mmlu": mmlu}


def score(target: Path, data: str, split: str, eval_conf: dict, out_dir: Path | None = None) -> dict:
    """``run_eval`` on the world's questions: the training run ``target``, or (``out_dir`` given) the base model
    folder ``target``, written to ``out_dir/mmlu.json``."""
    out, summary = target / "mmlu.json", target / "summary.json"
    if (
        out_dir is None
        and out.exists()
        and summary.exists()
        and out.stat().st_mtime >= summary.stat().st_mtime
        and json.loads(out.read_text()).get("split") == ("validation" if split == "val" else split)
    ):
        return json.loads(out.read_text())  # this run's own evaluation, written after it finished
    common = [
        f"mmlu.path={Path(data) / 'mmlu'}",
        f"mmlu.protocol={eval_conf['protocol']}",
        f"mmlu.k={eval_conf['k']}",
        f"mmlu.batch_size={eval_conf['batch_size']}",
        f"mmlu.split={split}",
        "mmlu.subjects=all",
        "mmlu.progress=false",
        "device=cpu",
    ]
    who = (
        [f"run_dir={target}"]
        if out_dir is None
        else ["model=llama_demo", f"model.path={target}", f"output_dir={out_dir}"]
    )
    with contextlib.redirect_stdout(io.StringIO()):
        return run_eval(compose(who + common, config_name="eval"))


def _run_job(job: dict) -> dict:
    """Pool entry point: one instruction-tuning run and its evaluation (quietly)."""
    with contextlib.redirect_stdout(io.StringIO()):
        s = finetune(**job)
    return {
        "job": job,
        "accuracy": 100 * s["mmlu"]["overall"]["accuracy"],
        "trainable": s["parameters"]["trainable"],
        "wall_time_s": s["wall_time_s"],
    }


def base_score(backbone: Path, data: Path, out_root: Path, split: str, eval_conf: dict) -> dict:
    """The base model's evaluation (no tuning), written to ``out_root/base/mmlu.json``."""
    (out_root / "base").mkdir(parents=True, exist_ok=True)
    path = out_root / "base" / "mmlu.json"
    if path.exists():
        d = json.loads(path.read_text())
        if d.get("split") == ("validation" if split == "val" else split) and d.get("model", {}).get("path") == str(
            backbone
        ):
            return d
    return score(backbone, str(data), split, eval_conf, out_dir=out_root / "base")


def tune(conf: dict, backbone: Path, data: Path, out_root: Path, table: Path, methods: list[str], n_procs: int) -> str:
    """The learning-rate sweep (``tune:`` in configs/demo/demo_llm.yaml) on the ``val/`` questions, same budget
    per method; NoRA++ keeps LoRA's best lr for its LoRA factors and tunes its NoRA factors' lr."""
    grids, seeds = conf["tune"]["grids"], list(conf["tune"]["seeds"])
    order = sorted(methods, key=lambda m: get_method(m).lr_from is not None)  # NoRA++ after LoRA
    chosen = learning_rates()
    rows, best = [], {}
    common = dict(
        backbone=str(backbone),
        data=str(data),
        out_root=str(out_root),
        epochs=conf["epochs"],
        eval_split="val",
        eval_conf=conf["eval"],
    )
    for method in order:
        ((key, grid),) = grids[method].items()
        base = dict(chosen["methods"].get(method, {}))
        if get_method(method).lr_from in best:
            base["lr"] = best[get_method(method).lr_from][0]
        results, value = sweep_method(method, key, list(grid), seeds, base, common, n_procs, run=_run_job)
        for v in sorted(results):
            rows.append(
                (method, f"{key}={v:g}", results[v], sum(results[v]) / len(results[v]), "" if v in grid else "widened")
            )
        best[method] = (value, sum(results[value]) / len(results[value]), sorted(results))
        chosen["methods"][method] = dict(base, **{key: value})
    header = (
        "# The LLM demo's learning rates, written by `python -m nora.demo.llm --tune` (val/ questions, seeds "
        f"{seeds}; table: results/demo_llm_lr_sweep.md).\n"
    )
    write_text_atomic(LEARNING_RATES, header + OmegaConf.to_yaml(OmegaConf.create(chosen)))
    lines = [
        f"# LLM demo learning-rate sweep (val/ questions, seeds {', '.join(map(str, seeds))})",
        "",
        "Written by `python -m nora.demo.llm --tune`; the chosen values are in "
        "`configs/demo/learning_rates_llm.yaml`. Every method has the same budget (five grid values x "
        f"{len(seeds)} seeds), plus one value beyond an end of its grid each time its best sat there "
        "(`widened`). Accuracy: eval.py's overall accuracy (%) on the val/ questions.",
        "",
        *sweep_rows(rows, best, grids, seeds),
    ]
    text = "\n".join(lines) + "\n"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--settings", default=None)
    conf = demo_llm_settings(pre.parse_known_args(argv)[0].settings)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=None, help="another demo_llm.yaml (default configs/demo/demo_llm.yaml)")
    ap.add_argument("--methods", default=",".join(conf["methods"]))
    ap.add_argument("--seeds", type=int, default=None, help=f"seeds per method (default {conf['seeds']})")
    ap.add_argument("--full", action="store_true", help=f"{conf['full_seeds']} seeds (make demo-full)")
    ap.add_argument("--jobs", type=int, default=2, help="single-threaded runs side by side (default 2)")
    ap.add_argument("--out", default="runs/demo_llm")
    ap.add_argument(
        "--results", default=None, help="where demo_llm.md goes (default results, --full results/demo_llm_full)"
    )
    ap.add_argument("--tune", action="store_true", help="run the learning-rate sweep instead")
    ap.add_argument("--diagnose", action="store_true", help="measure the finished runs (results/demo_llm_diagnosis.md)")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    t0 = time.time()
    out_root = Path(args.out)
    args.results = args.results or ("results/demo_llm_full" if args.full else "results")
    methods = args.methods.split(",")
    with user_errors():
        unknown = [m for m in methods if m not in conf["tune"]["grids"]]
        if unknown:
            raise UserError(f"--methods: unknown method {unknown[0]!r}; valid: {', '.join(conf['tune']['grids'])}")
        if args.diagnose:
            diagnosis_runs(conf, out_root)  # the runs it measures are there, before the backbone is built
        build_kernels_in_background()  # compiles (first time only) while the backbone pretrains
        data = world_data(conf)
        backbone = pretrain_backbone(conf, data)
        one_thread_worker()
        if args.tune:
            print(
                tune(
                    conf,
                    backbone,
                    data,
                    Path(str(out_root) + "_tune"),
                    Path(args.results) / "demo_llm_lr_sweep.md",
                    methods,
                    args.jobs,
                )
            )
            return 0
        if args.diagnose:
            common = dict(
                backbone=str(backbone),
                data=str(data),
                out_root=str(out_root) + "_diagnosis",
                epochs=conf["epochs"],
                eval_split="test",
                eval_conf=conf["eval"],
            )
            text = diagnose(conf, data, out_root, common, args.jobs, run_jobs, _run_job, learning_rates()["methods"])
            write_text_atomic(Path(args.results) / "demo_llm_diagnosis.md", text)
            print(text)
            return 0
        base_score(backbone, data, out_root, "test", conf["eval"])
        n = args.seeds or conf["full_seeds" if args.full else "seeds"]
        jobs = [
            dict(
                method=m,
                seed=s,
                backbone=str(backbone),
                data=str(data),
                out_root=str(out_root),
                epochs=conf["epochs"],
                eval_split="test",
                eval_conf=conf["eval"],
            )
            for s in range(n)
            for m in methods
        ]
        run_jobs(jobs, args.jobs, run=_run_job)
        render_demo_llm(
            collect(out_root), Path(args.results), str(out_root), methods, n, backbone, data, full=args.full, conf=conf
        )
    print((Path(args.results) / "demo_llm.md").read_text())
    log.info(f"LLM demo finished in {time.time() - t0:.0f} s; tables written to {args.results}/demo_llm.md")
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
