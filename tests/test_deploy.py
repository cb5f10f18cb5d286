"""A NoRA model leaves nora: ONNX (onnxruntime runs it), torch.export, and a merged causal LM that transformers loads
in an interpreter where nora cannot be imported.

Every model here is trained a few steps first (the coefficients have moved), in both activation forms (the residual
form, nora's default, and the paper's), as NoRA (``nora.apply_nora``) and as NoRA++ (``NoraPeftConfig`` with LoRA),
unmerged and merged. The LLaMA and the ViT are the heavy-tailed stress models of tests/heavy_tails.py (MLP inputs to
-40 / +14, as a real pretrained LLM's), where a form that is wrong outside the fit range would show.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import peft
import pytest
import torch
from heavy_tails import stress_llama, stress_vit
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import nora
from nora.adapter.merged import rational_modules
from nora.kernels import reference_decompositions

ONNX_REL = 1e-5  # onnxruntime's logits against PyTorch's, relative max difference


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


class Logits(nn.Module):
    """A causal LM as exporters take it: token ids in, logits out (no cache object)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def _train(model, loss_fn, steps=3, lr=0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    model, ids, _ = stress_llama()
    return model, ids


@pytest.fixture(scope="module")
def vit():
    model, images, _ = stress_vit()
    return model, images


def trained(kind: str, method: str, residual: bool, llama, vit):
    """(unmerged model, merged model, example input) for ``kind`` in {llama, vit}, ``method`` in {nora, nora_pp}."""
    base, x = copy.deepcopy(llama[0] if kind == "llama" else vit[0]), (llama[1] if kind == "llama" else vit[1])
    if kind == "llama":

        def loss(m):
            return m(input_ids=x, labels=x).loss

        lora_targets = "all-linear"
    else:
        target = torch.arange(x.shape[0]) % 10

        def loss(m):
            return nn.functional.cross_entropy(m(x), target)

        lora_targets = ["qkv", "fc1", "fc2"]
    torch.manual_seed(1)
    if method == "nora":
        nora.apply_nora(base, nora.NoraConfig(residual=residual))
        model = _train(base, loss)
        merged = nora.merge_nora(copy.deepcopy(model))
    else:
        model = _train(
            peft.get_peft_model(
                base, nora.NoraPeftConfig(lora_r=4, lora_target_modules=lora_targets, residual=residual)
            ),
            loss,
        )
        with torch.no_grad():  # LoRA's B starts at 0: make sure the LoRA part is in the outputs
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.02)
        merged = copy.deepcopy(model).merge_and_unload()
    assert all(m.residual == residual for m in rational_modules(merged).values()) and rational_modules(merged)
    return model, merged, x


def _as_module(model, kind):
    return Logits(model).eval() if kind == "llama" else model.eval()


CASES = [(k, m, r) for k in ("llama", "vit") for m in ("nora", "nora_pp") for r in (True, False)]
IDS = [f"{k}-{m}-{'residual' if r else 'paper'}" for k, m, r in CASES]
# the paper's form is the slow half (`make test-slow`, which CI runs too): the default form in `make test`
ONNX_CASES = [pytest.param(*c, id=i, marks=() if c[2] else pytest.mark.slow) for c, i in zip(CASES, IDS)]


@pytest.mark.parametrize("kind, method, residual", ONNX_CASES)
@pytest.mark.slow  # 32 s here: end to end (make test-slow, CI)
def test_onnx_export_runs_in_onnxruntime(kind, method, residual, llama, vit, tmp_path):
    """torch.onnx.export (dynamo, the default backend in place): onnxruntime's outputs within 1e-5 relative of
    PyTorch's, unmerged and merged; the graph computes the rationals with plain ONNX operators."""
    import onnx

    model, merged, x = trained(kind, method, residual, llama, vit)
    for name, m in (("unmerged", model), ("merged", merged)):
        module = _as_module(m, kind)
        with torch.no_grad():
            want = module(x).numpy()
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module, (x,), dynamo=True).save(str(path))
        graph = onnx.load(str(path))
        assert not [n.op_type for n in graph.graph.node if n.domain.startswith("nora")]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert rel_diff(got, want) <= ONNX_REL, (name, rel_diff(got, want))
        # the backends are as they were: the next forward runs the fused kernel again
        with torch.no_grad():
            assert np.array_equal(module(x).numpy(), want)


@pytest.mark.parametrize("kind, method, residual", CASES[::2], ids=IDS[::2])
@pytest.mark.slow  # 14 s here: end to end (make test-slow, CI)
def test_torch_export_equals_eager(kind, method, residual, llama, vit):
    """torch.export.export keeps nora's custom ops: the program's outputs equal eager bit for bit; decomposed with
    nora.kernels.reference_decompositions() it holds only aten ops, within float32 rounding of eager."""
    model, merged, x = trained(kind, method, residual, llama, vit)
    for m in (model, merged):
        module = _as_module(m, kind)
        with torch.no_grad():
            want = module(x)
        program = torch.export.export(module, (x,))
        assert any(str(n.target).startswith("nora.") for n in program.graph.nodes)
        with torch.no_grad():
            assert torch.equal(program.module()(x), want)
        plain = program.run_decompositions(reference_decompositions())
        assert not [n for n in plain.graph.nodes if str(n.target).startswith("nora.")]
        with torch.no_grad():
            assert rel_diff(plain.module()(x), want) <= 1e-6


def _tiny_gpt2():
    torch.manual_seed(3)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


NO_NORA = """
import sys
sys.modules["nora"] = None  # an interpreter where nora cannot be imported
try:
    import nora  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("nora is importable")
import json
import torch
import transformers
out = {}
for folder in sys.argv[2:]:
    case = torch.load(folder + "/case.pt")
    try:
        transformers.AutoModelForCausalLM.from_pretrained(folder)
        out[folder] = {"plain": "loaded"}
        continue
    except ValueError as exc:
        plain = str(exc)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=case["ids"], use_cache=False).logits
    out[folder] = {"plain": plain, "class": type(model).__name__, "module": type(model).__module__,
                   "equal_reference": bool(torch.equal(logits, case["reference"])),
                   "rel_trained": ((logits - case["trained"]).abs().max() / case["trained"].abs().max()).item(),
                   "nora_loaded": any(k == "nora" or k.startswith("nora.") for k, v in sys.modules.items() if v)}
json.dump(out, open(sys.argv[1], "w"))
"""


def test_merged_causal_lm_loads_without_nora(llama, tmp_path):
    """save_merged, and peft's merged save path (merge_and_unload + save_pretrained), write a folder that
    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) loads in an interpreter where nora is not
    importable, with the logits of nora's own loader (reference math: identical; fused kernels: float32 ulps) and of
    the trained adapter; without trust_remote_code it refuses (transformers' own error), never loading the original
    activations silently."""
    folders = {}
    ids = llama[1]
    for method in ("nora", "nora_pp"):
        for residual in (True, False):
            model, merged, _ = trained("llama", method, residual, llama, None)
            folder = tmp_path / f"llama-{method}-{residual}"
            if method == "nora":
                nora.save_merged(merged, folder)
            else:
                merged.save_pretrained(folder)  # peft's merged path: the class merge_and_unload gave saves it
            folders[folder] = model
    gpt2 = _tiny_gpt2()  # another family: Conv1D layers, GELU (tanh) written out as NewGELUActivation
    nora.apply_nora(gpt2)
    gpt2 = _train(gpt2, lambda m: m(input_ids=ids, labels=ids).loss)
    nora.merge_nora(gpt2).save_pretrained(tmp_path / "gpt2")
    folders[tmp_path / "gpt2"] = None
    for folder, model in folders.items():
        with torch.no_grad():
            loaded = nora.from_pretrained(folder)
            trained_logits = (model if model is not None else loaded)(input_ids=ids, use_cache=False).logits
            fast = loaded(input_ids=ids, use_cache=False).logits
            for m in rational_modules(loaded).values():
                m.backend = "reference"
            reference = loaded(input_ids=ids, use_cache=False).logits
        assert rel_diff(fast, trained_logits) <= 1e-5  # merging LoRA into the weights rounds differently
        torch.save({"ids": ids, "reference": reference, "trained": trained_logits}, folder / "case.pt")
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"].startswith("nora_") and "modeling_nora.py" in os.listdir(folder)
    result = tmp_path / "result.json"
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", NO_NORA, str(result), *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder, got in json.loads(result.read_text()).items():
        assert "trust_remote_code=True" in got["plain"], (folder, got)
        assert got["module"].endswith("modeling_nora") and not got["nora_loaded"], got
        assert got["equal_reference"], (folder, got)
        assert got["rel_trained"] <= 1e-5, (folder, got)


def test_save_pretrained_folder_describes_every_rational(llama, tmp_path):
    model, merged, ids = trained("llama", "nora", True, llama, None)
    assert type(merged).__name__ == "NoraLlamaForCausalLM"
    merged.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling_nora.NoraLlamaConfig",
        "AutoModelForCausalLM": "modeling_nora.NoraLlamaForCausalLM",
    }
    meta = config["nora_merged"]
    assert meta["base_model_type"] == "llama" and meta["base_architecture"] == "LlamaForCausalLM"
    assert sorted(meta["layers"]) == [f"model.layers.{i}.mlp.act_fn" for i in range(3)]
    layer = meta["layers"]["model.layers.0.mlp.act_fn"]
    assert layer["residual"] is True and layer["original"] == "silu"
    assert layer["shapes"]["fit_numerator"] == [layer["groups"], 6]
    # a folder loaded back saves the same folder again (the class nora.from_pretrained returns is the merged one)
    loaded = nora.from_pretrained(tmp_path)
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["nora_merged"] == meta and again["model_type"] == "nora_llama"
    with torch.no_grad():
        assert torch.equal(nora.from_pretrained(tmp_path / "again")(ids).logits, loaded(ids).logits)


def test_format_1_merged_folder_still_loads(llama, tmp_path):
    """A folder nora wrote before format 2 (a plain checkpoint with nora_merged.json and nora_merged.safetensors
    beside it) loads with nora.from_pretrained, with its outputs."""
    from safetensors.torch import save_file

    model, merged, ids = trained("llama", "nora", True, llama, None)
    rationals = rational_modules(merged)
    state = {k: v for k, v in merged.state_dict().items() if not k.startswith(tuple(f"{n}." for n in rationals))}
    type(merged).__bases__[0].save_pretrained(merged, str(tmp_path), state_dict=state)
    save_file(
        {f"{n}.{k}": t.contiguous() for n, m in rationals.items() for k, t in m.state_dict().items()},
        str(tmp_path / "nora_merged.safetensors"),
    )
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
    (tmp_path / "nora_merged.json").write_text(json.dumps({"format_version": 1, "layers": layers}))
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    config.pop("nora_merged", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = nora.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, merged(ids).logits)


def test_merged_vision_model_is_refused_by_save_merged_with_the_alternative(vit, tmp_path):
    _, merged, _ = trained("vit", "nora", True, None, vit)
    with pytest.raises(nora.AdapterError, match="no save_pretrained"):
        nora.save_merged(merged, tmp_path)


def test_legacy_torchscript_onnx_exporter_too(vit, tmp_path):
    """torch.onnx.export(dynamo=False), the TorchScript-based exporter, also gets the plain math (a trained NoRA ViT in
    the default form)."""
    model, merged, x = trained("vit", "nora", True, None, vit)
    with torch.no_grad():
        want = model(x).numpy()
    path = tmp_path / "legacy.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert rel_diff(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], want) <= ONNX_REL


def test_a_pickled_merged_model_loads_in_a_fresh_process(llama, tmp_path):
    """torch.save of a merged model (its class made by nora.merge_nora) and torch.load in a process that merged
    nothing: the class is made again on first access, the logits are the same."""
    model, merged, ids = trained("llama", "nora", True, llama, None)
    torch.save({"model": merged, "ids": ids}, tmp_path / "m.pt")
    with torch.no_grad():
        want = merged(ids).logits
    torch.save(want, tmp_path / "want.pt")
    code = (
        "import sys, torch\nd = torch.load(sys.argv[1], weights_only=False)\n"
        "with torch.no_grad():\n    got = d['model'](d['ids']).logits\n"
        "print(type(d['model']).__name__, torch.equal(got, torch.load(sys.argv[2])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.pt"), str(tmp_path / "want.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["NoraLlamaForCausalLM", "True"]
