"""Every reader of a saved NoRA artefact checks what its writer recorded, and every input is checked where it enters
(issue 32, part A): peft's own ``PeftModel.from_pretrained`` (through the NORA tuner), ``nora.load_nora``,
``nora.from_pretrained`` of a merged folder (formats 1 and 2), ``NoraConfig`` /
``NoraPeftConfig`` and ``train.py method=nora_pp``. Each case damages a real file (or builds a real mismatching
model) and asserts the one-line error and that the model given was left as it was."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import nora
from nora.adapter.merged import rational_modules
from nora.schema import ConfigValueError
from nora.tuner import NoraLayer

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def llama(inter=128, layers=2, act="silu", seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            hidden_act=act,
        )
    ).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    ).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def assert_untouched(model, before):
    state, kinds = before
    assert [type(m).__name__ for m in model.modules()] == kinds
    assert not any(isinstance(m, NoraLayer) for m in model.modules()) and "peft_config" not in model.__dict__
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"groups": "8"}, "groups='8': must be an integer"),
        ({"r": 2.5}, "r=2.5: must be an integer"),
        ({"degrees": "54"}, "degrees='54': must be a list of two integers [m, n]"),
        ({"degrees": [5]}, "degrees=[5]: must be a list of two integers [m, n]"),
        ({"alpha": "6"}, "alpha='6': must be a number"),
        ({"residual": "yes"}, "residual='yes': must be true or false"),
        ({"target_modules": ["(mlp"]}, "target_modules='(mlp': not a valid regex (missing ), unterminated subpattern"),
        ({"trainable_modules": ["head["]}, "trainable_modules='head[': not a valid regex (unterminated character set"),
    ],
)
@pytest.mark.parametrize("cls", ["NoraConfig", "NoraPeftConfig"])
def test_config_fields_are_checked_by_type_naming_the_field(cls, kw, message):
    if cls == "NoraPeftConfig" and "trainable_modules" in kw:
        kw, message = {"lora_target_modules": "q_proj("}, "lora_target_modules='q_proj(': not a valid regex"
    with pytest.raises(ConfigValueError) as err:
        getattr(nora, cls)(**kw)
    assert one_line(err).startswith(message), str(err.value)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"lora_r": 8.0}, "lora_r=8.0: must be an integer (0: NoRA alone)"),
        ({"lora_dropout": 1.5}, "lora_dropout=1.5: must be a number in [0, 1)"),
        ({"use_dora": "no"}, "use_dora='no': must be true or false"),
        ({"lora_target_modules": 7}, "lora_target_modules=7: must be null, a regex"),
    ],
)
def test_nora_peft_config_lora_fields_are_checked(kw, message):
    with pytest.raises(ConfigValueError) as err:
        nora.NoraPeftConfig(**kw)
    assert one_line(err).startswith(message)


def test_a_lora_target_typo_is_refused_and_the_model_is_untouched():
    """peft's LoraConfig refuses a list none of whose names match; NoRA's activations always match, so without the
    check one typo built NoRA alone (0 LoRA modules)."""
    for targets, missing in (
        (["q_proj", "v_projj"], "['v_projj']"),
        (["q_projj"], "['q_projj']"),
        (r".*\.qproj", "['.*\\\\.qproj']"),
    ):
        model = llama()
        before = snapshot(model)
        with pytest.raises(nora.AdapterError) as err:
            peft.get_peft_model(model, nora.NoraPeftConfig(lora_r=8, lora_target_modules=targets))
        assert one_line(err).startswith(f"lora_target_modules {missing} match no module of LlamaForCausalLM"), str(
            err.value
        )
        assert "its weight layers are named down_proj, embed_tokens, gate_proj, k_proj" in str(err.value)
        assert_untouched(model, before)


def test_a_target_regex_that_hits_a_linear_or_an_mlp_is_refused_by_name():
    for target, cls, why in (
        (r".*mlp\.down_proj", "Linear", "it holds parameters (weight (64, 128))"),
        (r".*\.mlp", "LlamaMLP", "it has submodules"),
    ):
        for build in (
            lambda t: nora.apply_nora(llama(), nora.NoraConfig(target_modules=t)),
            lambda t: peft.get_peft_model(llama(), nora.NoraPeftConfig(target_modules=t)),
        ):
            with pytest.raises(nora.AdapterError) as err:
                build(target)
            pattern = rf"target 'model\.layers\.0\.mlp(\.down_proj)?' \({cls}\) is not an activation: "
            assert re.match(pattern + re.escape(why), one_line(err)), str(err.value)


def test_calibrated_init_never_calibrated_stops_at_the_first_training_forward(tmp_path):
    ids = torch.randint(0, 96, (2, 8))
    model = peft.get_peft_model(llama(), nora.NoraPeftConfig(init="calibrated"))
    model.eval()
    model(ids)  # inference from the range fit is allowed (nothing is trained)
    model.train()
    with pytest.raises(nora.AdapterError) as err:
        model(input_ids=ids, labels=ids)
    assert one_line(err) == (
        "NoraPeftConfig(init='calibrated'): adapter 'default' was never calibrated, so training would start from the "
        "range fit; call nora.calibrate(peft_model, batches) after peft.get_peft_model (a few input batches), or use "
        "init='fit'"
    )
    model.save_pretrained(tmp_path / "uncalibrated")  # the saved config says what was done
    specs = json.loads((tmp_path / "uncalibrated" / CONFIG).read_text())["layer_specs"]
    assert {s["init"] for s in specs.values()} == {"fit"}
    nora.calibrate(model, [ids, torch.randint(0, 96, (2, 8))], forward=lambda m, b: m(input_ids=b))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.save_pretrained(tmp_path / "calibrated")
    specs = json.loads((tmp_path / "calibrated" / CONFIG).read_text())["layer_specs"]
    assert {s["init"] for s in specs.values()} == {"calibrated"} and len(specs) == 2
    # loaded back, the base rationals come from the file: training goes on without calibrating again
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path / "calibrated"), is_trainable=True)
    loaded.train()
    loaded(input_ids=ids, labels=ids).loss.backward()


# ------------------------------------------------------------------------------------------ peft's loader
@pytest.fixture(scope="module")
def saved_pp(tmp_path_factory):
    """A NoRA++ adapter (LoRA on q_proj/v_proj, NoRA on the SiLU of a width-128 LLaMA) saved by peft."""
    d = tmp_path_factory.mktemp("pp") / "adapter"
    model = peft.get_peft_model(llama(), nora.NoraPeftConfig(lora_r=4, lora_target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(str(d))
    return d


def damaged(saved: Path, tmp_path: Path, tensors=None, config=None) -> Path:
    d = tmp_path / "damaged"
    shutil.copytree(saved, d)
    if tensors is not None:
        t = load_file(str(d / WEIGHTS))
        tensors(t)
        save_file(t, str(d / WEIGHTS), metadata={"format": "pt"})
    if config is not None:
        c = json.loads((d / CONFIG).read_text())
        config(c)
        (d / CONFIG).write_text(json.dumps(c))
    return d


NUM0 = "base_model.model.model.layers.0.mlp.act_fn.nora_activation.base_denominator"


def _nan(t):
    t[NUM0][0, 0] = float("nan")


def _drop_tensor(t):
    del t[NUM0]


def _drop_layer(t):
    for k in [k for k in t if ".layers.1.mlp.act_fn." in k]:
        del t[k]


def _to_gelu(c):
    for s in c["layer_specs"].values():
        s["original"] = "gelu"


CASES = {
    # name: (base model, tensors edit, config edit, what the message says after "<dir> does not fit this <cls>
    # (nothing was changed): ")
    "width 256": (
        lambda: llama(inter=256),
        None,
        None,
        "model.layers.0.mlp.act_fn: width 256, the adapter was saved for width 128",
    ),
    "one layer more": (
        lambda: llama(layers=3),
        None,
        None,
        "this LlamaForCausalLM has 3 target activations, the adapter covers 2; no saved layer for "
        "model.layers.2.mlp.act_fn",
    ),
    "one layer less": (
        lambda: llama(layers=1),
        None,
        None,
        "the adapter holds 2 layers, 1 of them not targets of this LlamaForCausalLM: model.layers.1.mlp.act_fn",
    ),
    "GPT-2": (gpt2, None, None, "lora_target_modules ['q_proj', 'v_proj'] match no module of GPT2LMHeadModel"),
    "a NaN": (llama, _nan, None, "{dir}/adapter_model.safetensors: 1 tensor(s) hold NaN or inf values (" + NUM0 + ")"),
    "a tensor missing": (
        llama,
        _drop_tensor,
        None,
        "{dir}/adapter_model.safetensors: model.layers.0.mlp.act_fn: base_denominator missing",
    ),
    "a layer's tensors missing": (
        llama,
        _drop_layer,
        None,
        "{dir}/adapter_model.safetensors: its NoRA layers differ from the layer_specs of "
        "adapter_config.json (model.layers.1.mlp.act_fn)",
    ),
    "old file, a layer missing": (
        llama,
        _drop_layer,
        lambda c: c.pop("layer_specs"),
        "{dir}/adapter_model.safetensors: this LlamaForCausalLM has 2 target activations, "
        "the adapter covers 1; no saved layer for model.layers.1.mlp.act_fn",
    ),
    "fitted to another activation": (
        llama,
        None,
        _to_gelu,
        "model.layers.0.mlp.act_fn: this model's activation is silu, the adapter was fitted to gelu",
    ),
    "GELU base": (
        lambda: llama(act="gelu"),
        None,
        None,
        "model.layers.0.mlp.act_fn: this model's activation is gelu, the adapter was fitted to silu",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_from_pretrained_refuses_an_adapter_that_does_not_fit(saved_pp, tmp_path, case):
    build, tensors, config, message = CASES[case]
    d = damaged(saved_pp, tmp_path, tensors, config)
    model = build()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(nora.AdapterError) as err:
            PeftModel.from_pretrained(model, str(d))
    text = one_line(err)
    head = f"{d} does not fit this {type(model).__name__} (nothing was changed): "
    assert text.startswith(head), text
    assert message.format(dir=d) in text[len(head) :], text
    assert_untouched(model, before)


def test_peft_from_pretrained_loads_the_undamaged_adapter_with_its_outputs(saved_pp):
    ids = torch.randint(0, 96, (2, 8))
    a = PeftModel.from_pretrained(llama(), str(saved_pp))
    b = PeftModel.from_pretrained(llama(), str(saved_pp))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert not torch.equal(a(ids).logits, llama()(ids).logits)


def test_a_config_passed_explicitly_still_refuses_a_missing_tensor(saved_pp, tmp_path):
    """Without the folder (config= given, as load_nora does for the earlier two-part format), the tuner's load hook
    checks the state dict peft would load: a missing tensor is an error, not a layer left at its initialisation."""
    d = damaged(saved_pp, tmp_path, _drop_tensor)
    cfg = {k: v for k, v in json.loads((d / CONFIG).read_text()).items() if k != "peft_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(nora.AdapterError) as err:
            PeftModel.from_pretrained(llama(), str(d), config=nora.NoraPeftConfig(**cfg))
    assert one_line(err) == (
        "adapter_model.safetensors: 1 adapter tensor(s) this model needs are missing (base_model."
        "model.model.layers.0.mlp.act_fn.nora_activation.default.base_denominator); the file is "
        "incomplete or belongs to another model"
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "peft_type": "LORA"})),
            "{cfg} says peft_type 'LORA', but {dir}/adapter_model.safetensors holds NoRA tensors (keys "
            "*.nora_activation.*): "
            'loaded as LORA, NoRA would be left out; the adapter config was edited: restore "peft_type": "NORA"',
        ),
        (
            lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "peft_type": "NORAX"})),
            "{cfg} says peft_type 'NORAX', but",
        ),
        (
            lambda p: p.write_text(
                json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "peft_type"})
            ),
            '{cfg}: no peft_type (a peft adapter config names its method; a NoRA adapter says "peft_type": "NORA")',
        ),
        (lambda p: p.write_text(p.read_text()[:60]), "{cfg}: not readable JSON (JSONDecodeError: "),
    ],
)
def test_nora_loaders_name_an_edited_or_truncated_adapter_config(saved_pp, tmp_path, edit, message):
    d = damaged(saved_pp, tmp_path)
    edit(d / CONFIG)
    model = llama()
    before = snapshot(model)
    with pytest.raises(nora.AdapterError) as err:
        nora.load_nora(model, d)
    assert one_line(err).startswith(message.format(cfg=d / CONFIG, dir=d)), str(err.value)
    assert_untouched(model, before)


def test_a_lora_adapter_config_without_nora_tensors_is_not_mistaken(tmp_path):
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        nora.load_nora(llama(), tmp_path)
    assert one_line(err).startswith(
        f"no NoRA adapter at {tmp_path} (expected adapter_config.json with peft_type NORA and "
        "adapter_model.safetensors, or the earlier nora_config.json and nora_adapter.safetensors)"
    )


# ------------------------------------------------------------------------------------------ load_nora
def test_load_nora_refuses_an_adapter_fitted_to_another_activation(tmp_path):
    model = llama()
    nora.apply_nora(model, nora.NoraConfig())
    nora.save_nora(model, tmp_path)
    for act, own in (("gelu", "gelu"), ("relu", "relu")):
        other = llama(act=act)
        before = snapshot(other)
        with pytest.raises(nora.AdapterError) as err:
            nora.load_nora(other, tmp_path)
        assert one_line(err).startswith(
            f"the NoRA adapter in {tmp_path} does not fit this LlamaForCausalLM (nothing was changed): "
            f"model.layers.0.mlp.act_fn: this model's activation is {own}, the adapter was fitted to silu"
        )
        assert_untouched(other, before)
    nora.load_nora(llama(), tmp_path)  # the model it was fitted on


# ------------------------------------------------------------------------------------------ merged folders
@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("merged") / "m"
    model = peft.get_peft_model(llama(), nora.NoraPeftConfig())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.merge_and_unload().save_pretrained(str(d))
    return d


def _merged_copy(src: Path, tmp_path: Path, tensors=None, config=None) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    if tensors is not None:
        t = load_file(str(d / "model.safetensors"))
        tensors(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        c = json.loads((d / "config.json").read_text())
        config(c["nora_merged"]["layers"])
        (d / "config.json").write_text(json.dumps(c))
    return d


def _rename(new):
    def edit(layers):
        layers[new] = layers.pop("model.layers.0.mlp.act_fn")

    return edit


def _set(key, value):
    def edit(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = value

    return edit


@pytest.mark.parametrize(
    "tensors, config, message",
    [
        (
            _set("model.layers.0.mlp.act_fn.base_numerator", float("nan")),
            None,
            "{dir}: 1 tensor(s) of the checkpoint hold NaN or inf values "
            "(model.layers.0.mlp.act_fn.base_numerator); not "
            "loading a model that computes NaN",
        ),
        (
            _set("model.layers.1.mlp.down_proj.weight", float("inf")),
            None,
            "{dir}: 1 tensor(s) of the checkpoint hold NaN or inf values (model.layers.1.mlp.down_proj.weight)",
        ),
        (
            lambda t: t.pop("model.layers.1.mlp.act_fn.fit_denominator"),
            None,
            "{dir}: the checkpoint lacks 1 rational coefficient tensor(s) "
            "(model.layers.1.mlp.act_fn.fit_denominator) that "
            "config.json's nora_merged names",
        ),
        (
            None,
            _rename("model.layers.0.mlp.down_proj"),
            "{dir}/config.json: nora_merged does not fit this LlamaForCausalLM (nothing was loaded): "
            "model.layers.0.mlp.down_proj is a Linear holding parameters (weight (64, 128)), not an activation",
        ),
        (
            None,
            _rename("model.layers.0.mlp"),
            "{dir}/config.json: nora_merged does not fit this LlamaForCausalLM (nothing was loaded): "
            "model.layers.0.mlp is a "
            "LlamaMLP with submodules, not an activation",
        ),
        (
            None,
            lambda layers: layers["model.layers.0.mlp.act_fn"].update(original="gelu"),
            "{dir}/config.json: nora_merged does not fit this LlamaForCausalLM (nothing was loaded): "
            "model.layers.0.mlp.act_fn: this model's activation is silu, the adapter was fitted to gelu",
        ),
        (
            None,
            lambda layers: layers["model.layers.0.mlp.act_fn"].update(degrees=[4, 4]),
            "{dir}/config.json: nora_merged does not fit this LlamaForCausalLM (nothing was loaded): "
            "model.layers.0.mlp.act_fn: shapes base_numerator [8, 6], fit_numerator [8, 6] disagree with groups=8, "
            "degrees=[4, 4]",
        ),
    ],
)
def test_from_pretrained_of_a_damaged_merged_folder_is_one_line(merged_dir, tmp_path, tensors, config, message):
    d = _merged_copy(merged_dir, tmp_path, tensors, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(nora.AdapterError) as err:
            nora.from_pretrained(d)
    assert one_line(err).startswith(message.format(dir=d)), str(err.value)


def test_the_undamaged_merged_folder_loads(merged_dir):
    assert len(rational_modules(nora.from_pretrained(merged_dir))) == 2


def _format_1(src: Path, d: Path, layers_edit=None, tensors_edit=None) -> Path:
    merged = nora.from_pretrained(src)
    rationals = rational_modules(merged)
    state = {k: v for k, v in merged.state_dict().items() if not k.startswith(tuple(f"{n}." for n in rationals))}
    LlamaForCausalLM.save_pretrained(merged, str(d), state_dict=state)
    tensors = {f"{n}.{k}": t.contiguous() for n, m in rationals.items() for k, t in m.state_dict().items()}
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, str(d / "nora_merged.safetensors"))
    layers = {
        n: {
            "groups": m.groups,
            "form": m.form,
            "degrees": list(m.degrees),
            "original": m.original,
            "fit_range": m.fit_range,
            "channel_dim": m.channel_dim,
            "width": m.width,
            "residual": m.residual,
        }
        for n, m in rationals.items()
    }
    if layers_edit:
        layers_edit(layers)
    (d / "nora_merged.json").write_text(json.dumps({"format_version": 1, "layers": layers}))
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    config.pop("nora_merged", None)
    config.pop("auto_map", None)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize(
    "layers_edit, tensors_edit, message",
    [
        (None, None, None),
        (
            _rename("model.layers.0.mlp.down_proj"),
            None,
            "{dir}/nora_merged.json does not fit this LlamaForCausalLM (nothing was changed): "
            "model.layers.0.mlp.down_proj "
            "is a Linear holding parameters (weight (64, 128)), not an activation",
        ),
        (
            _rename("model.layers.0.mlp"),
            None,
            "{dir}/nora_merged.json does not fit this LlamaForCausalLM (nothing was changed): model.layers.0.mlp is a "
            "LlamaMLP with submodules, not an activation",
        ),
        (
            None,
            lambda t: t.pop("model.layers.1.mlp.act_fn.base_numerator"),
            "{dir}/nora_merged.json does not fit this LlamaForCausalLM (nothing was changed): "
            "model.layers.1.mlp.act_fn: "
            "base_numerator missing from nora_merged.safetensors",
        ),
        (
            None,
            lambda t: t["model.layers.1.mlp.act_fn.base_denominator"].fill_(float("nan")),
            "{dir}/nora_merged.safetensors: 1 tensor(s) hold NaN or inf values "
            "(model.layers.1.mlp.act_fn.base_denominator)",
        ),
    ],
)
def test_format_1_merged_folders_are_checked_too(merged_dir, tmp_path, layers_edit, tensors_edit, message):
    d = _format_1(merged_dir, tmp_path / "f1", layers_edit, tensors_edit)
    if message is None:
        assert len(rational_modules(nora.from_pretrained(d))) == 2
        return
    with pytest.raises(nora.AdapterError) as err:
        nora.from_pretrained(d)
    assert one_line(err).startswith(message.format(dir=d)), str(err.value)


# ------------------------------------------------------------------------------------------ train.py
def test_train_py_nora_pp_lora_target_typo_is_one_error_line(tmp_path):
    from instruct_fixtures import alpaca_records, write_alpaca_json

    data = write_alpaca_json(tmp_path / "alpaca_data.json", alpaca_records(8))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "model=llama_tiny",
        "dataset=alpaca",
        "method=nora_pp",
        f"data.path={data}",
        "logger=disabled",
        f"output_root={tmp_path / 'runs'}",
        "trainer.device=cpu",
        "trainer.max_steps=1",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "method.nora.calibration_batches=1",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "method.lora.targets=[q_proj,v_projj]",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [
        "error: method.lora.targets: ['v_projj'] match no module of LlamaForCausalLM (a name matches a "
        "module's full name or its last segments; a string is a regex matched in full)"
    ], out.stderr
    assert "Traceback" not in out.stderr
