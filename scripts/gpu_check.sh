#!/usr/bin/env bash
# One prepared check of the GPU kernels, a few minutes long; safe to run on any machine.
#
#   scripts/gpu_check.sh            (or: bash scripts/gpu_check.sh)
#
# 1. Triton kernels under the CPU interpreter (TRITON_INTERPRET=1), small shapes, vs float64: the plain
#    rational and the residual form (every activation, exactness at equal coefficients), and a smoke run of
#    the benchmark of step 4b.
# 2. Without CUDA: stop here and exit with the status of step 1 (0 = passed), saying no GPU was found.
# 3. With CUDA: the compiled Triton kernels vs the float64 reference on the GPU (small and large
#    shapes incl. LLaMA-3-8B's 4 x 2048 x 14336 in bf16, both forms, fp32/bf16/fp16, determinism; the
#    residual form for every activation, its exactness at equal coefficients and its determinism)
#    -> $OUT/gpu_check_correctness.json
# 4. With CUDA: python -m nora.bench kernels at the ViT-Tiny shape (64 x 197 x 768, fp32) and the
#    LLaMA-3-8B shape (4 x 2048 x 14336, bf16): times vs GELU/SiLU, saved bytes, measured copy
#    bandwidth, achieved GB/s and fraction of it -> $OUT/bench_kernels_cuda.json
# 4b. With CUDA: scripts/gpu_check.py bench: fwd and fwd+bwd of GELU, the plain rational and the residual
#    form (gelu) in bf16 at 64 x 197 x 768 and 4 x 2048 x 14336, G = 8 and G = D -> $OUT/bench_residual_cuda.json
# 5. With CUDA: a short sweep of the Triton tile size / warps at the LLaMA shape (plain rational through
#    nora.bench, plain and residual through gpu_check.py bench) -> $OUT/triton_sweep/.
# 6. With CUDA: python -m nora.bench train (ViT-Tiny 224 px, bf16, batch 256, batched GPU data path: full, LoRA,
#    NoRA; LoRA and NoRA also under torch.compile, same run) -> $OUT/bench_train_cuda.json, and
#    python -m nora.bench mlp (SwiGLU block, tiny and 8B shapes, bf16) -> $OUT/bench_mlp_cuda.json
# Everything printed is also appended to $OUT/gpu_check.log. Each step has a time limit; a failing
# step is reported and the next one still runs; the exit status is 0 only if every step passed.
#
# Environment: NORA_GPU_CHECK_OUT (default: results/ in the repository), PYTHON (default:
# .venv/bin/python if it exists, else python3), GPU_CHECK_REPEATS (benchmark rounds, default 10),
# NORA_GPU_CHECK_CPU_ONLY=1 (run step 1 only, even where CUDA exists: what CI runs).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
else
    PY=python3
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT="${NORA_GPU_CHECK_OUT:-$ROOT/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
REPEATS="${GPU_CHECK_REPEATS:-10}"
STATUS=0
START=$(date +%s)

log() { echo "$@" | tee -a "$LOG"; }
step() {  # step NAME TIMEOUT_S CMD...: run, print and log everything, keep going on failure
    local name="$1" limit="$2"
    shift 2
    log ""
    log "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    local rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        log "!! $name failed (exit $rc)"
        STATUS=1
    else
        log "-- $name passed"
    fi
    return 0
}

log "== nora gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) in $ROOT (python: $PY)"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}", "| cuda", torch.version.cuda)
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee -a "$LOG"
fi

step "triton interpreter checks (CPU, small shapes)" 600 \
    env TRITON_INTERPRET=1 "$PY" scripts/gpu_check.py interpret

if [ "${NORA_GPU_CHECK_CPU_ONLY:-0}" = "1" ]; then
    log ""
    log "NORA_GPU_CHECK_CPU_ONLY=1: ran the CPU-interpreter part only"
    log "== gpu_check done in $(( $(date +%s) - START ))s, status $STATUS"
    exit $STATUS
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    log ""
    log "no GPU found (torch.cuda.is_available() is False): ran the CPU-interpreter part only; no GPU numbers measured"
    log "== gpu_check done in $(( $(date +%s) - START ))s, status $STATUS"
    exit $STATUS
fi

step "triton correctness on the GPU vs float64" 600 \
    "$PY" scripts/gpu_check.py correctness --json "$OUT/gpu_check_correctness.json"

step "kernel benchmark (ViT-Tiny fp32, LLaMA-3-8B bf16)" 900 \
    "$PY" -m nora.bench kernels --device cuda --shapes "64x197x768:8,4x2048x14336:8:bfloat16" \
    --repeats "$REPEATS" --warmup 3 --out "$OUT/bench_kernels_cuda.json"

# the residual form's kernels next to the plain ones and GELU (bf16; G = 8 and one rational per channel)
step "rational and residual kernels vs GELU (bf16, 64x197x768 and 4x2048x14336, G=8 and G=D)" 300 \
    "$PY" scripts/gpu_check.py bench --repeats "$REPEATS" --warmup 3 --json "$OUT/bench_residual_cuda.json"

# Triton tile sweep at the LLaMA shape (the defaults were chosen without a GPU): GELU and Triton only; the residual
# kernels (more registers: two rationals and phi) at the same settings
mkdir -p "$OUT/triton_sweep"
for cfg in 1024:4 2048:8 4096:8; do
    blk="${cfg%%:*}"; wrp="${cfg##*:}"
    step "triton tile sweep BLOCK=$blk WARPS=$wrp" 240 \
        env NORA_TRITON_BLOCK="$blk" NORA_TRITON_WARPS="$wrp" "$PY" -m nora.bench kernels --device cuda \
        --shapes "4x2048x14336:8:bfloat16" --impls gelu,silu,triton --no-compile --repeats 10 --warmup 3 \
        --out "$OUT/triton_sweep/block${blk}_warps${wrp}.json"
    step "triton tile sweep, residual form, BLOCK=$blk WARPS=$wrp" 120 \
        env NORA_TRITON_BLOCK="$blk" NORA_TRITON_WARPS="$wrp" "$PY" scripts/gpu_check.py bench \
        --shapes 4x2048x14336 --repeats 5 --warmup 2 --json "$OUT/triton_sweep/residual_block${blk}_warps${wrp}.json"
done

# Training throughput (issue: a GPU-resident data path and a busy accelerator): ViT-Tiny at 224 px in bf16 on
# synthetic CIFAR-format data through the real training loop and batched data path; then with torch.compile.
# (LoRA and NoRA are also trained with trainer.compile=true in the same run: compiled / eager in the JSON)
step "training benchmark (ViT-Tiny 224 px, bf16, batch 256: full, LoRA, NoRA; LoRA and NoRA compiled too)" 1500 \
    "$PY" -m nora.bench train --device cuda --precision bf16 --data-path batched --methods full,lora,nora \
    --batch-size 256 --warmup 10 --steps 30 --out "$OUT/bench_train_cuda.json"
# SwiGLU MLP block step in bf16: tiny LLaMA and LLaMA-3-8B's shape (4096 -> 14336, 4 x 2048 tokens)
step "MLP block benchmark (tiny and 8B shapes, bf16)" 600 \
    "$PY" -m nora.bench mlp --device cuda --dtype bfloat16 --shapes tiny,8b --out "$OUT/bench_mlp_cuda.json"

if [ -f "$OUT/bench_kernels_cuda.json" ]; then
    "$PY" - "$OUT/bench_kernels_cuda.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s on {r['hardware'].get('gpu')}")
for s in r["shapes"]:
    for row in s["rows"]:
        if "fwd_bwd_ms" in row:
            print(f"{'x'.join(map(str, s['shape']))} {s['dtype']:<8} {row['impl']:<15} fwd+bwd {row['fwd_bwd_ms']:8.3f} ms"
                  f"  x{row['fwd_bwd_ratio_vs_gelu']:.2f} GELU  {row['fwd_bwd_GBps']:7.0f} GB/s"
                  f"  {100 * row['fwd_bwd_bandwidth_fraction']:4.0f}% of copy")
print("targets:", json.dumps(r.get("targets", {})))
EOF
fi

log "== gpu_check done in $(( $(date +%s) - START ))s, status $STATUS"
exit $STATUS
