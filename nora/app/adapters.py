"""A training run's adapter directory: writing what a method trained (:func:`save_adapter`), finding it
(:func:`find_adapter_dir`, :func:`resolve_adapter`, which also takes a Hub id), what it holds
(:func:`adapter_identity`) and loading it onto a fresh base model (:func:`apply_adapter`).

``<run_dir>/adapter/`` holds peft files (``adapter_config.json``, ``adapter_model.safetensors``): LoRA, DoRA (and a
vision head through ``modules_to_save``), or a NoRA adapter (``peft_type`` ``NORA``: NoRA, and NoRA++ with its LoRA
part, vision or LM, written by :func:`nora.save_nora`; ``peft.PeftModel.from_pretrained`` loads it after ``import
nora``, :func:`nora.load_nora` without peft for NoRA alone); or ``trainable.safetensors`` (full fine-tuning, linear
probe: every trained tensor by parameter name). Runs saved before every NoRA adapter was a peft adapter hold NoRA files
(``nora_config.json``, ``nora_adapter.safetensors``), alone or, for NoRA++, next to peft's LoRA files (marked so that
peft alone refuses them); they still load, through :func:`nora.load_nora`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nora.adapter import AdapterError, load_nora, read_nora_config, read_peft_config, save_nora
from nora.adapter.inject import is_peft_model
from nora.adapter.io import FULL_FT_NAME, NORA_FILES, PEFT_FILES
from nora.adapter.peft_format import read_nora_layers, read_peft_nora_config
from nora.errors import MissingFileError, UserError
from nora.files import atomic_write
from nora.hub import HUB_ID, download_adapter
from nora.methods import get_method
from nora.methods.config import MethodConfig
from nora.runs.layout import RunDir

NORA_KINDS = ("nora", "nora++")  # Method.adapter kinds saved by nora.save_nora
LORA_KINDS = ("lora", "dora")  # peft's LoRA files
TRAINABLE_KINDS = ("trainable", "peft")  # saved as trainable.safetensors (next to peft's files for "peft")


def save_adapter(model, method_cfg: MethodConfig, directory: Path) -> None:
    """Write what the method trained into ``directory``, as its registry entry says (``Method.adapter``): a NoRA
    adapter (NoRA, NoRA++) through the one NoRA writer (:func:`nora.save_nora`: one NORA peft adapter), LoRA/DoRA
    through peft's ``save_pretrained``, the other peft methods (IA3, VeRA, LN tuning) through it too and, like full
    fine-tuning and the linear probe, every trained tensor by parameter name (``trainable.safetensors``, the head
    included)."""
    directory.mkdir(parents=True, exist_ok=True)
    kind = get_method(method_cfg.name).adapter
    if kind in NORA_KINDS:
        save_nora(model, directory)
        return
    if is_peft_model(model):
        model.save_pretrained(str(directory))
    if kind in TRAINABLE_KINDS:
        state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        atomic_write(directory / FULL_FT_NAME, lambda tmp: save_file(state, str(tmp)))


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """The directory holding a run's adapter files: ``path/adapter`` if it has them, else ``path``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MissingFileError(f"adapter or run directory not found: {p}")
    for cand in (RunDir(p).adapter, p):
        if cand.is_dir() and any((cand / f).exists() for f in (PEFT_FILES[0], NORA_FILES[0], FULL_FT_NAME)):
            return cand
    raise MissingFileError(
        f"no adapter found in {p} or {p / 'adapter'}: expected peft files ({', '.join(PEFT_FILES)}) and/or NoRA "
        f"files ({', '.join(NORA_FILES)}) or {FULL_FT_NAME}, as a training run saves them in <run_dir>/adapter/"
    )


def resolve_adapter(source: str | os.PathLike, revision: str | None = None) -> Path:
    """The adapter directory of ``source``: a local run or adapter directory (see :func:`find_adapter_dir`), else
    a Hub repository id (``owner/name``, as :func:`nora.app.publish.push_to_hub` writes it), downloaded once."""
    if Path(source).expanduser().exists() or not HUB_ID.match(str(source)):
        return find_adapter_dir(source)
    return find_adapter_dir(download_adapter(str(source), revision=revision))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def adapter_identity(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """What an adapter directory holds, JSON-able::

    {"dir", "kind": "lora" | "dora" | "<peft type>" | "nora" | "nora++" | "trainable",
     "components": [...], "peft": {peft_type, use_dora, r, lora_alpha, target_modules, config} | None,
     "nora": {variant, config, layers} | None, "files": {name: sha256}}
    """
    adir = Path(adapter_dir)
    has_peft, has_nora = (adir / PEFT_FILES[0]).exists(), (adir / NORA_FILES[0]).exists()
    for present, files in ((has_peft, PEFT_FILES), (has_nora, NORA_FILES)):
        missing = [f for f in files if present and not (adir / f).exists()]
        if missing:
            raise MissingFileError(f"incomplete adapter in {adir}: {', '.join(missing)} missing next to {files[0]}")
    ident: dict[str, Any] = {"dir": str(adir.resolve()), "components": [], "peft": None, "nora": None, "files": {}}
    nora_peft = read_peft_nora_config(adir) if has_peft else None
    if nora_peft is not None:
        _nora_peft_identity(ident, adir, nora_peft)
    elif has_peft:
        pcfg = read_peft_config(adir)  # a NoRA++ marker undone: the real peft_type
        ident["components"].append("dora" if pcfg.get("use_dora") else str(pcfg.get("peft_type", "peft")).lower())
        ident["peft"] = {
            "peft_type": pcfg.get("peft_type"),
            "use_dora": bool(pcfg.get("use_dora", False)),
            "r": pcfg.get("r"),
            "lora_alpha": pcfg.get("lora_alpha"),
            "target_modules": pcfg.get("target_modules"),
            "config": pcfg,
        }
    if has_nora:
        meta = read_nora_config(adir)
        ident["components"].append("nora")
        ident["nora"] = {
            "variant": meta.get("config", {}).get("variant"),
            "config": meta.get("config"),
            "layers": len(meta.get("layers", {})),
        }
    if not has_peft and not has_nora:
        if not (adir / FULL_FT_NAME).exists():
            raise MissingFileError(
                f"no adapter in {adir}: expected peft files ({', '.join(PEFT_FILES)}), NoRA "
                f"files ({', '.join(NORA_FILES)}) or {FULL_FT_NAME}, as a completed training run "
                "writes them"
            )
        ident["components"].append("trainable")
    if nora_peft is not None:
        ident["kind"] = "nora++" if nora_peft.get("lora_r") else "nora"
    else:
        ident["kind"] = "nora++" if has_peft and has_nora else ident["components"][0]
    for f in (*PEFT_FILES, *NORA_FILES, FULL_FT_NAME):
        if (adir / f).exists():
            ident["files"][f] = _sha256(adir / f)
    return ident


def _check_safetensors(path: Path) -> None:
    """One line naming ``path`` when its safetensors header does not parse or promises more bytes than the file has
    (truncated, overwritten); reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # noqa: BLE001  safetensors raises its own SafetensorError
        raise AdapterError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); the file is "
            "truncated or damaged: copy the adapter again or retrain the run (force=true)"
        ) from None


def _nora_peft_identity(ident: dict, adir: Path, pcfg: dict) -> None:
    """A NORA peft adapter: its LoRA part (if ``lora_r > 0``) and its NoRA part, as the two-part format reports them."""
    if pcfg.get("lora_r"):
        ident["components"].append("dora" if pcfg.get("use_dora") else "lora")
        ident["peft"] = {
            "peft_type": pcfg["peft_type"],
            "use_dora": bool(pcfg.get("use_dora", False)),
            "r": pcfg["lora_r"],
            "lora_alpha": pcfg.get("lora_alpha"),
            "target_modules": pcfg.get("lora_target_modules"),
            "config": pcfg,
        }
    ident["components"].append("nora")
    nora_fields = (
        "variant",
        "r",
        "alpha",
        "groups",
        "degrees",
        "form",
        "numerator",
        "init",
        "fit_range",
        "calibration_range_weight",
        "per_group_calibration",
        "target_modules",
        "backend",
    )
    ident["nora"] = {
        "variant": pcfg.get("variant"),
        "config": {k: pcfg.get(k) for k in nora_fields},
        "layers": len(read_nora_layers(adir)),
    }


def apply_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load the adapter files in ``adapter_dir`` onto a fresh base ``model``; returns ``(model, identity)``
    with the model frozen and in eval mode (see :func:`adapter_identity`)."""
    adir = Path(adapter_dir)
    ident = adapter_identity(adir)
    for name in ident["files"]:  # peft's and torch's loaders would raise their own errors on a cut file
        if name.endswith(".safetensors"):
            _check_safetensors(adir / name)
    if "nora" in ident["components"]:  # NoRA alone in place, NoRA++ through peft; every layout nora wrote
        model = load_nora(model, adir)
    elif ident["peft"] is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adir), is_trainable=False)
    else:
        state = load_file(str(adir / FULL_FT_NAME))
        own = dict(model.named_parameters())
        unknown = [k for k in state if k not in own]
        if unknown:
            raise UserError(f"{adir / FULL_FT_NAME} holds tensors this model does not have: {unknown[:4]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
    model.requires_grad_(False)
    model.eval()
    return model, ident


def adapter_record(identity: dict) -> dict:
    """What ``summary.json`` records of the adapter a run saved (its ``"adapter"`` entry): kind, components and
    each file's sha256, so that a reload can tell the run's own adapter from one put in its place."""
    return {"kind": identity["kind"], "components": list(identity["components"]), "files": dict(identity["files"])}


def _expected_kind(method) -> str | None:
    """The adapter kind a run's method (a ``method`` config section or :class:`MethodConfig`) saves: its registry
    entry's ``adapter`` (:mod:`nora.methods.registry`), or None where only the absence of LoRA, DoRA and NoRA is
    checked (``trainable.safetensors``, peft tuners other than LoRA; see :func:`adapter_mismatch`)."""
    kind = get_method(method.name).adapter
    if kind in LORA_KINDS:  # peft's LoRA files say DoRA whenever the config's use_dora does
        return "dora" if method.lora.use_dora else "lora"
    return None if kind in TRAINABLE_KINDS else kind


def adapter_mismatch(identity: dict, method, recorded: dict | None) -> str | None:
    """Why the adapter ``identity`` (:func:`adapter_identity`) is not the one a run with ``method`` saved, or None.

    The method fixes the kind (``nora_pp``: LoRA and NoRA, ``lora``: LoRA only, ...); ``recorded``, the run's
    :func:`adapter_record` in ``summary.json`` (absent in runs saved before it was recorded), fixes each file's
    content: an adapter of another run or model put in its place (LLaMA-3-8B, Mistral-7B and Qwen2-7B share LoRA
    shapes, so loading alone would not notice) is refused."""
    adir, kind, name = Path(identity["dir"]), identity["kind"], method.name
    want = _expected_kind(method)
    if want is None and ({"nora", "lora", "dora"} & set(identity["components"])):
        return f"{adir} holds a {kind} adapter, but method={name} saves none of LoRA, DoRA or NoRA"
    if want is not None and kind != want:
        return f"{adir} holds a {kind} adapter, but method={name} saves a {want} adapter"
    if recorded:
        if recorded.get("kind") not in (None, kind):
            return f"{adir} holds a {kind} adapter, but summary.json records a {recorded['kind']} adapter"
        files, have = recorded.get("files") or {}, identity["files"]
        for f in sorted(set(files) | set(have)):
            if files.get(f) != have.get(f):
                if f not in have:
                    return f"{adir / f} is missing (summary.json records it)"
                if f not in files:
                    return f"{adir / f} is not part of the adapter this run saved (summary.json does not record it)"
                return (
                    f"{adir / f} is not the file this run saved (sha256 {have[f][:12]}..., summary.json records "
                    f"{files[f][:12]}...)"
                )
    return None


def check_adapter(adapter_dir: Path, method, recorded: dict | None) -> dict:
    """:func:`adapter_identity` of a run's ``adapter_dir``, after checking it is the adapter the run saved
    (:func:`adapter_mismatch`); :class:`UserError` (one line naming the file and the way out) when it is not."""
    identity = adapter_identity(adapter_dir)
    why = adapter_mismatch(identity, method, recorded)
    if why is not None:
        raise UserError(f"{why}; not loading it: restore the run's own adapter, or retrain the run (force=true)")
    return identity
