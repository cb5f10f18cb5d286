"""The offline demo: real transfer learning on real data that ships with scikit-learn.

1. **Pretrain** (cached): a 4-block, 64-wide ViT is trained from scratch by this project on a
   *source* task built from scikit-learn's handwritten digits (upright digits 0-4).
2. **Fine-tune**: each method adapts that backbone to three *target* tasks with different kinds of shift
   (configs/demo/demo.yaml), over several seeds, through exactly the same ``run_training`` as ``train.py``
   (composed with ``experiment=demo``), at the learning rates in configs/demo/learning_rates.yaml.
3. **Report**: ``results/demo.md``: one section per task, a summary across tasks, and the paired differences
   NoRA - linear probe and NoRA++ - LoRA with 95% intervals.

    python -m nora.demo                      # the README's first command (make demo)
    python -m nora.demo --full               # more seeds on every task (make demo-full)
    python -m nora.demo --seeds 3 --methods lora,nora --tasks rot90
    python -m nora.demo --tune               # the learning-rate sweep behind configs/demo/learning_rates.yaml

Every run uses one CPU thread (``--jobs`` runs go side by side), so a run's numbers do not depend on the
machine's core count: the demo reproduces to the digit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from omegaconf import OmegaConf

from nora.adapter.io import FULL_FT_NAME
from nora.app.config import CONFIG_DIR, compose, validate
from nora.app.training import run_training
from nora.errors import UserError, user_errors
from nora.files import atomic_path, write_text_atomic
from nora.files import cache_dir as nora_cache_dir
from nora.kernels import cpu as cpu_kernels
from nora.logs import setup_logging
from nora.methods import get_method
from nora.results.collect import collect
from nora.results.demo_report import demo_settings
from nora.results.render import render_demo
from nora.results.sweep import override_error
from nora.runs.layout import RunDir

log = logging.getLogger(__name__)

LEARNING_RATES = CONFIG_DIR / "demo" / "learning_rates.yaml"
HEAD_LR_METHOD = "linear_probe"  # the lr sweep tunes it first: its best lr becomes every method's head lr


def learning_rates() -> dict:
    """configs/demo/learning_rates.yaml: ``head_lr`` and each method's trainer overrides (``lr``, ``nora_lr``)."""
    return OmegaConf.to_container(OmegaConf.load(LEARNING_RATES), resolve=True)


def digits_overrides(task: dict) -> list[str]:
    return [
        f"dataset.classes=[{','.join(map(str, task['classes']))}]",
        f"dataset.num_classes={len(task['classes'])}",
        f"dataset.transform={task['transform']}",
    ]


def cache_dir() -> Path:
    return nora_cache_dir("demo")


def source_key(cfg) -> str:
    """The cache key of the source backbone: the composed pretraining config (model, data, trainer, method, seed)
    and the code that shapes the backbone (data path, loop, model), so that an edit to any of it pretrains afresh
    instead of reusing a backbone the current code and configs would not produce."""
    key = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "dataset", "trainer", "method")}
    h = hashlib.sha256(json.dumps([key, cfg.seed], sort_keys=True, default=str).encode())
    pkg = Path(__file__).resolve().parents[1]
    for rel in (
        "data/vision.py",
        "data/batched.py",
        "data/sampling.py",
        "data/config.py",
        "train/loop.py",
        "models/vision.py",
        "methods/__init__.py",
        "app/training.py",
        "app/config.py",
        "app/setup/vision.py",
    ):
        h.update((pkg / rel).read_bytes())
    return h.hexdigest()[:10]


def pretrain_source(out_root: Path) -> Path:
    """Train the source backbone once (reproducible, cached by its settings) and return its weights."""
    conf = demo_settings()
    source, pre = conf["source"], dict(conf["pretrain"])
    seed = pre.pop("seed")
    cfg = compose(
        [
            "experiment=demo",
            "method=full",
            f"seed={seed}",
            "dataset.name=digits_source",
            f"trainer.epochs={pre['epochs']}",
            f"trainer.lr={pre['lr']}",
            f"trainer.batch_size={pre['batch_size']}",
            "trainer.weight_decay=0.05",
            "model.checkpoint=null",
            "trainer.warmup_ratio=0.1",
            "force=true",
        ]
        + digits_overrides(source)
    )
    weights = cache_dir() / f"source_{source_key(cfg)}.safetensors"
    if weights.exists():
        return weights
    log.info(f"pretraining the source backbone on digits {source['classes']} (cached in {weights})")
    run_dir = out_root / "source"
    summary = run_training(cfg, run_dir=run_dir)
    log.info(f"  source accuracy {summary['final_accuracy']:.1f}% after {summary['wall_time_s']:.0f} s")

    weights.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights) as tmp:
        shutil.copy(RunDir(run_dir).adapter / FULL_FT_NAME, tmp)
    return weights


def lr_overrides(method: str, lrs: dict | None = None, head_lr: float | None = None) -> list[str]:
    """Trainer overrides for ``method``: its tuned learning rates (or ``lrs``) and the shared head lr."""
    table = learning_rates()
    lrs = table["methods"].get(method, {}) if lrs is None else lrs
    out = [f"trainer.{k}={v}" for k, v in lrs.items()]
    if get_method(method).head_lr:  # not full FT or the linear probe: their head trains at their own lr
        out.append(f"trainer.head_lr={table['head_lr'] if head_lr is None else head_lr}")
    if get_method(method).uses_lora:
        # at this size, drawing LoRA's dropout masks costs as much as the rest of the training step on a CPU
        out.append("method.lora.dropout=0.0")
    return out


def finetune(
    method: str,
    task: str,
    seed: int,
    weights: Path,
    out_root: Path,
    extra: list[str],
    lrs: dict | None = None,
    name: str | None = None,
    head_lr: float | None = None,
) -> dict:
    """One fine-tuning run of ``method`` on target ``task`` in ``out_root/<task>/<name>``; returns its summary."""
    tasks = demo_settings()["tasks"]
    # a run left by an older demo (another backbone, other learning rates) is redone, not reused
    cfg = compose(
        [
            "experiment=demo",
            f"method={method}",
            f"seed={seed}",
            f"model.checkpoint={weights}",
            f"output_root={out_root}",
            "on_config_change=rerun",
            "trainer.eval_every=1",
        ]
        + digits_overrides(tasks[task])
        + lr_overrides(method, lrs, head_lr)
        + list(extra)
    )
    return run_training(cfg, run_dir=out_root / task / (name or f"{method}_s{seed}"))


_kernel_build: threading.Thread | None = None


def build_kernels_in_background() -> None:
    """Start building NoRA's C++ CPU kernel (:mod:`nora.kernels.cpu`; cached, about 30 s on a fresh machine) on a
    thread of this process, so that it compiles while the backbone pretrains instead of inside the first NoRA run of
    every worker (each of which would otherwise wait for the same build). :func:`run_jobs` waits for it."""
    global _kernel_build
    if _kernel_build is None:
        _kernel_build = threading.Thread(target=cpu_kernels.available, name="nora-kernel-build", daemon=True)
        _kernel_build.start()


def wait_for_kernels() -> None:
    """Block until the kernel build that :func:`build_kernels_in_background` started (or starts now) has finished."""
    build_kernels_in_background()
    _kernel_build.join()


def one_thread_worker() -> None:
    import torch

    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


def _run_job(job: dict) -> dict:
    """Pool entry point: one ``finetune`` call, its summary (quietly: the parent prints one line per run)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        s = finetune(**job)
    return {
        "job": job,
        "accuracy": s["final_accuracy"],
        "trainable": s["parameters"]["trainable"],
        "wall_time_s": s["wall_time_s"],
    }


def run_jobs(jobs: list[dict], n_procs: int, run=_run_job) -> list[dict]:
    """Run jobs (``finetune`` keyword arguments; ``run``: the module-level function that runs one and returns its
    ``{"job", "accuracy", "trainable", "wall_time_s"}``) on ``n_procs`` single-threaded processes, printing one line
    per finished run."""
    one_thread_worker()
    wait_for_kernels()
    done = []
    if n_procs <= 1:
        for r in map(run, jobs):
            done.append(_report(r))
        return done
    with ProcessPoolExecutor(n_procs, mp_context=get_context("spawn"), initializer=one_thread_worker) as pool:
        for r in pool.map(run, jobs):
            done.append(_report(r))
    return done


def _report(r: dict) -> dict:
    j = r["job"]
    label = j.get("name") or f"{j['method']}_s{j['seed']}"
    log.info(
        f"  {j.get('task', 'world'):10s} {label:28s} accuracy {r['accuracy']:5.1f}%  ({r['trainable']:,} trainable, "
        f"{r['wall_time_s']:.1f} s)",
    )
    return r


def _grid_runs(
    method: str, key: str, values: list[float], seeds: list[int], base: dict, common: dict, n_procs: int, run=_run_job
) -> dict[float, list[float]]:
    """Validation accuracy per seed of ``method`` at each of ``values`` of ``key``."""
    jobs = [
        dict(method=method, seed=s, lrs=dict(base, **{key: v}), name=f"{method}_{key}{v:g}_s{s}", **common)
        for v in values
        for s in seeds
    ]
    accs = [r["accuracy"] for r in run_jobs(jobs, n_procs, run)]
    return {v: accs[i * len(seeds) : (i + 1) * len(seeds)] for i, v in enumerate(values)}


def next_value(v: float, up: bool, ratio: float) -> float:
    """The next grid value beyond ``v``: on the 1-3-10 ladder when ``v`` is on it (0.3 -> 1 -> 3), else ``ratio``
    times (or over) ``v``."""
    e = math.floor(math.log10(v))
    m = round(v / 10**e, 6)
    if m in (1.0, 3.0):
        steps = {
            (1.0, True): 3 * 10**e,
            (3.0, True): 10 ** (e + 1),
            (1.0, False): 3 * 10 ** (e - 1),
            (3.0, False): 10**e,
        }
        return float(f"{steps[(m, up)]:.3g}")
    return float(f"{(v * ratio if up else v / ratio):.3g}")


def sweep_method(
    method: str,
    key: str,
    grid: list[float],
    seeds: list[int],
    base: dict,
    common: dict,
    n_procs: int,
    max_widen: int = 3,
    run=_run_job,
) -> tuple[dict[float, list[float]], float]:
    """Sweep ``key`` of ``method`` over ``grid``; while the best mean sits at an end of the swept values, add the
    next value beyond that end (``next_value``), at most ``max_widen`` times, so that no chosen value is at
    an edge of what was tried. Returns every value's per-seed accuracies and the best value (ties: smaller)."""
    grid = sorted(grid)
    ratio = grid[1] / grid[0]
    results = _grid_runs(method, key, grid, seeds, base, common, n_procs, run)

    def best() -> float:
        return max(results, key=lambda v: (sum(results[v]) / len(results[v]), -v))

    for _ in range(max_widen):
        low, high = min(results), max(results)
        if best() not in (low, high):
            break
        nxt = next_value(best(), up=best() == high, ratio=ratio)
        results.update(_grid_runs(method, key, [nxt], seeds, base, common, n_procs, run))
    return results, best()


def tune(weights: Path, out_root: Path, table: Path, methods: list[str], n_procs: int) -> str:
    """The learning-rate sweep behind configs/demo/learning_rates.yaml (see ``tune:`` in configs/demo/demo.yaml).

    Each grid value runs on the tuning seeds with the validation split of the tuning task's training images
    (the test images are never used); the best mean validation accuracy wins, ties keep the smaller lr, and a best
    value at an end of the grid widens it (``sweep_method``). The linear probe goes first: its best lr becomes
    every method's head lr. NoRA++ keeps LoRA's best lr for its LoRA factors and tunes its NoRA factors' lr.
    Writes the sweep table and the learning-rate file."""
    conf = demo_settings()["tune"]
    grids, seeds, task = conf["grids"], list(conf["seeds"]), conf["task"]
    # the probe first, a method that keeps another's lr (NoRA++: LoRA's) after the others
    order = sorted(methods, key=lambda m: (m != HEAD_LR_METHOD, get_method(m).lr_from is not None))
    chosen = learning_rates()
    rows, best = [], {}
    for method in order:
        ((key, grid),) = grids[method].items()
        base = dict(chosen["methods"].get(method, {}))
        if get_method(method).lr_from in best:
            base["lr"] = best[get_method(method).lr_from][0]
        common = dict(
            task=task,
            weights=weights,
            out_root=out_root,
            extra=["dataset.eval_split=validation"],
            head_lr=best.get(HEAD_LR_METHOD, (None,))[0],
        )
        results, value = sweep_method(method, key, list(grid), seeds, base, common, n_procs)
        for v in sorted(results):
            rows.append(
                (method, f"{key}={v:g}", results[v], sum(results[v]) / len(results[v]), "" if v in grid else "widened")
            )
        best[method] = (value, sum(results[value]) / len(results[value]), sorted(results))
        chosen["methods"][method] = dict(base, **{key: value})
        if method == HEAD_LR_METHOD:
            chosen["head_lr"] = value
    write_learning_rates(chosen, task, seeds)
    text = sweep_table(rows, best, grids, seeds, task, chosen["head_lr"])
    untuned = [m for m in demo_settings()["methods"] if m not in methods]
    if untuned:
        text += (
            f"\nNot in this sweep (`--methods`): {', '.join(untuned)}; they keep their values in "
            "`configs/demo/learning_rates.yaml`.\n"
        )
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text)
    return text


def sweep_rows(rows, best: dict, grids: dict, seeds: list) -> list[str]:
    """A learning-rate sweep's markdown table (one row per method and value, per-seed accuracies and mean), its
    best values and the methods still at an edge; shared by both demos' sweep tables."""
    lines = [
        "| method | setting | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | |",
        "|---|---|" + "---|" * (len(seeds) + 2),
    ]
    lines += [
        f"| {m} | {setting} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {mean:.1f} | {note} |"
        for m, setting, accs, mean, note in rows
    ]
    edge = [m for m, (v, _a, tried) in best.items() if v in (tried[0], tried[-1])]
    return lines + [
        "",
        "Best: " + ", ".join(f"{m} {next(iter(grids[m]))}={v:g}" for m, (v, _a, _t) in best.items()),
        "",
        "Still at an end of the values tried after widening: " + (", ".join(edge) or "none") + ".",
    ]


def sweep_table(rows, best: dict, grids: dict, seeds: list, task: str, head_lr: float) -> str:
    n_grid = len(next(iter(next(iter(grids.values())).values())))
    lines = [
        f"# Demo learning-rate sweep (task `{task}`, validation split of its training images, seeds "
        f"{', '.join(map(str, seeds))})",
        "",
        "Written by `python -m nora.demo --tune`; the chosen values are in `configs/demo/learning_rates.yaml`, "
        "which `make demo` and `make demo-full` read. Every method has the same budget: "
        f"{n_grid} grid values x {len(seeds)} seeds (`tune:` in `configs/demo/demo.yaml`), plus one value "
        "beyond the end of its grid each time its best value sat at that end (rows marked `widened`).",
        "",
        *sweep_rows(rows, best, grids, seeds),
        "",
        f"Every method's new head trains at the linear probe's best lr ({head_lr:g}); NoRA++ keeps "
        "LoRA's best lr for its LoRA factors and tunes the NoRA factors' lr. Ties keep the smaller lr. "
        "LoRA/DoRA/NoRA++ adapters use dropout 0 in the demo (see `lr_overrides`).",
    ]
    return "\n".join(lines) + "\n"


def write_learning_rates(chosen: dict, task: str, seeds: list) -> None:
    header = (
        f"# The demo's learning rates, written by `python -m nora.demo --tune` (task {task}, validation split, "
        f"seeds {seeds};\n# table: results/demo_lr_sweep.md). `lr` trains the method's own parameters, "
        "`nora_lr` NoRA++'s NoRA factors;\n# every method's new head trains at `head_lr` (the linear probe's "
        "best lr). make demo, make demo-full and the sweep read it.\n"
    )
    write_text_atomic(LEARNING_RATES, header + OmegaConf.to_yaml(OmegaConf.create(chosen)))


def check_arguments(methods: list[str], tasks: list[str], overrides: list[str], conf: dict) -> None:
    """``--methods``, ``--tasks`` and the extra Hydra overrides, before anything is pretrained: an unknown name,
    an override Hydra refuses (a typo'd key, an unknown option) or one that gives the fine-tuning runs an invalid
    value is one :class:`UserError` line naming it and what is valid."""
    for what, given, valid in (
        ("--methods", methods, list(conf["tune"]["grids"])),
        ("--tasks", tasks, list(conf["tasks"])),
    ):
        unknown = [x for x in given if x not in valid]
        if unknown:
            raise UserError(f"{what}: unknown {what[2:-1]} {unknown[0]!r}; valid: {', '.join(valid)}")
    for method in methods if overrides else ():  # each method's runs get the overrides
        base = ["experiment=demo", f"method={method}"]
        try:
            cfg = compose(base + list(overrides))
        except Exception as exc:  # Hydra's errors for a bad override, as one line
            err = override_error(exc, overrides, lambda ov, base=base: compose(base + ov))
            if err is None:
                raise
            raise UserError(f"{err} (the fine-tuning runs of method={method})") from None
        validate(cfg)  # a value the schemas refuse (trainer.lr=abc): their one-line UserError


def demo_jobs(
    methods: list[str], tasks: list[str], seeds: dict, epochs: dict, weights: Path, out_root: Path, extra: list[str]
) -> list[dict]:
    """Every (task, method, seed) run of the demo, seed by seed across the tasks (seed 0 of every task, then seed
    1, ...): an interrupted demo has every method of a task at the same number of seeds and every task started,
    and a rerun skips the finished runs."""
    return [
        dict(
            method=m, task=t, seed=s, weights=weights, out_root=out_root, extra=[f"trainer.epochs={epochs[t]}", *extra]
        )
        for s in range(max(seeds.values(), default=0))
        for t in tasks
        if s < seeds[t]
        for m in methods
    ]


def main(argv: list[str] | None = None) -> int:
    conf = demo_settings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(conf["methods"]))
    ap.add_argument("--tasks", default=",".join(conf["tasks"]), help=f"valid: {', '.join(conf['tasks'])}")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per task (default: each task's `seeds`)")
    ap.add_argument("--full", action="store_true", help="each task's `full_seeds` (make demo-full)")
    ap.add_argument("--jobs", type=int, default=2, help="single-threaded runs side by side (default 2)")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument(
        "--results",
        default=None,
        help="where demo.md (and the sweep table) go (default: results, with --full results/demo_full)",
    )
    ap.add_argument("--tune", action="store_true", help="run the learning-rate sweep instead")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the fine-tuning runs")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")

    out_root, t0 = Path(args.out), time.time()
    args.results = args.results or ("results/demo_full" if args.full else "results")
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    with user_errors():
        check_arguments(methods, tasks, args.overrides, conf)  # before anything starts
        one_thread_worker()  # the pretraining too: one thread, so the cached backbone is the same on every machine
        build_kernels_in_background()  # on the other core, while the backbone pretrains
        weights = pretrain_source(out_root)
        if args.tune:
            print(
                tune(
                    weights, Path(str(out_root) + "_tune"), Path(args.results) / "demo_lr_sweep.md", methods, args.jobs
                )
            )
            return 0
        seeds = {t: args.seeds or conf["tasks"][t]["full_seeds" if args.full else "seeds"] for t in tasks}
        epochs = {t: conf["tasks"][t]["epochs"] for t in tasks}
        run_jobs(demo_jobs(methods, tasks, seeds, epochs, weights, out_root, args.overrides), args.jobs)

        render_demo(collect(out_root), Path(args.results), str(out_root), methods, seeds, full=args.full)
    print((Path(args.results) / "demo.md").read_text())
    log.info(f"demo finished in {time.time() - t0:.0f} s; tables written to {args.results}/demo.md")
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
