"""The offline demo: real transfer learning on real data that ships with scikit-learn.

1. **Pretrain** (cached): a 4-block, 64-wide ViT is trained from scratch by this project on a
   *source* task built from scikit-learn's handwritten digits.
2. **Fine-tune**: each method adapts that backbone to a different *target* task, over several seeds,
   through exactly the same ``run_training`` as ``train.py`` (composed with ``experiment=demo``).
3. **Report**: ``results/demo.md`` (accuracy mean ± std, trainable parameters and share, time per
   method), printed as well.

    python -m nora.demo                      # the README's first command (make demo)
    python -m nora.demo --seeds 3 --methods lora,nora
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# The source task: upright digits 0-4. The target task: digits 5-9 rotated by 90 degrees, so new
# classes *and* a new geometry: a new head on frozen source features is not enough.
SOURCE = {"classes": [0, 1, 2, 3, 4], "transform": "none"}
TARGET = {"classes": [5, 6, 7, 8, 9], "transform": "rot90"}
PRETRAIN = {"epochs": 40, "lr": 2e-3, "batch_size": 32}
METHODS = ("linear_probe", "full", "lora", "nora", "nora_pp", "rational_ft", "zero_init_ft")

# Learning rates of the demo's fine-tuning runs, chosen by `python -m nora.demo --tune` (seeds 0 and 1, best
# mean accuracy on a validation split held out from the target *training* images; the test images are never
# used for it). The sweep's table is results/demo_lr_sweep.md. `lr` trains the method's own parameters (all weights,
# LoRA, or the NoRA factors); NoRA++ keeps LoRA's lr and tunes `nora_lr`; every method's new head uses the
# linear probe's best lr.
LR_GRID = {"linear_probe": {"lr": [1e-2, 3e-2, 1e-1, 3e-1]}, "full": {"lr": [3e-4, 1e-3, 3e-3, 1e-2]},
           "lora": {"lr": [3e-4, 1e-3, 3e-3, 1e-2]}, "nora": {"lr": [1e-2, 3e-2, 1e-1, 3e-1]},
           "nora_pp": {"nora_lr": [1e-2, 3e-2, 1e-1, 3e-1]}, "rational_ft": {"lr": [1e-3, 3e-3, 1e-2, 3e-2]},
           "zero_init_ft": {"lr": [1e-3, 3e-3, 1e-2, 3e-2]}}
DEMO_LR = {"linear_probe": {"lr": 3e-1}, "full": {"lr": 1e-3}, "lora": {"lr": 3e-3},
           "nora": {"lr": 3e-2}, "nora_pp": {"lr": 3e-3, "nora_lr": 3e-2},
           "rational_ft": {"lr": 3e-2}, "zero_init_ft": {"lr": 3e-2}}
HEAD_LR = 3e-1  # the linear probe's best lr


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def _digits_overrides(task: dict) -> list[str]:
    return [f"dataset.classes=[{','.join(map(str, task['classes']))}]", f"dataset.num_classes={len(task['classes'])}",
            f"dataset.transform={task['transform']}"]


def cache_dir() -> Path:
    from nora.files import cache_dir as nora_cache_dir

    return nora_cache_dir("demo")


def pretrain_source(out_root: Path, seed: int = 0) -> Path:
    """Train the source backbone once (reproducible, cached by its settings) and return its weights."""
    from nora.run import run_training

    # keyed by the settings and by the code that shapes the backbone (data path, loop, model), so an edit to any
    # of it pretrains afresh instead of reusing a backbone the current code would not produce
    h = hashlib.sha256(json.dumps([SOURCE, PRETRAIN, seed], sort_keys=True).encode())
    pkg = Path(__file__).resolve().parent
    for rel in ("demo.py", "data/vision.py", "data/batched.py", "data/sampling.py", "train/loop.py",
                "models/vision.py", "methods/__init__.py", "run.py"):
        h.update((pkg / rel).read_bytes())
    key = h.hexdigest()[:10]
    weights = cache_dir() / f"source_{key}.safetensors"
    if weights.exists():
        return weights
    print(f"pretraining the source backbone on digits {SOURCE['classes']} (cached in {weights})", flush=True)
    cfg = _compose(["experiment=demo", "method=full", f"seed={seed}", "dataset.name=digits_source",
                    f"trainer.epochs={PRETRAIN['epochs']}", f"trainer.lr={PRETRAIN['lr']}",
                    f"trainer.batch_size={PRETRAIN['batch_size']}", "trainer.weight_decay=0.05",
                    "model.checkpoint=null", "trainer.warmup_ratio=0.1", "force=true"] + _digits_overrides(SOURCE))
    run_dir = out_root / "source"
    summary = run_training(cfg, run_dir=run_dir)
    print(f"  source accuracy {summary['final_accuracy']:.1f}% after {summary['wall_time_s']:.0f} s", flush=True)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    shutil.copy(run_dir / "adapter" / "trainable.safetensors", tmp)
    os.replace(tmp, weights)
    return weights


def lr_overrides(method: str, lrs: dict | None = None) -> list[str]:
    lrs = DEMO_LR.get(method, {}) if lrs is None else lrs
    out = [f"trainer.{k}={v}" for k, v in lrs.items()]
    if method not in ("full", "linear_probe"):  # those train the head with their own lr
        out.append(f"trainer.head_lr={HEAD_LR}")
    if method in ("lora", "dora", "nora_pp"):
        # at this size, drawing LoRA's dropout masks costs as much as the rest of the training step on a CPU
        out.append("method.lora.dropout=0.0")
    return out


def finetune(method: str, seed: int, weights: Path, out_root: Path, extra: list[str],
             lrs: dict | None = None, name: str | None = None) -> dict:
    from nora.run import run_training

    # a run left by an older demo (another backbone, other learning rates) is redone, not reused
    cfg = _compose(["experiment=demo", f"method={method}", f"seed={seed}", f"model.checkpoint={weights}",
                    f"output_root={out_root}", "on_config_change=rerun"]
                   + _digits_overrides(TARGET) + lr_overrides(method, lrs) + extra)
    return run_training(cfg, run_dir=out_root / (name or f"{method}_s{seed}"))


def tune(weights: Path, out_root: Path, table: Path, methods: list[str], seeds: tuple[int, ...] = (0, 1)) -> str:
    """The learning-rate sweep behind DEMO_LR, on a validation split of the target training images: each value
    on ``seeds``, the best mean validation accuracy wins (a value that only sometimes trains is not chosen)."""
    lines = [f"# Demo learning-rate sweep (validation split of the target training images, seeds "
             f"{', '.join(map(str, seeds))})", "",
             "| method | setting | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    global HEAD_LR
    best = {}
    order = sorted(methods, key=lambda m: m != "linear_probe")  # the probe first: its lr is every head's lr
    for method in order:
        (key, grid), = LR_GRID[method].items()
        if method == "nora_pp" and "lora" in best:
            DEMO_LR["nora_pp"]["lr"] = best["lora"][0]  # NoRA++ keeps LoRA's tuned lr
        for value in grid:
            lrs = dict(DEMO_LR[method], **{key: value})
            accs = [finetune(method, seed, weights, out_root / "tune", ["dataset.eval_split=validation", "force=true"],
                             lrs=lrs, name=f"{method}_{key}{value:g}_s{seed}")["final_accuracy"] for seed in seeds]
            mean = sum(accs) / len(accs)
            lines.append(f"| {method} | {key}={value:g} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {mean:.1f} |")
            print(f"  tune {method} {key}={value:g}: {' '.join(f'{a:.1f}' for a in accs)} -> {mean:.1f}%", flush=True)
            if method not in best or mean > best[method][1]:
                best[method] = (value, mean)
        if method == "linear_probe":
            HEAD_LR = best[method][0]
    edge = [m for m, (v, _a) in best.items() if v in (LR_GRID[m][next(iter(LR_GRID[m]))][0],
                                                       LR_GRID[m][next(iter(LR_GRID[m]))][-1])]
    lines += ["", "Best: " + ", ".join(f"{m} {next(iter(LR_GRID[m]))}={v:g}" for m, (v, _a) in best.items()),
              "", "At the edge of its grid (a wider grid might move it): " + (", ".join(edge) or "none") + ".",
              "", f"Every method's new head trains at the linear probe's best lr ({HEAD_LR:g}); NoRA++ keeps "
              "LoRA's best lr for its LoRA factors and tunes the NoRA factors' lr. Ties keep the smaller lr. "
              "LoRA/DoRA adapters use dropout 0 in the demo (see `lr_overrides`)."]
    text = "\n".join(lines) + "\n"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--table", default="results/demo.md")
    ap.add_argument("--tune", action="store_true", help="run the learning-rate sweep behind DEMO_LR instead")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the fine-tuning runs")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    from nora.errors import user_errors

    out_root = Path(args.out)
    t0 = time.time()
    with user_errors():
        weights = pretrain_source(out_root)
        if args.tune:
            print(tune(weights, out_root, Path(args.table).with_name("demo_lr_sweep.md"), args.methods.split(",")))
            return 0
        for method in args.methods.split(","):
            for seed in range(args.seeds):
                s = finetune(method, seed, weights, out_root, args.overrides)
                print(f"  {method:13s} seed {seed}: accuracy {s['final_accuracy']:5.1f}%  "
                      f"({s['parameters']['trainable']:,} trainable, {s['wall_time_s']:.1f} s)", flush=True)
        from nora.results.demo import render_demo_table

        table = render_demo_table(out_root, Path(args.table), methods=args.methods.split(","))
    print(table)
    print(f"demo finished in {time.time() - t0:.0f} s; table written to {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
