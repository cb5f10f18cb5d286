"""NoRA as a peft method: ``peft.get_peft_model(model, nora.NoraPeftConfig(...))`` and peft's own save, load,
merge, disable and multi-adapter API, each step in a fresh interpreter that imports nothing but ``nora`` (which
registers the method) and peft / transformers, as a PEFT user's script does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COMMON = """
import json, sys, torch, peft, transformers, nora
from peft import PeftConfig, PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()

def train(model, steps=4, lr=3e-2, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 96, (4, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss)

def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits

def _raises(f):
    try:
        f()
    except ValueError as e:
        return str(e)
    return None

def out(**kw):
    print("RESULT " + json.dumps(kw))
"""


def run(code: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> dict:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "HF_HUB_OFFLINE")},
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-c", COMMON + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------------- registration, config
def test_import_nora_registers_the_peft_method(tmp_path):
    got = run(
        """
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
        from peft.utils import PeftType
        cfg = nora.NoraPeftConfig(lora_r=8, lora_target_modules=["q_proj", "v_proj"], groups=4)
        d = cfg.to_dict()
        out(member="NORA" in list(PeftType), value=PeftType("NORA").value,
            config=PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.NORA].__name__,
            tuner=PEFT_TYPE_TO_TUNER_MAPPING[PeftType.NORA].__name__, prefix=PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.NORA],
            peft_type=d["peft_type"], r=d["r"], groups=d["groups"], lora_r=d["lora_r"], nora_pp=cfg.is_nora_pp,
            bad_lora_r=_raises(lambda: nora.NoraPeftConfig(lora_r=-1)),
            bad_groups=_raises(lambda: nora.NoraPeftConfig(groups=0)))
    """,
        tmp_path,
    )
    assert got["member"] and got["value"] == "NORA" and got["prefix"] == "nora_"
    assert (got["config"], got["tuner"]) == ("NoraPeftConfig", "NoraModel")
    assert (got["peft_type"], got["r"], got["groups"], got["lora_r"], got["nora_pp"]) == ("NORA", 3, 4, 8, True)
    assert "lora_r=-1" in got["bad_lora_r"] and "groups" in got["bad_groups"]


# ------------------------------------------------------------------- NoRA++: build, train, save, reload, merge
BUILD_TRAIN_SAVE = """
    d = sys.argv[1] if len(sys.argv) > 1 else DIR
    base = tiny()
    base.save_pretrained(d + "/base")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    base_logits = logits(base, ids)
    cfg = nora.NoraPeftConfig(task_type="CAUSAL_LM", groups=8, lora_r=4, lora_alpha=8,
                              lora_target_modules=["q_proj", "up_proj"], use_dora=USE_DORA)
    model = peft.get_peft_model(base, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    init_logits = logits(model, ids)
    loss = train(model)
    trained = logits(model, ids)
    with model.disable_adapter():
        disabled = logits(model, ids)
    model.save_pretrained(d + "/adapter")
    torch.save({"ids": ids, "trained": trained, "base": base_logits, "init": init_logits}, d + "/want.pt")
    import os
    out(trainable=trainable, total=total, loss=loss, files=sorted(os.listdir(d + "/adapter")),
        init_vs_base=float((init_logits - base_logits).abs().max()),
        trained_vs_init=float((trained - init_logits).abs().max()),
        disabled_vs_init=float((disabled - init_logits).abs().max()),
        type=type(model).__name__)
"""

RELOAD = """
    from safetensors.torch import load_file
    d = DIR
    want = torch.load(d + "/want.pt")
    cfg = PeftConfig.from_pretrained(d + "/adapter")
    base = LlamaForCausalLM.from_pretrained(d + "/base").eval()
    model = PeftModel.from_pretrained(base, d + "/adapter")
    got = logits(model, want["ids"])
    with model.disable_adapter():
        disabled = logits(model, want["ids"])
    keys = sorted(load_file(d + "/adapter/adapter_model.safetensors"))
    model.merge_adapter()  # merged in place (LoRA into the weights, NoRA into per-group rationals), then undone
    merge_adapter = float((logits(model, want["ids"]) - want["trained"]).abs().max())
    model.unmerge_adapter()
    # LoRA's unmerge subtracts B A again (float rounding); NoRA's puts the activation itself back
    unmerged = [float((logits(model, want["ids"]) - want["trained"]).abs().max()),
                type(model.base_model.model.model.layers[0].mlp.act_fn.base_layer).__name__]
    merged = model.merge_and_unload()
    merged_logits = logits(merged, want["ids"])
    acts = sorted({type(m).__name__ for n, m in merged.named_modules() if n.endswith("mlp.act_fn")})
    nora.save_merged(merged, d + "/merged")
    out(config=type(cfg).__name__, lora_r=cfg.lora_r, use_dora=cfg.use_dora, model_type=type(model).__name__,
        same=bool(torch.equal(got, want["trained"])), diff=float((got - want["trained"]).abs().max()),
        disabled_vs_init=float((disabled - want["init"]).abs().max()),
        merged_diff=float((merged_logits - want["trained"]).abs().max()), merged_type=type(merged).__name__,
        acts=acts, keys=keys, trainable=sum(p.requires_grad for p in model.parameters()),
        merge_adapter=merge_adapter, unmerged=unmerged)
"""

MERGED_RELOAD = """
    d = DIR
    want = torch.load(d + "/want.pt")
    model = nora.from_pretrained(d + "/merged")
    got = logits(model, want["ids"])
    out(diff=float((got - want["trained"]).abs().max()), type=type(model).__name__,
        acts=sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp.act_fn")}))
"""


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.slow  # 38 s here: end to end (make test-slow, CI)
def test_nora_pp_peft_round_trip(tmp_path, use_dora):
    d = repr(str(tmp_path))
    made = run(f"DIR = {d}\nUSE_DORA = {use_dora}\n" + textwrap.dedent(BUILD_TRAIN_SAVE), tmp_path)
    assert made["type"] == "PeftModelForCausalLM"
    lora = 2 * (4 * 64 + 64 * 4 + 4 * 64 + 128 * 4)  # q_proj (64 -> 64), up_proj (64 -> 128), 2 layers
    dora = 2 * (64 + 128) if use_dora else 0  # DoRA's magnitude vectors
    assert made["trainable"] == lora + dora + 2 * 2 * 3 * (8 + 5)  # + NoRA: 2r(G + 5) per activation
    assert made["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    # step 0 is the pretrained model itself (the residual form: SiLU plus the change of its fitted rational, zero at
    # step 0; the fused kernel's own SiLU is float32 ulps from torch's), training moved it, and disable_adapter()
    # gives back step 0 without LoRA
    assert made["init_vs_base"] <= 1e-5
    assert made["trained_vs_init"] > 1e-2
    assert made["disabled_vs_init"] == 0.0

    got = run(f"DIR = {d}\n" + textwrap.dedent(RELOAD), tmp_path)
    assert (got["config"], got["lora_r"], got["use_dora"]) == ("NoraPeftConfig", 4, use_dora)
    assert got["model_type"] == "PeftModelForCausalLM"
    assert got["same"], got["diff"]
    assert got["trainable"] == 0  # PeftModel.from_pretrained: inference mode
    assert got["disabled_vs_init"] == 0.0
    # a LlamaForCausalLM whose save_pretrained writes the self-contained merged folder (tests/test_deploy.py)
    assert got["merged_type"] == "NoraLlamaForCausalLM" and got["acts"] == ["GroupRational"]
    assert got["merged_diff"] < 1e-5 and got["merge_adapter"] < 1e-5
    assert got["unmerged"][0] < 1e-5 and got["unmerged"][1] == "SiLUActivation"
    act = "base_model.model.model.layers.0.mlp.act_fn.nora_activation."
    assert {
        act + k for k in ("base_numerator", "base_denominator", "nora_A_num", "nora_B_num", "nora_A_den", "nora_B_den")
    } <= set(got["keys"])
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in got["keys"]
    assert ("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector" in got["keys"]) == use_dora
    assert not any(".default" in k or "base_layer" in k for k in got["keys"])

    merged = run(f"DIR = {d}\n" + textwrap.dedent(MERGED_RELOAD), tmp_path)
    assert merged["type"] == "NoraLlamaForCausalLM" and merged["acts"] == ["GroupRational"]
    assert merged["diff"] < 1e-5


# ------------------------------------------------------------------------ NoRA alone, several adapters
SEVERAL = """
    import os
    d = DIR
    base = tiny()
    base.save_pretrained(d + "/base")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    model = peft.get_peft_model(base, nora.NoraPeftConfig(groups=4), adapter_name="a")
    trainable_a = model.get_nb_trainable_parameters()[0]
    train(model, seed=0)
    model.add_adapter("b", nora.NoraPeftConfig(groups=8, r=2, alpha=4.0, lora_r=2, lora_target_modules=["v_proj"]))
    model.set_adapter("b")
    trainable_b = model.get_nb_trainable_parameters()[0]
    train(model, seed=1)
    got = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        got[name] = logits(model, ids)
    model.save_pretrained(d + "/adapter")
    torch.save({"ids": ids, **got}, d + "/want.pt")
    out(trainable_a=trainable_a, trainable_b=trainable_b, a_vs_b=float((got["a"] - got["b"]).abs().max()),
        files=sorted(os.listdir(d + "/adapter")), b_files=sorted(os.listdir(d + "/adapter/b")))  # peft: a/, b/
"""

SEVERAL_RELOAD = """
    d = DIR
    want = torch.load(d + "/want.pt")
    base = LlamaForCausalLM.from_pretrained(d + "/base").eval()
    model = PeftModel.from_pretrained(base, d + "/adapter/a", adapter_name="a")
    model.load_adapter(d + "/adapter/b", adapter_name="b")
    diffs = {}
    for name in ("b", "a", "b"):
        model.set_adapter(name)
        diffs[name] = float((logits(model, want["ids"]) - want[name]).abs().max())
    model.set_adapter("a")
    merged = model.merge_and_unload()
    out(diffs=diffs, merged_a=float((logits(merged, want["ids"]) - want["a"]).abs().max()))
"""


@pytest.mark.slow  # 13 s here: end to end (make test-slow, CI)
def test_nora_alone_and_several_named_adapters(tmp_path):
    d = repr(str(tmp_path))
    made = run(f"DIR = {d}\n" + textwrap.dedent(SEVERAL), tmp_path)
    assert made["trainable_a"] == 2 * 2 * 3 * (4 + 5)  # lora_r=0: NoRA alone, 2r(G + 5) per activation
    assert made["trainable_b"] == 2 * 2 * 2 * (8 + 5) + 2 * (2 * 64 + 32 * 2)  # NoRA r=2 + LoRA r=2 on v_proj
    assert made["a_vs_b"] > 1e-2
    assert made["files"] == ["README.md", "a", "b"]  # peft saves adapters other than "default" in subfolders
    assert made["b_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    got = run(f"DIR = {d}\n" + textwrap.dedent(SEVERAL_RELOAD), tmp_path)
    assert got["diffs"] == {"a": 0.0, "b": 0.0}
    assert got["merged_a"] < 1e-5


# ------------------------------------------------------------------------------------- calibrated init
CALIBRATED = """
    d = DIR
    base = tiny()
    base.save_pretrained(d + "/base")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(init="calibrated", per_group_calibration=True, groups=4, degrees=[3, 2])
    cfg = nora.NoraPeftConfig(**kw)
    model = peft.get_peft_model(base, cfg)
    layer = model.base_model.model.model.layers[0].mlp.act_fn
    before = layer.nora_activation["default"].base_numerator.clone()
    batches = [torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    fits = nora.calibrate(model, batches)
    after = layer.nora_activation["default"].base_numerator
    # nora.apply_nora's calibrated init on the same model and batches: the same base rationals
    ref = tiny()
    nora.apply_nora(ref, nora.NoraConfig(**kw), calibration_batches=batches)
    ref_act = ref.model.layers[0].mlp.act_fn
    den = layer.nora_activation["default"].base_denominator
    as_apply_nora = float(max((after - ref_act.base_numerator).abs().max(),
                              (den - ref_act.base_denominator).abs().max()))
    want = logits(model, ids)
    model.save_pretrained(d + "/adapter")
    back = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(d + "/base").eval(), d + "/adapter")
    out(n=len(fits), as_apply_nora=as_apply_nora, changed=float((after - before).abs().max()),
        rows_differ=bool(not torch.equal(after[0], after[1])),
        same=bool(torch.equal(logits(back, ids), want)), still_silu=type(layer.base_layer).__name__)
"""


def test_calibrated_init_is_a_step_after_get_peft_model_and_is_saved(tmp_path):
    got = run(f"DIR = {str(tmp_path)!r}\n" + textwrap.dedent(CALIBRATED), tmp_path)
    assert got["n"] == 2 and got["changed"] > 1e-3 and got["rows_differ"]  # re-fitted, per group
    assert got["as_apply_nora"] < 1e-6
    assert got["same"] and got["still_silu"] == "SiLUActivation"


# --------------------------------------------------------------------------------- the hub, by repo id
HUB = """
    d = DIR
    base = tiny()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    model = peft.get_peft_model(base, nora.NoraPeftConfig(lora_r=2, lora_target_modules=["q_proj"]))
    train(model)
    want = logits(model, ids)
    model.push_to_hub("me/tiny-nora-pp")
    back = PeftModel.from_pretrained(tiny(), "me/tiny-nora-pp")
    cfg = PeftConfig.from_pretrained("me/tiny-nora-pp")
    out(same=bool(torch.equal(logits(back, ids), want)), config=type(cfg).__name__, lora_r=cfg.lora_r)
"""


def test_push_to_hub_and_from_pretrained_by_hub_id(tmp_path):
    from fake_hub import FakeHub

    with FakeHub(tmp_path / "hub") as hub:
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": "hf_test",
            "HF_HUB_CACHE": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "0",
        }
        got = run(f"DIR = {str(tmp_path)!r}\n" + textwrap.dedent(HUB), tmp_path, env=env)
        files = hub.files("me/tiny-nora-pp")
    assert got == {"same": True, "config": "NoraPeftConfig", "lora_r": 2}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads(files["adapter_config.json"])["peft_type"] == "NORA"


# ------------------------------------------------------------------------------ LoRA targets as in peft
TARGETS = """
    got = {}
    for name, targets in (("all-linear", "all-linear"), ("default", None), ("regex", r".*\\.(q|k)_proj")):
        model = peft.get_peft_model(tiny(), nora.NoraPeftConfig(lora_r=2, lora_target_modules=targets))
        got[name] = sorted({n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")})
    got["nora_only"] = sorted({type(m).__name__ for n, m in peft.get_peft_model(tiny(), nora.NoraPeftConfig())
                               .named_modules() if n.endswith("act_fn")})
    out(**got)
"""


def test_lora_targets_are_read_as_peft_reads_them(tmp_path):
    got = run(TARGETS, tmp_path)
    assert got["all-linear"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert got["default"] == ["q_proj", "v_proj"]  # peft's default for llama
    assert got["regex"] == ["k_proj", "q_proj"]
    assert got["nora_only"] == ["NoraLayer"]


# ------------------------------------------------------------------- a timm ViT: NoRA++ with a new head
VIT = """
    from timm.models.vision_transformer import VisionTransformer
    def vit():
        torch.manual_seed(0)
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10).eval()
    d = DIR
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = nora.NoraPeftConfig(lora_r=2, lora_target_modules=["qkv", "fc1"], modules_to_save=["head"])
    model = peft.get_peft_model(vit(), cfg)
    comps = nora.parameter_report(model).components
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        want = model(x)
    model.save_pretrained(d + "/vit")
    back = PeftModel.from_pretrained(vit(), d + "/vit")
    with torch.no_grad():
        got = back(x)
        merged = back.merge_and_unload()(x)
    out(comps={k: comps[k] for k in ("nora", "lora", "head")}, same=bool(torch.equal(got, want)),
        merged=float((merged - want).abs().max()), scale=float(want.abs().max()))
"""


def test_nora_pp_on_a_timm_vit_with_a_new_head(tmp_path):
    got = run(f"DIR = {str(tmp_path)!r}\n" + textwrap.dedent(VIT), tmp_path)
    assert got["comps"] == {
        "nora": 2 * 2 * 3 * (8 + 5),
        "lora": 2 * (2 * 64 + 192 * 2 + 2 * 64 + 256 * 2),
        "head": 64 * 10 + 10,
    }
    assert got["same"]
    assert got["merged"] < 1e-5 * max(1.0, got["scale"])
