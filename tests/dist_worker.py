"""One rank of the data-parallel tests (tests/test_distributed.py), launched by
``torchrun --standalone --nproc_per_node=2 tests/dist_worker.py OUT_DIR OVERRIDE...``.

Runs ``run_training`` three times in the same process group (gloo, CPU) on the tiny LLaMA:

* ``ddp``: trainer.strategy=ddp, to completion;
* ``fsdp``: trainer.strategy=fsdp, stopped after one step (``stop_after_steps=1``), then run again: it resumes
  from the checkpoint (gathered FSDP state, scattered back into shards) and completes.

After each completed ``fit`` every rank writes its full trainable state (FSDP shards gathered) to
``OUT_DIR/<tag>_rank<r>.pt``, so the test can check that the ranks agree and match a single-process run.

``dist_worker.py accumulation OUT_DIR``: one SGD step of :func:`accumulation_step` with 2 ranks x batch 2 x
accumulation 2 (tests/test_distributed.py compares it with batch 8 x 1 and batch 2 x 4 in one process).
"""

import os
import sys
from pathlib import Path

import torch

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


# token-mean accumulation: 8 records of very different lengths (and supervised shares), one global batch
RECORD_LENGTHS = (3, 61, 5, 40, 9, 17, 2, 33)
VOCAB = 64


def accumulation_records() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    records = []
    for n in RECORD_LENGTHS:
        ids = torch.randint(0, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100  # the prompt
        records.append({"input_ids": ids, "labels": labels})
    return records


def accumulation_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def pad_collate(rows: list[dict]) -> dict:
    n = max(len(r["input_ids"]) for r in rows)
    out = {
        "input_ids": torch.zeros(len(rows), n, dtype=torch.long),
        "labels": torch.full((len(rows), n), -100, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), n, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        out["input_ids"][i, :k], out["labels"][i, :k], out["attention_mask"][i, :k] = r["input_ids"], r["labels"], 1
    return out


class RankSlices:
    """The 8 records in order as one optimizer step: micro-batch ``m`` of rank ``r`` holds records
    ``[(m * ranks + r) * batch_size, ... + batch_size)``."""

    def __init__(self, batch_size: int, accum: int, ranks: int, rank: int):
        self.batches = [
            list(range((m * ranks + rank) * batch_size, (m * ranks + rank + 1) * batch_size)) for m in range(accum)
        ]
        self.start = 0

    def set_epoch(self, epoch):
        pass

    def set_start(self, k):
        self.start = k

    def __len__(self):
        return len(self.batches) - self.start

    def __iter__(self):
        return iter(self.batches[self.start :])


def accumulation_step(out: Path, batch_size: int, accum: int) -> None:
    """One optimizer step (SGD, lr 1, no momentum, no clipping) over the 8 records; writes the updated weights
    to ``out/weights.pt`` (rank 0) and the logged loss to ``out/metrics.jsonl``."""
    from nora.runs.layout import RunDir
    from nora.runs.logger import RunLogger
    from nora.train import distributed as dist
    from nora.train.config import TrainerConfig
    from nora.train.loop import TrainData, Trainer
    from nora.train.tasks import CausalLMTask

    dist.setup("cpu")
    ranks, rank = dist.world_size(), dist.rank()
    records = accumulation_records()
    cfg = TrainerConfig(
        device="cpu",
        lr=1.0,
        weight_decay=0.0,
        optimizer="sgd",
        momentum=0.0,
        grad_clip=None,
        scheduler="constant",
        warmup_ratio=0.0,
        max_steps=1,
        batch_size=batch_size,
        grad_accum=accum,
        eval_every=0,
        checkpoint_every=0,
        log_every=1,
        progress=False,
        num_workers=0,
    )
    data = TrainData(
        records,
        records,
        RankSlices(batch_size, accum, ranks, rank),
        RankSlices(batch_size, accum, ranks, rank),
        collate_fn=pad_collate,
    )
    trainer = Trainer(
        cfg,
        accumulation_model(),
        CausalLMTask(),
        data,
        RunDir(out).checkpoint,
        RunLogger(out, None, enabled=rank == 0),
        device=torch.device("cpu"),
        wrap=(lambda m: dist.wrap_ddp(m, torch.device("cpu"))) if ranks > 1 else None,
    )
    assert trainer.fit().step == 1
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, out / "weights.pt")
    dist.barrier()


def main() -> None:
    if sys.argv[1] == "accumulation":
        accumulation_step(Path(sys.argv[2]), batch_size=2, accum=2)
        from nora.train import distributed as dist

        dist.teardown()
        return
    out = Path(sys.argv[1])
    overrides = sys.argv[2:]
    from hydra import compose, initialize_config_dir

    from nora.app.training import run_training
    from nora.train import distributed as dist
    from nora.train.checkpoint import training_state_dict
    from nora.train.loop import Trainer

    tag = {"name": None}
    fit = Trainer.fit

    def fit_and_dump(self):
        state = fit(self)
        full = training_state_dict(self.model)  # a collective under FSDP: every rank calls it
        if state.finished:
            torch.save({k: v.cpu() for k, v in full.items()}, out / f"{tag['name']}_rank{dist.rank()}.pt")
        return state

    Trainer.fit = fit_and_dump
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        runs = [
            ("ddp", ["trainer.strategy=ddp"]),
            ("fsdp_stopped", ["trainer.strategy=fsdp", "trainer.stop_after_steps=1"]),
            ("fsdp", ["trainer.strategy=fsdp"]),
        ]
        for name, extra in runs:
            tag["name"] = name
            run = "fsdp" if name.startswith("fsdp") else name
            cfg = compose("train", overrides=overrides + extra + [f"output_root={out}", f"run_name={run}"])
            summary = run_training(cfg)
            if dist.rank() == 0:
                print(f"[{name}] {summary.get('status')} step={summary.get('steps', summary.get('step'))}", flush=True)
    dist.teardown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nora.logs import setup_logging

    setup_logging()  # a command's console, as train.py's Hydra logging gives it (run_training's messages)
    main()
