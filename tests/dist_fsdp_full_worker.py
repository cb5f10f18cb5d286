"""One rank of tests/test_distributed.py's FSDP full fine-tuning test, launched by
``torchrun --standalone --nproc_per_node=2 tests/dist_fsdp_full_worker.py OUT_DIR OVERRIDE...``.

Full fine-tuning (every weight trainable) of the tiny LLaMA under FSDP2, stopped after one step and resumed from
its checkpoint. Every checkpoint's gathered state (torch's distributed state-dict API) is recorded per rank in
``OUT_DIR/gathered_rank<r>.json``: rank 0 gets full-size CPU tensors, the other ranks nothing. After the run each
rank writes its full trainable state to ``OUT_DIR/fsdp_full_rank<r>.pt``.
"""

import json
import os
import sys
from pathlib import Path

import torch

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def main() -> None:
    out = Path(sys.argv[1])
    overrides = sys.argv[2:]
    from hydra import compose, initialize_config_dir

    from nora.app.training import run_training
    from nora.train import distributed as dist
    from nora.train import loop
    from nora.train.checkpoint import training_state_dict

    seen = []
    gather = loop.gather_training_state

    def gather_and_record(model, optimizer):
        got = gather(model, optimizer)
        local = {n: tuple(p.to_local().shape) for n, p in model.named_parameters() if dist.is_dtensor(p)}
        rec = {"none": got is None, "sharded_params": len(local)}
        if got is not None:
            state, opt = got
            rec.update(
                devices=sorted({str(t.device) for t in state.values()}),
                shapes={k: list(v.shape) for k, v in state.items()},
                optimizer_devices=sorted(
                    {str(v.device) for s in opt["state"].values() for v in s.values() if torch.is_tensor(v)}
                ),
                optimizer_keys=sorted(opt["state"]),
                exp_avg_shapes={str(i): list(s["exp_avg"].shape) for i, s in opt["state"].items()},
            )
        seen.append(rec)
        return got

    loop.gather_training_state = gather_and_record
    fit = loop.Trainer.fit

    def fit_and_dump(self):
        state = fit(self)
        full = training_state_dict(self.model)  # a collective under FSDP: every rank calls it
        if state.finished:
            torch.save({k: v.cpu() for k, v in full.items()}, out / f"fsdp_full_rank{dist.rank()}.pt")
        return state

    loop.Trainer.fit = fit_and_dump
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        for extra in (["trainer.stop_after_steps=1"], []):
            cfg = compose(
                "train",
                overrides=overrides + extra + ["trainer.strategy=fsdp", f"output_root={out}", "run_name=fsdp_full"],
            )
            summary = run_training(cfg)
            if dist.rank() == 0:
                print(
                    f"[fsdp_full] {summary.get('status')} step={summary.get('steps', summary.get('step'))}", flush=True
                )
    (out / f"gathered_rank{dist.rank()}.json").write_text(json.dumps(seen))
    dist.teardown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nora.logs import setup_logging

    setup_logging()  # a command's console, as train.py's Hydra logging gives it (run_training's messages)
    main()
