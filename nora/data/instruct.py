"""Instruction-tuning data for causal LMs: Alpaca and OpenOrca, prompt templates, response-only labels,
cached tokenisation, length-grouped batching and optional packing.

Public API (see each docstring)::

    cfg = InstructDataConfig.from_dict({"name": "alpaca", "path": "alpaca_data.json", "max_length": 512})
    train, val, stats = build_instruct_datasets(cfg, tokenizer)      # val is None when val_size == 0
    sampler = LengthGroupedBatchSampler(train.lengths, batch_size=8, seed=0, num_replicas=ws, rank=rk)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler,
                                         collate_fn=InstructCollator.from_tokenizer(tokenizer, pad_to_multiple_of=8))
    sampler.set_epoch(epoch); sampler.set_start(k)                   # exact resume at batch k of the epoch
    n_tokens, n_supervised = tokens_in_batch(batch)                   # for tokens/s logging

``build_dataloader(dataset, cfg, tokenizer, batch_size, ...)`` wires the three together.

Sources (``InstructDataConfig.name`` / ``path``)
    ``alpaca``: records with string fields ``instruction``, ``input``, ``output`` (hub ``tatsu-lab/alpaca``).
    ``openorca``: records with ``system_prompt``, ``question``, ``response`` (``id`` optional; hub
    ``Open-Orca/OpenOrca``). ``path=None`` loads the hub dataset through ``datasets.load_dataset`` (the token,
    if the dataset is gated, comes from ``HF_TOKEN`` in the environment). ``path`` may be a ``.json`` file (a
    JSON list of records, as ``alpaca_data.json``), a ``.jsonl`` file, a ``.parquet`` file, or a directory:
    either one written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split`` picks
    the split) or one holding ``.json``/``.jsonl``/``.parquet`` files (searched recursively, hidden folders
    skipped; when file paths name splits such as ``train``/``test``, only those naming ``split`` are read,
    e.g. a ``hf download --repo-type dataset`` snapshot). Each file is loaded with the
    ``datasets`` json/parquet builders and checked on its own: a file lacking a field raises
    :class:`DataError` naming the file, the missing field(s) and the expected ones. Extra fields (Alpaca's
    ``text``, OpenOrca's ``id``) are ignored; ``null`` values read as empty strings.

Subset (``subset_size``, default 100,000; ``None`` = everything)
    Applied before tokenisation when the source has more rows. ``subset_strategy="shuffle"`` (default) takes
    a seeded random sample (``numpy.random.default_rng(seed)``), kept in file order, so a subset of OpenOrca
    mixes its GPT-4 and GPT-3.5 parts instead of being all of the first file; ``"first"`` takes the first N
    rows. The held-out validation rows (``val_size``: a count, or a fraction in (0, 1)) are then drawn from
    the selected rows with ``default_rng([seed, 1])``. Both depend only on ``seed`` and the data, not on
    the training seed. Alpaca (52,002 rows) is below the default subset size and is used whole.

Templates (``template``: ``alpaca`` | ``chat``; default ``alpaca`` for Alpaca, ``chat`` for OpenOrca)
    ``alpaca``: the Stanford Alpaca prompts (:data:`ALPACA_PROMPT_INPUT` when ``input`` is non-empty, else
    :data:`ALPACA_PROMPT_NO_INPUT`) in the form usually quoted from the Alpaca README, ending in
    ``"### Response:\\n"`` (the repository's ``train.py`` omits that last newline). An OpenOrca record under
    this template uses ``system_prompt + "\\n\\n" + question`` as the instruction (just ``question`` when the
    system prompt is empty) and no input.
    ``chat``: the tokenizer's own ``chat_template`` when it has one (and ``use_tokenizer_chat_template``),
    rendered with a system message (only when the system prompt is non-empty; merged into the user turn if
    the template rejects a system role), the user message and ``add_generation_prompt=True``; otherwise the
    plain-text :data:`CHAT_PROMPT` (``"### System:\\n{system_prompt}\\n\\n### User:\\n{question}\\n\\n###
    Assistant:\\n"``, the System block left out when the system prompt is empty). An Alpaca record under this
    template uses ``instruction`` (plus ``"\\n\\n" + input`` when non-empty) as the user message.
    The response follows the prompt and is followed by the tokenizer's EOS token. BOS is whatever the
    tokenizer adds itself (found by comparing ``tokenizer("x")`` with ``add_special_tokens`` on and off),
    not added twice when a chat template already writes it.

Prompt/response boundary
    The prompt is tokenised alone and prompt+response jointly (``add_special_tokens=False``). When the
    prompt's tokens are a prefix of the joint tokens (always so for byte-level BPE tokenizers such as LLaMA-3's
    and GPT-2's, whose pre-tokenizers split after the newline that ends every template), the response
    tokens are the rest of the joint tokenisation: exactly the tokens the model sees when the whole text is
    tokenised, and they decode to exactly the response text. Otherwise (a BPE merge across the boundary)
    the response is tokenised on its own and concatenated, so no prompt token is ever supervised; such
    examples are counted in ``stats["num_boundary_fallback"]``. Labels are ``-100`` on the prompt (BOS
    included) and on padding; the loss covers the response tokens and the EOS.

Truncation (``max_length``, default 512; ``min_response_tokens``, default 64)
    An example longer than ``max_length`` is truncated, never dropped silently: if the whole prompt fits with
    at least ``min(min_response_tokens, response length + 1)`` response tokens, the end of the response is
    cut (the EOS goes with it: a cut response is not taught to stop there); otherwise the prompt is cut from
    the left (the BOS kept, so the ``### Response:`` header next to the answer survives) to make room for
    that many response tokens. Counts: ``num_truncated`` (all truncated examples) and
    ``num_prompt_truncated`` (those whose prompt was cut) on each dataset object and in ``stats``, and a
    ``logging.info`` line per call. An example left with no supervised token (only possible when
    ``max_length`` is no longer than the BOS prefix) is dropped and counted in ``num_dropped``.

Cache (``cache_dir``, default ``$NORA_CACHE_DIR/instruct`` or ``~/.cache/nora/instruct``)
    Tokenised train/val splits are written once with ``save_to_disk`` under a directory named by a hash of:
    the source fingerprint (for local files their names, sizes, modification times and content hash
    (head and tail for files over 256 MiB); for the hub the ``datasets`` fingerprint), the dataset name,
    split, subset and validation settings, seed, template, max length, and the tokenizer (class,
    ``name_or_path``, a hash of its full ``tokenizer.json``, special token ids and chat template). A second
    call with the same inputs loads it (memory-mapped) without tokenising (``stats["cache_hit"]``); building
    is guarded by a file lock, so ranks started together tokenise once (about 1,400 Alpaca examples/s on 2
    CPU cores with the test tokenizer: each example is tokenised twice, prompt alone and prompt+response).
    Raw local files are read through the ``datasets`` builders with their arrow cache under ``<cache_dir>/hf``.

Batching
    :class:`InstructCollator` pads to the longest sequence in the batch (optionally to a multiple of 8):
    pad id in ``input_ids``, 0 in ``attention_mask``, -100 in ``labels``. :class:`LengthGroupedBatchSampler`
    groups examples of similar length (as in Hugging Face's ``group_by_length``: random "mega-batches" of
    ``mega_batch_mult`` global batches are sorted by length and cut into batches whose order is shuffled),
    deterministic in ``(seed, epoch)``, resumable at any batch, and split across ranks. On a synthetic
    Alpaca-like length distribution (log-normal, median 120 tokens, clipped to [16, 512], 20,000 examples,
    batch 16) the share of pad tokens is 59.2% for random batches and 3.1% length-grouped with the default
    ``mega_batch_mult=50`` (5.3% with ``pad_to_multiple_of=8``; 0.9% with ``mega_batch_mult=200``, 0.1% when
    the whole epoch is sorted); see ``tests/test_instruct_data.py::test_padding_waste``.
    Packing (``packing=True``) is optional: examples are packed into rows of at most ``max_length`` tokens
    (best-fit decreasing, deterministic); each row carries ``position_ids`` that restart at 0 for every
    example, and the collator concatenates a batch's rows into a single padding-free row without an
    ``attention_mask``. Hugging Face LLaMA models (SDPA/eager: block-diagonal causal mask derived from the
    ``position_ids``; FlashAttention-2: variable-length kernels) then keep attention inside each example,
    provided the model is called without a KV cache (``use_cache=False``, as in training); the test checks the
    logits against unpacked forward passes. Labels of each example are masked as above, so no token is
    trained to predict the next example. Length grouping is the default.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from nora.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CACHE_VERSION = 1  # bump when the tokenised format or the tokenisation rules change

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
CHAT_PROMPT = "### System:\n{system_prompt}\n\n### User:\n{question}\n\n### Assistant:\n"
CHAT_PROMPT_NO_SYSTEM = "### User:\n{question}\n\n### Assistant:\n"


class DataError(UserError, ValueError):
    """Instruction data that cannot be loaded as configured; the message says what to change."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The configured dataset (local path or hub dataset) is not available."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    hub_name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    template: str
    fmt: str  # how to lay out a local copy (error messages)


_SPECS = {
    "alpaca": _Spec(
        hub_name="tatsu-lab/alpaca", required=("instruction", "input", "output"), optional=("text",),
        template="alpaca",
        fmt="a .json file holding a JSON list of records (as alpaca_data.json from the Stanford Alpaca repo), a "
            ".jsonl file with one record per line, a .parquet file, or a directory of such files or one written "
            "by datasets' save_to_disk; each record has the string fields instruction, input, output (input may "
            "be empty)"),
    "openorca": _Spec(
        hub_name="Open-Orca/OpenOrca", required=("system_prompt", "question", "response"), optional=("id",),
        template="chat",
        fmt="one or more .parquet files (as 1M-GPT4-Augmented.parquet of Open-Orca/OpenOrca), .json/.jsonl files, "
            "or a directory of them or one written by datasets' save_to_disk; each record has the string fields "
            "system_prompt, question, response (system_prompt may be empty; id is optional)"),
}
_EXTS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SPLIT_WORDS = ("train", "test", "validation", "valid", "val", "dev", "eval")


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class InstructDataConfig:
    """What to load and how to tokenise it (the ``dataset=alpaca|openorca`` config group).

    name: ``alpaca`` | ``openorca``. path: local file or directory (None: the hub dataset ``hub_name``,
    default ``tatsu-lab/alpaca`` / ``Open-Orca/OpenOrca``). split: split to read. subset_size: keep at most
    this many rows (None: all), chosen by subset_strategy ``shuffle`` (seeded sample) or ``first``.
    max_length: tokens per example after truncation. min_response_tokens: response tokens kept when the
    prompt alone is too long. val_size: held-out rows for the validation loss (count, or fraction in (0, 1);
    0: no validation set). seed: subset and validation draw. template: ``alpaca`` | ``chat`` (None: the
    dataset's default). use_tokenizer_chat_template: ``chat`` uses the tokenizer's chat template if it has
    one. cache_dir: tokenised cache (None: ``$NORA_CACHE_DIR/instruct`` or ``~/.cache/nora/instruct``).
    packing: pack training examples into rows of max_length (default False: length-grouped batches).
    group_by_length: length-grouped training batches. pad_to_multiple_of: collator padding multiple (None: off).
    mega_batch_mult: global batches per length-sorted group.
    """

    name: str = "alpaca"
    path: str | None = None
    hub_name: str | None = None
    split: str = "train"
    subset_size: int | None = 100_000
    subset_strategy: str = "shuffle"
    max_length: int = 512
    min_response_tokens: int = 64
    val_size: int | float = 1000
    seed: int = 0
    template: str | None = None
    use_tokenizer_chat_template: bool = True
    cache_dir: str | None = None
    packing: bool = False
    group_by_length: bool = True
    pad_to_multiple_of: int | None = 8
    mega_batch_mult: int = 50

    def __post_init__(self):
        def bad(msg: str):
            raise DataError(f"data config: {msg}")

        if self.name not in _SPECS:
            bad(f"name={self.name!r} is not an instruction dataset; choose one of {sorted(_SPECS)}")
        if self.path is not None:
            self.path = str(self.path)
            if self.path.strip() in ("", "null", "None"):
                self.path = None
        if self.template not in (None, "alpaca", "chat"):
            bad(f"template={self.template!r}; choose alpaca or chat (or null for the dataset's default)")
        if self.subset_strategy not in ("shuffle", "first"):
            bad(f"subset_strategy={self.subset_strategy!r}; choose shuffle or first")
        if self.subset_size is not None and int(self.subset_size) <= 0:
            bad(f"subset_size={self.subset_size}; use a positive count or null for all rows")
        if int(self.max_length) < 2:
            bad(f"max_length={self.max_length} is too small")
        if int(self.min_response_tokens) < 1:
            bad(f"min_response_tokens={self.min_response_tokens} must be >= 1")
        v = self.val_size
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (isinstance(v, float) and v >= 1):
            bad(f"val_size={v!r}; use a count (0 for none) or a fraction in (0, 1)")
        if self.pad_to_multiple_of is not None and int(self.pad_to_multiple_of) <= 0:
            self.pad_to_multiple_of = None
        if int(self.mega_batch_mult) < 1:
            bad(f"mega_batch_mult={self.mega_batch_mult} must be >= 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None, ignore: Sequence[str] = (), **overrides
                  ) -> "InstructDataConfig":
        """Build from a mapping (a plain dict or an OmegaConf DictConfig); unknown keys raise :class:`DataError`
        listing the valid ones. Keys in ``ignore`` (e.g. a config group's ``family``) are skipped."""
        try:
            from omegaconf import OmegaConf

            if d is not None and OmegaConf.is_config(d):
                d = OmegaConf.to_container(d, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        d = {**dict(d or {}), **overrides}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in d if k not in valid and k not in ignore)
        if unknown:
            raise DataError(f"data config: unknown key(s) {unknown}; valid keys: {valid}")
        return cls(**{k: v for k, v in d.items() if k in valid})

    @property
    def spec(self) -> _Spec:
        return _SPECS[self.name]

    @property
    def resolved_hub_name(self) -> str:
        return self.hub_name or self.spec.hub_name

    @property
    def resolved_template(self) -> str:
        return self.template or self.spec.template


def default_cache_dir() -> Path:
    from nora.files import cache_dir

    return cache_dir("instruct")


# -------------------------------------------------------------------------------------------- templates
def format_alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (the field's name)
    """The Stanford Alpaca prompt, with or without the input block; the response follows directly."""
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def format_chat_prompt(system_prompt: str, question: str, tokenizer=None,
                       use_tokenizer_chat_template: bool = True) -> str:
    """Chat prompt up to where the assistant's answer starts: the tokenizer's chat template if it has one
    (and ``use_tokenizer_chat_template``), else the plain-text :data:`CHAT_PROMPT`."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if use_tokenizer_chat_template and template:
        user = {"role": "user", "content": question}
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [user]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001  templates without a system role raise; merge it into the user turn
            if not system_prompt:
                raise
            merged = [{"role": "user", "content": f"{system_prompt}\n\n{question}"}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    if system_prompt:
        return CHAT_PROMPT.format(system_prompt=system_prompt, question=question)
    return CHAT_PROMPT_NO_SYSTEM.format(question=question)


def _s(v) -> str:
    return "" if v is None else str(v)


def render_example(record: Mapping[str, Any], name: str, template: str, tokenizer=None,
                   use_tokenizer_chat_template: bool = True) -> tuple[str, str]:
    """``(prompt, response)`` text of one raw record of dataset ``name`` under ``template``."""
    if name == "alpaca":
        system, instruction, inp, response = "", _s(record["instruction"]), _s(record["input"]), _s(record["output"])
    else:
        system, instruction, inp, response = _s(record["system_prompt"]), _s(record["question"]), "", \
            _s(record["response"])
    if template == "alpaca":
        if system:
            instruction = f"{system}\n\n{instruction}"
        return format_alpaca_prompt(instruction, inp), response
    user = f"{instruction}\n\n{inp}" if inp else instruction
    return format_chat_prompt(system, user, tokenizer, use_tokenizer_chat_template), response


# ----------------------------------------------------------------------------------------- tokenisation
def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before the text by itself (LLaMA-3: ``[<|begin_of_text|>]``)."""
    with_special = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return with_special[:i]
    return []


def assemble(prompt_ids: Sequence[int], response_ids: Sequence[int], *, prefix: Sequence[int], eos_id: int,
             max_length: int, min_response_tokens: int = 64) -> dict:
    """Join ``prefix + prompt``, ``response + [eos]``; mask the prompt; truncate to ``max_length``.

    Returns ``input_ids``, ``labels``, ``truncated``, ``prompt_truncated`` (see the module docstring)."""
    prompt, prefix = list(prompt_ids), list(prefix)
    if prefix and prompt[:len(prefix)] != prefix:
        prompt = prefix + prompt
    head = len(prefix) if prefix and prompt[:len(prefix)] == prefix else 0  # kept when the prompt is cut
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
            prompt = prompt[:min(head, keep_p)] + (prompt[len(prompt) - tail:] if tail > 0 else [])
            target = target[:keep_r]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target,
            "truncated": truncated, "prompt_truncated": prompt_truncated}


def encode_examples(tokenizer, prompts: Sequence[str], responses: Sequence[str], *, max_length: int,
                    min_response_tokens: int = 64, prefix: Sequence[int] | None = None) -> dict[str, list]:
    """Tokenise a batch of (prompt, response) pairs into ``input_ids``/``labels`` and per-example flags
    (``length``, ``n_supervised``, ``truncated``, ``prompt_truncated``, ``boundary_fallback``)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token; responses "
                        "must end with one")
    prefix = special_prefix(tokenizer) if prefix is None else list(prefix)
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    f_ids = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=False)["input_ids"]
    r_ids, fallback = [], []
    for p, f in zip(p_ids, f_ids):
        ok = list(f[:len(p)]) == list(p)
        r_ids.append(list(f[len(p):]) if ok else None)
        fallback.append(not ok)
    todo = [i for i, r in enumerate(r_ids) if r is None]
    if todo:
        sep = tokenizer([responses[i] for i in todo], add_special_tokens=False)["input_ids"]
        for i, ids in zip(todo, sep):
            r_ids[i] = list(ids)
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "length", "n_supervised", "truncated",
                                            "prompt_truncated", "boundary_fallback")}
    for p, r, fb in zip(p_ids, r_ids, fallback):
        ex = assemble(p, r, prefix=prefix, eos_id=eos_id, max_length=max_length,
                      min_response_tokens=min_response_tokens)
        out["input_ids"].append(ex["input_ids"])
        out["labels"].append(ex["labels"])
        out["length"].append(len(ex["input_ids"]))
        out["n_supervised"].append(sum(1 for t in ex["labels"] if t != IGNORE_INDEX))
        out["truncated"].append(ex["truncated"])
        out["prompt_truncated"].append(ex["prompt_truncated"])
        out["boundary_fallback"].append(fb)
    return out


def _tokenize_batch(batch: dict, *, tokenizer, name: str, template: str, use_chat: bool, max_length: int,
                    min_response_tokens: int, prefix: list[int]) -> dict:
    n = len(next(iter(batch.values())))
    pairs = [render_example({k: batch[k][i] for k in batch}, name, template, tokenizer, use_chat) for i in range(n)]
    return encode_examples(tokenizer, [p for p, _ in pairs], [r for _, r in pairs], max_length=max_length,
                           min_response_tokens=min_response_tokens, prefix=prefix)


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
    extra = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
             getattr(tokenizer, "chat_template", None)]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ sources
def _format_help(cfg: InstructDataConfig) -> str:
    return (f"Put a local copy on disk and pass data.path=<file or dir>: {cfg.spec.fmt}. To fetch it on a machine "
            f"with Hub access: hf download --repo-type dataset {cfg.resolved_hub_name} --local-dir <dir>")


def _local_files(cfg: InstructDataConfig) -> tuple[str, Path, list[Path]]:
    """``(kind, root, files)``: kind ``saved`` (save_to_disk directory) or ``files``."""
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DataNotFoundError(f"data.path={cfg.path}: no such file or directory. {_format_help(cfg)}")
    if root.is_file():
        if root.suffix.lower() not in _EXTS:
            raise DataError(f"data.path={cfg.path}: unsupported file type {root.suffix!r}; {cfg.spec.fmt}")
        return "files", root, [root]
    if (root / "dataset_dict.json").exists() or ((root / "state.json").exists()
                                                 and (root / "dataset_info.json").exists()):
        return "saved", root, sorted(p for p in root.rglob("*") if p.is_file())
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _EXTS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataNotFoundError(f"data.path={cfg.path}: the directory holds no .json/.jsonl/.parquet files and "
                                f"was not written by save_to_disk. {_format_help(cfg)}")

    def splits_named(p: Path) -> set[str]:
        words = set(re.split(r"[^a-z0-9]+", str(p.relative_to(root)).lower()))
        return {w for w in _SPLIT_WORDS if w in words}

    tagged = [p for p in files if splits_named(p)]
    if tagged:
        mine = [p for p in files if cfg.split.lower() in splits_named(p)]
        if not mine:
            raise DataNotFoundError(f"data.path={cfg.path}: its files name splits "
                                    f"{sorted(set().union(*map(splits_named, tagged)))} but none is "
                                    f"data.split={cfg.split}")
        files = mine
    return "files", root, files


def _files_fingerprint(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    big = 256 << 20
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        with open(f, "rb") as fh:
            if st.st_size <= big:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(st.st_size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def _check_columns(ds, where: str, cfg: InstructDataConfig):
    import datasets

    cols = list(ds.column_names)
    missing = [c for c in cfg.spec.required if c not in cols]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} for dataset={cfg.name}; expected fields "
                        f"{list(cfg.spec.required)} (optional: {list(cfg.spec.optional)}); found {cols}")
    extra = [c for c in cols if c not in cfg.spec.required]
    if extra:
        logger.debug("%s: ignoring field(s) %s", where, extra)
    ds = ds.select_columns(list(cfg.spec.required))
    if all(getattr(ds.features[c], "dtype", None) in ("string", "large_string") for c in cfg.spec.required):
        return ds  # nothing to convert (casting would rewrite every row)
    try:
        return ds.cast(datasets.Features({c: datasets.Value("string") for c in cfg.spec.required}))
    except Exception as e:  # noqa: BLE001
        kinds = {c: str(ds.features[c]) for c in cfg.spec.required}
        raise DataError(f"{where}: fields must be strings; found types {kinds} ({type(e).__name__})") from None


def _load_local(cfg: InstructDataConfig, kind: str, root: Path, files: Sequence[Path], hf_cache: Path):
    import datasets

    if kind == "saved":
        try:
            ds = datasets.load_from_disk(str(root))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"data.path={cfg.path}: could not read the save_to_disk directory: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"data.path={cfg.path}: no split {cfg.split!r}; it has {list(ds)} (set data.split)")
            ds = ds[cfg.split]
        return _check_columns(ds, str(root), cfg)
    parts = []
    for f in files:
        try:
            ds = datasets.load_dataset(_EXTS[f.suffix.lower()], data_files=str(f), split="train",
                                       cache_dir=str(hf_cache))
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise DataError(f"{f}: could not be read as {f.suffix} records ({type(e).__name__}: {msg}). "
                            f"Expected {cfg.spec.fmt}") from None
        parts.append(_check_columns(ds, str(f), cfg))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_hub(cfg: InstructDataConfig):
    import datasets

    hub = cfg.resolved_hub_name
    try:
        ds = datasets.load_dataset(hub, split=cfg.split)
    except Exception as e:  # noqa: BLE001  offline, unreachable, gated, missing: one message
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or \
            os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
        token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
        gated = any(w in (type(e).__name__ + text).lower() for w in ("gated", "401", "403", "unauthorized",
                                                                        "authenticat"))
        if offline:
            why = ("offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and it is not in the local Hugging Face "
                   "cache")
        elif gated:
            why = ("the dataset is gated or private and " + ("the HF_TOKEN in the environment was refused"
                                                            if token else "no HF_TOKEN is set in the environment"))
        else:
            why = "the Hub could not be reached or has no such dataset"
        raise DataNotFoundError(
            f"dataset={cfg.name}: could not load '{hub}' (split {cfg.split}) from the Hugging Face Hub: {why} "
            f"[{type(e).__name__}: {text}]. {_format_help(cfg)}") from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover (split= returns a Dataset)
        ds = ds[cfg.split]
    return _check_columns(ds, f"hub dataset {hub}", cfg), ds._fingerprint


# ------------------------------------------------------------------------------------------ datasets
class InstructDataset(torch.utils.data.Dataset):
    """Tokenised examples: ``ds[i] -> {"input_ids": list[int], "labels": list[int]}``.

    ``lengths`` (numpy, tokens per example) feeds the sampler; ``num_examples`` (= ``len``), ``num_total``
    (before dropping), ``num_truncated``, ``num_prompt_truncated``, ``num_dropped`` and ``num_tokens`` /
    ``num_supervised_tokens`` describe it. ``hf_dataset`` is the underlying ``datasets.Dataset``."""

    def __init__(self, hf_dataset, meta: Mapping[str, Any] | None = None, split: str = "train"):
        if getattr(hf_dataset, "_indices", None) is not None:
            hf_dataset = hf_dataset.flatten_indices()
        self.hf_dataset = hf_dataset.select_columns(["input_ids", "labels", "length"])
        self.split = split
        self.lengths = hf_dataset.data.column("length").to_numpy().astype(np.int64)
        meta = dict(meta or {})
        self.num_examples = len(hf_dataset)
        self.num_total = int(meta.get("num_total", self.num_examples))
        self.num_truncated = int(meta.get("num_truncated", 0))
        self.num_prompt_truncated = int(meta.get("num_prompt_truncated", 0))
        self.num_dropped = int(meta.get("num_dropped", 0))
        self.num_boundary_fallback = int(meta.get("num_boundary_fallback", 0))
        self.num_tokens = int(self.lengths.sum())
        self.num_supervised_tokens = int(meta.get("num_supervised_tokens", 0))

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i) -> dict[str, list[int]]:
        row = self.hf_dataset[int(i)]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, list[int]]]:
        cols = self.hf_dataset[[int(i) for i in indices]]
        return [{"input_ids": a, "labels": b} for a, b in zip(cols["input_ids"], cols["labels"])]

    def __repr__(self) -> str:
        return (f"InstructDataset(split={self.split}, examples={self.num_examples}, truncated={self.num_truncated}, "
                f"dropped={self.num_dropped}, tokens={self.num_tokens})")


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example lengths into rows of at most ``max_length`` tokens;
    deterministic. Returns the example indices of each row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > max_length:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit a row of {max_length}")
    count = np.zeros(max_length + 1, dtype=np.int64)  # rows with exactly c tokens free
    by_free: list[list[int]] = [[] for _ in range(max_length + 1)]
    rows: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        nz = np.flatnonzero(count[n:])
        if nz.size:
            free = n + int(nz[0])
            r = by_free[free].pop()
            count[free] -= 1
        else:
            free, r = max_length, len(rows)
            rows.append([])
        rows[r].append(int(i))
        by_free[free - n].append(r)
        count[free - n] += 1
    return rows


class PackedInstructDataset(torch.utils.data.Dataset):
    """Examples of an :class:`InstructDataset` packed into rows of at most ``max_length`` tokens.

    Items carry ``position_ids`` restarting at 0 for each example; :class:`InstructCollator` turns a batch of
    them into one padding-free row (see the module docstring for the attention isolation)."""

    def __init__(self, dataset: InstructDataset, max_length: int):
        self.base = dataset
        self.rows = pack_lengths(dataset.lengths, max_length)
        self.lengths = np.array([int(dataset.lengths[r].sum()) for r in self.rows], dtype=np.int64)
        for k in ("num_total", "num_truncated", "num_prompt_truncated", "num_dropped", "num_tokens",
                  "num_supervised_tokens", "num_boundary_fallback"):
            setattr(self, k, getattr(dataset, k))
        self.num_examples = dataset.num_examples
        self.max_length = max_length

    @property
    def fill(self) -> float:
        """Share of the rows' ``max_length`` slots holding tokens."""
        return float(self.lengths.sum() / max(len(self.rows) * self.max_length, 1))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> dict[str, list[int]]:
        exs = self.base.__getitems__(self.rows[int(i)])
        return {"input_ids": [t for e in exs for t in e["input_ids"]],
                "labels": [t for e in exs for t in e["labels"]],
                "position_ids": [p for e in exs for p in range(len(e["input_ids"]))]}


def build_instruct_datasets(cfg: InstructDataConfig | Mapping[str, Any], tokenizer):
    """Load, check, subset, split, tokenise (once; cached) -> ``(train_dataset, val_dataset, stats)``.

    ``train_dataset`` is an :class:`InstructDataset` (a :class:`PackedInstructDataset` with ``cfg.packing``),
    ``val_dataset`` an :class:`InstructDataset` or None (``val_size=0``). ``stats`` holds the counts (rows read
    and selected, per-split examples, truncated, prompt-truncated, dropped, boundary fallbacks, tokens,
    supervised tokens), ``cache_hit`` and ``cache_path``."""
    if not isinstance(cfg, InstructDataConfig):
        cfg = InstructDataConfig.from_dict(cfg)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    raw = None
    if cfg.path is not None:
        kind, root, files = _local_files(cfg)
        source, source_fp = str(root.resolve()), _files_fingerprint(root, files)
    else:
        raw, source_fp = _load_hub(cfg)
        source = f"hub:{cfg.resolved_hub_name}"
    template = cfg.resolved_template
    key_fields = {
        "version": CACHE_VERSION, "name": cfg.name, "source": source_fp, "split": cfg.split,
        "subset_size": cfg.subset_size, "subset_strategy": cfg.subset_strategy, "seed": int(cfg.seed),
        "val_size": cfg.val_size, "template": template, "use_chat": bool(cfg.use_tokenizer_chat_template),
        "max_length": int(cfg.max_length), "min_response_tokens": int(cfg.min_response_tokens),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:24]
    final = cache_root / f"{cfg.name}-{key}"
    cache_hit = final.joinpath("stats.json").exists()
    if not cache_hit:
        from filelock import FileLock

        cache_root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_root / f".{cfg.name}-{key}.lock")):
            cache_hit = final.joinpath("stats.json").exists()  # another rank finished it meanwhile
            if not cache_hit:
                if raw is None:
                    raw = _load_local(cfg, kind, root, files, cache_root / "hf")
                _build_cache(cfg, tokenizer, raw, final, source, key)
    import datasets

    stats = json.loads(final.joinpath("stats.json").read_text())
    stats.update(cache_hit=cache_hit, cache_path=str(final))
    dropped = stats["num_dropped"]
    if dropped:
        logger.warning("instruction data %s: %d examples had no response token left within max_length=%d and "
                       "were dropped", cfg.name, dropped, cfg.max_length)
    if stats["num_train"] == 0:
        raise DataError(f"dataset={cfg.name}: no training example left (max_length={cfg.max_length} leaves no "
                        "response token after the tokenizer's own prefix); raise data.max_length")
    train = InstructDataset(datasets.load_from_disk(str(final / "train")), stats["train"], "train")
    val = InstructDataset(datasets.load_from_disk(str(final / "val")), stats["val"], "val") \
        if stats["num_val"] > 0 else None
    if cfg.packing:
        train = PackedInstructDataset(train, int(cfg.max_length))
        stats["packing"] = {"rows": len(train), "fill": round(train.fill, 4)}
    t = stats["train"]
    logger.info(
        "instruction data %s (%s, template %s, max_length %d)%s: %d rows read, %d selected -> %d train / %d val "
        "examples; %d truncated (%d with the prompt cut), %d dropped without response tokens; %d train tokens "
        "(%d supervised)%s", cfg.name, source, template, cfg.max_length, " [cached]" if cache_hit else "",
        stats["num_rows"], stats["num_selected"], stats["num_train"], stats["num_val"], stats["num_truncated"],
        stats["num_prompt_truncated"], dropped, t["num_tokens"], t["num_supervised_tokens"],
        f"; packed into {len(train)} rows ({100 * train.fill:.1f}% full)" if cfg.packing else "")
    return train, val, stats


def _select_rows(cfg: InstructDataConfig, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row numbers of the subset, and the positions (within it) of the train and validation rows."""
    if cfg.subset_size is not None and n > int(cfg.subset_size):
        if cfg.subset_strategy == "first":
            rows = np.arange(int(cfg.subset_size))
        else:
            rows = np.sort(np.random.default_rng(int(cfg.seed)).permutation(n)[:int(cfg.subset_size)])
    else:
        rows = np.arange(n)
    m = len(rows)
    n_val = int(round(cfg.val_size * m)) if isinstance(cfg.val_size, float) else int(cfg.val_size)
    if n_val >= m:
        raise DataError(f"data.val_size={cfg.val_size} holds out {n_val} of the {m} selected rows and leaves none "
                        "for training; lower data.val_size (0 for no validation set)")
    val = np.sort(np.random.default_rng([int(cfg.seed), 1]).permutation(m)[:n_val])
    train = np.setdiff1d(np.arange(m), val, assume_unique=True)
    return rows, train, val


def _build_cache(cfg: InstructDataConfig, tokenizer, raw, final: Path, source: str, key: str) -> None:
    import datasets

    n = len(raw)
    if n == 0:
        raise DataError(f"dataset={cfg.name} ({source}): no rows")
    rows, train_pos, val_pos = _select_rows(cfg, n)
    subset = raw.select(rows) if len(rows) < n else raw
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    features = datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"), "n_supervised": datasets.Value("int32"), "truncated": datasets.Value("bool"),
        "prompt_truncated": datasets.Value("bool"), "boundary_fallback": datasets.Value("bool")})
    tok = subset.map(
        _tokenize_batch, batched=True, batch_size=1000, remove_columns=subset.column_names, features=features,
        fn_kwargs=dict(tokenizer=tokenizer, name=cfg.name, template=cfg.resolved_template,
                       use_chat=bool(cfg.use_tokenizer_chat_template), max_length=int(cfg.max_length),
                       min_response_tokens=int(cfg.min_response_tokens), prefix=special_prefix(tokenizer)),
        cache_file_name=str(tmp / "tokenized.arrow"), load_from_cache_file=False, new_fingerprint=key,
        desc=f"tokenizing {cfg.name}")
    table = tok.data
    col = {c: table.column(c).to_numpy() for c in ("length", "n_supervised", "truncated", "prompt_truncated",
                                                    "boundary_fallback")}
    stats: dict[str, Any] = {"dataset": cfg.name, "source": source, "split": cfg.split, "template":
                             cfg.resolved_template, "max_length": int(cfg.max_length), "num_rows": n,
                             "num_selected": len(rows), "key": key}
    for split, pos in (("train", train_pos), ("val", val_pos)):
        keep = pos[col["n_supervised"][pos] > 0]
        stats[split] = {
            "num_total": int(len(pos)), "num_examples": int(len(keep)), "num_dropped": int(len(pos) - len(keep)),
            "num_truncated": int(col["truncated"][pos].sum()),
            "num_prompt_truncated": int(col["prompt_truncated"][pos].sum()),
            "num_boundary_fallback": int(col["boundary_fallback"][pos].sum()),
            "num_tokens": int(col["length"][keep].sum()), "num_supervised_tokens": int(col["n_supervised"][keep].sum()),
            "max_example_length": int(col["length"][keep].max()) if len(keep) else 0,
            "mean_example_length": float(col["length"][keep].mean()) if len(keep) else 0.0,
        }
        stats[f"num_{split}"] = int(len(keep))
        if len(keep):  # an empty split is not written (save_to_disk of 0 rows does not load back)
            tok.select(keep).save_to_disk(str(tmp / split))
    for k in ("num_truncated", "num_prompt_truncated", "num_dropped", "num_boundary_fallback"):
        stats[k] = stats["train"][k] + stats["val"][k]
    del tok, table
    (tmp / "tokenized.arrow").unlink(missing_ok=True)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    try:
        os.replace(tmp, final)
    except OSError:  # a complete copy is already there
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------- batching
class InstructCollator:
    """Pad a list of ``{"input_ids", "labels"}`` to the longest (optionally a multiple of
    ``pad_to_multiple_of``): ``input_ids`` with ``pad_token_id``, ``attention_mask`` 0, ``labels`` -100.

    Items with ``position_ids`` (from :class:`PackedInstructDataset`), or any batch when ``padding_free``,
    are concatenated into one row ``[1, total]`` with ``position_ids`` restarting per example and no
    ``attention_mask`` (no padding, so ``pad_to_multiple_of`` does not apply; see the module docstring)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_side: str = "right",
                 padding_free: bool = False):
        if padding_side not in ("right", "left"):
            raise ValueError("padding_side must be 'right' or 'left'")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of) if pad_to_multiple_of else None
        self.padding_side = padding_side
        self.padding_free = padding_free

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "InstructCollator":
        """Pad with the tokenizer's pad token, or its EOS when it has none (LLaMA-3): padded positions are
        masked out of attention and loss either way."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token")
        return cls(pad, **kwargs)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        if self.padding_free or "position_ids" in features[0]:
            return self._flatten(features)
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(features)
        ids = torch.full((b, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            sl = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            ids[i, sl] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, sl] = torch.as_tensor(f["labels"], dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def _flatten(features) -> dict[str, torch.Tensor]:
        ids = [t for f in features for t in f["input_ids"]]
        labels = [t for f in features for t in f["labels"]]
        pos = [p for f in features for p in (f["position_ids"] if "position_ids" in f
                                             else range(len(f["input_ids"])))]
        as_row = lambda x: torch.as_tensor(x, dtype=torch.long).unsqueeze(0)  # noqa: E731
        return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(pos)}


class BatchTokens(NamedTuple):
    tokens: int       # non-pad tokens (what the model processes)
    supervised: int   # tokens with a label (what the loss covers)


def tokens_in_batch(batch: Mapping[str, torch.Tensor]) -> BatchTokens:
    """Non-pad and supervised token counts of a collated batch, for tokens/s logging."""
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
    return BatchTokens(tokens, int((batch["labels"] != IGNORE_INDEX).sum()))


def _dist_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    dist = torch.distributed
    on = dist.is_available() and dist.is_initialized()
    r = int(num_replicas) if num_replicas is not None else (dist.get_world_size() if on else 1)
    k = int(rank) if rank is not None else (dist.get_rank() if on else 0)
    if not 0 <= k < r:
        raise ValueError(f"rank {k} outside 0..{r - 1}")
    return r, k


class LengthGroupedBatchSampler:
    """Batches of similar-length examples, deterministic per ``(seed, epoch)``, resumable, distributed.

    Each epoch: a permutation of all examples (``numpy.random.default_rng([seed, epoch])``) is cut into
    mega-batches of ``mega_batch_mult`` global batches (``batch_size * num_replicas`` examples); each mega-batch
    is sorted by length (longest first) and cut into global batches; the order of the global batches is
    shuffled; rank ``r`` takes the ``r``-th slice of ``batch_size`` examples of every global batch, so all
    ranks get the same number of batches, of similar lengths at each step, with disjoint examples. The global
    batches depend on ``batch_size * num_replicas`` only: one process with ``batch_size=B*R`` sees the union
    of what ``R`` ranks with ``B`` see. ``group_by_length=False`` gives plain random batches;
    ``shuffle=False`` (evaluation) sorts the whole set by length and keeps that order.

    The last incomplete global batch is dropped with ``drop_last``; otherwise it is kept (split evenly
    between ranks) after repeating the first ``(-n) % num_replicas`` examples of the epoch's permutation.
    ``set_epoch(epoch)`` reshuffles; ``set_start(k)`` (or ``start_batch``) skips the first ``k`` batches of
    the epoch (exact resume); ``len()`` counts the batches still to come. The interface matches
    :class:`nora.data.sampling.ShuffledBatchSampler`.
    """

    def __init__(self, lengths, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False, mega_batch_mult: int = 50, start_batch: int = 0):
        lengths = getattr(lengths, "lengths", lengths)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or self.lengths.size == 0:
            raise ValueError("LengthGroupedBatchSampler needs a non-empty 1-d sequence of lengths")
        if int(batch_size) < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.group_by_length, self.drop_last = bool(group_by_length), bool(drop_last)
        self.mega_batch_mult = int(mega_batch_mult)
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        self.epoch, self.start = 0, int(start_batch)
        if self.num_batches == 0:
            raise ValueError(f"{self.lengths.size} examples make no batch of {self.batch_size} x "
                             f"{self.num_replicas} ranks with drop_last; lower the batch size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, batch: int) -> None:
        self.start = int(batch)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    @property
    def num_batches(self) -> int:
        """Batches per rank in a full epoch."""
        n, g, r = self.lengths.size, self.global_batch_size, self.num_replicas
        return n // g if self.drop_last else -(-(n + (-n) % r) // g)

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The epoch's global batches (all ranks' examples, rank slices in order)."""
        epoch = self.epoch if epoch is None else int(epoch)
        n, g, r = self.lengths.size, self.global_batch_size, self.num_replicas
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.drop_last:
            order = order[:(n // g) * g]
        elif n % r:
            order = np.concatenate([order, order[:(-n) % r]])
        if self.group_by_length:
            mega = len(order) if not self.shuffle else g * self.mega_batch_mult
            chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i:i + g] for i in range(0, len(order), g)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        r = self.num_replicas
        for gb in self.global_batches()[self.start:]:
            b = len(gb) // r
            yield gb[self.rank * b:(self.rank + 1) * b].tolist()


def padding_waste(lengths, batches: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None) -> float:
    """Share of pad tokens when ``batches`` (index lists) are padded to their longest member."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for b in batches:
        ls = lengths[np.asarray(b)]
        t = int(ls.max())
        if pad_to_multiple_of:
            t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
        real += int(ls.sum())
        padded += t * len(ls)
    return 1.0 - real / max(padded, 1)


def build_dataloader(dataset, cfg: InstructDataConfig, tokenizer, batch_size: int, *, train: bool = True,
                     seed: int = 0, num_replicas: int | None = None, rank: int | None = None,
                     drop_last: bool = False, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader with a :class:`LengthGroupedBatchSampler` (``loader.batch_sampler``: call ``set_epoch`` /
    ``set_start`` on it) and an :class:`InstructCollator` following ``cfg`` (group_by_length,
    pad_to_multiple_of, mega_batch_mult). Evaluation (``train=False``) keeps a fixed length-sorted order."""
    sampler = LengthGroupedBatchSampler(
        dataset.lengths, batch_size, seed=seed, shuffle=train,
        group_by_length=(cfg.group_by_length or not train) and not isinstance(dataset, PackedInstructDataset),
        num_replicas=num_replicas, rank=rank, drop_last=drop_last, mega_batch_mult=cfg.mega_batch_mult)
    collate = InstructCollator.from_tokenizer(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


__all__ = [
    "ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "BatchTokens", "CHAT_PROMPT", "CHAT_PROMPT_NO_SYSTEM",
    "DataError", "DataNotFoundError", "IGNORE_INDEX", "InstructCollator", "InstructDataConfig", "InstructDataset",
    "LengthGroupedBatchSampler", "PackedInstructDataset", "assemble", "build_dataloader", "build_instruct_datasets",
    "encode_examples", "format_alpaca_prompt", "format_chat_prompt", "pack_lengths", "padding_waste",
    "render_example", "special_prefix", "tokenizer_fingerprint", "tokens_in_batch",
]
