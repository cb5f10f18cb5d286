"""Low-budget baselines: methods that train tens of thousands of parameters or fewer, for comparing NoRA with
methods of its own size (not only with LoRA's millions).

=========  ======================================================================================
bitfit     the bias terms of the backbone (+ the new head); no library has it, so it is three lines here
ln_tuning  peft's LN tuning: a trainable copy of each targeted norm layer (scale and shift)
ia3        peft's (IA)3: learned scaling vectors on the targeted projections' outputs (inputs for the
           ``feedforward_modules``)
vera       peft's VeRA: frozen random low-rank matrices shared by all layers, trained scaling vectors
           ``lambda_d`` (r) and ``lambda_b`` (out features) per targeted layer
=========  ======================================================================================

A method config carries every setting under ``baseline:`` (``configs/method/{bitfit,ln_tuning,ia3,vera}.yaml``);
module lists may be given per model family (``{vision: ..., causal_lm: ...}``) because ViT and LLaMA name their
layers differently. A list matches module-name suffixes, a string is a regex on the full name (peft's rule).
"""

from __future__ import annotations

from torch import nn

from nora.errors import UserError
from nora.methods.config import BaselineSettings
from nora.schema import per_family


def _modules(value, family: str, what: str):
    v = per_family(value, family, what)
    return v if v is None or isinstance(v, str) else list(v)


def peft_config(baseline, head: str | None, family: str):
    """The peft config of a ``baseline:`` node (ln_tuning, ia3, vera)."""
    import peft

    kind = baseline.kind
    common = {"target_modules": _modules(baseline.target_modules, family, f"method.baseline.target_modules ({kind})")}
    if head:
        common["modules_to_save"] = [head]
    if family == "causal_lm":
        common["task_type"] = "CAUSAL_LM"
    if kind == "ln_tuning":
        return peft.LNTuningConfig(**common)
    if kind == "ia3":
        ff = _modules(baseline.feedforward_modules, family, "method.baseline.feedforward_modules (ia3)")
        return peft.IA3Config(feedforward_modules=ff, **common)
    # vera: the shared projections are drawn from projection_prng_key, so they are saved with the adapter
    return peft.VeraConfig(
        r=baseline.r,
        d_initial=baseline.d_initial,
        vera_dropout=baseline.dropout,
        projection_prng_key=baseline.projection_prng_key,
        save_projection=True,
        **common,
    )


def train_biases(model: nn.Module, head: str | None) -> nn.Module:
    """BitFit (Ben Zaken et al., 2022): every bias of the backbone trains, all other weights stay frozen."""
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias") or name == "bias"]
    if not biases:
        raise UserError(
            f"method=bitfit: {type(model).__name__} has no bias parameters to train "
            "(LLaMA-style models have none); choose ln_tuning, ia3 or vera"
        )
    for p in biases:
        p.requires_grad_(True)
    if head:
        model.get_submodule(head).requires_grad_(True)
    return model


def apply_baseline(model: nn.Module, baseline: BaselineSettings, head: str | None, family: str) -> nn.Module:
    """Freeze-then-train for a ``baseline:`` node (checked by its schema, :class:`BaselineSettings`); ``model``
    arrives with every parameter frozen."""
    if baseline.kind == "bitfit":
        return train_biases(model, head)
    import peft

    return peft.get_peft_model(model, peft_config(baseline, head, family))
