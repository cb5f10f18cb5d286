"""Instruction tuning end to end on a tiny random LLaMA/Qwen2 with the offline tokenizer (no network, CPU):
every method through ``run_training``, run outputs, adapter reload with identical logits, the NoRA init
agreement check, bf16, packing, and clear errors (token, weights, dataset, fields, config keys, truncation)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from instruct_fixtures import alpaca_records, openorca_records, write_alpaca_json, write_openorca_parquet
from omegaconf import OmegaConf

import nora.app.adapters
import nora.app.training
from nora.app.training import run_training
from nora.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = str(ROOT / "configs")

# The NoRA swap at init vs the original tiny LLaMA (calibrated rationals; measured: mean KL ~1e-8 nats,
# max |log-prob diff| ~3e-6); bounds with a wide margin:
MAX_MEAN_KL = 1e-6
MAX_LOGPROB_DIFF = 1e-4


def make_cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Data files in the real formats and a private cache of tokenised data."""
    root = tmp_path_factory.mktemp("instruct")
    return {
        "alpaca": write_alpaca_json(root / "alpaca_data.json", alpaca_records(16)),
        "openorca": write_openorca_parquet(root / "openorca" / "1M-GPT4-Augmented.parquet", openorca_records(10)),
        "cache": root / "cache",
    }


def overrides(data, tmp, method="nora_pp", model="llama_tiny", dataset="alpaca", extra=()):
    ov = [
        f"method={method}",
        f"model={model}",
        f"dataset={dataset}",
        f"data.path={data[dataset]}",
        f"output_root={tmp}",
        "logger=disabled",
        "trainer.device=cpu",
        "trainer.batch_size=4",
        "trainer.eval_batch_size=8",
        "trainer.num_workers=0",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress=false",
        "dataset.val_size=4",
        "dataset.max_length=256",
        f"dataset.cache_dir={data['cache']}",
    ]
    if method in ("nora", "nora_pp"):
        ov.append("method.nora.calibration_batches=2")
    return ov + list(extra)


def losses(run_dir):
    return [
        r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


def capture_trained_model(monkeypatch):
    """Keep a handle on the model run_training trains (it is passed to save_adapter at the end)."""
    box = {}
    save = nora.app.adapters.save_adapter

    def spy(model, method_cfg, directory):
        box["model"] = model
        return save(model, method_cfg, directory)

    monkeypatch.setattr(nora.app.training, "save_adapter", spy)
    return box


@torch.no_grad()
def logits(model, tokenizer, texts=("Give three tips for staying healthy.", "What is the capital of France?")):
    model.eval()
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return model(**enc).logits


# ------------------------------------------------------------------------------ every method, reloaded
@pytest.mark.parametrize(
    "method,model,dataset",
    [
        ("lora", "llama_tiny", "alpaca"),
        ("dora", "llama_tiny", "alpaca"),
        ("nora", "llama_tiny", "alpaca"),
        ("nora_pp", "llama_tiny", "alpaca"),
        ("nora_pp", "qwen2_tiny", "openorca"),
    ],
)
def test_method_trains_writes_outputs_and_reloads(data, tmp_path, monkeypatch, method, model, dataset):
    from nora.app.reload import load_trained_model
    from nora.models.causal_lm import build_causal_lm

    box = capture_trained_model(monkeypatch)
    cfg = make_cfg(overrides(data, tmp_path, method, model, dataset, ["trainer.max_steps=3"]))
    s = run_training(cfg)
    run = tmp_path / cfg.run_name
    assert s["status"] == "complete" and s["steps"] == 3 and s["family"] == "causal_lm"
    assert s["tokens_seen"] > 0 and s["tokens_per_s"] > 0 and "peak_memory_mb" in s
    assert s["data"]["num_train"] == (12 if dataset == "alpaca" else 6) and s["num_truncated"] == 0
    assert s["strategy"] == "single" and s["model_dtype"] == "float32" and s["attn_implementation"] == "sdpa"
    comps = s["parameters"]["components"]
    assert (comps["lora"] > 0) == (method != "nora")
    assert (comps["nora"] > 0) == (method in ("nora", "nora_pp"))
    assert comps["base"] == 0 and comps["head"] == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r) and len(losses(run)) == 3
    assert "eval/loss" in records[-1] and "eval/perplexity" in records[-1]
    adapter = run / "adapter"
    if method != "nora":
        assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
        assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] == (method == "dora")
    if method in ("nora", "nora_pp"):  # one NoRA peft adapter (peft type NORA), LoRA inside for NoRA++
        peft_cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert peft_cfg["peft_type"] == "NORA" and (peft_cfg["lora_r"] > 0) == (method == "nora_pp")
        assert not (adapter / "nora_config.json").exists() and (run / "activations.png").exists()
        agree = s["nora_init_agreement"]
        assert agree["tokens"] > 100 and agree["prompts"] == 4
        assert agree["mean_kl"] < MAX_MEAN_KL and agree["max_abs_logprob_diff"] < MAX_LOGPROB_DIFF
        assert agree["top1_agreement"] == 1.0
    else:
        assert "nora_init_agreement" not in s

    # the adapter on a freshly built base model computes exactly what the trained model did
    trained = load_trained_model(run)
    assert trained.summary["status"] == "complete"
    assert trained.adapter["kind"] == {"lora": "lora", "dora": "dora", "nora": "nora", "nora_pp": "nora++"}[method]
    want = logits(box["model"], trained.tokenizer)
    got = logits(trained.model, trained.tokenizer)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    base, tok = build_causal_lm(trained.config.model)
    assert (logits(base, tok) - want).abs().max() > 1e-5  # training changed something


def test_overfit_loss_decreases(data, tmp_path):
    """30 steps on 6 OpenOrca examples (NoRA++): the training loss falls well below its start."""
    cfg = make_cfg(
        overrides(
            data,
            tmp_path,
            "nora_pp",
            dataset="openorca",
            extra=[
                "trainer.max_steps=30",
                "trainer.lr=1e-2",
                "trainer.nora_lr=1e-2",
                "trainer.warmup_steps=0",
                "trainer.scheduler=constant",
                "dataset.val_size=4",
                "trainer.batch_size=3",
            ],
        )
    )
    s = run_training(cfg)
    ls = losses(tmp_path / cfg.run_name)
    assert len(ls) == 30
    first, last = sum(ls[:3]) / 3, sum(ls[-3:]) / 3
    print(f"overfit: loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first, (first, last)
    assert s["final"]["loss"] < 6.0


@pytest.mark.slow  # 10 s here: end to end (make test-slow, CI)
def test_train_py_command(data, tmp_path):
    """The documented command: train.py with a tiny LLaMA, Alpaca from a local file, NoRA++, offline. The
    trainer's default batch (64) exceeds the 16 examples (one smaller batch per epoch), and the default
    validation share (2%) holds out nothing from 16 rows (evaluation falls back to the training set)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "model=llama_tiny",
        "dataset=alpaca",
        "method=nora_pp",
        f"data.path={data['alpaca']}",
        "logger=disabled",
        f"output_root={tmp_path}",
        "trainer.device=cpu",
        "trainer.max_steps=2",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "method.nora.calibration_batches=1",
        f"dataset.cache_dir={data['cache']}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # the run name carries the overrides that change the result (nora/runs/naming.py)
    run = tmp_path / (
        "llama_tiny_alpaca_nora_pp_s0_method.nora.calibration_batches=1,trainer.device=cpu,trainer.max_steps=2"
    )
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "activations.png",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoints/last.pt",
    ):
        assert (run / f).exists(), f
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "complete" and s["steps"] == 2 and s["tokens_seen"] == 2 * s["data"]["train"]["num_tokens"]
    assert s["nora_init_agreement"]["split"] == "train" and s["data"]["num_val"] == 0
    assert "NoRA init vs original model" in out.stdout and "truncated" in out.stdout
    assert "no validation rows" in out.stdout


# --------------------------------------------------------------------------------- NoRA on the LLM
def _setup(data, tmp_path, extra=(), method="nora"):
    """The causal-LM setup with the method applied, and the NoRA init-agreement check run_training makes."""
    from nora.app.config import validate
    from nora.app.setup.causal_lm import causal_lm_setup
    from nora.eval.agreement import init_agreement, nora_target_modules
    from nora.methods import apply_method

    run = validate(make_cfg(overrides(data, tmp_path, method, extra=list(extra))))
    setup = causal_lm_setup(run, torch.device("cpu"), 1, 0)
    originals = nora_target_modules(setup.model, run.method.nora.nora_config(None))
    result = apply_method(setup.model, run.method, run.model, setup.calibration, setup.forward)
    return (
        setup,
        result,
        lambda: init_agreement(result.model, originals, setup.agreement_batches, "cpu", setup.agreement_split),
    )


def test_every_mlp_silu_replaced_and_calibration_beats_range_fit(data, tmp_path):
    """Wider weights (initializer_range=0.3): gate pre-activations reach about +-11, beyond [-3, 3]. The default
    (residual) form starts at the model whatever its fit; in the paper's form, rationals calibrated on those inputs
    keep the next-token distribution closer than a plain [-3, 3] fit (measured: mean KL 6e-6 vs 1.6e-5 nats, max
    |log-prob diff| 0.014 vs 0.064)."""
    from nora.adapter import nora_modules

    wide = ["model.config.initializer_range=0.3"]
    residual = _setup(data, tmp_path, wide)[2]()  # the default form: step 0 is the model, whatever the fit
    assert residual["mean_kl"] < 1e-6 and residual["max_abs_logprob_diff"] < 1e-4 and residual["top1_agreement"] == 1
    wide.append("nora_residual=false")  # the paper's form: the rationals replace SiLU, as far as they are fitted
    setup, result, agreement = _setup(data, tmp_path, wide)
    mods = nora_modules(result.model)
    assert sorted(mods) == [f"model.layers.{i}.mlp.act_fn" for i in range(2)]
    assert all(m.original == "silu" and m.groups == 8 for m in mods.values())
    assert result.parameters.components["nora"] == 2 * 2 * 3 * (8 + 5)
    assert all(r["range"][1] > 6.0 for r in result.injection.targets.values())  # fitted where inputs live
    calibrated = agreement()
    setup, result, agreement = _setup(data, tmp_path, wide + ["model.nora_init=fit"])
    fitted = agreement()
    print("calibrated", calibrated, "\nrange fit", fitted)
    assert calibrated["mean_kl"] < 5e-5 and calibrated["max_abs_logprob_diff"] < 0.05
    assert calibrated["mean_kl"] < fitted["mean_kl"]
    assert calibrated["max_abs_logprob_diff"] < fitted["max_abs_logprob_diff"] / 2


def test_bf16_weights_fp32_rational(data, tmp_path):
    """bf16 weights: the rational computes in float32 and returns bf16; NoRA and LoRA factors stay float32;
    a short bf16 run trains with a finite loss."""
    from nora.adapter import nora_modules

    setup, result, _ = _setup(data, tmp_path, ["model.dtype=bfloat16"], method="nora_pp")
    model = result.model
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert model.get_base_model().model.layers[0].mlp.gate_proj.base_layer.weight.dtype == torch.bfloat16
    act = nora_modules(model)["model.layers.0.mlp.act_fn"]
    assert act.base_numerator.dtype == torch.float32
    x = torch.randn(3, 5, 128).mul(3).to(torch.bfloat16)
    y = act(x)
    num, den = act.coefficients()
    assert y.dtype == torch.bfloat16
    # computed in float32 and rounded once: the float32 evaluation rounded to bf16
    torch.testing.assert_close(y, act.evaluate(x.float(), num, den).to(torch.bfloat16), rtol=0, atol=0)
    s = run_training(
        make_cfg(
            overrides(
                data,
                tmp_path,
                "nora_pp",
                extra=["model.dtype=bfloat16", "trainer.precision=bf16", "trainer.max_steps=2"],
            )
        )
    )
    assert s["status"] == "complete" and s["model_dtype"] == "bfloat16"
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(tmp_path / "llama_tiny_alpaca_nora_pp_s0"))


def test_packed_batches_count_tokens(data, tmp_path):
    """Packing: padding-free rows without attention_mask train, and every packed token is counted."""
    cfg = make_cfg(
        overrides(data, tmp_path, "lora", extra=["dataset.packing=true", "trainer.batch_size=1", "trainer.max_steps=2"])
    )
    from nora.app.config import validate
    from nora.app.setup.causal_lm import causal_lm_setup

    setup = causal_lm_setup(validate(cfg), torch.device("cpu"), 1, 0)
    rows = [setup.data.collate_fn([setup.data.train_set[i] for i in b]) for b in setup.data.train_sampler]
    assert all("attention_mask" not in r and "position_ids" in r for r in rows)
    assert sum(setup.task.units(r) for r in rows) == setup.data.train_set.num_tokens
    s = run_training(cfg)
    assert s["status"] == "complete" and s["packing"] is True and s["tokens_seen"] > 0


# ---------------------------------------------------------------------------------------- errors
def test_gated_model_offline_is_one_clear_error(data, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    cfg = make_cfg(overrides(data, tmp_path, "lora", extra=["model=llama3_8b"]))
    with pytest.raises(UserError) as e:
        run_training(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "meta-llama/Meta-Llama-3-8B" in msg
    assert "HF_TOKEN" in msg and "model.path=<dir>" in msg and "offline" in msg


def test_missing_token_and_weights_messages(monkeypatch, tmp_path):
    """Online but no token for a gated repo; a wrong model.path; (simulated hub errors)."""
    import transformers

    from nora.models import causal_lm

    mcfg = make_cfg(["model=llama3_8b"]).model
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("nora.hub.offline", lambda: False)

    def gated(*a, **k):
        raise OSError("You are trying to access a gated repo. 401 Client Error: Unauthorized")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gated)
    with pytest.raises(UserError, match="no HF_TOKEN is set in the environment") as e:
        causal_lm.build_tokenizer(mcfg)
    assert "model.path=<dir>" in str(e.value) and "accept the licence" in str(e.value)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", gated)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    with pytest.raises(UserError, match="HF_TOKEN in the environment has no access"):
        causal_lm.build_causal_lm(mcfg, tokenizer=object())
    mcfg.path = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="model.path=.*no such directory"):
        causal_lm.build_causal_lm(mcfg, tokenizer=object())
    (tmp_path / "empty").mkdir()
    mcfg.path = str(tmp_path / "empty")
    with pytest.raises(UserError, match="holds no config.json"):
        causal_lm.build_causal_lm(mcfg, tokenizer=object())


def test_missing_dataset_errors(data, tmp_path):
    from nora.data.instruct import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="no such file or directory") as e:
        run_training(make_cfg(overrides(data, tmp_path, "lora", extra=[f"data.path={tmp_path}/nope.json"])))
    assert "data.path=<file or dir>" in str(e.value)
    with pytest.raises(DataNotFoundError, match="offline") as e:  # hub dataset, no network, nothing cached
        run_training(make_cfg(overrides(data, tmp_path, "lora", extra=["data.path=null"])))
    assert "tatsu-lab/alpaca" in str(e.value) and "data.path=<file or dir>" in str(e.value)


def test_data_file_missing_field_and_unknown_key(data, tmp_path):
    from nora.data.instruct import DataError

    bad = [{k: v for k, v in r.items() if k != "output"} for r in alpaca_records(6)]
    path = write_alpaca_json(tmp_path / "broken.json", bad)
    with pytest.raises(DataError, match=r"broken\.json.*missing field\(s\) \['output'\]"):
        run_training(make_cfg(overrides(data, tmp_path, "lora", extra=[f"data.path={path}"])))
    with pytest.raises(DataError, match=r"unknown key\(s\) \['shuffle_buffer'\]"):
        run_training(make_cfg(overrides(data, tmp_path, "lora", extra=["+dataset.shuffle_buffer=10"])))


def test_long_sequences_truncated_and_counted(data, tmp_path, logged):
    from nora.app.config import validate
    from nora.app.setup.causal_lm import causal_lm_setup

    cfg = make_cfg(overrides(data, tmp_path, "lora", extra=["dataset.max_length=48"]))
    setup = causal_lm_setup(validate(cfg), torch.device("cpu"), 1, 0)
    out = logged()
    n = setup.extra["num_truncated"]
    assert n == 16 and f"{n} truncated" in out  # every fixture example is longer than 48 tokens
    assert int(setup.data.train_set.lengths.max()) == 48 and len(setup.data.train_set) == 12  # none dropped


# --------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("method", ["lora", "dora", "nora", "nora_pp"])
@pytest.mark.parametrize("experiment", ["llama3_alpaca", "llama3_openorca"])
def test_8b_experiment_configs(method, experiment):
    from nora.app.config import validate
    from nora.schema import per_family

    cfg = make_cfg([f"experiment={experiment}", f"method={method}", "data.path=/data/x"])
    validate(cfg)
    OmegaConf.resolve(cfg)
    m = cfg.model
    assert m.hf_name == "meta-llama/Meta-Llama-3-8B" and m.gated and m.dtype == "bfloat16"
    assert m.attn_implementation == "sdpa" and m.nora_init == "calibrated" and m.head is None
    assert list(m.lora_targets) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg.dataset.path == "/data/x" and cfg.dataset.max_length == 512
    t = cfg.trainer
    assert t.batch_size * t.grad_accum == 128 and t.strategy == "auto"
    assert per_family(cfg.method.lr, "causal_lm", "lr") > 0
    if cfg.method.lora:
        assert list(cfg.method.lora.targets) == list(m.lora_targets)
    if cfg.method.nora:
        assert (cfg.method.nora.r, cfg.method.nora.alpha, cfg.method.nora.groups) == (3, 6.0, 8)
    assert "HF_TOKEN" not in json.dumps(OmegaConf.to_container(cfg))


def test_other_swiglu_configs():
    for name, hub in (("qwen2_7b", "Qwen/Qwen2-7B"), ("mistral_7b", "mistralai/Mistral-7B-v0.1")):
        m = make_cfg([f"model={name}", "dataset=alpaca"]).model
        assert m.family == "causal_lm" and m.hf_name == hub and m.dtype == "bfloat16"
        assert m.nora_targets == ["model\\.layers\\.\\d+\\.mlp\\.act_fn"]


def test_gradient_checkpointing_trains_lora():
    from nora.methods import apply_method
    from nora.models.causal_lm import build_causal_lm

    cfg = make_cfg(["model=llama_tiny", "dataset=alpaca", "method=lora", "model.gradient_checkpointing=true"])
    model, tok = build_causal_lm(cfg.model)
    assert (
        model.is_activation_checkpointing
        if hasattr(model, "is_activation_checkpointing")
        else model.is_gradient_checkpointing
    )
    model = apply_method(model, cfg.method, cfg.model).model
    model.train()
    ids = tok(["Give three tips for staying healthy."], return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


# ------------------------------------------------------------------------------- vision runs reload too
@pytest.mark.parametrize("method", ["linear_probe", "nora"])
def test_load_trained_model_vision(tmp_path, monkeypatch, method):
    from fixtures import write_cifar

    from nora.app.reload import load_trained_model

    root = write_cifar(tmp_path / "cifar10", "cifar10", n_train=64, n_test=32)
    box = capture_trained_model(monkeypatch)
    cfg = make_cfg(
        [
            f"method={method}",
            "model=vit_test",
            "dataset=cifar10",
            f"dataset.root={root}",
            "dataset.download=false",
            "dataset.verify_md5=false",
            f"output_root={tmp_path}",
            "logger=disabled",
            "trainer.epochs=1",
            "trainer.batch_size=32",
            "trainer.num_workers=0",
            "trainer.progress=false",
            "trainer.checkpoint_every=0",
            "trainer.device=cpu",
        ]
    )
    assert run_training(cfg)["status"] == "complete"
    trained = load_trained_model(tmp_path / cfg.run_name)
    assert trained.tokenizer is None
    assert trained.adapter["kind"] == ("trainable" if method == "linear_probe" else "nora")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = box["model"].eval()(x)
        torch.testing.assert_close(trained.model(x), want, rtol=0, atol=1e-6)


def test_local_weights_through_model_path(tmp_path):
    """model.path=<dir> loads weights and tokenizer from a local copy (as written by save_pretrained or
    `hf download --local-dir`), in the configured dtype, without the hub."""
    from nora.models.causal_lm import build_causal_lm

    tiny, tok = build_causal_lm(make_cfg(["model=llama_tiny", "dataset=alpaca"]).model)
    tiny.save_pretrained(tmp_path / "weights")
    tok.save_pretrained(tmp_path / "weights")
    mcfg = make_cfg(
        ["model=llama3_8b", "dataset=alpaca", f"model.path={tmp_path / 'weights'}", "model.dtype=float32"]
    ).model
    model, tok2 = build_causal_lm(mcfg)
    assert model.config._attn_implementation == "sdpa" and model.dtype == torch.float32
    assert model.training and not model.config.use_cache
    torch.testing.assert_close(logits(model, tok2), logits(tiny, tok), rtol=0, atol=0)
