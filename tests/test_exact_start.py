"""Step 0 is the pretrained model: NoRA's default (the residual form) on models with a real LLM's heavy-tailed MLP
inputs.

The stress models (tests/heavy_tails.py) are tiny LLaMA and ViT models built with the real constructors whose MLP
activation inputs follow a real pretrained LLM's per-layer profile (tails to -40 / +14 in a few channels). In the
paper's form the fitted rationals replace the activations and the model's logits move by tens of percent there; in
the residual form every API's defaults give the pretrained model back, to float32's resolution.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
from heavy_tails import PROFILE, STRESS_LAYERS, stress_llama, stress_vit
from legacy_formats import write_nora_files

import nora

REL = 1e-5  # float32 logits: relative max difference to the pretrained model's


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return torch.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))).item()


@pytest.fixture(scope="module")
def llama():
    model, ids, stats = stress_llama()
    with torch.no_grad():
        logits = model(ids).logits
    return model, ids, stats, logits


@pytest.fixture(scope="module")
def vit():
    model, images, stats = stress_vit()
    with torch.no_grad():
        out = model(images)
    return model, images, stats, out


def test_stress_models_have_the_profiles_tails(llama, vit):
    for stats in (llama[2], vit[2]):
        assert [s["profile_layer"] for s in stats] == list(STRESS_LAYERS[: len(stats)])
        for s in stats:  # each layer reaches its profile layer's minimum and maximum, and the bulk its share beyond 3
            assert s["min"] == pytest.approx(s["profile_min"], abs=0.05)
            assert s["max"] == pytest.approx(s["profile_max"], abs=0.05)
            assert 0.8 * s["profile_share_gt_3"] <= s["share_gt_3"] <= 3.5 * s["profile_share_gt_3"]
    assert PROFILE["layers"][0]["min"] < -40 and llama[2][0]["min"] < -40


def test_the_papers_form_starts_away_from_the_pretrained_model(llama, vit):
    """What the stress models are for: the rationals fitted on [-3, 3] miss the activations where the tails are."""
    model, ids, _, ref = llama
    paper = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="outside their fit range"):
        nora.apply_nora(paper, nora.NoraConfig(residual=False))
        with torch.no_grad():
            logits = paper(ids).logits
    assert rel_diff(logits, ref) > 0.1
    model, images, _, ref = vit
    paper = copy.deepcopy(model)
    nora.apply_nora(paper, nora.NoraConfig(residual=False, trainable_modules=["head"]))
    with torch.no_grad():
        assert rel_diff(paper(images), ref) > 1e-3


def _apply(model, api: str, ids: torch.Tensor):
    if api == "apply_nora":
        nora.apply_nora(model)
    elif api == "apply_nora calibrated":
        nora.apply_nora(model, nora.NoraConfig(init="calibrated"), calibration_batches=[{"input_ids": ids[:2]}])
    elif api == "peft NoRA":
        model = peft.get_peft_model(model, nora.NoraPeftConfig())
    elif api == "peft NoRA++ (README's five lines)":
        model = peft.get_peft_model(
            model, nora.NoraPeftConfig(lora_r=8, lora_alpha=16, lora_target_modules="all-linear")
        )
    elif api == "peft NoRA calibrated":
        model = peft.get_peft_model(model, nora.NoraPeftConfig(init="calibrated"))
        nora.calibrate(model, [{"input_ids": ids[:2]}])
    elif api == "LoRA then apply_nora (NoRA++)":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
        nora.apply_nora(model)
    return model


APIS = [
    "apply_nora",
    "apply_nora calibrated",
    "peft NoRA",
    "peft NoRA++ (README's five lines)",
    "peft NoRA calibrated",
    "LoRA then apply_nora (NoRA++)",
]


@pytest.mark.parametrize("api", APIS)
def test_every_api_starts_at_the_pretrained_llama(llama, api):
    model, ids, _, ref = llama
    base_ppl = perplexity(model, ids)
    adapted = _apply(copy.deepcopy(model), api, ids)
    assert len(nora.nora_modules(adapted)) == 3 or api.startswith("peft")
    with torch.no_grad():
        logits = adapted(ids).logits
    assert rel_diff(logits, ref) <= REL
    assert abs(perplexity(adapted, ids) / base_ppl - 1) <= 1e-3  # the bound: 0.1%


@pytest.mark.parametrize("api", ["apply_nora", "peft NoRA"])
def test_every_api_starts_at_the_pretrained_vit(vit, api):
    model, images, _, ref = vit
    model = copy.deepcopy(model)
    if api == "apply_nora":
        nora.apply_nora(model, nora.NoraConfig(trainable_modules=["head"]))
    else:
        model = peft.get_peft_model(model, nora.NoraPeftConfig(modules_to_save=["head"]))
    with torch.no_grad():
        assert rel_diff(model(images), ref) <= REL


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_every_backend_starts_exactly(llama, backend):
    model, ids, _, ref = llama
    adapted = copy.deepcopy(model)
    nora.apply_nora(adapted, nora.NoraConfig(backend=backend))
    with torch.no_grad():
        logits = adapted(ids).logits
    assert rel_diff(logits, ref) <= REL
    if backend in ("reference", "torch"):  # torch's own GELU/SiLU plus an exact zero: bit-identical
        assert torch.equal(logits, ref)


def test_bfloat16_model_starts_at_the_bfloat16_model(llama):
    model, ids, _, _ = llama
    model = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        ref = model(ids).logits
    adapted = copy.deepcopy(model)
    nora.apply_nora(adapted)
    with torch.no_grad():
        logits = adapted(ids).logits
    # phi computed in float32 and rounded once, as torch's bf16 SiLU does: equal up to rare one-ulp roundings
    assert rel_diff(logits, ref) <= 2**-7


def _train(model, ids, steps=3, lr=0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_disable_adapter_gives_back_the_pretrained_model_after_training(llama):
    model, ids, _, ref = llama
    pm = peft.get_peft_model(copy.deepcopy(model), nora.NoraPeftConfig(lora_r=4, lora_target_modules="all-linear"))
    _train(pm, ids)
    with torch.no_grad():
        trained = pm(ids).logits
        with pm.disable_adapter():
            off = pm(ids).logits
    assert rel_diff(trained, ref) > 1e-3
    assert rel_diff(off, ref) <= REL
    plain = copy.deepcopy(model)
    nora.apply_nora(plain)
    _train(plain, ids)
    with torch.no_grad(), nora.disable_adapter(plain):
        assert rel_diff(plain(ids).logits, ref) <= REL


def test_merged_residual_model_equals_the_trained_adapter(llama, tmp_path):
    """merge_nora, peft's merge_and_unload, save_merged / from_pretrained: the outputs of the trained adapter."""
    model, ids, _, _ = llama
    plain = copy.deepcopy(model)
    nora.apply_nora(plain)
    _train(plain, ids)
    with torch.no_grad():
        want = plain(ids).logits
    nora.merge_nora(plain)
    assert all(m.residual for m in nora.adapter.merged.rational_modules(plain).values())
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, want)  # the same kernel on the same coefficients
    nora.save_merged(plain, tmp_path / "merged")
    assert (
        json.loads((tmp_path / "merged" / "config.json").read_text())["nora_merged"]["layers"][
            "model.layers.0.mlp.act_fn"
        ]["residual"]
        is True
    )
    loaded = nora.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)

    pm = peft.get_peft_model(copy.deepcopy(model), nora.NoraPeftConfig(lora_r=4, lora_target_modules="all-linear"))
    _train(pm, ids)
    with torch.no_grad():
        want = pm(ids).logits
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("fmt", ["nora", "peft"])
def test_an_adapter_saved_before_the_residual_form_loads_in_the_papers_form(llama, tmp_path, fmt):
    """A saved config without `residual` was trained in the paper's form: it reloads so, with its outputs."""
    model, ids, _, _ = llama
    if fmt == "nora":
        trained = copy.deepcopy(model)
        nora.apply_nora(trained, nora.NoraConfig(residual=False))
    else:
        trained = peft.get_peft_model(copy.deepcopy(model), nora.NoraPeftConfig(residual=False))
    _train(trained, ids)
    with torch.no_grad():
        want = trained(ids).logits
    out = tmp_path / fmt
    if fmt == "nora":
        write_nora_files(trained, out)  # the earlier format (tests/legacy_formats.py)
        meta = json.loads((out / "nora_config.json").read_text())
        del meta["config"]["residual"]
        for info in meta["layers"].values():
            del info["residual"]
        (out / "nora_config.json").write_text(json.dumps(meta))
        fresh = copy.deepcopy(model)
        nora.load_nora(fresh, out)
    else:
        trained.save_pretrained(out)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg.pop("residual") is False
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        assert peft.PeftConfig.from_pretrained(out).residual is False
        fresh = peft.PeftModel.from_pretrained(copy.deepcopy(model), out)
    assert not any(m.residual for m in nora.nora_modules(fresh).values())
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)


def test_residual_adapter_round_trips_through_peft_in_a_fresh_config(llama, tmp_path):
    model, ids, _, _ = llama
    pm = peft.get_peft_model(copy.deepcopy(model), nora.NoraPeftConfig(lora_r=4, lora_target_modules="all-linear"))
    _train(pm, ids)
    with torch.no_grad():
        want = pm(ids).logits
    pm.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["residual"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a")
    assert all(m.residual for m in nora.nora_modules(loaded).values())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
