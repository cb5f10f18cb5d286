"""One rank of the data-parallel tests (tests/test_distributed.py), launched by
``torchrun --standalone --nproc_per_node=2 tests/dist_worker.py OUT_DIR OVERRIDE...``.

Runs ``run_training`` three times in the same process group (gloo, CPU) on the tiny LLaMA:

* ``ddp``: trainer.strategy=ddp, to completion;
* ``fsdp``: trainer.strategy=fsdp, stopped after one step (``stop_after_steps=1``), then run again: it resumes
  from the checkpoint (gathered FSDP state, scattered back into shards) and completes.

After each completed ``fit`` every rank writes its full trainable state (FSDP shards gathered) to
``OUT_DIR/<tag>_rank<r>.pt``, so the test can check that the ranks agree and match a single-process run.
"""
import os
import sys
from pathlib import Path

import torch

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def main() -> None:
    out = Path(sys.argv[1])
    overrides = sys.argv[2:]
    from hydra import compose, initialize_config_dir

    from nora.run import run_training
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
        runs = [("ddp", ["trainer.strategy=ddp"]),
                ("fsdp_stopped", ["trainer.strategy=fsdp", "trainer.stop_after_steps=1"]),
                ("fsdp", ["trainer.strategy=fsdp"])]
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
    main()
