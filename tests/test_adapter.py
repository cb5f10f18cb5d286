"""NoRA adapter on real model classes: function preservation, trainable sets, NoRA++, save/load/merge."""

import json
import math
import subprocess
import sys
import textwrap

import peft
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from legacy_formats import NORA_PP_PEFT_TYPE, write_nora_files, write_two_part
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import nora
from nora.adapter.layer import NoraActivation

PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def vit_tiny(num_classes=100):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes).eval()


def small_vit(num_classes=10, mlp_ratio=4, **kw):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=3,
        num_heads=4,
        mlp_ratio=mlp_ratio,
        num_classes=num_classes,
        **kw,
    ).eval()


def tiny_llama(cls=LlamaForCausalLM, cfg_cls=LlamaConfig, **kw):
    cfg = cfg_cls(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kw,
    )
    return cls(cfg).eval()


# --------------------------------------------------------------------------- function preservation
def test_vit_tiny_function_preserved_at_init():
    model = vit_tiny()
    x = torch.randn(2, 3, 224, 224)
    # record each GELU's real input so the swapped activation can be compared on the same values
    inputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, (a[0], o)))
        for n, m in model.named_modules()
        if isinstance(m, nn.GELU)
    ]
    with torch.no_grad():
        before = model(x)
    for h in hooks:
        h.remove()
    report = nora.apply_nora(model, nora.NoraConfig(trainable_modules=["head"]))
    assert len(report) == 12 and set(report.targets) == set(inputs)
    fit_err = report.max_error()
    assert fit_err <= 5e-3
    with torch.no_grad():
        after = model(x)
        # layer by layer: on the inputs it really sees, each rational is within the fit error of GELU
        for name, (inp, out) in inputs.items():
            assert inp.abs().max() <= 3.0  # inside the fit range, where the bound holds
            err = (model.get_submodule(name)(inp) - out).abs().max().item()
            assert err <= fit_err * 1.01 + 1e-6, name
    # end to end: 12 blocks each add an MLP output error <= |W_fc2|_inf * fit_err to the residual
    # stream; the logits move by far less than that worst case, and by a small fraction of their scale
    worst = sum(b.mlp.fc2.weight.abs().sum(1).max().item() for b in model.blocks) * fit_err
    diff = (after - before).abs().max().item()
    assert diff <= worst
    assert diff <= 10 * fit_err * before.abs().max().item()


def test_nora_with_zero_b_is_bit_identical_to_plain_rational():
    torch.manual_seed(1)
    base = vit_tiny()
    x = torch.randn(2, 3, 224, 224)
    plain, adapted = vit_tiny(), vit_tiny()
    plain.load_state_dict(base.state_dict())
    adapted.load_state_dict(base.state_dict())
    nora.apply_nora(plain, nora.NoraConfig(variant="frozen"))
    nora.apply_nora(adapted, nora.NoraConfig(variant="nora"))
    assert all(m.nora_B_num.abs().sum() == 0 for m in nora.nora_modules(adapted).values())
    with torch.no_grad():
        assert torch.equal(plain(x), adapted(x))


# ----------------------------------------------------------------------------- parameter accounting
def test_parameter_accounting_matches_method_arithmetic():
    model = vit_tiny(num_classes=100)
    total_before = sum(p.numel() for p in model.parameters())
    nora.apply_nora(model, nora.NoraConfig(r=3, groups=8, trainable_modules=["head"]))
    rep = nora.parameter_report(model)
    assert rep.components["nora"] == 12 * 2 * 3 * (8 + 5) == 936
    assert rep.components["head"] == 192 * 100 + 100 == 19_300
    assert rep.components["lora"] == 0 and rep.components["base"] == 0
    assert rep.trainable == 20_236
    assert rep.total == total_before + 936
    assert rep.percent == pytest.approx(100 * 20_236 / (total_before + 936))
    assert 0.35 < rep.percent < 0.4  # the abstract's "0.4% (0.02M)"


@pytest.mark.parametrize(
    "variant,numerator,per_act",
    [
        ("nora", "group", 2 * 3 * (8 + 5)),
        ("nora", "shared", 3 * (1 + 6) + 3 * (8 + 4)),
        ("rational_ft", "group", 8 * 6 + 8 * 4),
        ("rational_ft", "shared", 6 + 8 * 4),
        ("zero_init_ft", "group", 8 * 10),
        ("frozen", "group", 0),
    ],
)
def test_variant_parameter_counts(variant, numerator, per_act):
    model = small_vit()
    nora.apply_nora(model, nora.NoraConfig(variant=variant, numerator=numerator))
    assert nora.parameter_report(model).components["nora"] == 3 * per_act
    assert nora.parameter_report(model).trainable == 3 * per_act


def test_rank_and_degrees_change_the_count():
    model = small_vit()
    nora.apply_nora(model, nora.NoraConfig(r=2, groups=4, degrees=(3, 2)))
    # r(m+1) + G r + r n + G r
    assert nora.parameter_report(model).components["nora"] == 3 * (2 * 4 + 4 * 2 + 2 * 2 + 4 * 2)


def test_nora_init_and_first_gradients():
    model = small_vit()
    nora.apply_nora(model, nora.NoraConfig(r=3, alpha=6, trainable_modules=["head"]))
    act = model.blocks[0].mlp.act
    bound = 1 / math.sqrt(6)  # kaiming_uniform(a=sqrt(5)) over fan_in = m+1 = 6, as LoRA's A
    assert act.nora_A_num.abs().max() <= bound and act.nora_A_num.abs().max() > bound / 4
    assert act.nora_B_num.abs().sum() == 0 and act.nora_B_den.abs().sum() == 0
    assert act.scale == 2.0
    x = torch.randn(4, 3, 32, 32)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    # with B = 0, only B receives gradient at step 0 (as in LoRA)
    assert act.nora_B_num.grad.abs().sum() > 0 and act.nora_B_den.grad.abs().sum() > 0
    assert act.nora_A_num.grad.abs().sum() == 0
    assert all(p.grad is None for n, p in model.named_parameters() if "blocks.0.attn" in n)


def test_coefficients_stay_float32_in_bf16_models():
    model = small_vit()
    nora.apply_nora(model)
    fits = {n: m.base_numerator.clone() for n, m in nora.nora_modules(model).items()}
    model.to(torch.bfloat16)
    for n, m in nora.nora_modules(model).items():
        assert m.base_numerator.dtype == torch.float32 and m.nora_A_num.dtype == torch.float32
        assert torch.equal(m.base_numerator, fits[n])
    y = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# ------------------------------------------------------------------------------ Hugging Face LMs
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_decoder_injection_and_calibration(family):
    model = tiny_llama() if family == "llama" else tiny_llama(Qwen2ForCausalLM, Qwen2Config)
    ids = torch.randint(0, 96, (4, 24))
    with torch.no_grad():
        before = model(ids).logits.log_softmax(-1)
    report = nora.apply_nora(model, nora.NoraConfig(init="calibrated"), calibration_batches=[{"input_ids": ids[:2]}])
    assert set(report.targets) == {f"model.layers.{i}.mlp.act_fn" for i in range(2)}
    assert all(t["original"] == "silu" for t in report.targets.values())
    held_out = ids[2:]
    with torch.no_grad():
        after = model(held_out).logits.log_softmax(-1)
    kl = F.kl_div(after, before[2:], log_target=True, reduction="none").sum(-1).mean().item()
    assert kl < 1e-8
    assert (after - before[2:]).abs().max().item() < 1e-4
    assert nora.parameter_report(model).trainable == 2 * 78


def test_calibration_follows_wide_activation_inputs():
    """Gate inputs far beyond [-3, 3] (as in LLaMA): a range fit drifts, a calibrated fit does not."""

    def make():
        torch.manual_seed(3)
        m = tiny_llama()
        with torch.no_grad():
            for layer in m.model.layers:
                layer.mlp.gate_proj.weight.mul_(60.0)  # gate pre-activations reach about +-20
        return m

    ids = torch.randint(0, 96, (6, 24))
    ref = make()
    with torch.no_grad():
        logp = ref(ids[3:]).logits.log_softmax(-1)
    spans = []
    h = ref.model.layers[0].mlp.act_fn.register_forward_pre_hook(lambda m, a: spans.append(a[0].abs().max().item()))
    with torch.no_grad():
        ref(ids[:3])
    h.remove()
    assert spans[0] > 10

    def kl_of(model):
        with torch.no_grad():
            out = model(ids[3:]).logits.log_softmax(-1)
        return F.kl_div(out, logp, log_target=True, reduction="none").sum(-1).mean().item()

    ranged, calibrated = make(), make()  # the paper's form: the rational replaces SiLU, as far as it is fitted
    nora.apply_nora(ranged, nora.NoraConfig(init="fit", fit_range=(-3, 3), residual=False))
    report = nora.apply_nora(
        calibrated, nora.NoraConfig(init="calibrated", residual=False), calibration_batches=[{"input_ids": ids[:3]}]
    )
    assert all(t["range"][1] - t["range"][0] > 10 for t in report.targets.values())
    kl_range, kl_cal = kl_of(ranged), kl_of(calibrated)
    assert kl_cal < 1e-3
    assert kl_range > 10 * kl_cal


def test_per_group_calibration_gives_per_group_coefficients():
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 16))
    nora.apply_nora(
        model,
        nora.NoraConfig(init="calibrated", per_group_calibration=True, groups=4),
        calibration_batches=[{"input_ids": ids}],
    )
    act = model.model.layers[0].mlp.act_fn
    assert act.base_numerator.shape == (4, 6) and act.base_denominator.shape == (4, 4)
    assert not torch.equal(act.base_numerator[0], act.base_numerator[1])


# ----------------------------------------------------------------------------------- NoRA++ / peft
def _trainable(model):
    from nora.adapter.inject import canonical_name

    return {canonical_name(model, n) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_dora", [False, True])
def test_nora_pp_trainable_set_either_order(use_dora):
    def lcfg():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora)

    torch.manual_seed(0)
    lora_only = peft.get_peft_model(tiny_llama(), lcfg())
    lora_set = _trainable(lora_only)
    assert lora_set and all("lora_" in n for n in lora_set)

    torch.manual_seed(0)
    after = peft.get_peft_model(tiny_llama(), lcfg())  # LoRA first, then NoRA
    nora.apply_nora(after)
    torch.manual_seed(0)
    first = tiny_llama()  # NoRA first, then LoRA
    nora.apply_nora(first)
    first = nora.get_peft_model(first, lcfg())

    nora_set = {f"model.layers.{i}.mlp.act_fn.nora_{k}" for i in range(2) for k in ("A_num", "B_num", "A_den", "B_den")}
    assert _trainable(after) == lora_set | nora_set
    assert _trainable(first) == lora_set | nora_set
    rep = nora.parameter_report(after)
    assert rep.components["nora"] == 2 * 78
    assert rep.components["lora"] == nora.parameter_report(lora_only).trainable
    assert rep.components["base"] == 0 and rep.components["head"] == 0


def test_nora_pp_on_vit_with_head_in_modules_to_save():
    model = peft.get_peft_model(small_vit(), peft.LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"]))
    nora.apply_nora(model)
    rep = nora.parameter_report(model)
    assert rep.components["nora"] == 3 * 78
    assert rep.components["head"] == 64 * 10 + 10
    assert rep.components["lora"] == 3 * 2 * (64 + 3 * 64)
    assert rep.components["base"] == 0


# ------------------------------------------------------------------------------ save / load / merge
def _perturb(model):
    with torch.no_grad():
        for m in nora.nora_modules(model).values():
            for p in m.parameters(recurse=False):
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("variant", ["nora", "rational_ft", "zero_init_ft"])
def test_save_load_merge_round_trip_vit(tmp_path, variant):
    base_state = small_vit().state_dict()
    model = small_vit()
    model.load_state_dict(base_state)
    nora.apply_nora(model, nora.NoraConfig(variant=variant, trainable_modules=["head"]))
    _perturb(model)
    with torch.no_grad():
        model.head.weight.add_(0.1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    nora.save_nora(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == PEFT_FILES  # one NORA peft adapter

    fresh = small_vit()
    fresh.load_state_dict(base_state)  # the "pretrained" weights, without the adapter
    nora.load_nora(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    assert nora.parameter_report(fresh).trainable == 0
    nora.merge_nora(fresh)
    assert not nora.nora_modules(fresh)
    assert type(fresh.blocks[0].mlp.act).__name__ == "GroupRational"
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-6, atol=1e-6)


def test_load_trainable_resumes_training_set(tmp_path):
    model = small_vit()
    nora.apply_nora(model, nora.NoraConfig(trainable_modules=["head"]))
    nora.save_nora(model, tmp_path)
    fresh = small_vit()
    nora.load_nora(fresh, tmp_path, trainable=True)
    assert nora.parameter_report(fresh).components == nora.parameter_report(model).components


def _nora_pp(seed=0):
    torch.manual_seed(seed)
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    nora.apply_nora(model)
    _perturb(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    return model, state


def test_nora_pp_save_load_round_trip(tmp_path):
    model, base_state = _nora_pp(seed=0)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    nora.save_nora(model, tmp_path)  # one peft adapter, peft type NORA, with its LoRA part (nora.tuner adds it)
    assert sorted(p.name for p in tmp_path.iterdir()) == PEFT_FILES

    for load in (nora.load_nora, peft.PeftModel.from_pretrained):  # nora's loader is peft's for NoRA++
        fresh = tiny_llama()
        fresh.load_state_dict(base_state)
        loaded = load(fresh, str(tmp_path))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)
    # the NoRA tensors are keyed by the activations' names in the base model
    from nora.adapter.peft_format import read_nora_layers

    assert set(read_nora_layers(tmp_path)) == {"model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"}


# --------------------------------------------------------------------------------------- errors
def test_bad_group_count_is_reported_at_injection():
    with pytest.raises(ValueError, match="groups=7 does not divide the width 256"):
        nora.apply_nora(small_vit(), nora.NoraConfig(groups=7))


def test_unknown_target_pattern_lists_candidates():
    with pytest.raises(ValueError, match=r"match no module.*blocks\.0\.mlp\.act"):
        nora.apply_nora(small_vit(), nora.NoraConfig(target_modules=[r"blocks\.\d+\.mlp\.gelu"]))


def test_model_without_activations():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no activation of Sequential matches"):
        nora.apply_nora(mlp)


def test_non_activation_target_is_rejected():
    with pytest.raises(ValueError, match="is not an activation"):
        nora.apply_nora(small_vit(), nora.NoraConfig(target_modules=[r"blocks\.0\.mlp"]))


@pytest.mark.parametrize("field,value", [("variant", "lora"), ("form", "C"), ("numerator", "both"), ("init", "magic")])
def test_config_rejects_unknown_values(field, value):
    with pytest.raises(ValueError, match=f"unknown {field}"):
        nora.NoraConfig(**{field: value})


def test_calibrated_init_needs_batches():
    with pytest.raises(ValueError, match="needs calibration_batches"):
        nora.apply_nora(tiny_llama(), nora.NoraConfig(init="calibrated"))


def test_custom_activation_module_is_fitted_from_its_own_forward():
    class Softish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.5 * x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), Softish(), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    model = Block()
    x = torch.randn(5, 8)
    with torch.no_grad():
        before = model(x)
    report = nora.apply_nora(model, nora.NoraConfig(target_modules=["act"], groups=4))
    assert report.targets["act"]["original"] == "Softish"
    assert report.max_error() < 1e-3
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-2
    assert isinstance(model.act, NoraActivation)


# ------------------------------------------------------------------ misuse is refused before any change
def _activations(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp.act")}


def test_load_onto_more_blocks_is_refused_and_leaves_the_model_untouched(tmp_path):
    two = small_vit()
    two.blocks = two.blocks[:2]
    nora.apply_nora(two)
    nora.save_nora(two, tmp_path)
    four = small_vit()  # 3 blocks: the adapter covers blocks 0-1 only
    before = _activations(four)
    with pytest.raises(nora.AdapterError, match=r"the model has 3 targets .* covers 2; no adapter for blocks\.2"):
        nora.load_nora(four, tmp_path)
    assert _activations(four) == before == {f"blocks.{i}.mlp.act": "GELU" for i in range(3)}


def test_load_with_another_head_size_or_width_is_refused_before_any_swap(tmp_path):
    model = small_vit(num_classes=10)
    nora.apply_nora(model, nora.NoraConfig(trainable_modules=["head"]))
    nora.save_nora(model, tmp_path)
    other_head = small_vit(num_classes=7)
    with pytest.raises(nora.AdapterError, match=r"head\.weight: saved \(10, 64\), model \(7, 64\)"):
        nora.load_nora(other_head, tmp_path)
    assert set(_activations(other_head).values()) == {"GELU"}
    wider = small_vit(num_classes=10, mlp_ratio=2)  # fc1 width 128, the adapter was saved for 256
    with pytest.raises(nora.AdapterError, match="width 128, the adapter was saved for width 256"):
        nora.load_nora(wider, tmp_path)
    assert set(_activations(wider).values()) == {"GELU"}
    assert isinstance(nora.AdapterError("x"), ValueError)  # library callers catching ValueError still do


def test_apply_or_load_twice_is_refused(tmp_path):
    model = small_vit()
    nora.apply_nora(model)
    with pytest.raises(nora.AdapterError, match="already holds NoRA activations"):
        nora.apply_nora(model)
    nora.save_nora(model, tmp_path)
    with pytest.raises(nora.AdapterError, match="already holds NoRA activations; load .* freshly built"):
        nora.load_nora(model, tmp_path)


def test_save_nora_refuses_a_directory_of_another_adapter(tmp_path):
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path))
    model = tiny_llama()
    nora.apply_nora(model)
    with pytest.raises(nora.AdapterError, match="holds peft adapter files .* of another method"):
        nora.save_nora(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    write_nora_files(model, tmp_path / "old")
    with pytest.raises(nora.AdapterError, match="holds nora_config.json .* earlier format"):
        nora.save_nora(model, tmp_path / "old")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(nora.AdapterError, match="holds trainable.safetensors"):
        nora.save_nora(model, tmp_path / "full")


# ------------------------------------------------------------- peft-only loaders: all of it or a clear error
def test_peft_loads_a_nora_pp_adapter_and_its_config_is_not_marked(tmp_path):
    """nora.save_nora writes NoRA++ as a peft method: nothing for peft to refuse any more."""
    model, state = _nora_pp()
    nora.save_nora(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "NORA" and "nora_peft_type" not in raw and raw["lora_r"] == 4
    assert isinstance(peft.PeftConfig.from_pretrained(str(tmp_path)), nora.NoraPeftConfig)
    fresh = tiny_llama()
    fresh.load_state_dict(state)
    ids = torch.randint(0, 96, (2, 10))
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# the earlier two-part format (peft's LoRA files next to NoRA's, tests/legacy_formats.py): peft alone would load only
# the LoRA half, so its adapter_config.json stays marked; nora.load_nora still reads it
def test_peft_alone_refuses_a_nora_pp_adapter_in_the_earlier_two_part_format(tmp_path):
    model, state = _nora_pp()
    write_two_part(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["nora_peft_type"] == "LORA" and raw["peft_type"] == NORA_PP_PEFT_TYPE
    fresh = tiny_llama()
    fresh.load_state_dict(state)
    with pytest.raises(KeyError, match=r"peft alone would load only the LoRA half"):
        peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    with pytest.raises(KeyError, match=r"nora\.load_nora_pp"):
        peft.PeftConfig.from_pretrained(str(tmp_path))
    assert not nora.nora_modules(fresh) and not any("lora_" in n for n, _ in fresh.named_parameters())
    with pytest.raises(KeyError, match=r"nora\.load_nora_pp"):  # transformers' own peft integration
        fresh.load_adapter(str(tmp_path))
    ids = torch.randint(0, 96, (2, 10))
    loaded = nora.load_nora(fresh, tmp_path)
    assert isinstance(loaded, peft.PeftModel)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert nora.adapter.read_peft_config(tmp_path)["peft_type"] == "LORA"


def test_a_two_part_nora_pp_adapter_needs_both_halves(tmp_path):
    model, _ = _nora_pp()
    write_two_part(model, tmp_path)
    (tmp_path / "nora_config.json").unlink()  # the peft half only
    fresh = tiny_llama()
    with pytest.raises(FileNotFoundError, match="no NoRA adapter at"):
        nora.load_nora(fresh, tmp_path)
    assert not hasattr(fresh, "peft_config") and not nora.nora_modules(fresh)
    model.save_pretrained(str(tmp_path / "lora"))  # a LoRA adapter is no NoRA adapter
    with pytest.raises(FileNotFoundError, match="no NoRA adapter at"):
        nora.load_nora(fresh, tmp_path / "lora")


# -------------------------------------------------------------------------------- disable_adapter
def test_peft_disable_adapter_switches_nora_off_too():
    import copy

    model, state = _nora_pp()
    base = tiny_llama()
    base.load_state_dict(state)
    nora.apply_nora(base, nora.NoraConfig(variant="frozen"))  # the step-0 model: base rationals, no LoRA
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        adapted, step0 = model(ids).logits, base(ids).logits
        assert not torch.allclose(adapted, step0, atol=1e-3)
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, step0)
        assert torch.equal(model(ids).logits, adapted)
        with nora.disable_adapter(model):
            assert torch.equal(model(ids).logits, step0)
        reference = copy.deepcopy(model)  # as DPO trainers build their reference model
        with reference.disable_adapter():
            assert torch.equal(reference(ids).logits, step0)
            assert torch.equal(model(ids).logits, adapted)  # the copy toggles only itself


def test_disable_adapter_on_plain_and_nora_first_models():
    torch.manual_seed(0)
    model = small_vit()
    step0 = small_vit()
    step0.load_state_dict(model.state_dict())
    nora.apply_nora(step0, nora.NoraConfig(variant="frozen"))
    nora.apply_nora(model)
    _perturb(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = model(x)
        with nora.disable_adapter(model):
            assert torch.equal(model(x), step0(x))
        assert torch.equal(model(x), adapted)
    first = tiny_llama()  # NoRA first, then LoRA through nora.get_peft_model
    nora.apply_nora(first)
    _perturb(first)
    first = nora.get_peft_model(first, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with first.disable_adapter():
        assert not any(m.adapter_enabled for m in nora.nora_modules(first).values())
    assert all(m.adapter_enabled for m in nora.nora_modules(first).values())


# ------------------------------------------------------------------------- merged save / load pair
def test_merged_model_saved_and_reloaded_keeps_its_rationals(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _nora_pp()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
    merged = nora.merge_nora(model.merge_and_unload())
    nora.save_merged(merged, tmp_path)
    loaded = nora.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.act_fn, nora.GroupRational)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
    # the plain loader never builds the original activations silently: the model type is nora's, the code is
    # modeling_nora.py (tests/test_deploy.py loads it without nora)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))
    unmerged = tiny_llama()
    nora.apply_nora(unmerged)
    with pytest.raises(nora.AdapterError, match="call nora.merge_nora"):
        nora.save_merged(unmerged, tmp_path / "x")
    with pytest.raises(nora.AdapterError, match="no merged NoRA model here"):
        nora.from_pretrained(tmp_path / "nowhere")


def test_from_pretrained_reports_no_unexpected_keys(tmp_path):
    import logging

    model, _ = _nora_pp()
    merged = nora.merge_nora(model.merge_and_unload())
    nora.save_merged(merged, tmp_path)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        loaded = nora.from_pretrained(tmp_path)
        # the code written beside the checkpoint: nothing unexpected either
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "UNEXPECTED" in m or "MISSING" in m], seen
    assert isinstance(loaded.model.layers[0].mlp.act_fn, nora.GroupRational)


# ------------------------------------------------------------------ defaults by kind, layouts, honest defaults
def tiny_convnext(**kw):
    return timm.create_model(
        "convnext_atto", pretrained=False, num_classes=10, depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), **kw
    ).eval()


def test_conv_layout_mlp_groups_channels_not_columns():
    """ConvNeXt atto/femto/pico/nano feed their MLP activation (N, C, H, W): the groups cut C, not the width."""
    model = tiny_convnext()  # conv_mlp=True
    report = nora.apply_nora(model)
    act = model.stages[0].blocks[0].mlp.act
    assert (act.channel_dim, act.width) == (1, 64) and report.targets["stages.0.blocks.0.mlp.act"]["channel_dim"] == 1
    _perturb(model)
    x = torch.randn(1, 64, 1, 1).expand(2, 64, 16, 16).contiguous()  # one value per channel, any image width
    with torch.no_grad():
        y = act(x)
        assert torch.equal(y, y[:, :, :1, :1].expand_as(y))
        # channel-wise it equals the channels-last evaluation of the same coefficients
        last = nora.GroupRational(
            *act.coefficients(),
            form=act.form,
            original=act.original,
            residual=act.residual,
            fit_numerator=act.base_numerator,
            fit_denominator=act.base_denominator,
        )
        torch.testing.assert_close(y, last(x.movedim(1, -1)).movedim(-1, 1), rtol=0, atol=0)
        model(torch.randn(1, 3, 224, 224))  # 224 px: the image width (14 columns) is no longer the grouped dim
    with pytest.raises(ValueError, match=r"expected 64 channels on dim 1 of a conv-layout"):
        act(torch.randn(1, 32, 4, 4))


@pytest.mark.parametrize(
    "builder,width",
    [
        (
            lambda: transformers.GPT2LMHeadModel(
                transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
            ),
            128,
        ),
        (
            lambda: transformers.Phi3ForCausalLM(
                transformers.Phi3Config(
                    vocab_size=64,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    pad_token_id=0,
                )
            ),
            64,
        ),
        (lambda: tiny_convnext(), 64),
    ],
)
def test_group_check_covers_conv1d_fused_gate_up_and_conv2d(builder, width, tmp_path):
    with pytest.raises(ValueError, match=f"groups=7 does not divide the width {width}"):
        nora.apply_nora(builder(), nora.NoraConfig(groups=7))
    model = builder()
    nora.apply_nora(model)
    nora.save_nora(model, tmp_path)
    specs = json.loads((tmp_path / "adapter_config.json").read_text())["layer_specs"]
    widths = [spec["width"] for spec in specs.values()]
    assert widths[0] == width and None not in widths


def test_load_checks_the_saved_width_of_a_conv_layout_mlp(tmp_path):
    nora.apply_nora(tiny_convnext())  # warm the fit cache
    model = tiny_convnext()
    nora.apply_nora(model)
    nora.save_nora(model, tmp_path)
    wider = timm.create_model(
        "convnext_atto", pretrained=False, num_classes=10, depths=(1, 1, 1, 1), dims=(16, 16, 32, 64)
    )
    with pytest.raises(
        nora.AdapterError,
        match=r"stages\.3\.blocks\.0\.mlp\.act: width 256, the adapter was saved "
        "for width 128",
    ):
        nora.load_nora(wider, tmp_path)


def qwen2_moe_mixed():
    return transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            mlp_only_layers=[0],
            decoder_sparse_step=1,
        )
    ).eval()


def test_moe_defaults_cover_dense_layers_experts_and_shared_experts():
    model = qwen2_moe_mixed()
    report = nora.apply_nora(model)
    assert set(report.targets) == {
        "model.layers.0.mlp.act_fn",
        "model.layers.1.mlp.experts.act_fn",
        "model.layers.1.mlp.shared_expert.act_fn",
    }
    assert report.targets["model.layers.1.mlp.experts.act_fn"]["width"] == 32  # from the fused (E, 2I, H) tensor
    assert report.layers["Qwen2MoeDecoderLayer"] == {"layers": 2, "with_targets": 2, "targets": 3}
    assert not report.warnings and "Qwen2MoeDecoderLayer: 3 in 2 of 2 layers" in report.summary()


def test_partial_layer_coverage_is_reported():
    # the old name pattern finds the dense layer's act_fn only: the MoE layer is left out, and the report says so
    with pytest.warns(
        UserWarning,
        match=r"only 1 of 2 Qwen2MoeDecoderLayer layers hold a target; none in "
        r"model\.layers\.1",
    ):
        report = nora.apply_nora(qwen2_moe_mixed(), nora.NoraConfig(target_modules=[r"(.*\.)?mlp\.act_fn"]))
    assert report.layers["Qwen2MoeDecoderLayer"]["with_targets"] == 1 and report.warnings


def test_defaults_skip_attention_se_gates_heads_and_identity():
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)  # SE blocks, no MLP
    with pytest.raises(ValueError, match="no activation of EfficientNet matches the default targets"):
        nora.find_targets(model, nora.NoraConfig())
    inc = timm.create_model("inception_next_tiny", pretrained=False, num_classes=10, depths=(1, 1), dims=(16, 32))
    assert sorted(nora.find_targets(inc, nora.NoraConfig())) == [
        "stages.0.blocks.0.mlp.act",
        "stages.1.blocks.0.mlp.act",
    ]  # not head.act
    vit = small_vit()
    vit.blocks[0].mlp.act = nn.Identity()
    assert "blocks.0.mlp.act" not in nora.find_targets(vit, nora.NoraConfig())
    with pytest.raises(ValueError, match=r"'blocks\.0\.mlp\.act' is an nn\.Identity placeholder"):
        nora.apply_nora(vit, nora.NoraConfig(target_modules=[r"blocks\.\d+\.mlp\.act"]))


def test_explicit_pattern_on_batchnorm_activations_uses_conv_layout():
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).eval()
    report = nora.apply_nora(model, nora.NoraConfig(target_modules=[r"blocks\.1\.0\.bn1\.act"], groups=8))
    assert report.targets["blocks.1.0.bn1.act"]["channel_dim"] == 1
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


def test_batchnorm_statistics_frozen_and_adapter_reloads_exactly(tmp_path):
    def make():
        torch.manual_seed(0)
        return timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10).eval()

    state = make().state_dict()
    model = make()
    nora.apply_nora(model, nora.NoraConfig(trainable_modules=["head.fc"]))
    stats = model.stem.bn.running_mean.clone()
    x = torch.randn(2, 3, 64, 64)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    model.eval()
    assert torch.equal(model.stem.bn.running_mean, stats) and model.stem.bn.momentum == 0.0
    with torch.no_grad():
        want = model(x)
    nora.save_nora(model, tmp_path)
    fresh = make()
    fresh.load_state_dict(state)
    nora.load_nora(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


def test_trainable_batchnorm_statistics_are_saved(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    def make():
        torch.manual_seed(0)
        m = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
        m.head = nn.Sequential(nn.BatchNorm1d(64), nn.Linear(64, 10))
        return m.eval()

    model = make()
    nora.apply_nora(model, nora.NoraConfig(trainable_modules=["head"]))
    assert model.head[0].momentum == 0.1  # a trainable BatchNorm keeps learning its statistics
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    model.eval()
    assert not torch.equal(model.head[0].running_mean, torch.zeros(64))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    nora.save_nora(model, tmp_path)
    fresh = make()
    nora.load_nora(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


def test_trainable_modules_on_a_peft_model_apply_and_reload(tmp_path):
    state = small_vit().state_dict()
    base = small_vit()
    base.load_state_dict(state)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["qkv"]))
    nora.apply_nora(model, nora.NoraConfig(trainable_modules=["head"]))
    assert model.base_model.model.head.weight.requires_grad
    assert nora.parameter_report(model).components["head"] == 64 * 10 + 10
    with torch.no_grad():
        model.base_model.model.head.weight.add_(0.3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    nora.save_nora(model, tmp_path)  # one NORA peft adapter: NoRA's trainable_modules are its modules_to_save
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).modules_to_save == ["head"]
    for load in (nora.load_nora, peft.PeftModel.from_pretrained):
        fresh = small_vit()
        fresh.load_state_dict(state)
        loaded = load(fresh, str(tmp_path))
        with torch.no_grad():
            assert torch.equal(loaded(x), want)
    with pytest.raises(ValueError, match=r"trainable_modules \['haed'\] match no module"):
        nora.apply_nora(
            peft.get_peft_model(small_vit(), peft.LoraConfig(r=2, target_modules=["qkv"])),
            nora.NoraConfig(trainable_modules=["haed"]),
        )


def test_adapter_saved_with_lora_on_fused_experts_loads_onto_a_plain_model(tmp_path):
    def mixtral():
        torch.manual_seed(0)
        return transformers.MixtralForCausalLM(
            transformers.MixtralConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=2,
            )
        ).eval()

    wrapped = peft.get_peft_model(mixtral(), peft.LoraConfig(r=2, target_modules="all-linear"))
    assert any("experts.base_layer" in n for n, _ in wrapped.named_modules())  # peft wraps the fused experts
    nora.apply_nora(wrapped)
    _perturb(wrapped)
    write_nora_files(wrapped, tmp_path / "with_lora")  # the earlier format kept NoRA's half on its own
    assert set(nora.adapter.read_nora_config(tmp_path / "with_lora")["layers"]) == {
        "model.layers.0.mlp.experts.act_fn",
        "model.layers.1.mlp.experts.act_fn",
    }
    plain = mixtral()
    nora.load_nora(plain, tmp_path / "with_lora")
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():  # LoRA's B is still zero: the wrapped model computes what the plain one with the adapter does
        torch.testing.assert_close(wrapped(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)
    nora.save_nora(wrapped, tmp_path / "nora_pp")  # today: both parts in one NORA peft adapter
    loaded = nora.load_nora(mixtral(), tmp_path / "nora_pp")
    assert set(nora.adapter.peft_format.read_nora_layers(tmp_path / "nora_pp")) == set(nora.nora_modules(plain))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, wrapped(ids).logits)
    nora.save_nora(plain, tmp_path / "plain")  # and the other way round
    rewrapped = peft.get_peft_model(mixtral(), peft.LoraConfig(r=2, target_modules="all-linear"))
    nora.load_nora(rewrapped, tmp_path / "plain")
    assert set(nora.nora_modules(rewrapped)) == set(nora.nora_modules(plain))


def wide_gate_llama():
    m = tiny_llama()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.gate_proj.weight.mul_(60.0)  # gate pre-activations reach about +-20
    return m


def test_fit_range_warning_on_the_first_batch():
    import warnings

    model = wide_gate_llama()
    nora.apply_nora(model, nora.NoraConfig(residual=False))  # the paper's form (the residual form is exact out there)
    _perturb(model)  # as after a first optimizer step: the warning is about the fit, not the update
    ids = torch.randint(0, 96, (2, 16))
    inputs = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().flatten()))
        for m in nora.nora_modules(model).values()
    ]
    with pytest.warns(
        UserWarning,
        match=r"% \(\d+ of \d+\) of the inputs of 2 of 2 rational activations lie outside "
        r"their fit range .* off by up to .*init='calibrated'",
    ) as rec:
        with torch.no_grad():
            model(ids)
    for h in hooks:
        h.remove()
    message = str(rec[0].message)
    x = torch.cat(inputs)
    outside = x[x.abs() > 3]
    assert float(message.split("nora: ")[1].split("%")[0]) == pytest.approx(100 * outside.numel() / x.numel(), rel=1e-3)
    assert f"({outside.numel()} of {x.numel()})" in message
    assert f"|x| up to {x.abs().max().item():.3g}" in message
    fit = nora.fit_rational("silu", x_range=(-3, 3))
    worst = (fit(outside.double()) - F.silu(outside.double())).abs().max().item()
    reported = float(message.split("off by up to ")[1].split(" ")[0])
    assert 0.5 * worst <= reported <= worst * 1.001 and worst > 1  # GELU/SiLU fits are off by units out there
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second batch is quiet
        with torch.no_grad():
            model(ids)
    quiet = tiny_llama()  # inputs well inside [-3, 3]
    nora.apply_nora(quiet, nora.NoraConfig(residual=False))
    residual = wide_gate_llama()  # the residual form is the original activation out there: nothing to warn about
    nora.apply_nora(residual)
    for m in (quiet, residual):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad():
                m(ids)


def test_fit_range_warning_on_calibration_batches_at_apply_time():
    ids = torch.randint(0, 96, (2, 16))
    with pytest.warns(UserWarning, match="outside their fit range"):
        nora.apply_nora(
            wide_gate_llama(), nora.NoraConfig(init="fit", residual=False), calibration_batches=[{"input_ids": ids}]
        )


def test_adapter_layer_works_without_transformers_timm_or_peft(tmp_path):
    """nora.adapter / nora.rational import none of the optional packages: apply, train, save, load and merge a plain
    torch model in an interpreter where transformers, timm and peft cannot be imported."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("transformers", "timm", "peft"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import torch
        from torch import nn
        import nora.adapter as A

        class Mlp(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.act, self.fc2 = nn.Conv2d(8, 32, 1), nn.GELU(), nn.Conv2d(32, 8, 1)
            def forward(self, x):
                return self.fc2(self.act(self.fc1(x)))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList([nn.ModuleDict({{"mlp": Mlp()}}) for _ in range(2)])
            def forward(self, x):
                for b in self.blocks:
                    x = x + b["mlp"](x)
                return x

        torch.manual_seed(0)
        model = Net()
        state = model.state_dict()
        report = A.apply_nora(model)
        assert sorted(report.targets) == ["blocks.0.mlp.act", "blocks.1.mlp.act"], report.targets
        assert {{t["channel_dim"] for t in report.targets.values()}} == {{1}}
        for m in A.nora_modules(model).values():
            m.nora_B_den.data.add_(0.1)
        x = torch.randn(2, 8, 4, 4)
        want = model(x)
        A.save_nora(model, {str(tmp_path)!r})
        fresh = Net()
        fresh.load_state_dict(state)
        A.load_nora(fresh, {str(tmp_path)!r})
        assert torch.equal(fresh(x), want)
        A.merge_nora(fresh)
        assert torch.allclose(fresh(x), want, atol=1e-6)
        assert not any(n.split(".")[0] in ("transformers", "timm", "peft") for n in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_default_targets_of_a_bare_mlp_module():
    class Mlp(nn.Module):  # a user's own MLP, passed on its own: its layer holds both projections
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 8)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    report = nora.apply_nora(Mlp())
    assert list(report.targets) == ["act"] and report.targets["act"]["width"] == 32


def test_per_group_calibration_of_a_conv_layout_mlp_groups_channels():
    model = tiny_convnext()
    x = torch.randn(2, 3, 36, 36)  # stage 0 runs at 9 x 9: the image width is not divisible by the 2 groups
    with torch.no_grad():
        before = model(x)
    config = nora.NoraConfig(
        init="calibrated", per_group_calibration=True, groups=2, target_modules=[r"stages\.0\.blocks\.0\.mlp\.act"]
    )  # 2 fits: kept short
    with pytest.warns(UserWarning, match="only 1 of 4 ConvNeXtStage layers hold a target"):
        report = nora.apply_nora(model, config, calibration_batches=[x])
    act = model.stages[0].blocks[0].mlp.act
    assert act.channel_dim == 1 and act.base_numerator.shape == (2, 6)
    assert not torch.equal(act.base_numerator[0], act.base_numerator[1])
    assert report.max_error() < 1e-2
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-2 * before.abs().max()


# ------------------------------------------------------------------ one adapter format (issue 31)
def _trained_vit(seed=0):
    torch.manual_seed(seed)
    base = small_vit()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    nora.apply_nora(base, nora.NoraConfig(trainable_modules=["head"]))
    _perturb(base)
    with torch.no_grad():
        base.head.weight.add_(0.1)
    return base, state


def _fresh_vit(state):
    fresh = small_vit()
    fresh.load_state_dict(state)
    return fresh


def _assert_same_adapter(a, b):
    """The same config text, tensors and metadata (safetensors orders its metadata as it likes)."""
    from safetensors import safe_open

    assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()
    with safe_open(str(a / PEFT_FILES[1]), "pt") as fa, safe_open(str(b / PEFT_FILES[1]), "pt") as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def test_a_vision_nora_adapter_is_one_peft_adapter_that_peft_and_nora_load(tmp_path):
    """nora.save_nora writes a timm ViT's NoRA adapter (activations and head) in peft's layout: peft's own
    PeftModel.from_pretrained and nora.load_nora (in place) both rebuild the trained model exactly."""
    model, state = _trained_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    nora.save_nora(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == PEFT_FILES
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "NORA" and cfg["lora_r"] == 0 and cfg["modules_to_save"] == ["head"]
    assert set(cfg["layer_specs"]) == {f"blocks.{i}.mlp.act" for i in range(3)}
    spec = {"width": 256, "channel_dim": -1, "original": "gelu", "init": "fit", "fit_range": [-3.0, 3.0]}
    assert cfg["layer_specs"]["blocks.0.mlp.act"] == spec

    loaded = peft.PeftModel.from_pretrained(_fresh_vit(state), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    fresh = _fresh_vit(state)
    assert nora.load_nora(fresh, tmp_path) is fresh  # NoRA alone: in place, no peft wrapper
    assert set(nora.nora_modules(fresh)) == set(cfg["layer_specs"])
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    assert nora.parameter_report(fresh).trainable == 0
    nora.save_nora(fresh, tmp_path / "again")  # the reloaded model writes the same adapter
    _assert_same_adapter(tmp_path / "again", tmp_path)


def test_a_vision_nora_adapter_loads_where_peft_cannot_be_imported(tmp_path):
    """The writer of NoRA alone and the reader need no peft: in an interpreter where `import peft` fails, nora.save_nora
    writes the same two files (the config text equal to NoraPeftConfig's own save) and nora.load_nora reads the
    adapter peft wrote, with the trained model's outputs."""
    model, state = _trained_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    torch.save({"state": state, "x": x, "want": want}, tmp_path / "case.pt")
    nora.save_nora(model, tmp_path / "with_peft")
    code = textwrap.dedent(f"""
        import sys, importlib.abc

        class NoPeft(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "peft" or name.startswith("peft."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, NoPeft())
        import torch
        from timm.models.vision_transformer import VisionTransformer
        import nora

        assert not hasattr(nora, "NoraPeftConfig")
        case = torch.load({str(tmp_path / "case.pt")!r})
        fresh = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=10).eval()
        fresh.load_state_dict(case["state"])
        nora.load_nora(fresh, {str(tmp_path / "with_peft")!r})
        with torch.no_grad():
            assert torch.equal(fresh(case["x"]), case["want"])
        nora.save_nora(fresh, {str(tmp_path / "without_peft")!r})
        assert not any(m.split(".")[0] == "peft" for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    _assert_same_adapter(tmp_path / "without_peft", tmp_path / "with_peft")  # as written with peft
    loaded = peft.PeftModel.from_pretrained(_fresh_vit(state), str(tmp_path / "without_peft"))
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def test_the_config_nora_writes_without_peft_is_nora_peft_configs_own(tmp_path):
    """adapter_config.json as nora.adapter writes it (no peft) is the text NoraPeftConfig.save_pretrained writes, for
    NoRA alone and NoRA++; the defaults nora.adapter assumes are NoraPeftConfig's."""
    import dataclasses

    from nora.adapter.peft_format import PEFT_BOOKKEEPING, PEFT_DEFAULTS
    from nora.tuner import peft_config_of

    own = {f.name for f in dataclasses.fields(nora.NoraConfig)}
    defaults = {
        f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        for f in dataclasses.fields(nora.NoraPeftConfig)
        if f.name not in own and f.name != "peft_type"
    }
    assert PEFT_DEFAULTS == defaults
    from peft.config import PeftConfig

    peft_own = {f.name: f.default for f in dataclasses.fields(PeftConfig) if f.name in PEFT_BOOKKEEPING}
    assert peft_own == PEFT_BOOKKEEPING  # peft's own bookkeeping defaults, copied for the core install
    vit, _ = _trained_vit()
    llm, _ = _nora_pp()
    for name, model in (("vit", vit), ("nora_pp", llm)):
        nora.save_nora(model, tmp_path / name)
        peft_config_of(model).save_pretrained(str(tmp_path / f"{name}_peft"))
        written = (tmp_path / name / "adapter_config.json").read_text()
        assert written == (tmp_path / f"{name}_peft" / "adapter_config.json").read_text()
        peft.PeftConfig.from_pretrained(str(tmp_path / name)).save_pretrained(str(tmp_path / f"{name}_again"))
        assert (tmp_path / f"{name}_again" / "adapter_config.json").read_text() == written


def test_a_nora_adapter_in_the_earlier_format_still_loads(tmp_path):
    """nora_config.json + nora_adapter.safetensors (tests/legacy_formats.py: what save_nora wrote before) loads with
    nora.load_nora, checked as before (another width is refused, the model untouched)."""
    model, state = _trained_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    write_nora_files(model, tmp_path)
    fresh = _fresh_vit(state)
    nora.load_nora(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    wider = small_vit(mlp_ratio=2)
    with pytest.raises(nora.AdapterError, match="width 128, the adapter was saved for width 256"):
        nora.load_nora(wider, tmp_path)
    assert set(_activations(wider).values()) == {"GELU"}
