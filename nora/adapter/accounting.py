"""Trainable-parameter accounting per component (head, LoRA/DoRA, NoRA, base weights)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

from torch import nn

from nora.adapter.inject import canonical_name, get_nora_config, nora_modules

COMPONENTS = ("nora", "lora", "head", "base")  # what the library tells apart itself; other methods name theirs


@dataclass
class ParameterReport:
    total: int
    trainable: int
    components: dict[str, int] = field(default_factory=dict)  # trainable count per component

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percent"] = self.percent
        return d

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:,}" for k, v in self.components.items() if v)
        return f"trainable {self.trainable:,} / {self.total:,} ({self.percent:.3f}%): {parts or 'none'}"


def _head_patterns(model: nn.Module) -> list[re.Pattern]:
    pats = []
    cfg = get_nora_config(model)
    if cfg is not None:
        pats += [re.compile(p) for p in cfg.trainable_modules]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    classifier = getattr(getattr(base, "pretrained_cfg", None) or {}, "get", lambda k, d=None: d)("classifier")
    if classifier:
        pats.append(re.compile(re.escape(classifier)))
    return pats


def parameter_report(model: nn.Module, marks: Sequence[tuple[str, str]] = ()) -> ParameterReport:
    """Count total and trainable parameters (buffers excluded) and split the trainable ones.

    Components: ``nora`` (parameters of NoRA activations), ``lora`` (peft tuner parameters:
    ``lora_A``/``lora_B``/DoRA magnitudes), ``head`` (the classifier / ``trainable_modules`` /
    peft ``modules_to_save``), then each ``(component, mark)`` of ``marks``: a trainable tensor whose name
    contains ``mark`` (a fine-tuning method's own tensors, e.g. ``("ia3", "ia3_l")``: the methods' registry,
    :mod:`nora.methods.registry`), ``base`` (anything else, e.g. full fine-tuning).
    """
    nora_ids = {id(p) for m in nora_modules(model).values() for p in m.parameters()}
    heads = _head_patterns(model)
    comps = {c: 0 for c in (*COMPONENTS, *(c for c, _mark in marks))}
    total = trainable = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue  # peft keeps the frozen original of a modules_to_save copy; it is not used
        n = p.numel()
        total += n
        if not p.requires_grad:
            continue
        trainable += n
        cname = canonical_name(model, name)
        if id(p) in nora_ids:
            comps["nora"] += n
        elif "lora_" in cname:
            comps["lora"] += n
        elif "modules_to_save" in cname or any(h.fullmatch(cname.rsplit(".", 1)[0]) for h in heads):
            comps["head"] += n
        else:
            comps[next((c for c, mark in marks if mark in cname), "base")] += n
    return ParameterReport(total=total, trainable=trainable, components=comps)
