"""Does NoRA's initialisation keep the model it replaces? An evaluation run once before training (causal LMs).

With NoRA at its init (rationals fitted in place of SiLU, low-rank updates zero; LoRA, if any, also at its zero
init) the swapped model should reproduce the original model's next-token distribution. :func:`init_agreement`
measures it on held-out validation prompts (:func:`logprob_agreement`); ``run_training`` reports the result and
stores it in summary.json as ``nora_init_agreement``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from nora.adapter.config import NoraConfig
from nora.adapter.discover import resolve_name
from nora.adapter.engine import find_targets, set_module
from nora.adapter.inject import nora_modules

log = logging.getLogger(__name__)

AGREEMENT_BATCH = 2  # examples per forward pass in the comparison (full-vocabulary log-probs)


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def nora_target_modules(model: nn.Module, config: NoraConfig) -> dict[str, nn.Module]:
    """The original activation modules NoRA will replace (name -> module), kept for the agreement check: the
    library's own choice of targets (:func:`nora.adapter.inject.find_targets`), defaults included."""
    return dict(find_targets(model, config))


def init_agreement(
    model: nn.Module, originals: dict[str, nn.Module], batches: list[dict], device, split: str, say: Callable = log.info
) -> dict[str, Any]:
    """:func:`logprob_agreement` on ``batches`` (moved to ``device``), reported through ``say`` (this module's
    logger; a no-op on the ranks other than 0); ``split`` names where they come from."""
    report = logprob_agreement(model, originals, [{k: v.to(device) for k, v in b.items()} for b in batches])
    report["split"] = split
    say(
        "NoRA init vs original model on {prompts} {split} prompts ({tokens} tokens): mean KL {mean_kl:.3g} nats, "
        "max KL {max_kl:.3g}, max |log-prob diff| {max_abs_logprob_diff:.3g} (mean {mean_abs_logprob_diff:.3g}), "
        "top-1 agreement {top1_agreement:.4f}".format(**report)
    )
    return report


@torch.no_grad()
def logprob_agreement(model: nn.Module, originals: dict[str, nn.Module], batches) -> dict[str, Any]:
    """How closely ``model`` (with NoRA activations at init) reproduces the model with its ``originals``.

    For every position ``t`` whose next token is real (not padding), with ``p`` the original model's
    next-token distribution and ``q`` the swapped one's: ``mean_kl``/``max_kl`` of KL(p || q) in nats,
    ``mean_abs_logprob_diff``/``max_abs_logprob_diff`` of ``|log p(x_{t+1}) - log q(x_{t+1})|`` (the
    log-probability of the actual next token, as MMLU-style scoring uses), ``top1_agreement`` (share of
    positions whose argmax agrees) and ``tokens``/``prompts`` counted. Activations are swapped in place and
    restored; the model runs in eval mode."""
    swapped = nora_modules(model)
    missing = [n for n in swapped if n not in originals]
    if missing:
        raise ValueError(f"no original activation recorded for {missing[:3]}")

    def use(mods):
        for name, m in mods.items():
            set_module(model, resolve_name(model, name), m)

    was_training = model.training
    model.eval()
    kl_sum = kl_max = d_sum = d_max = agree = 0.0
    n_tok = n_prompts = 0
    try:
        for batch in batches:
            inputs = model_inputs(batch)
            use({n: originals[n] for n in swapped})
            ref = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
            use(swapped)
            new = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
            nxt = inputs["input_ids"][:, 1:]
            mask = (
                inputs["attention_mask"][:, 1:].bool()
                if "attention_mask" in inputs
                else torch.ones_like(nxt, dtype=torch.bool)
            )
            kl = (ref.exp() * (ref - new)).sum(-1)[mask].clamp_min(0.0)  # >= 0 up to rounding
            d = (ref.gather(-1, nxt[..., None]) - new.gather(-1, nxt[..., None])).squeeze(-1).abs()[mask]
            agree += float((ref.argmax(-1) == new.argmax(-1))[mask].sum())
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max())) if kl.numel() else kl_max
            d_sum += float(d.sum())
            d_max = max(d_max, float(d.max())) if d.numel() else d_max
            n_tok += int(mask.sum())
            n_prompts += int(nxt.shape[0])
            del ref, new
    finally:
        use(swapped)
        model.train(was_training)
    n = max(n_tok, 1)
    return {
        "mean_kl": kl_sum / n,
        "max_kl": kl_max,
        "mean_abs_logprob_diff": d_sum / n,
        "max_abs_logprob_diff": d_max,
        "top1_agreement": agree / n,
        "tokens": n_tok,
        "prompts": n_prompts,
    }
