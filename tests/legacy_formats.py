"""Adapter folders in the layouts nora wrote before every NoRA adapter was one peft adapter (issue 31), written here by
those layouts' rules (nora no longer writes them, and must keep reading them):

* NoRA alone: ``nora_config.json`` (``format_version`` 1, the NoraConfig, per activation its groups, form, degrees,
  width, layout, variant, original, ...) + ``nora_adapter.safetensors`` (each activation's tensors and each
  ``trainable_modules`` module's, keyed by canonical module name);
* the two-part NoRA++: peft's LoRA/DoRA files (``model.save_pretrained``) next to those two, ``adapter_config.json``
  marked: its ``peft_type`` replaced by :data:`NORA_PP_PEFT_TYPE` (the real one under ``nora_peft_type``), so that
  peft alone refuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from nora.adapter.discover import activation_layout, is_peft_model, module_index, resolve_name
from nora.adapter.inject import get_nora_config, nora_modules, trainable_module_names
from nora.adapter.io import canonical_state

# the text the two-part writer put in place of peft_type (peft's KeyError prints it)
NORA_PP_PEFT_TYPE = (
    "NORA++ adapter (peft LoRA/DoRA + NoRA activations): peft alone would load only the LoRA "
    "half; load it with nora.load_nora_pp(base_model, dir), or evaluate it with lm_eval's "
    "`nora` model (python -m nora.integrations.lm_eval --model nora ...)"
)


def write_nora_files(model, directory) -> Path:
    """``nora_config.json`` + ``nora_adapter.safetensors`` of ``model``'s NoRA adapter (the earlier ``save_nora``)."""
    directory = Path(directory)
    config, mods, index = get_nora_config(model), nora_modules(model), module_index(model)
    assert config is not None and mods
    directory.mkdir(parents=True, exist_ok=True)
    tensors, layers = {}, {}
    for name, mod in mods.items():
        for k, t in mod.state_dict().items():
            tensors[f"{name}.{k}"] = t.detach().cpu().contiguous()
        layers[name] = {
            "groups": mod.groups,
            "form": mod.form,
            "degrees": list(mod.degrees),
            "width": mod.width if mod.width is not None else activation_layout(model, name, index).width,
            "channel_dim": mod.channel_dim,
            "variant": mod.variant,
            "original": mod.original,
            "r": mod.r,
            "alpha": mod.alpha,
            "numerator_mode": mod.numerator_mode,
            "fit_range": mod.fit_range,
            "residual": mod.residual,
            "shared_base_numerator": mod.base_numerator.shape[0] == 1,
        }
    extra = trainable_module_names(model, config)
    for name in extra:
        for k, t in canonical_state(model, model.get_submodule(resolve_name(model, name, index))).items():
            tensors[f"{name}.{k}"] = t.detach().cpu().contiguous()
    meta = {"format_version": 1, "config": config.to_dict(), "layers": layers, "trainable_modules": extra}
    save_file(tensors, str(directory / "nora_adapter.safetensors"), metadata={"format": "pt"})
    (directory / "nora_config.json").write_text(json.dumps(meta, indent=2))
    return directory


def write_two_part(model, directory) -> Path:
    """The two-part NoRA++ of a peft-wrapped (LoRA/DoRA) model with NoRA (the earlier ``nora.adapter.io.save_nora_pp``,
    and what ``nora.app.adapters.save_adapter`` wrote): peft's files, marked, next to the NoRA files."""
    assert is_peft_model(model)
    directory = Path(directory)
    model.save_pretrained(str(directory))
    write_nora_files(model, directory)
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["nora_peft_type"], cfg["peft_type"] = cfg["peft_type"], NORA_PP_PEFT_TYPE
    path.write_text(json.dumps(cfg, indent=2))
    return directory
