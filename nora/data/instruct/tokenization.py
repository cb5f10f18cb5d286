"""Tokenisation with response-only labels: prompt/response boundary, BOS/EOS, truncation, tokenizer fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from nora.data.instruct.config import DataError
from nora.data.instruct.templates import render_example

IGNORE_INDEX = -100


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before the text by itself (LLaMA-3: ``[<|begin_of_text|>]``)."""
    with_special = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            return with_special[:i]
    return []


def assemble(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    *,
    prefix: Sequence[int],
    eos_id: int,
    max_length: int,
    min_response_tokens: int = 64,
) -> dict:
    """Join ``prefix + prompt``, ``response + [eos]``; mask the prompt; truncate to ``max_length``.

    Returns ``input_ids``, ``labels``, ``truncated``, ``prompt_truncated`` (see the module docstring)."""
    prompt, prefix = list(prompt_ids), list(prefix)
    if prefix and prompt[: len(prefix)] != prefix:
        prompt = prefix + prompt
    head = len(prefix) if prefix and prompt[: len(prefix)] == prefix else 0  # kept when the prompt is cut
    target = list(response_ids) + [int(eos_id)]
    truncated = prompt_truncated = False
    if len(prompt) + len(target) > max_length:
        truncated = True
        need = min(min_response_tokens, len(target))
        budget = max_length - len(prompt)
        if budget >= need:
            target = target[:budget]
        else:
            prompt_truncated = True
            keep_r = min(need, max(max_length - head, 0))
            keep_p = max_length - keep_r
            tail = keep_p - min(head, keep_p)
            prompt = prompt[: min(head, keep_p)] + (prompt[len(prompt) - tail :] if tail > 0 else [])
            target = target[:keep_r]
    return {
        "input_ids": prompt + target,
        "labels": [IGNORE_INDEX] * len(prompt) + target,
        "truncated": truncated,
        "prompt_truncated": prompt_truncated,
    }


def encode_examples(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int,
    min_response_tokens: int = 64,
    prefix: Sequence[int] | None = None,
) -> dict[str, list]:
    """Tokenise a batch of (prompt, response) pairs into ``input_ids``/``labels`` and per-example flags
    (``length``, ``n_supervised``, ``truncated``, ``prompt_truncated``, ``boundary_fallback``)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token; responses must end with one"
        )
    prefix = special_prefix(tokenizer) if prefix is None else list(prefix)
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    f_ids = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=False)["input_ids"]
    r_ids, fallback = [], []
    for p, f in zip(p_ids, f_ids):
        ok = list(f[: len(p)]) == list(p)
        r_ids.append(list(f[len(p) :]) if ok else None)
        fallback.append(not ok)
    todo = [i for i, r in enumerate(r_ids) if r is None]
    if todo:
        sep = tokenizer([responses[i] for i in todo], add_special_tokens=False)["input_ids"]
        for i, ids in zip(todo, sep):
            r_ids[i] = list(ids)
    out: dict[str, list] = {
        k: []
        for k in ("input_ids", "labels", "length", "n_supervised", "truncated", "prompt_truncated", "boundary_fallback")
    }
    for p, r, fb in zip(p_ids, r_ids, fallback):
        ex = assemble(
            p, r, prefix=prefix, eos_id=eos_id, max_length=max_length, min_response_tokens=min_response_tokens
        )
        out["input_ids"].append(ex["input_ids"])
        out["labels"].append(ex["labels"])
        out["length"].append(len(ex["input_ids"]))
        out["n_supervised"].append(sum(1 for t in ex["labels"] if t != IGNORE_INDEX))
        out["truncated"].append(ex["truncated"])
        out["prompt_truncated"].append(ex["prompt_truncated"])
        out["boundary_fallback"].append(fb)
    return out


def tokenize_batch(
    batch: dict,
    *,
    tokenizer,
    name: str,
    template: str,
    use_chat: bool,
    max_length: int,
    min_response_tokens: int,
    prefix: list[int],
) -> dict:
    n = len(next(iter(batch.values())))
    pairs = [render_example({k: batch[k][i] for k in batch}, name, template, tokenizer, use_chat) for i in range(n)]
    return encode_examples(
        tokenizer,
        [p for p, _ in pairs],
        [r for _, r in pairs],
        max_length=max_length,
        min_response_tokens=min_response_tokens,
        prefix=prefix,
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything in a tokenizer that changes token ids: class, name, vocabulary and merges,
    normaliser/pre-tokeniser/post-processor, special tokens and chat template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        getattr(tokenizer, "chat_template", None),
    ]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()
