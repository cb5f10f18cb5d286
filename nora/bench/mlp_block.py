"""SwiGLU MLP block step: ``down(act(gate(x)) * up(x))`` of LLaMA (transformers' own ``LlamaMLP``) with the
original SiLU, with NoRA on the activation, with LoRA on the projections and with both (NoRA++), forward +
backward + the gradients of whatever trains, timed interleaved in one process with medians; ratios to the
SiLU block from the same run; peak memory on CUDA.

    python -m nora.bench mlp                                  # CPU: tiny-LLaMA and a mid-size shape, fp32
    python -m nora.bench mlp --device cuda --dtype bfloat16   # GPU: tiny and LLaMA-3-8B (4096 -> 14336, 4x2048 tokens)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import nora
from nora import hardware
from nora.files import write_json_atomic
from nora.hardware import resolve_device
from nora.logs import setup_logging

log = logging.getLogger(__name__)

# name: (hidden, intermediate, batch, tokens)
SHAPES = {"tiny": (64, 128, 8, 256), "mid": (512, 1792, 2, 512), "8b": (4096, 14336, 4, 2048)}
VARIANTS = ("silu", "nora", "lora", "nora_pp")
LORA_VARIANTS = ("lora", "nora_pp")  # LoRA on the projections
NORA_VARIANTS = ("nora", "nora_pp")  # NoRA on the activation


def build(variant: str, hidden: int, inter: int, dtype, device):
    import peft
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter)
    mlp = torch.nn.Sequential()  # a named parent so targets read "block.act_fn"
    mlp.add_module("block", LlamaMLP(cfg))
    mlp = mlp.to(device=device, dtype=dtype).requires_grad_(False)
    if variant == "silu":
        return mlp.requires_grad_(False)  # the frozen pretrained block: gradients flow to its input only
    if variant in LORA_VARIANTS:
        mlp = peft.get_peft_model(
            mlp, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"])
        )
    if variant in NORA_VARIANTS:
        nora.apply_nora(mlp, nora.NoraConfig(target_modules=[r"block\.act_fn"], fit_range=(-6.0, 6.0)))
    return mlp


def step_fn(model, x):
    def run():
        y = model(x)
        y.float().pow(2).mean().backward()
        for p in model.parameters():
            p.grad = None

    return run


def timeit(fn, device, repeats: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nora.bench mlp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument(
        "--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} (default: tiny,8b on CUDA, tiny,mid on CPU)"
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = (args.shapes or ("tiny,8b" if device.type == "cuda" else "tiny,mid")).split(",")
    report = {
        "benchmark": "mlp_block",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": args.repeats,
        "hardware": hardware.describe(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m nora.bench mlp " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": "every variant keeps the block's weights frozen and back-propagates to its input, as inside "
        "a fine-tuned network; lora/nora/nora_pp also compute their adapters' gradients",
        "shapes": [],
    }
    for name in shapes:
        hidden, inter, b, t = SHAPES[name]
        x = torch.randn(b, t, hidden, device=device, dtype=dtype, requires_grad=True)
        models = {v: build(v, hidden, inter, dtype, device) for v in VARIANTS}
        fns = {v: step_fn(m, x) for v, m in models.items()}
        times = {v: [] for v in VARIANTS}
        peak = {}
        for v, fn in fns.items():  # warm-up (and the kernel build/compile) plus the peak memory of one step
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                peak[v] = (torch.cuda.max_memory_allocated() - base) / 2**20
        for _ in range(args.repeats):  # interleaved rounds
            for v, fn in fns.items():
                times[v].append(timeit(fn, device, 1))
        med = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
        rows = [
            {
                "variant": v,
                "step_ms": 1e3 * med[v],
                "vs_silu": med[v] / med["silu"],
                "vs_lora": med[v] / med["lora"],
                "peak_step_memory_mb": peak.get(v),
            }
            for v in VARIANTS
        ]
        report["shapes"].append(
            {"name": name, "hidden": hidden, "intermediate": inter, "batch": b, "tokens": t, "rows": rows}
        )
        print(f"{name}: hidden {hidden}, intermediate {inter}, {b}x{t} tokens, {report['dtype']} on {hardware.label()}")
        for r in rows:
            mem = f"  step memory {r['peak_step_memory_mb']:.0f} MB" if r["peak_step_memory_mb"] is not None else ""
            print(
                f"  {r['variant']:8s} {r['step_ms']:9.2f} ms  x{r['vs_silu']:.2f} SiLU  x{r['vs_lora']:.2f} LoRA{mem}"
            )
        del models, fns, x
    out = Path(args.out or f"results/bench_mlp_{device.type}.json")
    write_json_atomic(out, report)
    log.info(f"wrote {out}")
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
