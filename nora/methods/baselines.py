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

from typing import Callable

from torch import nn

from nora.errors import UserError
from nora.methods.config import BaselineSettings, MethodConfig
from nora.methods.registry import ApplyContext, Method, peft_common, register_method
from nora.schema import per_family, require


def _modules(value, family: str, what: str):
    v = per_family(value, family, what)
    return v if v is None or isinstance(v, str) else list(v)


def train_biases(model: nn.Module, ctx: ApplyContext):
    """BitFit (Ben Zaken et al., 2022): every bias of the backbone trains, all other weights stay frozen."""
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias") or name == "bias"]
    if not biases:
        raise UserError(
            f"method=bitfit: {type(model).__name__} has no bias parameters to train "
            "(LLaMA-style models have none); choose ln_tuning, ia3 or vera"
        )
    for p in biases:
        p.requires_grad_(True)
    if ctx.head:
        model.get_submodule(ctx.head).requires_grad_(True)
    return model, None


def _ln_tuning(baseline: BaselineSettings, family: str, common: dict):
    import peft

    return peft.LNTuningConfig(**common)


def _ia3(baseline: BaselineSettings, family: str, common: dict):
    import peft

    ff = _modules(baseline.feedforward_modules, family, "method.baseline.feedforward_modules (ia3)")
    return peft.IA3Config(feedforward_modules=ff, **common)


def _vera(baseline: BaselineSettings, family: str, common: dict):
    import peft

    # the shared projections are drawn from projection_prng_key, so they are saved with the adapter
    return peft.VeraConfig(
        r=baseline.r,
        d_initial=baseline.d_initial,
        vera_dropout=baseline.dropout,
        projection_prng_key=baseline.projection_prng_key,
        save_projection=True,
        **common,
    )


def peft_baseline(peft_config: Callable) -> Callable:
    """The ``apply`` of a peft tuner configured by ``peft_config(baseline, family, common)`` (``common``: the
    target and saved modules and the task type every peft config takes)."""

    def apply(model: nn.Module, ctx: ApplyContext):
        import peft

        baseline, family = ctx.method.baseline, ctx.family
        what = f"method.baseline.target_modules ({ctx.method.name})"
        common = {"target_modules": _modules(baseline.target_modules, family.name, what), **peft_common(ctx)}
        return peft.get_peft_model(model, peft_config(baseline, family.name, common)), None

    return apply


def needs_target_modules(method_cfg: MethodConfig) -> None:
    targets = method_cfg.baseline.target_modules
    require(
        bool(targets), "method.baseline.target_modules", targets, f"must name at least one module for {method_cfg.name}"
    )


BASELINE = dict(adapter="peft", settings=("baseline",), check=needs_target_modules)
register_method(
    Method(
        "bitfit", "BitFit", train_biases, families=("vision",), components=(("bias", ".bias"),), settings=("baseline",)
    )
)
register_method(
    Method(
        "ln_tuning", "LN tuning", peft_baseline(_ln_tuning), components=(("ln_tuning", "ln_tuning_layers"),), **BASELINE
    )
)
register_method(Method("ia3", "(IA)3", peft_baseline(_ia3), components=(("ia3", "ia3_l"),), **BASELINE))
register_method(Method("vera", "VeRA", peft_baseline(_vera), components=(("vera", "vera_lambda_"),), **BASELINE))
