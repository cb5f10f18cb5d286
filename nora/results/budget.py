"""Matched budget: trainable-parameter counts of LoRA/DoRA at each rank next to NoRA++, on the real shapes.

The paper says NoRA++ beats LoRA and DoRA "under matched training budgets". NoRA++ is LoRA (rank 8) plus
NoRA on the MLP activations, so it trains a few parameters more than LoRA r=8; the matched-budget sweeps
(``sweeps/matched_vit.yaml``, ``sweeps/matched_llama.yaml``) therefore train LoRA and DoRA at the two ranks
whose trainable counts bracket NoRA++'s. The counts come from :func:`nora.parameter_report` on models built
with the real constructors (timm ViT-Tiny/16, random init; LLaMA-3-8B from its config on the meta device)
and the project's own ``apply_method``, so they are the numbers the runs' ``summary.json`` will report.

    python -m nora.results budget        # prints the table quoted in sweeps/README.md
"""

from __future__ import annotations

from dataclasses import dataclass

from nora.methods import apply_method, get_method
from nora.models import build_model
from nora.results.sweep import CONFIG_DIR

BUDGET_REFERENCE = "nora_pp"  # the arm the others' trainable counts are compared to
UNRANKED_ARMS = (BUDGET_REFERENCE, "nora")  # counted once, at their config's LoRA rank (if any)
RANKED_METHODS = ("lora", "dora")  # counted at each rank: their arms are <method>_r<rank>

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)


@dataclass
class Count:
    model: str
    arm: str  # e.g. lora_r8
    method: str
    rank: int | None
    total: int
    trainable: int
    components: dict

    @property
    def adapter(self) -> int:
        """Trainable parameters without the new classifier head (which every vision method trains)."""
        return self.trainable - self.components.get("head", 0)


def _method_cfg(method: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"method={method}"] + overrides)


def _vit_tiny(num_classes: int):
    from omegaconf import OmegaConf

    cfg = _method_cfg("lora", ["model=vit_tiny"])
    mcfg = OmegaConf.merge(cfg.model, {"pretrained": False, "checkpoint": None})
    return build_model(mcfg, num_classes)


def _llama3_8b_meta():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))


def count(model_name: str, method: str, rank: int | None = None, num_classes: int = 100) -> Count:
    """Trainable parameters of ``method`` (LoRA/DoRA rank ``rank``) on ``vit_tiny`` or ``llama3_8b``."""
    over = [f"model={model_name}"]
    if rank is not None:
        over.append(f"method.lora.r={rank}")
    if get_method(method).uses_nora:
        over.append("method.nora.init=fit")  # the count does not depend on the initialisation
    cfg = _method_cfg(method, over)
    model = _vit_tiny(num_classes) if model_name == "vit_tiny" else _llama3_8b_meta()
    res = apply_method(model, cfg.method, cfg.model)
    p = res.parameters
    r = int(cfg.method.lora.r) if cfg.method.get("lora") else None
    arm = f"{method}_r{r}" if method in RANKED_METHODS else method
    return Count(model_name, arm, method, r, p.total, p.trainable, dict(p.components))


def bracket(counts: list[Count], target: int, method: str) -> tuple[Count | None, Count | None]:
    """The largest rank of ``method`` at or below ``target`` adapter parameters and the smallest above."""
    mine = sorted((c for c in counts if c.method == method), key=lambda c: c.rank)
    below = [c for c in mine if c.adapter <= target]
    above = [c for c in mine if c.adapter > target]
    return (below[-1] if below else None), (above[0] if above else None)


def budget_table(model_name: str, ranks=(6, 7, 8, 9, 10), num_classes: int = 100) -> tuple[str, list[Count]]:
    counts = [count(model_name, m, num_classes=num_classes) for m in UNRANKED_ARMS]
    for m in RANKED_METHODS:
        counts += [count(model_name, m, r, num_classes=num_classes) for r in ranks]
    ref = counts[0]
    head = ref.components.get("head", 0)
    lines = [
        f"| {model_name} arm | LoRA/DoRA | NoRA | head | trainable without head | vs NoRA++ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in counts:
        diff = c.adapter - ref.adapter
        lines.append(
            f"| {c.arm} | {c.components.get('lora', 0):,} | {c.components.get('nora', 0):,} | "
            f"{c.components.get('head', 0):,} | {c.adapter:,} | {diff:+,} |"
        )
    text = "\n".join(lines) + "\n"
    notes = [f"total parameters with NoRA++ applied: {ref.total:,} (head: {head:,})"]
    for m in RANKED_METHODS:
        lo, hi = bracket(counts, ref.adapter, m)
        notes.append(
            f"{m}: r={lo.rank if lo else '?'} ({lo.adapter if lo else 0:,}) <= NoRA++ ({ref.adapter:,}) < "
            f"r={hi.rank if hi else '?'} ({hi.adapter if hi else 0:,})"
        )
    return text + "\n" + "\n".join(n for n in notes if n) + "\n", counts
