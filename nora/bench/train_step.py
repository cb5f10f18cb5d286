"""Training-step benchmark: every fine-tuning method through the real training loop.

``python -m nora.bench train`` runs, for each method, ``run_training`` on synthetic CIFAR-format data
(real pickle batches, loaded by torchvision) with a random-weight model (default ViT-Tiny at 224 px,
batch 16), each method in its own process (so peak memory is that method's alone). The first
``--warmup`` optimizer steps form the loop's first logging interval and are discarded; the next
``--steps`` steps are measured by the loop itself (``metrics.jsonl``): images/s, the share of step time
spent waiting for data, and peak memory (CUDA: max allocated; CPU: process peak RSS), plus the
training memory (peak minus what was allocated before the first step: on the CPU this removes the
libraries every process holds). Model FLOPs
per image are counted with ``torch.utils.flop_counter`` (forward + backward), giving model FLOP
utilisation against a dense-matmul rate measured in the same run (CPU: fp32 matmul; GPU: bf16
matmul). Ratios to LoRA and to full fine-tuning come from the same run. The methods of ``--compile-methods``
(default LoRA, NoRA and NoRA++) are also trained with ``trainer.compile=true`` in the same interleaved rounds
(compilation happens in the discarded warm-up steps), and each reports its compiled step time and the ratio
compiled / eager. JSON goes to ``results/bench_train_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from nora import hardware
from nora.app.training import run_training
from nora.data.synthetic import write_cifar
from nora.files import write_json_atomic
from nora.hardware import resolve_device
from nora.logs import setup_logging
from nora.methods import apply_method
from nora.models import build_model
from nora.models.vision import input_size
from nora.runs.logger import read_metrics

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("full", "linear_probe", "lora", "dora", "nora", "nora_pp")
DEFAULT_COMPILE_METHODS = ("lora", "nora", "nora_pp")
REFERENCE_METHODS = ("lora", "full")  # every row's step time and memory are also given relative to these


def _overrides(args, method: str, data_root: str, out: str) -> list[str]:
    steps = args.warmup + args.steps
    return [
        f"method={method}",
        f"model={args.model}",
        "dataset=cifar10",
        f"dataset.root={data_root}",
        "dataset.download=false",
        "dataset.verify_md5=false",
        "model.pretrained=false",
        f"output_root={out}",
        "logger=disabled",
        f"trainer.max_steps={steps}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.log_every={args.warmup}",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress=false",
        f"trainer.device={args.device}",
        f"trainer.precision={args.precision}",
        f"trainer.data_path={args.data_path}",
        f"trainer.num_workers={args.num_workers}",
        "trainer.warmup_steps=0",
        "dataset.limit_eval=8",
        "trainer.eval_batch_size=8",
        *(["trainer.compile=true"] if args.compile else []),
        *args.override,
    ]


def flops_per_image(model, size: int, device) -> float:
    """Forward + backward FLOPs of one image as the method trains it (counted, not estimated: frozen weights
    get no weight gradient, so a PEFT method's backward costs less than full fine-tuning's)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, size, size, device=device)
    with FlopCounterMode(display=False) as fc:
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


def method_flops(model_name: str, methods: list[str], num_classes: int, device) -> dict[str, float]:
    from hydra import compose, initialize_config_dir

    out = {}
    configs = str(Path(__file__).resolve().parents[2] / "configs")
    for m in methods:
        with initialize_config_dir(config_dir=configs, version_base="1.3"):
            cfg = compose(
                "train", overrides=[f"model={model_name}", "model.pretrained=false", f"method={m}", "dataset=cifar10"]
            )
        model = build_model(cfg.model, num_classes)
        model = apply_method(model, cfg.method, cfg.model).model.to(device)
        out[m] = flops_per_image(model, input_size(model), device)
    return out


def matmul_rate(device: torch.device) -> float:
    """Dense matmul FLOP/s measured now (the utilisation reference)."""
    n = 4096 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 50 if device.type == "cuda" else 5
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def run_one(args) -> dict:
    """Child process: train one method for warmup+steps steps and report the measured interval."""
    from hydra import compose, initialize_config_dir

    configs = str(Path(__file__).resolve().parents[2] / "configs")
    with tempfile.TemporaryDirectory() as out:
        with initialize_config_dir(config_dir=configs, version_base="1.3"):
            cfg = compose("train", overrides=_overrides(args, args.one, args.data_root, out))
        summary = run_training(cfg, run_dir=Path(out) / "run")
        records = read_metrics(Path(out) / "run")
    measured = [r for r in records if "loss" in r and "eval/accuracy" not in r][-1]
    ips = measured["images_per_s"]
    return {
        "method": args.one,
        "images_per_s": ips,
        "step_time_s": args.batch_size / ips,
        "data_wait_share": measured["data_wait_share"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "training_memory_mb": summary["peak_memory_mb"] - summary["memory_before_training_mb"],
        "parameters": summary["parameters"],
        "data_path": summary.get("data_path"),
        "image_size": int(summary["image_size"]),
    }


def _run_child(args, method: str, data_root: str, compile_: bool) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "nora.bench.train_step",
        "--one",
        method,
        "--data-root",
        data_root,
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--data-path",
        args.data_path,
        "--num-workers",
        str(args.num_workers),
        *(["--compile"] if compile_ else []),
        *args.override,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"))
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    if proc.returncode or not line:
        log.error(f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        raise SystemExit(f"benchmark of {method}{' (compiled)' if compile_ else ''} failed")
    return json.loads(line[0][len("BENCH_RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nora.bench train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--model", default="vit_tiny", help="a configs/model name (built with random weights)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="discarded optimizer steps")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole method list (median per method)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--data-path", default="auto", choices=["auto", "batched", "per_sample"])
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="every method with trainer.compile=true (no eager run)")
    ap.add_argument(
        "--compile-methods",
        default=",".join(DEFAULT_COMPILE_METHODS),
        help="methods also timed with trainer.compile=true in the same run ('' for none)",
    )
    ap.add_argument("--out", default=None, help="JSON path (default results/bench_train_<device>.json)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data-root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("override", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    if args.one:
        print("BENCH_RESULT " + json.dumps(run_one(args)), flush=True)
        return 0

    device = resolve_device(args.device)
    methods = args.methods.split(",")
    n_train = args.batch_size * (args.warmup + args.steps + 1)
    compiled_methods = [] if args.compile else [m for m in args.compile_methods.split(",") if m in methods]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    compiled: dict[str, list[dict]] = {m: [] for m in compiled_methods}
    with tempfile.TemporaryDirectory() as data_root:
        write_cifar(data_root, "cifar10", n_train=n_train, n_test=16)
        for r in range(args.rounds):
            # interleaved rounds: slow drifts of the machine hit every method (and both modes) alike
            runs = [(m, False) for m in methods] + [(m, True) for m in compiled_methods]
            for m, comp in runs:
                res = _run_child(args, m, data_root, args.compile or comp)
                (compiled if comp else results)[m].append(res)
                log.info(
                    f"round {r} {m:8s}{' compiled' if args.compile or comp else ' eager   '} "
                    f"{res['images_per_s']:8.1f} img/s  step {res['step_time_s'] * 1e3:7.1f} ms  "
                    f"data wait {100 * res['data_wait_share']:4.1f}%  peak {res['peak_memory_mb']:7.0f} MB",
                )

    # FLOPs per image of each method and the matmul reference, measured in this process
    fpi = method_flops(args.model, methods, 10, device)
    size = results[methods[0]][0]["image_size"]
    peak = matmul_rate(device)

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    rows = {}
    for m, rs in results.items():
        ips = med([r["images_per_s"] for r in rs])
        rows[m] = {
            "images_per_s": ips,
            "step_time_s": args.batch_size / ips,
            "data_wait_share": med([r["data_wait_share"] for r in rs]),
            "peak_memory_mb": med([r["peak_memory_mb"] for r in rs]),
            "training_memory_mb": med([r["training_memory_mb"] for r in rs]),
            "trainable": rs[0]["parameters"]["trainable"],
            "data_path": rs[0]["data_path"],
            "flops_per_image": fpi[m],
            "mfu": fpi[m] * ips / peak,
        }
    for m, rs in compiled.items():
        ips = med([r["images_per_s"] for r in rs])
        rows[m]["compiled"] = {
            "images_per_s": ips,
            "step_time_s": args.batch_size / ips,
            "peak_memory_mb": med([r["peak_memory_mb"] for r in rs]),
            "data_wait_share": med([r["data_wait_share"] for r in rs]),
        }
        rows[m]["compiled_vs_eager_step_time"] = rows[m]["compiled"]["step_time_s"] / rows[m]["step_time_s"]
    for ref in REFERENCE_METHODS:
        if ref in rows:
            for m in rows:
                rows[m][f"step_time_vs_{ref}"] = rows[m]["step_time_s"] / rows[ref]["step_time_s"]
                rows[m][f"peak_memory_vs_{ref}"] = rows[m]["peak_memory_mb"] / rows[ref]["peak_memory_mb"]
                rows[m][f"training_memory_vs_{ref}"] = rows[m]["training_memory_mb"] / max(
                    rows[ref]["training_memory_mb"], 1e-9
                )
    report = {
        "benchmark": "train_step",
        "model": args.model,
        "image_size": size,
        "batch_size": args.batch_size,
        "measured_steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "device": str(device),
        "precision": args.precision,
        "compiled_everything": args.compile,
        "compiled_methods": compiled_methods,
        "matmul_flops_per_s": peak,
        "methods": rows,
        "hardware": hardware.describe(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m nora.bench train " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out or f"results/bench_train_{device.type}.json")
    write_json_atomic(out, report)
    print(
        f"\n{args.model} {size}px batch {args.batch_size} on {hardware.label()}; full fine-tuning "
        f"{fpi.get('full', max(fpi.values())) / 1e9:.2f} GFLOP/image (fwd+bwd); "
        f"matmul reference {peak / 1e9:.0f} GFLOP/s"
    )
    print(
        f"{'method':10s} {'img/s':>8s} {'step ms':>8s} {'vs lora':>8s} {'vs full':>8s} {'peak MB':>8s} "
        f"{'train MB':>8s} {'vs lora':>8s} {'wait':>6s} {'MFU':>6s}"
    )
    for m, r in rows.items():
        print(
            f"{m:10s} {r['images_per_s']:8.1f} {r['step_time_s'] * 1e3:8.1f} {r.get('step_time_vs_lora', 0):8.2f} "
            f"{r.get('step_time_vs_full', 0):8.2f} {r['peak_memory_mb']:8.0f} {r['training_memory_mb']:8.0f} "
            f"{r.get('training_memory_vs_lora', 0):8.2f} {100 * r['data_wait_share']:5.1f}% {100 * r['mfu']:5.1f}%"
        )
    for m in compiled_methods:
        r = rows[m]
        print(
            f"{m:10s} compiled {r['compiled']['step_time_s'] * 1e3:8.1f} ms/step vs eager "
            f"{r['step_time_s'] * 1e3:8.1f}: compiled / eager = {r['compiled_vs_eager_step_time']:.2f}"
        )
    log.info(f"wrote {out}")
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
