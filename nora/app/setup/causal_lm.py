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
6. with NoRA, ``method.nora.agreement_prompts`` held-out prompts for the init-agreement check
   (:mod:`nora.eval.agreement`, run by ``run_training`` once the method is applied);
7. ``wrap`` for ``trainer.strategy``: ``ddp`` (default with several ranks) or ``fsdp``
   (:func:`nora.train.distributed.wrap_fsdp`).

The loss (:class:`~nora.train.tasks.CausalLMTask`) is the mean over the supervised tokens of the whole optimizer
step: all micro-batches and ranks (:meth:`nora.train.loop.Trainer._train_step`), so data-parallel training with
accumulation takes exactly the step a single process with the whole batch would take.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from nora.app.config import RunConfig
from nora.app.setup.train_setup import TrainSetup
from nora.data.instruct import InstructCollator, InstructDataset, LengthGroupedBatchSampler, build_instruct_datasets
from nora.errors import UserError
from nora.eval.agreement import AGREEMENT_BATCH, model_inputs
from nora.models.causal_lm import build_causal_lm, build_tokenizer, resolve_dtype
from nora.train import distributed as dist
from nora.train.loop import TrainData, resolve_precision
from nora.train.tasks import CausalLMTask

log = logging.getLogger(__name__)


@torch.no_grad()
def calibration_forward(model: nn.Module, batch: dict):
    """Calibration pass: the activations are what matters, so only the last position's logits are computed."""
    return model(**model_inputs(batch), logits_to_keep=1)


def resolve_strategy(strategy: str, world_size: int) -> str:
    """``single`` in one process, else ``ddp`` or ``fsdp`` (``auto``: ddp)."""
    if world_size <= 1:
        return "single"
    s = strategy.lower()
    return "ddp" if s == "auto" else s


def causal_lm_setup(run: RunConfig, device: torch.device, world_size: int, rank: int) -> TrainSetup:
    """Everything ``run_training`` needs for a ``causal_lm`` run (see the module docstring)."""

    dcfg = run.dataset
    tokenizer = build_tokenizer(run.model)
    train, val, stats = build_instruct_datasets(dcfg, tokenizer)
    eval_split = "val"
    if val is None:  # val_size=0, or a fraction of a file too small to hold anything out
        eval_split = "train"
        val = train.base if not isinstance(train, InstructDataset) else train
        if rank == 0:
            log.info(
                f"data {dcfg.name}: no validation rows (dataset.val_size={dcfg.val_size} of "
                f"{stats['num_selected']}); the evaluation and the NoRA agreement check use the training set",
            )
    if rank == 0:
        _print_data(dcfg, stats)
    train_sampler, eval_sampler = _samplers(run, train, val, world_size, rank)
    collate = InstructCollator.from_tokenizer(tokenizer, pad_to_multiple_of=dcfg.pad_to_multiple_of)
    model, tokenizer = build_causal_lm(run.model, tokenizer, device=device)
    setup = TrainSetup(
        model=model,
        task=CausalLMTask(),
        agreement_split=eval_split,
        data=TrainData(train, val, train_sampler, eval_sampler, collate_fn=collate),
    )
    nora = run.method.nora
    if nora is not None and nora.init == "calibrated":
        setup.calibration = _calibration_batches(run, train, tokenizer, world_size, nora.calibration_batches, device)
        setup.forward = calibration_forward
    if nora is not None and nora.agreement_prompts > 0:
        m = min(nora.agreement_prompts, len(val))
        setup.agreement_batches = [
            collate([val[j] for j in range(i, min(i + AGREEMENT_BATCH, m))]) for i in range(0, m, AGREEMENT_BATCH)
        ]
    strategy = resolve_strategy(run.trainer.strategy, world_size)
    setup.extra = _summary_keys(run, stats, strategy, world_size)
    setup.wrap = _wrapper(run, strategy, device, world_size, rank, setup.extra)
    return setup


def _print_data(dcfg, stats: dict) -> None:
    t = stats["train"]
    log.info(
        f"data {dcfg.name}: {stats['num_train']} train / {stats['num_val']} val examples "
        f"(max_length {dcfg.max_length}): {stats['num_truncated']} truncated "
        f"({stats['num_prompt_truncated']} with the prompt cut), {stats['num_dropped']} dropped; "
        f"{t['num_tokens']} train tokens ({t['num_supervised_tokens']} supervised)"
        + (" [cached]" if stats.get("cache_hit") else ""),
    )


def _samplers(run: RunConfig, train, val, world_size: int, rank: int):
    dcfg, bs = run.dataset, run.trainer.batch_size
    try:
        # the last, smaller global batch is kept (split evenly over the ranks): a small file still trains
        train_sampler = LengthGroupedBatchSampler(
            train.lengths,
            bs,
            seed=run.seed,
            shuffle=True,
            group_by_length=_grouped(dcfg),
            num_replicas=world_size,
            rank=rank,
            drop_last=False,
            mega_batch_mult=dcfg.mega_batch_mult,
        )
    except ValueError as e:
        raise UserError(
            f"{e} (trainer.batch_size={bs} x {world_size} rank(s), {len(train)} training "
            f"{'rows' if dcfg.packing else 'examples'})"
        ) from None
    eval_sampler = LengthGroupedBatchSampler(
        val.lengths,
        run.trainer.eval_batch_size,
        seed=run.seed,
        shuffle=False,
        num_replicas=world_size,
        rank=rank,
        drop_last=False,
    )
    return train_sampler, eval_sampler


def _grouped(dcfg) -> bool:
    return bool(dcfg.group_by_length) and not dcfg.packing


def _calibration_batches(run: RunConfig, train, tokenizer, world_size: int, n: int, device) -> list[dict]:
    """The first ``n`` global training batches (epoch 0), identical on every rank, as padding-free rows."""
    dcfg = run.dataset
    glob = LengthGroupedBatchSampler(
        train.lengths,
        run.trainer.batch_size * world_size,
        seed=run.seed,
        shuffle=True,
        group_by_length=_grouped(dcfg),
        num_replicas=1,
        rank=0,
        drop_last=False,
        mega_batch_mult=dcfg.mega_batch_mult,
    )
    flat = InstructCollator.from_tokenizer(tokenizer, padding_free=True)
    return [{k: v.to(device) for k, v in flat([train[i] for i in idx]).items()} for idx, _ in zip(glob, range(n))]


def _summary_keys(run: RunConfig, stats: dict, strategy: str, world_size: int) -> dict:
    return {
        "data": {k: v for k, v in stats.items() if k not in ("cache_path", "key")},
        "num_truncated": stats["num_truncated"],
        "num_prompt_truncated": stats["num_prompt_truncated"],
        "max_length": int(run.dataset.max_length),
        "packing": bool(run.dataset.packing),
        "model_dtype": str(resolve_dtype(run.model.dtype)).replace("torch.", ""),
        "attn_implementation": run.model.attn_implementation or "sdpa",
        "gradient_checkpointing": run.model.gradient_checkpointing,
        "strategy": strategy,
        "global_batch_size": run.trainer.batch_size * world_size * run.trainer.grad_accum,
    }


def _wrapper(run: RunConfig, strategy: str, device, world_size: int, rank: int, extra: dict):
    tcfg = run.trainer
    amp = resolve_precision(tcfg.precision, device)
    if rank == 0:
        log.info(
            f"batch: {tcfg.batch_size} sequences x {world_size} rank(s) x {tcfg.grad_accum} accumulation "
            f"step(s) = {extra['global_batch_size']} per optimizer step ({strategy}, weights {extra['model_dtype']}, "
            f"autocast {str(amp).replace('torch.', '') if amp else 'off'})",
        )
    if strategy == "fsdp":
        return lambda model: dist.wrap_fsdp(
            model, device, param_dtype=amp, reshard_after_forward=tcfg.fsdp_reshard_after_forward
        )
    if strategy == "ddp":
        return lambda model: dist.wrap_ddp(model, device)
    return None
