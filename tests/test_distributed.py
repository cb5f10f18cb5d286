"""Data-parallel training on the CPU: 2 processes (torchrun, gloo) on the tiny LLaMA with NoRA++.

One torchrun launch (tests/dist_worker.py) trains with DDP, then with FSDP2 (fully_shard) interrupted after one
step and resumed from its checkpoint. Checked against a single process with the same global batch: identical
weights on both ranks, the same per-step losses, the same trained adapter. Also: the SLURM launcher config and
the SLURM environment derivation, and the global-token-mean loss.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from instruct_fixtures import alpaca_records, write_alpaca_json

from nora.app.training import run_training

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = str(ROOT / "configs")


def common(data, cache, batch_size):
    # 16 training examples; global batch 4 x 2 accumulation micro-steps = 8 per step -> 2 steps per epoch;
    # LoRA dropout off (random per rank); a high learning rate so the weights move visibly; clipping runs but
    # never scales (FSDP sums the gradient norm over shards: a clip factor that differs in the last bit would
    # break the bit-identical DDP/FSDP comparison)
    return [
        "model=llama_tiny",
        "dataset=alpaca",
        "method=nora_pp",
        f"data.path={data}",
        "logger=disabled",
        "trainer.device=cpu",
        f"trainer.batch_size={batch_size}",
        "trainer.grad_accum=2",
        "trainer.max_steps=4",
        "trainer.eval_every=0",
        "trainer.log_every=1",
        "trainer.checkpoint_every=0",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.lr=5e-3",
        "trainer.nora_lr=5e-3",
        "dataset.val_size=4",
        "dataset.max_length=256",
        f"dataset.cache_dir={cache}",
        "method.lora.dropout=0",
        "method.nora.calibration_batches=2",
        "trainer.grad_clip=100",
    ]


def losses(run_dir):
    return [
        r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


def keep_final_state(monkeypatch) -> dict:
    """Make the next in-process run keep its final trainable tensors in the returned dict (``["state"]``)."""
    from nora.train.checkpoint import training_state_dict
    from nora.train.loop import Trainer

    box, fit = {}, Trainer.fit

    def fit_and_keep(self):
        state = fit(self)
        box["state"] = training_state_dict(self.model)
        return state

    monkeypatch.setattr(Trainer, "fit", fit_and_keep)
    return box


@pytest.mark.slow  # 15 s here: end to end (make test-slow, CI)
def test_two_processes_match_one(tmp_path, monkeypatch):
    data = write_alpaca_json(tmp_path / "alpaca_data.json", alpaca_records(20))
    cache = tmp_path / "cache"
    out = tmp_path / "dist"
    out.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "dist_worker.py"),
        str(out),
        *common(data, cache, batch_size=2),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # meanwhile, the single-process reference: batch 4 = 2 ranks x 2
    box = keep_final_state(monkeypatch)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(
            "train", overrides=common(data, cache, batch_size=4) + [f"output_root={tmp_path}", "run_name=single"]
        )
    single = run_training(cfg)
    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-4000:]
    assert "[ddp] complete step=4" in log and "[fsdp_stopped] incomplete step=1" in log
    assert "[fsdp] complete step=4" in log and "resumed from" in log

    ref = {k: v for k, v in box["state"].items()}
    for strategy in ("ddp", "fsdp"):
        r0 = torch.load(out / f"{strategy}_rank0.pt")
        r1 = torch.load(out / f"{strategy}_rank1.pt")
        assert set(r0) == set(ref) and any("nora_B_num" in k for k in r0) and any("lora_B" in k for k in r0)
        for k in r0:
            assert torch.equal(r0[k], r1[k]), f"{strategy}: ranks differ on {k}"
            # Adam divides by sqrt(v): rounding differences of near-zero gradients (1 batch of 4 vs 2 + 2
            # all-reduced) can move an element by a few % of one step's lr (5e-3); the losses agree to 1e-6
            torch.testing.assert_close(r0[k], ref[k], rtol=0, atol=2e-4, msg=f"{strategy} vs 1 process: {k}")
        moved = max(float(v.abs().max()) for k, v in r0.items() if "lora_B" in k or "nora_B" in k)
        assert moved > 5e-3  # the B factors (zero at init) moved: the comparison is not trivial
        s = json.loads((out / strategy / "summary.json").read_text())
        assert s["status"] == "complete" and s["world_size"] == 2 and s["strategy"] == strategy
        assert s["global_batch_size"] == 8 and s["tokens_seen"] == single["tokens_seen"]
        torch.testing.assert_close(losses(out / strategy), losses(tmp_path / "single"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["final"]["loss"], single["final"]["loss"], rtol=1e-5, atol=1e-6)
        peft_cfg = json.loads((out / strategy / "adapter" / "adapter_config.json").read_text())
        assert peft_cfg["peft_type"] == "NORA" and peft_cfg["lora_r"] > 0  # NoRA++: one peft adapter
    # the saved FSDP adapter (gathered from the shards) is the single-process one
    from safetensors.torch import load_file

    for f in ("adapter_model.safetensors",):  # LoRA's and NoRA's tensors
        a, b = load_file(str(out / "fsdp" / "adapter" / f)), load_file(str(tmp_path / "single" / "adapter" / f))
        assert set(a) == set(b) and any(".nora_activation.nora_B_num" in k for k in a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-4)
    # DDP and FSDP (interrupted and resumed) take bit-identical steps
    d, f = torch.load(out / "ddp_rank0.pt"), torch.load(out / "fsdp_rank0.pt")
    assert all(torch.equal(d[k], f[k]) for k in d)


def test_token_mean_loss_single_process_is_model_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    from nora.train.tasks import CausalLMTask

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    ids = torch.randint(0, 50, (2, 7))
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    task = CausalLMTask()
    assert task.items(batch) == 9  # supervised next-token targets: 3 of row 0 (its prompt is masked), 6 of row 1
    torch.testing.assert_close(
        task.loss(model, batch, float(task.items(batch))), model(**batch).loss, rtol=1e-6, atol=0
    )


def test_accumulation_is_the_token_mean_of_the_step(tmp_path):
    """The loss of an optimizer step is the sum of the supervised-token losses over all its micro-batches and
    ranks divided by their total count: batch 8 x accum 1, batch 2 x accum 4 (one process) and 2 ranks x
    batch 2 x accum 2 (torchrun, gloo) take the same SGD step, which is -lr times the gradient of the token mean
    of the 8 records (of very different lengths); the logged loss is that token mean."""
    import dist_worker as w

    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("WORLD_SIZE", None)
    (tmp_path / "ranks").mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "tests" / "dist_worker.py"),
            "accumulation",
            str(tmp_path / "ranks"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for name, bs, accum in (("b8", 8, 1), ("b2x4", 2, 4)):
        (tmp_path / name).mkdir()
        w.accumulation_step(tmp_path / name, batch_size=bs, accum=accum)

    # the reference: the gradient of the token mean over all 8 records, and the per-micro-batch mean it replaces
    model = w.accumulation_model()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = [w.pad_collate([r]) for r in w.accumulation_records()]
    sums = [model(**r, num_items_in_batch=1.0).loss for r in rows]  # each record's token-loss sum
    n = sum(int((r["labels"][:, 1:] != -100).sum()) for r in rows)
    token_mean = sum(sums) / n
    grads = torch.autograd.grad(token_mean, list(model.parameters()))
    expected = {k: start[k] - g for (k, _), g in zip(model.named_parameters(), grads)}
    pairs = [w.pad_collate(w.accumulation_records()[i : i + 2]) for i in range(0, 8, 2)]
    mean_of_means = sum(model(**p).loss for p in pairs) / 4  # the old objective of batch 2 x accum 4
    old = torch.autograd.grad(mean_of_means, list(model.parameters()))
    assert max(float((a - b).abs().max()) for a, b in zip(grads, old)) > 1e-3  # the two objectives differ

    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-4000:]
    for name in ("b8", "b2x4", "ranks"):
        got = torch.load(tmp_path / name / "weights.pt")
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        logged = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert logged[0]["step"] == 1
        torch.testing.assert_close(logged[0]["loss"], float(token_mean.detach()), rtol=1e-5, atol=0)


def test_slurm_env_from_submitit(monkeypatch):
    pytest.importorskip("submitit")
    from nora.train.distributed import slurm_env

    # slurm_env() writes these into os.environ: setenv first so that monkeypatch removes them afterwards
    # (a delenv of an absent key records nothing, and a leaked WORLD_SIZE=4 makes later in-process
    # training runs wait for a rendezvous that never comes)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    assert slurm_env() is False  # not a submitit job
    env = dict(
        SUBMITIT_EXECUTOR="slurm",
        SLURM_NTASKS="4",
        SLURM_PROCID="3",
        SLURM_LOCALID="1",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NODEID="1",
    )
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert slurm_env() is True
    got = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    assert got == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07"}
    assert slurm_env() is False  # WORLD_SIZE now set: nothing to do


def test_slurm_launcher_config():
    """configs/hydra/launcher/slurm.yaml documents its fields and composes on top of the submitit plugin."""
    text = (ROOT / "configs" / "hydra" / "launcher" / "slurm.yaml").read_text()
    for field in (
        "nodes:",
        "gpus_per_node:",
        "tasks_per_node:",
        "cpus_per_task:",
        "timeout_min:",
        "partition:",
        "account:",
        "max_num_timeout:",
        "setup:",
    ):
        line = next(x for x in text.splitlines() if x.startswith(field))
        assert "#" in line, f"{field} undocumented"
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "experiment=llama3_alpaca", "method=nora_pp", "hydra.launcher.nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 2 and launcher.tasks_per_node == launcher.gpus_per_node == 8


@pytest.mark.slow  # 10 s here: end to end (make test-slow, CI)
def test_fsdp_full_fine_tuning_checkpoints_on_rank0_cpu_and_resumes_exactly(tmp_path, monkeypatch):
    """Full fine-tuning under FSDP checkpoints through torch's distributed state-dict API: rank 0 receives every
    trainable tensor full-size on the CPU (with its optimizer state, keyed as an unsharded optimizer keys it), the
    other rank nothing; interrupted after one step and resumed, the run ends where one process ends."""
    data = write_alpaca_json(tmp_path / "alpaca_data.json", alpaca_records(20))
    cache = tmp_path / "cache"
    out = tmp_path / "dist"
    out.mkdir()

    def overrides(batch_size):
        return [
            ("method=full" if o.startswith("method=") else o)
            for o in common(data, cache, batch_size)
            if not o.startswith(("method.lora.", "method.nora.", "trainer.nora_lr"))
        ] + ["trainer.max_steps=2"]

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "dist_fsdp_full_worker.py"),
        str(out),
        *overrides(2),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    box = keep_final_state(monkeypatch)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=overrides(4) + [f"output_root={tmp_path}", "run_name=single"])
    single = run_training(cfg)
    try:
        log, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-4000:]
    assert "[fsdp_full] incomplete step=1" in log and "[fsdp_full] complete step=2" in log and "resumed from" in log

    ref = box["state"]
    rank0 = json.loads((out / "gathered_rank0.json").read_text())
    rank1 = json.loads((out / "gathered_rank1.json").read_text())
    assert len(rank0) == len(rank1) >= 2  # the interrupted run's checkpoint, then the resumed run's
    n_params = sum(1 for k in ref if not k.endswith(("_base_num", "_base_den")))
    for r0, r1 in zip(rank0, rank1):
        assert r1 == {"none": True, "sharded_params": n_params}
        assert not r0["none"] and r0["devices"] == ["cpu"] and r0["optimizer_devices"] == ["cpu"]
        assert r0["shapes"] == {k: list(v.shape) for k, v in ref.items()}  # full size, every trainable tensor
        assert r0["optimizer_keys"] == list(range(n_params))
        assert sorted(map(list, {tuple(s) for s in r0["exp_avg_shapes"].values()})) == sorted(
            map(list, {tuple(v.shape) for v in ref.values()})
        )
    a, b = torch.load(out / "fsdp_full_rank0.pt"), torch.load(out / "fsdp_full_rank1.pt")
    assert set(a) == set(ref)
    for k in a:
        assert torch.equal(a[k], b[k]), f"ranks differ on {k}"
        torch.testing.assert_close(a[k], ref[k], rtol=0, atol=2e-4, msg=f"fsdp vs 1 process: {k}")
    torch.testing.assert_close(losses(out / "fsdp_full"), losses(tmp_path / "single"), rtol=1e-5, atol=1e-6)
    assert json.loads((out / "fsdp_full" / "summary.json").read_text())["tokens_seen"] == single["tokens_seen"]
