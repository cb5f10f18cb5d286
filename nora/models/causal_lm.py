"""Hugging Face decoder LMs with a SwiGLU MLP (LLaMA, Qwen2, Mistral): pretrained or random-initialised.

``build_causal_lm(model_cfg) -> (model, tokenizer)`` reads a ``configs/model/*.yaml`` of family ``causal_lm``:

=========================  ==========================================================================
``hf_name``                hub id of the weights and tokenizer (e.g. ``meta-llama/Meta-Llama-3-8B``)
``path``                   a local directory with the weights and tokenizer (``save_pretrained`` or
                           ``hf download ... --local-dir``); overrides ``hf_name``
``revision``               hub revision (branch, tag or commit); null: the default branch
``gated``                  the hub repo needs an accepted licence and a token (only shapes the error)
``random_init``            build from ``arch`` + ``config`` with random weights (tests, smoke runs)
``arch``, ``config``       ``llama`` | ``qwen2`` | ``mistral`` and the ``*Config`` fields (random_init)
``init_seed``              seed of the random initialisation (a rebuilt base model is identical)
``tokenizer``              null: the one next to the weights; ``offline``: the byte-level BPE built
                           here (:func:`nora.models.tokenizer.build_offline_tokenizer`); or a hub id/dir
``dtype``                  weights dtype: ``bfloat16`` | ``float16`` | ``float32``
``attn_implementation``    ``sdpa`` (default) | ``eager`` | ``flash_attention_2``
``gradient_checkpointing`` recompute each decoder layer in backward (non-reentrant)
=========================  ==========================================================================

The token for gated repos comes from the environment (``HF_TOKEN``) or huggingface_hub's own login cache
(``hf auth login``), never from a file in this repository. A model that cannot be loaded (no token,
no access, offline without a cached copy, wrong ``path``) ends in one :class:`~nora.errors.UserError` line
saying to set ``HF_TOKEN`` or where to put the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nora import hub
from nora.errors import UserError
from nora.models.config import CausalLMModelConfig, ModelFamily, as_model_config, register_family
from nora.models.tokenizer import build_offline_tokenizer

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name or "float32").lower().replace("torch.", "")
    if key not in DTYPES:
        raise UserError(f"model.dtype={name!r}; valid: bfloat16, float16, float32")
    return DTYPES[key]


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _source(model_cfg) -> tuple[str, bool]:
    """``(what to pass to from_pretrained, is_local)``."""
    path = model_cfg.path
    if path:
        p = Path(str(path)).expanduser()
        if not p.is_dir():
            raise UserError(
                f"model.path={path}: no such directory; point it at a folder holding config.json, the "
                "weights (*.safetensors) and the tokenizer files"
            )
        if not (p / "config.json").exists():
            raise UserError(
                f"model.path={path} holds no config.json; point it at a folder written by "
                f"save_pretrained or `hf download {model_cfg.hf_name or '<repo>'} "
                "--local-dir <dir>`"
            )
        return str(p), True
    name = model_cfg.hf_name
    if not name:
        raise UserError(f"model={model_cfg.name}: set model.hf_name (hub id) or model.path (local weights)")
    return str(name), False


def _load_error(model_cfg, source: str, what: str, exc: Exception) -> UserError:
    """One line: what failed, why (offline / token / access / missing), and the two ways out."""
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    kind = type(exc).__name__
    low = (kind + " " + str(exc)).lower()
    token = _token()
    name = model_cfg.hf_name or source
    gated = model_cfg.gated
    if hub.offline():
        why = "offline (the hub is unreachable or HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache"
    elif any(w in low for w in ("gated", "401", "403", "unauthorized", "authenticat", "restricted")):
        why = "the repository is gated and " + (
            f"the HF_TOKEN in the environment has no access (accept the licence at https://huggingface.co/{name})"
            if token
            else "no HF_TOKEN is set in the environment"
        )
    elif any(w in low for w in ("not found", "404", "does not appear", "is not a local folder")):
        why = "no such repository or file"
    else:
        why = "it could not be loaded"
    fix = (
        f"set HF_TOKEN=<a token with access to {name}> in the environment"
        + (f" (accept the licence at https://huggingface.co/{name} first)" if gated else "")
        + f", or download the weights where there is network (`hf download {name} --local-dir "
        "<dir>`) and pass model.path=<dir>"
    )
    return UserError(f"model={model_cfg.name}: could not load the {what} of {source}: {why} [{kind}: {text}]; {fix}")


def build_tokenizer(model_cfg):
    """The tokenizer a model config names (see the module docstring)."""
    model_cfg = as_model_config(model_cfg)
    spec = model_cfg.tokenizer
    if spec == "offline":
        return build_offline_tokenizer(**dict(model_cfg.tokenizer_kwargs or {}))
    from transformers import AutoTokenizer

    if spec:
        source, local = str(spec), Path(str(spec)).expanduser().is_dir()
    else:
        source, local = _source(model_cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=None if local else model_cfg.revision, token=None if local else _token()
        )
    except Exception as exc:  # noqa: BLE001  hub/IO errors of many kinds: one message
        raise _load_error(model_cfg, source, "tokenizer", exc) from None
    return tok


def _random_model(model_cfg, tokenizer, dtype: torch.dtype, attn: str):
    import transformers

    arch = model_cfg.arch
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[arch]
    cfg_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    kwargs = dict(model_cfg.config)
    kwargs.setdefault("vocab_size", len(tokenizer))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kwargs.setdefault(k, getattr(tokenizer, k, None))
    config = cfg_cls(**kwargs)
    config._attn_implementation = attn
    # the same weights every time (a rebuilt base model must match the one that was trained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.init_seed)
        model = model_cls(config)
    return model.to(dtype)


def build_causal_lm(model_cfg: CausalLMModelConfig, tokenizer=None, device: torch.device | str | None = None):
    """``(model, tokenizer)`` for a ``causal_lm`` model config (see the module docstring).

    The model is in ``model.dtype``, in train mode, with ``use_cache`` off (training), SDPA attention unless
    configured otherwise, and gradient checkpointing if ``gradient_checkpointing``. Pretrained weights are
    loaded straight onto ``device`` when it is a GPU (each rank's own; no full copy in host memory per rank),
    else onto the CPU."""
    model_cfg = as_model_config(model_cfg)
    dtype = resolve_dtype(model_cfg.dtype)
    attn = model_cfg.attn_implementation or "sdpa"
    if tokenizer is None:
        tokenizer = build_tokenizer(model_cfg)
    if model_cfg.random_init:
        model = _random_model(model_cfg, tokenizer, dtype, attn)
    else:
        from transformers import AutoModelForCausalLM

        source, local = _source(model_cfg)
        place = {}
        if device is not None and torch.device(device).type == "cuda":
            dev = torch.device(device)
            place = {"device_map": {"": f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"}}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=dtype,
                attn_implementation=attn,
                revision=None if local else model_cfg.revision,
                token=None if local else _token(),
                low_cpu_mem_usage=True,
                **place,
            )
        except Exception as exc:  # noqa: BLE001
            raise _load_error(model_cfg, source, "weights", exc) from None
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, tokenizer


CAUSAL_LM = register_family(
    ModelFamily(
        "causal_lm",
        CausalLMModelConfig,
        lambda model_cfg, num_classes=None: build_causal_lm(model_cfg),
        classifier=False,
        language_model=True,
        peft_task_type="CAUSAL_LM",
    )
)
