"""The vision training spine end to end: configs, every method on CIFAR-format data, run outputs,
W&B offline files, exact resume, atomic checkpoints, NaN handling and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import write_cifar
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from nora.app.config import validate
from nora.app.training import run_training
from nora.errors import NonFiniteLossError, UserError
from nora.methods import METHODS, apply_method
from nora.models import build_model

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = str(ROOT / "configs")


def make_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar10"), "cifar10", n_train=192, n_test=64)


def tiny_overrides(root, tmp, method="nora", extra=()):
    return [
        f"method={method}",
        "model=vit_test",
        "dataset=cifar10",
        f"dataset.root={root}",
        "dataset.download=false",
        "dataset.verify_md5=false",
        f"output_root={tmp}",
        "logger=disabled",
        "trainer.epochs=2",
        "trainer.batch_size=32",
        "trainer.eval_batch_size=64",
        "trainer.num_workers=0",
        "trainer.log_every=2",
        "trainer.progress=false",
        "trainer.checkpoint_every=0",
        *extra,
    ]


# ------------------------------------------------------------------------------------------ configs
VISION_METHODS = [m for m in METHODS]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "digits"])
@pytest.mark.parametrize("method", VISION_METHODS)
def test_config_composes_and_method_applies(method, dataset):
    cfg = make_cfg([f"method={method}", f"dataset={dataset}", "model=vit_test"])
    validate(cfg)
    OmegaConf.resolve(cfg)
    assert cfg.method.name == method and cfg.dataset.name == dataset
    result = apply_method(build_model(cfg.model, int(cfg.dataset.num_classes)), cfg.method, cfg.model)
    comps = result.parameters.components
    head = 32 * cfg.dataset.num_classes + cfg.dataset.num_classes  # the new head trains with every method
    assert comps["head"] == head
    if method == "full":
        assert comps["base"] > 0 and result.parameters.percent == 100.0
    elif method == "linear_probe":
        assert result.parameters.trainable == head
    if method in ("lora", "dora", "nora_pp"):
        assert comps["lora"] > 0
    if method in ("nora", "nora_pp"):
        assert comps["nora"] == 2 * 2 * 3 * (8 + 5)  # 2 blocks, 2r(G+5)
    if method == "rational_ft":  # shared numerator (1 x 6) + per-group denominators (G x 4)
        assert comps["nora"] == 2 * (6 + 8 * 4)
    if method == "zero_init_ft":
        assert comps["nora"] == 2 * 8 * 10
    if method in ("lora", "dora", "nora_pp"):  # the blocks' qkv, proj, fc1, fc2 only (not patch_embed.proj)
        lora_modules = {n.rsplit(".lora_", 1)[0] for n, p in result.model.named_parameters() if "lora_A" in n}
        assert len(lora_modules) == 2 * 4
        assert not any("patch_embed" in n for n in lora_modules)


@pytest.mark.parametrize(
    "schema,yaml_file",
    [
        ("nora.train.config:TrainerConfig", "trainer/default.yaml"),
        ("nora.methods.config:LoraSettings", "adapter/lora.yaml"),
    ],
)
def test_schema_defaults_are_the_yaml_defaults(schema, yaml_file):
    """A key a YAML file leaves out takes the schema's default: the two must never drift apart (values given by
    interpolation from the model config are the model's to set)."""
    import dataclasses
    import importlib

    module, name = schema.split(":")
    cls = getattr(importlib.import_module(module), name)
    yaml = OmegaConf.to_container(OmegaConf.load(Path(CONFIGS) / yaml_file), resolve=False)
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
    }
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}  # YAML has lists
    given = {k: v for k, v in yaml.items() if not (isinstance(v, str) and v.startswith("${"))}
    assert set(yaml) <= set(defaults)
    assert given == {k: defaults[k] for k in given}


def test_unknown_group_option_lists_valid_ones():
    with pytest.raises(MissingConfigException) as err:
        make_cfg(["method=lora_plus"])
    msg = str(err.value)
    assert "lora_plus" in msg and "nora_pp" in msg and "zero_init_ft" in msg


@pytest.mark.parametrize(
    "override,match",
    [
        ("trainer.optimizer=adamx", "valid: adamw, sgd"),
        ("trainer.scheduler=step", "valid: cosine, linear, constant"),
        ("trainer.precision=fp8", "valid: auto, fp32, bf16, fp16"),
        ("trainer.data_path=gpu", "valid: auto, batched, per_sample"),
        ("method.nora.form=C", "valid: A, B"),
        ("method.nora.variant=magic", "valid: nora, rational_ft, zero_init_ft, frozen"),
        ("on_config_change=ignore", "valid: error, rerun, keep"),
    ],
)
def test_bad_values_fail_with_the_valid_options(cifar10, tmp_path, override, match):
    cfg = make_cfg(tiny_overrides(cifar10, tmp_path, extra=[override]))
    with pytest.raises((UserError, ValueError), match=match):
        run_training(cfg, run_dir=tmp_path / "run")


# Each bad value fails in validate(), before any data, model or run directory: the data root below does not
# exist and build_model is made to fail, so a value that slipped through would end in another error.
BAD_VALUES = [
    ("trainer.lr=-1", "trainer.lr=-1.0: must be > 0"),
    ("trainer.lr=abc", "trainer.lr='abc': could not be converted to Float"),
    ("trainer.epochs=0", "trainer.epochs=0: must be >= 1"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size=0: must be >= 1"),
    ("trainer.batch_size=0", "trainer.batch_size=0: must be >= 1"),
    ("trainer.grad_accum=0", "trainer.grad_accum=0: must be >= 1"),
    ("trainer.scheduler=cosin", "trainer.scheduler='cosin'; valid: cosine, linear, constant"),
    ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio=1.5: must be in [0, 1)"),
    ("trainer.num_workers=two", "trainer.num_workers='two': could not be converted to Integer"),
    ("trainer.strategy=zero3", "trainer.strategy='zero3'; valid: auto, ddp, fsdp"),
    ("+trainer.learning_rate=1", "trainer.learning_rate: no such key; valid: device, precision, epochs"),
    (
        "method.nora.groups=7",
        "method.nora.groups=7 does not divide the width 128 of model=vit_test; use a divisor, e.g. 2, 4, 8, 16, 32, 64",
    ),
    ("method.nora.r=0", "method.nora.r=0: must be >= 1"),
    ("method.nora.init=random", "method.nora.init='random'; valid: fit, calibrated"),
    ("method.nora.backend=cuda_magic", "method.nora.backend='cuda_magic'; valid: auto, "),
    ("method.lr=-0.1", "method.lr=-0.1: must be > 0"),
    ("model.pretrained=maybe", "model.pretrained='maybe': "),
    ("dataset.num_classes=1", "dataset.num_classes=1: must be >= 2"),
    ("dataset.augment.crop_padding=-2", "dataset.augment.crop_padding=-2: must be >= 0"),
    ("seed=abc", "seed='abc': could not be converted to Integer"),
    ("on_config_change=ask", "on_config_change='ask'; valid: error, rerun, keep"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_value_fails_before_anything_loads(tmp_path, monkeypatch, override, message):
    import nora.models

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(nora.models, "build_model", no_model)
    cfg = make_cfg(tiny_overrides(tmp_path / "nowhere", tmp_path, extra=[override]))
    with pytest.raises(UserError) as err:
        run_training(cfg, run_dir=tmp_path / "run")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_nora_groups_checked_at_injection_where_the_config_has_no_width():
    cfg = make_cfg(["method=nora", "model=vit_test", "dataset=cifar10", "method.nora.groups=7"])
    cfg.model.kwargs = {k: v for k, v in cfg.model.kwargs.items() if k != "embed_dim"}  # timm's default: 192
    with pytest.raises(
        UserError,
        match=r"^method\.nora\.groups=7 does not divide the width 768 of "
        r"blocks\.0\.mlp\.act \(read from fc2 \(Linear\)\); use a divisor",
    ):
        apply_method(build_model(cfg.model, 10), cfg.method, cfg.model)


def test_lora_settings_are_checked():
    with pytest.raises(UserError, match=r"^method\.lora\.dropout=1\.5: must be in \[0, 1\)$"):
        validate(make_cfg(["method=lora", "model=vit_test", "method.lora.dropout=1.5"]))


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.lr=abc", "error: trainer.lr='abc': could not be converted to Float"),
        ("method.nora.groups=7", "error: method.nora.groups=7 does not divide the width 128 of model=vit_test"),
        ("trainer.scheduler=cosin", "error: trainer.scheduler='cosin'; valid: cosine, linear, constant"),
    ],
)
@pytest.mark.slow  # 25 s here: end to end (make test-slow, CI)
def test_bad_value_is_one_line_from_train_py(tmp_path, override, message):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "model=vit_test",
            "dataset=cifar10",
            f"dataset.root={tmp_path}/nowhere",
            "logger=disabled",
            f"output_root={tmp_path}",
            override,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    # Hydra makes its own .hydra/ and train.log before the job starts; nothing of the run is written
    written = {p.name for p in tmp_path.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert written <= {"train.log"}, written


def test_family_mismatch_is_rejected():
    cfg = make_cfg(["model=vit_test", "dataset=cifar10"])
    cfg.model.family = "causal_lm"
    with pytest.raises(UserError, match="is a vision dataset but model=vit_test is a causal_lm model"):
        validate(cfg)


# ----------------------------------------------------------------------------- end-to-end runs
@pytest.mark.parametrize("method", VISION_METHODS)
@pytest.mark.slow  # 10 s here: end to end (make test-slow, CI)
def test_tiny_run_writes_outputs(cifar10, tmp_path, method):
    cfg = make_cfg(tiny_overrides(cifar10, tmp_path, method))
    run_dir = tmp_path / "run"
    summary = run_training(cfg, run_dir=run_dir)
    assert summary["status"] == "complete"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary, default=str))
    for key in (
        "method",
        "model",
        "dataset",
        "seed",
        "parameters",
        "final_accuracy",
        "best_accuracy",
        "wall_time_s",
        "images_per_s",
        "peak_memory_mb",
    ):
        assert on_disk[key] is not None, key
    assert on_disk["steps"] == 2 * (192 // 32)
    assert 0.0 <= on_disk["final_accuracy"] <= 100.0
    assert (run_dir / "config.yaml").exists()
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m and "eval/accuracy" not in m]
    assert [m["step"] for m in train] == [2, 4, 6, 8, 10, 12]
    assert all(m["images_per_s"] > 0 and 0 <= m["data_wait_share"] <= 1 for m in train)
    assert metrics[-1]["eval/accuracy"] == on_disk["final_accuracy"]
    adapter = sorted(p.name for p in (run_dir / "adapter").iterdir())
    if method in ("lora", "dora", "nora_pp"):
        assert "adapter_model.safetensors" in adapter
    if method in ("nora", "nora_pp", "rational_ft", "zero_init_ft"):
        assert (run_dir / "activations.png").stat().st_size > 10_000
        # every NoRA adapter is one peft adapter (peft type NORA, the head in modules_to_save), never nora's own files
        assert adapter == ["adapter_config.json", "adapter_model.safetensors"]
        assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "NORA"
    if method in ("full", "linear_probe"):
        assert adapter == ["trainable.safetensors"]
    assert (run_dir / "checkpoints" / "last.pt").exists()


def test_finished_run_is_skipped_and_force_reruns(cifar10, tmp_path, logged):
    cfg = make_cfg(tiny_overrides(cifar10, tmp_path, "linear_probe", ["trainer.epochs=1"]))
    first = run_training(cfg, run_dir=tmp_path / "run")
    again = run_training(cfg, run_dir=tmp_path / "run")
    assert "skip:" in logged() and again == json.loads(json.dumps(first, default=str))
    cfg.force = True
    forced = run_training(cfg, run_dir=tmp_path / "run")
    assert forced["date"] >= first["date"] and forced["final_accuracy"] == first["final_accuracy"]


def test_a_changed_config_is_never_skipped_or_resumed_silently(cifar10, tmp_path, logged):
    run = tmp_path / "run"
    base = tiny_overrides(cifar10, tmp_path, "linear_probe", ["trainer.epochs=1"])
    first = run_training(make_cfg(base), run_dir=run)
    # where outputs go, logging and progress settings are not the configuration: still skipped
    same = run_training(make_cfg(base + ["trainer.log_every=5", f"output_root={tmp_path / 'elsewhere'}"]), run_dir=run)
    assert same == json.loads(json.dumps(first, default=str))
    with pytest.raises(UserError, match=r"holds a complete run of another configuration(.|\n)*trainer.epochs: 1 -> 2"):
        run_training(make_cfg(base + ["trainer.epochs=2"]), run_dir=run)
    kept = run_training(make_cfg(base + ["trainer.epochs=2", "on_config_change=keep"]), run_dir=run)
    assert kept["epochs"] == 1 and "on_config_change=keep uses it as it is" in logged()
    redone = run_training(make_cfg(base + ["trainer.epochs=2", "on_config_change=rerun"]), run_dir=run)
    assert redone["epochs"] == 2 and redone["config_hash"] != first["config_hash"]
    with pytest.raises(UserError, match="trainer.epochs: 2 -> 1"):
        run_training(make_cfg(base), run_dir=run)

    # a checkpoint of another configuration is not resumed: error, or (rerun) a clean start that ends exactly
    # where a straight run with the new configuration ends
    extra = ["trainer.epochs=2", "trainer.checkpoint_every=2"]
    cut = tmp_path / "cut"
    part = run_training(
        make_cfg(tiny_overrides(cifar10, tmp_path, "nora", extra + ["trainer.stop_after_steps=3"])), run_dir=cut
    )
    assert part == {"status": "incomplete", "step": 3}
    other = tiny_overrides(cifar10, tmp_path, "nora", extra + ["method.nora.r=2"])
    with pytest.raises(UserError, match=r"holds a checkpoint of another configuration(.|\n)*method.nora.r: 3 -> 2"):
        run_training(make_cfg(other), run_dir=cut)
    interrupted = run_training(make_cfg(other + ["on_config_change=rerun", "trainer.stop_after_steps=1"]), run_dir=cut)
    assert interrupted == {"status": "incomplete", "step": 1}  # started at 0, not at the other run's step 3
    resumed = run_training(make_cfg(other), run_dir=cut)
    straight = run_training(make_cfg(other), run_dir=tmp_path / "straight")
    assert resumed["final"] == straight["final"] and resumed["parameters"] == straight["parameters"]


def test_wandb_offline_run_files(cifar10, tmp_path):
    cfg = make_cfg(tiny_overrides(cifar10, tmp_path, "nora", ["logger=wandb", "trainer.epochs=1"]))
    run_training(cfg, run_dir=tmp_path / "run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "W&B offline run file missing"


# ------------------------------------------------------------------------------------ resume
def _train_records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,path", [("nora", "per_sample"), ("lora", "batched")])
def test_resume_mid_epoch_is_exact(cifar10, tmp_path, method, path):
    extra = [
        "trainer.epochs=3",
        "trainer.checkpoint_every=4",
        "trainer.log_every=1",
        "dataset.augment.crop_padding=4",
        f"trainer.data_path={path}",
        "trainer.eval_every=1",
    ]
    full = run_training(make_cfg(tiny_overrides(cifar10, tmp_path, method, extra)), run_dir=tmp_path / "full")
    # the same run, killed after 7 steps (mid epoch 2 of 6-step epochs), then resumed twice
    part = run_training(
        make_cfg(tiny_overrides(cifar10, tmp_path, method, extra + ["trainer.stop_after_steps=7"])),
        run_dir=tmp_path / "cut",
    )
    assert part == {"status": "incomplete", "step": 7}
    part = run_training(
        make_cfg(tiny_overrides(cifar10, tmp_path, method, extra + ["trainer.stop_after_steps=5"])),
        run_dir=tmp_path / "cut",
    )
    assert part == {"status": "incomplete", "step": 12}
    resumed = run_training(make_cfg(tiny_overrides(cifar10, tmp_path, method, extra)), run_dir=tmp_path / "cut")
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait_share")} for r in rs]

    assert strip(_train_records(tmp_path / "cut")) == strip(_train_records(tmp_path / "full"))
    from safetensors.torch import load_file

    name = "adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "full/adapter" / name)), load_file(str(tmp_path / "cut/adapter" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_atomic_checkpoint_survives_an_interrupted_write(tmp_path, monkeypatch):
    from nora.train import checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.atomic_save({"step": 1, "w": torch.arange(5.0)}, path)
    good = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(10)  # half-written file ...
        raise KeyboardInterrupt  # ... and the process is killed before the rename

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"step": 2, "w": torch.zeros(5)}, path)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert path.read_bytes() == good
    assert torch.load(path)["step"] == 1
    checkpoint.atomic_save({"step": 3}, path)  # the next save replaces the stray temp file
    assert torch.load(path)["step"] == 3 and [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_nan_loss_stops_without_touching_the_last_checkpoint(cifar10, tmp_path, monkeypatch):
    from nora.train.tasks import ClassificationTask

    real = ClassificationTask.loss
    calls = {"n": 0}

    def poisoned(self, model, batch, normalizer):
        calls["n"] += 1
        loss = real(self, model, batch, normalizer)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(ClassificationTask, "loss", poisoned)
    cfg = make_cfg(tiny_overrides(cifar10, tmp_path, "nora", ["trainer.checkpoint_every=4"]))
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 6.*without overwriting"):
        run_training(cfg, run_dir=tmp_path / "run")
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)
    assert ckpt["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "run/summary.json").exists()


# ------------------------------------------------------------------------------- clear errors
def test_missing_data_is_one_line_from_train_py(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "method=nora",
            "dataset=cifar100",
            f"dataset.root={tmp_path}/nowhere",
            "dataset.download=false",
            f"output_root={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cifar100 not found under")
    assert "put the extracted cifar-100-python/ folder" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_missing_pretrained_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = make_cfg(["model=vit_tiny"])
    with pytest.raises(
        UserError,
        match=r"pretrained weights for vit_tiny_patch16_224\.augreg_in21k_ft_in1k could not "
        r"be loaded.*model\.checkpoint=",
    ):
        build_model(cfg.model, 10)
