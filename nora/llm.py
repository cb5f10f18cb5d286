"""Instruction tuning of causal LMs (LLaMA-3, Qwen2, Mistral): what ``run_training`` needs for ``family: causal_lm``.

:func:`causal_lm_setup` builds, in this order (so a missing dataset fails before any weights download):

1. the tokenizer (``model.tokenizer``: the model's own, or ``offline`` for the tiny test models);
2. the instruction data (``dataset=alpaca|openorca``, :mod:`nora.data.instruct`): tokenised once and cached,
   labels -100 on prompt and padding, truncated to ``dataset.max_length`` with the count printed;
3. the batch samplers: length-grouped training batches (:class:`~nora.data.instruct.LengthGroupedBatchSampler`,
   ``trainer.batch_size`` per rank; ``N`` ranks with batch ``B`` see exactly what one process with batch
   ``N*B`` sees) and a fixed, length-sorted validation order;
4. the model (:func:`nora.models.causal_lm.build_causal_lm`: bf16/fp32, SDPA, optional gradient checkpointing);
5. for NoRA's calibrated initialisation, the first ``method.nora.calibration_batches`` *global* training batches
   (the same on every rank, so every rank fits the same coefficients), each as one padding-free row so no pad
   token's activation enters the fit;
6. ``wrap``: run once by the Trainer on the method-applied model before training. With NoRA it first measures
   how closely the swapped model (rationals in place of SiLU, LoRA at its zero init) reproduces the original
   model's next-token distribution on held-out validation prompts (:func:`logprob_agreement`; printed and stored
   in summary.json as ``nora_init_agreement``), then wraps the model for ``trainer.strategy``: ``ddp`` (default
   with several ranks) or ``fsdp`` (:func:`nora.train.distributed.wrap_fsdp`).

The loss (:class:`TokenMeanCausalLMTask`) is the mean over the supervised tokens of the *global* batch: each rank
divides its token-loss sum by the all-reduced count, so data-parallel training takes exactly the step a single
process with the whole batch would take, whatever the ranks' token counts.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nora.errors import UserError
from nora.train import distributed as dist
from nora.train.tasks import CausalLMTask

log = logging.getLogger("nora")

# dataset-config keys the training spine uses itself (not data-loading settings)
DATA_IGNORE = ("family",)
STRATEGIES = ("auto", "ddp", "fsdp")
AGREEMENT_PROMPTS = 16      # held-out validation examples compared at init (method.nora.agreement_prompts)
AGREEMENT_BATCH = 2         # examples per forward pass in that comparison (full-vocabulary log-probs)


class TokenMeanCausalLMTask(CausalLMTask):
    """:class:`~nora.train.tasks.CausalLMTask` whose loss averages over the supervised tokens of the global batch.

    Single process: the usual per-batch token mean. With ``N`` ranks each rank returns ``N * sum / total``
    (``total`` all-reduced), so DDP/FSDP's gradient average equals the single-process gradient of the
    whole batch's token mean."""

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        if not dist.is_initialized() or dist.world_size() == 1:
            return model(**batch).loss
        n = (batch["labels"][..., 1:] != -100).sum().float()
        per_rank = dist.all_reduce_sum(n) / dist.world_size()
        return model(**batch, num_items_in_batch=per_rank.clamp_min(1e-6)).loss


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def calibration_forward(model: nn.Module, batch: dict):
    """Calibration pass: the activations are what matters, so only the last position's logits are computed."""
    return model(**model_inputs(batch), logits_to_keep=1)


def data_config(cfg):
    from nora.data.instruct import InstructDataConfig

    return InstructDataConfig.from_dict(cfg.dataset, ignore=DATA_IGNORE)


def resolve_strategy(tcfg, world_size: int) -> str:
    s = str(tcfg.get("strategy", "auto") or "auto").lower()
    if s not in STRATEGIES:
        raise UserError(f"trainer.strategy={s!r}; valid: {', '.join(STRATEGIES)}")
    if world_size <= 1:
        return "single"
    return "ddp" if s == "auto" else s


def nora_target_modules(model: nn.Module, method_cfg) -> dict[str, nn.Module]:
    """The original activation modules NoRA will replace (name -> module), for the agreement check."""
    from nora.methods import nora_config_from

    pats = [re.compile(p) for p in nora_config_from(method_cfg, None).targets]
    return {n: m for n, m in model.named_modules() if n and any(p.fullmatch(n) for p in pats)
            and not list(m.children())}


@torch.no_grad()
def logprob_agreement(model: nn.Module, originals: dict[str, nn.Module], batches) -> dict[str, Any]:
    """How closely ``model`` (with NoRA activations at init) reproduces the model with its ``originals``.

    For every position ``t`` whose next token is real (not padding), with ``p`` the original model's
    next-token distribution and ``q`` the swapped one's: ``mean_kl``/``max_kl`` of KL(p || q) in nats,
    ``mean_abs_logprob_diff``/``max_abs_logprob_diff`` of ``|log p(x_{t+1}) - log q(x_{t+1})|`` (the
    log-probability of the actual next token, as MMLU-style scoring uses), ``top1_agreement`` (share of
    positions whose argmax agrees) and ``tokens``/``prompts`` counted. Activations are swapped in place and
    restored; the model runs in eval mode."""
    from nora.adapter.inject import _set_module, nora_modules, resolve_name

    swapped = nora_modules(model)
    missing = [n for n in swapped if n not in originals]
    if missing:
        raise ValueError(f"no original activation recorded for {missing[:3]}")

    def use(mods):
        for name, m in mods.items():
            _set_module(model, resolve_name(model, name), m)

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
            mask = inputs["attention_mask"][:, 1:].bool() if "attention_mask" in inputs \
                else torch.ones_like(nxt, dtype=torch.bool)
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
    return {"mean_kl": kl_sum / n, "max_kl": kl_max, "mean_abs_logprob_diff": d_sum / n,
            "max_abs_logprob_diff": d_max, "top1_agreement": agree / n, "tokens": n_tok, "prompts": n_prompts}


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def causal_lm_setup(cfg, device: torch.device, world_size: int, rank: int) -> dict:
    """Everything ``run_training`` needs for a ``causal_lm`` run (see the module docstring)."""
    from nora.data.instruct import InstructCollator, LengthGroupedBatchSampler, build_instruct_datasets
    from nora.models.causal_lm import build_causal_lm, build_tokenizer, resolve_dtype
    from nora.train.loop import resolve_precision

    tcfg, mcfg = cfg.trainer, cfg.model
    strategy = resolve_strategy(tcfg, world_size)
    dcfg = data_config(cfg)
    tokenizer = build_tokenizer(mcfg)
    train, val, stats = build_instruct_datasets(dcfg, tokenizer)
    eval_split = "val"
    if val is None:  # val_size=0, or a fraction of a file too small to hold anything out
        from nora.data.instruct import InstructDataset

        eval_split = "train"
        val = train.base if not isinstance(train, InstructDataset) else train
        if rank == 0:
            print(f"data {dcfg.name}: no validation rows (dataset.val_size={dcfg.val_size} of "
                  f"{stats['num_selected']}); the evaluation and the NoRA agreement check use the training set",
                  flush=True)
    if rank == 0:
        t = stats["train"]
        print(f"data {dcfg.name}: {stats['num_train']} train / {stats['num_val']} val examples "
              f"(max_length {dcfg.max_length}): {stats['num_truncated']} truncated "
              f"({stats['num_prompt_truncated']} with the prompt cut), {stats['num_dropped']} dropped; "
              f"{t['num_tokens']} train tokens ({t['num_supervised_tokens']} supervised)"
              + (" [cached]" if stats.get("cache_hit") else ""), flush=True)

    bs, ebs = int(tcfg.batch_size), int(tcfg.eval_batch_size)
    packed = bool(dcfg.packing)
    seed = int(cfg.seed)
    group = bool(dcfg.group_by_length) and not packed
    try:
        # the last, smaller global batch is kept (split evenly over the ranks): a small file still trains
        train_sampler = LengthGroupedBatchSampler(train.lengths, bs, seed=seed, shuffle=True, group_by_length=group,
                                                  num_replicas=world_size, rank=rank, drop_last=False,
                                                  mega_batch_mult=int(dcfg.mega_batch_mult))
    except ValueError as e:
        raise UserError(f"{e} (trainer.batch_size={bs} x {world_size} rank(s), {len(train)} training "
                        f"{'rows' if packed else 'examples'})") from None
    eval_sampler = LengthGroupedBatchSampler(val.lengths, ebs, seed=seed, shuffle=False, num_replicas=world_size,
                                             rank=rank, drop_last=False)
    collate = InstructCollator.from_tokenizer(tokenizer, pad_to_multiple_of=dcfg.pad_to_multiple_of)

    model, tokenizer = build_causal_lm(mcfg, tokenizer, device=device)

    method = cfg.method
    calibration = forward = None
    nora_cfg = method.get("nora")
    if nora_cfg and nora_cfg.init == "calibrated":
        n = int(nora_cfg.get("calibration_batches", 4))
        # the first n global training batches (epoch 0), identical on every rank, as padding-free rows
        glob = LengthGroupedBatchSampler(train.lengths, bs * world_size, seed=seed, shuffle=True,
                                         group_by_length=group, num_replicas=1, rank=0, drop_last=False,
                                         mega_batch_mult=int(dcfg.mega_batch_mult))
        flat = InstructCollator.from_tokenizer(tokenizer, padding_free=True)
        calibration = []
        for idx, _ in zip(glob, range(n)):
            calibration.append(_to(flat([train[i] for i in idx]), device))
        forward = calibration_forward

    extra: dict[str, Any] = {
        "data": {k: v for k, v in stats.items() if k not in ("cache_path", "key")},
        "num_truncated": stats["num_truncated"], "num_prompt_truncated": stats["num_prompt_truncated"],
        "max_length": int(dcfg.max_length), "packing": packed,
        "model_dtype": str(resolve_dtype(mcfg.get("dtype", "float32"))).replace("torch.", ""),
        "attn_implementation": mcfg.get("attn_implementation") or "sdpa",
        "gradient_checkpointing": bool(mcfg.get("gradient_checkpointing", False)),
        "strategy": strategy, "global_batch_size": bs * world_size * int(tcfg.get("grad_accum", 1)),
    }

    originals = nora_target_modules(model, method) if nora_cfg else {}
    k = int(nora_cfg.get("agreement_prompts", AGREEMENT_PROMPTS)) if nora_cfg else 0
    report_batches = []
    if originals and k > 0:
        m = min(k, len(val))
        for i in range(0, m, AGREEMENT_BATCH):
            report_batches.append(collate([val[j] for j in range(i, min(i + AGREEMENT_BATCH, m))]))
    amp = resolve_precision(tcfg.get("precision", "auto"), device)
    if rank == 0:
        accum = int(tcfg.get("grad_accum", 1))
        print(f"batch: {bs} sequences x {world_size} rank(s) x {accum} accumulation step(s) = "
              f"{bs * world_size * accum} per optimizer step ({strategy}, weights {extra['model_dtype']}, "
              f"autocast {str(amp).replace('torch.', '') if amp else 'off'})", flush=True)

    def wrap(model: nn.Module) -> nn.Module:
        if report_batches:
            report = logprob_agreement(model, originals, [_to(b, device) for b in report_batches])
            report["split"] = eval_split
            extra["nora_init_agreement"] = report
            if rank == 0:
                print("NoRA init vs original model on {prompts} {split} prompts ({tokens} tokens): mean KL "
                      "{mean_kl:.3g} nats, max KL {max_kl:.3g}, max |log-prob diff| {max_abs_logprob_diff:.3g} "
                      "(mean {mean_abs_logprob_diff:.3g}), top-1 agreement {top1_agreement:.4f}".format(**report),
                      flush=True)
        if strategy == "fsdp":
            return dist.wrap_fsdp(model, device, param_dtype=amp,
                                  reshard_after_forward=bool(tcfg.get("fsdp_reshard_after_forward", True)))
        if strategy == "ddp":
            return dist.wrap_ddp(model, device)
        return model

    return dict(model=model, task=TokenMeanCausalLMTask(), train_set=train, eval_set=val,
                train_sampler=train_sampler, eval_sampler=eval_sampler, collate_fn=collate,
                calibration=calibration, forward=forward, head=None, extra=extra, wrap=wrap, tokenizer=tokenizer)
