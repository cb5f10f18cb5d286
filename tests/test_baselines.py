"""The low-budget baselines (bitfit, ln_tuning, ia3, vera): configs compose for ViT and LLaMA, each trains a tiny
model through the real ``run_training``, and every trainable count is checked by hand arithmetic."""

import json
import sys
from pathlib import Path

import pytest
import torch
from fixtures import write_cifar
from instruct_fixtures import alpaca_records, write_alpaca_json
from omegaconf import OmegaConf
from test_train_vision import make_cfg

from nora.app.training import run_training
from nora.errors import UserError
from nora.methods import METHODS, apply_method
from nora.models import build_model

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ("bitfit", "ln_tuning", "ia3", "vera")

# vit_test: width 32, MLP 128, 2 blocks, 10 classes. Trainable parameters besides the 32 * 10 + 10 = 330 of the head:
VIT_COUNTS = {
    # biases: patch embedding (32) + per block norm1, norm2 (32 each), qkv (96), proj (32), fc1 (128), fc2 (32)
    # + the final norm (32)
    "bitfit": ("bias", 32 + 2 * (32 + 32 + 96 + 32 + 128 + 32) + 32),
    # scale and shift of norm1, norm2 per block and of the final norm: (2 * 2 + 1) norms * 2 * 32
    "ln_tuning": ("ln_tuning", (2 * 2 + 1) * 2 * 32),
    # qkv scaled on its output (96), fc2 (feed-forward) on its input (128), per block
    "ia3": ("ia3", 2 * (96 + 128)),
    # lambda_d (r = 64) + lambda_b (out features) for qkv (96), proj (32), fc1 (128), fc2 (32), per block
    "vera": ("vera", 2 * (4 * 64 + 96 + 32 + 128 + 32)),
}
# llama_tiny: hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 key/value heads (k/v out 32); no head, no biases
LLAMA_COUNTS = {
    "ln_tuning": ("ln_tuning", 2 * (64 + 64) + 64),  # input/post-attention RMSNorm scales + final norm
    "ia3": ("ia3", 2 * (32 + 32 + 128)),  # k, v outputs, down_proj input
    "vera": ("vera", 2 * ((64 + 64) + (64 + 32))),  # q (r + 64), v (r + 32)
}


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar10"), "cifar10", n_train=128, n_test=64)


def test_baselines_are_methods():
    assert set(BASELINES) <= set(METHODS)


@pytest.mark.parametrize("method", BASELINES)
def test_vit_counts_by_hand(method):
    cfg = make_cfg([f"method={method}", "model=vit_test", "dataset=cifar10"])
    OmegaConf.resolve(cfg)
    rep = apply_method(build_model(cfg.model, 10), cfg.method, cfg.model).parameters
    component, n = VIT_COUNTS[method]
    assert rep.components[component] == n
    assert rep.components["head"] == 330 and rep.trainable == n + 330
    assert rep.components["base"] == rep.components["lora"] == rep.components["nora"] == 0


@pytest.mark.parametrize("method", ["ln_tuning", "ia3", "vera"])
def test_llama_counts_by_hand(method):
    from nora.models.causal_lm import build_causal_lm  # noqa: F401  (the real constructor, via build_model)

    cfg = make_cfg([f"method={method}", "model=llama_tiny", "dataset=alpaca"])
    OmegaConf.resolve(cfg)
    model = build_model(cfg.model)[0]
    rep = apply_method(model, cfg.method, cfg.model).parameters
    component, n = LLAMA_COUNTS[method]
    assert rep.components[component] == n == rep.trainable


def test_bitfit_on_llama_is_refused_with_the_valid_methods():
    cfg = make_cfg(["method=bitfit", "model=llama_tiny", "dataset=alpaca"])
    OmegaConf.resolve(cfg)
    with pytest.raises(UserError, match="method=bitfit does not apply to causal_lm models"):
        apply_method(build_model(cfg.model)[0], cfg.method, cfg.model)


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.slow  # 61 s here: end to end (make test-slow, CI)
def test_config_composes_for_both_families(method):
    import subprocess

    for model in ("vit_test", "llama_tiny"):
        out = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--cfg", "job", f"method={method}", f"model={model}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert f"name: {method}" in out.stdout and f"kind: {method}" in out.stdout


@pytest.mark.parametrize("method", BASELINES)
def test_trains_tiny_vit(cifar10, tmp_path, method):
    """A real run: the counted tensors change, every other backbone weight stays as loaded."""
    ov = [
        f"method={method}",
        "model=vit_test",
        "dataset=cifar10",
        f"dataset.root={cifar10}",
        "dataset.download=false",
        "dataset.verify_md5=false",
        f"output_root={tmp_path}",
        "logger=disabled",
        "trainer.epochs=1",
        "trainer.batch_size=32",
        "trainer.eval_batch_size=64",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.checkpoint_every=0",
        "trainer.lr=0.05",
    ]
    summary = run_training(make_cfg(ov), run_dir=tmp_path / "run")
    assert summary["status"] == "complete" and summary["steps"] == 128 // 32
    component, n = VIT_COUNTS[method]
    assert summary["parameters"]["components"][component] == n and summary["parameters"]["trainable"] == n + 330
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter" / "trainable.safetensors"))
    assert sum(t.numel() for t in saved.values()) == n + 330  # exactly what trained, head included
    # the method's own tensors start at fixed values (zero biases, unit norms and (IA)3 scales, VeRA's constants),
    # so a fresh copy shows whether training moved them
    cfg = make_cfg(ov)
    OmegaConf.resolve(cfg)
    fresh = dict(apply_method(build_model(cfg.model, 10), cfg.method, cfg.model).model.named_parameters())
    mark = {"bitfit": ".bias", "ln_tuning": "ln_tuning_layers", "ia3": "ia3_l", "vera": "vera_lambda"}[method]
    own = [k for k in saved if mark in k and "head" not in k]
    assert sum(saved[k].numel() for k in own) == n
    assert all(not torch.equal(saved[k], fresh[k].detach()) for k in own), "a trained tensor did not move"


def test_ia3_trains_tiny_llama(tmp_path):
    data = write_alpaca_json(tmp_path / "alpaca_data.json", alpaca_records(16))
    ov = [
        "method=ia3",
        "model=llama_tiny",
        "dataset=alpaca",
        f"data.path={data}",
        f"output_root={tmp_path}",
        "logger=disabled",
        "trainer.device=cpu",
        "trainer.batch_size=4",
        "trainer.eval_batch_size=8",
        "trainer.num_workers=0",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress=false",
        "dataset.val_size=4",
        "dataset.max_length=256",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=3",
    ]
    s = run_training(make_cfg(ov), run_dir=tmp_path / "run")
    assert s["status"] == "complete" and s["steps"] == 3
    assert s["parameters"]["components"]["ia3"] == LLAMA_COUNTS["ia3"][1] == s["parameters"]["trainable"]
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and sorted(cfg["feedforward_modules"]) == ["down_proj"]
