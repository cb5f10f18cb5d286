"""MMLU evaluation: k-shot prompts, log-likelihood scoring of the answer letters, per-category accuracy.

Protocol (identical to lm-evaluation-harness's default ``mmlu`` task, lm_eval 0.4.13,
``tasks/mmlu/default/_default_template_yaml``; checked question by question by
``tests/test_mmlu_lm_eval.py`` and ``scripts/mmlu_agreement.py``):

* prompt = ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``
  (underscores in the subject name become spaces), then the first ``k`` questions of the subject's
  ``dev`` split in file order (lm_eval's ``first_n`` sampler), each as
  ``"{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {letter}\\n\\n"``, then the test
  question in the same form ending in ``"Answer:"``;
* the prediction is the letter X in A-D whose continuation ``" X"`` (space + letter) has the highest
  log-likelihood given the prompt (ties go to the earlier letter). Tokenization follows lm_eval's
  ``_encode_pair``: ``context`` and ``context + continuation`` are tokenized (with the tokenizer's
  special tokens, e.g. LLaMA-3's ``<|begin_of_text|>``), and the continuation is the tokens of the
  second beyond the length of the first. With byte-level BPE tokenizers (LLaMA-3, GPT-2, the
  offline test tokenizer) ``" A"`` is one token, different from ``"A"``, and the score is that
  token's next-token log-probability; where ``" A"`` is split into several tokens, the score is the
  sum of their log-probabilities (teacher-forced). :func:`continuation_tokens` reports which case a
  tokenizer is in, and the result records it;
* a prompt longer than the model's context (``max_length``; by default the model config's
  ``n_positions``/``max_position_embeddings``/``n_ctx``, as lm_eval) loses few-shot examples, the
  last one first, until it fits; the number dropped is reported per subject. If even the zero-shot
  prompt does not fit, it is truncated from the left (as lm_eval does) and counted as ``truncated``;
* accuracy per subject, per category and overall are micro-averages over questions.

``protocol="continuation"`` is lm_eval's ``mmlu_continuation`` task instead (``tasks/mmlu/continuation``): the
description reads ``"The following are questions (with answers) about {subject}.\n\n"``, each question is
``"Question: {question.strip()}\nAnswer:"`` (shots followed by `` {correct answer text}\n\n``), no options are
shown, and the prediction is the answer text ``" {choice}"`` with the highest summed log-likelihood (lm_eval's
``acc``). It measures whether a model knows the answer without the skill of binding a letter to an option, which
small models lack (MMLU's letters put them at chance); the offline LLM demo scores with it.

Batching: the token rows are sorted by length (longest first), right-padded with an attention mask
and scored in batches; with right padding each real position sees exactly the tokens it sees
unpadded, so batched and unbatched log-probabilities agree (tested). On CUDA the forward runs under
bf16 autocast by default; log-softmax is always taken in float32. For Hugging Face models that
accept a per-row ``logits_to_keep`` index tensor, only the needed positions are projected onto the
vocabulary (saves the B x T x V logits tensor).

The model is any causal LM called as ``model(input_ids=..., attention_mask=...)`` returning an
object with ``.logits`` (a Hugging Face model, peft-wrapped or not, with or without NoRA
activations); :func:`nora.app.reload.load_trained_model` rebuilds a training run's model with its adapter.

Result dictionary (:meth:`MMLUResult.to_dict`, written as ``mmlu.json`` by :func:`write_mmlu_json`;
``format`` is bumped on any incompatible change)::

    {
      "format": "nora.mmlu/1",
      "task": "mmlu", "split": "test", "k": 5, "grouping": "original" | "lm_eval",
      "date": "2025-01-31T12:00:00+00:00",          # UTC, end of evaluation
      "wall_time_s": 12.3,
      "overall":    {"accuracy": 0.61, "correct": 8571, "n": 14042},
      "categories": {"STEM": {"accuracy", "correct", "n", "subjects": [...]},
                     "humanities": ..., "social_sciences": ..., "other": ...},   # always all four;
                                                                                # accuracy null if n == 0
      "subjects":   {"<subject>": {"category", "accuracy", "correct", "n",
                                   "shots_requested", "shots_used_min", "shots_used_mean",
                                   "shots_dropped", "questions_with_dropped_shots", "truncated"}},
      "shots":      {"requested": 5, "dropped": 0, "questions_with_dropped_shots": 0,
                     "truncated_questions": 0},
      "protocol":   {"prompt": "lm_eval mmlu (default)", "continuations": [" A", " B", " C", " D"],
                     "continuation_tokens": {"A": [...], ...}, "single_token_continuations": true,
                     "max_length": 8192, "batch_size": 8, "bf16_autocast": true,
                     "add_special_tokens": true},
      "data":       {"path": "...", "source": "csv" | "hf", "n_subjects": 57},   # overall/categories
                                                       # cover only the subjects evaluated
      "model":      {...} | null,        # passed in by the caller (e.g. name, revision, dtype)
      "adapter":    {...} | null,        # passed in by the caller (nora.runs.adapter_identity)
      "predictions": {"<subject>": [0-3, ...]}    # only with include_predictions=True
    }
"""

from __future__ import annotations

import datetime as _dt
import inspect
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from nora.eval.mmlu_data import (
    CATEGORIES,
    LETTERS,
    MMLUQuestion,
    SubjectData,
    category_names,
    detect_source,
    load_mmlu,
    resolve_subjects,
    subject_categories,
)
from nora.files import write_json_atomic

FORMAT = "nora.mmlu/1"
CONTINUATIONS = tuple(" " + letter for letter in LETTERS)
PROTOCOLS = ("letters", "continuation")  # lm_eval's mmlu (default) | mmlu_continuation
DEFAULT_MAX_LENGTH = 2048  # lm_eval's fallback when neither the config nor the tokenizer give one


# --------------------------------------------------------------------------------- prompts
def format_subject(subject: str) -> str:
    return " ".join(subject.split("_"))


# the file an evaluation writes into its directory (a training run's: nora.runs.layout names it there too)
MMLU_FILE = "mmlu.json"


def description(subject: str, protocol: str = "letters") -> str:
    kind = "multiple choice questions" if protocol == "letters" else "questions"
    return f"The following are {kind} (with answers) about {format_subject(subject)}.\n\n"


def format_question(q: MMLUQuestion, protocol: str = "letters") -> str:
    """The question block ending in ``"Answer:"`` (lm_eval's ``doc_to_text``)."""
    if protocol == "continuation":
        return f"Question: {q.question.strip()}\nAnswer:"
    a, b, c, d = q.choices
    return f"{q.question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def continuations(q: MMLUQuestion, protocol: str = "letters") -> tuple[str, ...]:
    """The four scored continuations: `` A``..`` D``, or `` {choice}`` for the continuation protocol."""
    return CONTINUATIONS if protocol == "letters" else tuple(" " + c for c in q.choices)


def format_shot(q: MMLUQuestion, protocol: str = "letters") -> str:
    return f"{format_question(q, protocol)}{continuations(q, protocol)[q.answer]}\n\n"


def build_prompt(subject: str, shots: Sequence[MMLUQuestion], question: MMLUQuestion, protocol: str = "letters") -> str:
    return (
        description(subject, protocol)
        + "".join(format_shot(s, protocol) for s in shots)
        + format_question(question, protocol)
    )


# ---------------------------------------------------------------------------- tokenization
def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _split_pair(context: str, continuation: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_pair(
    tokenizer, context: str, continuation: str, add_special_tokens: bool = True
) -> tuple[list[int], list[int]]:
    """``(context_tokens, continuation_tokens)`` as lm_eval's ``_encode_pair`` for causal models."""
    context, continuation = _split_pair(context, continuation)
    whole, ctx = _encode(tokenizer, [context + continuation, context], add_special_tokens)
    return ctx, whole[len(ctx) :]


def continuation_tokens(tokenizer, context: str = "Answer:", add_special_tokens: bool = True) -> dict[str, list[int]]:
    """The tokens scored for each letter after ``context`` (one id each for LLaMA-3-style BPE)."""
    return {
        letter: encode_pair(tokenizer, context, cont, add_special_tokens)[1]
        for letter, cont in zip(LETTERS, CONTINUATIONS)
    }


def model_max_length(model, tokenizer=None) -> int:
    """Context length as lm_eval resolves it: config n_positions / max_position_embeddings / n_ctx,
    then the tokenizer's ``model_max_length`` (unless unset), then 2048."""
    cfg = getattr(_unwrap(model), "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if v is not None:
            return int(v)
    v = getattr(tokenizer, "model_max_length", None)
    if v is not None and v < 10**12:
        return int(v)
    return DEFAULT_MAX_LENGTH


def _unwrap(model):
    """The underlying transformers model of a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            return get_base()
        except Exception:
            return model
    return model


# -------------------------------------------------------------------------------- requests
@dataclass
class _Request:
    """One (question, letter) log-likelihood: tokens ``cont`` scored at the end of row ``row``."""

    question: int
    letter: int
    row: int
    cont: list[int]


@dataclass
class _Prepared:
    rows: list[list[int]]
    requests: list[_Request]
    shots: list[int]
    truncated: list[bool]


def _prepare_subject(
    tokenizer,
    subject: str,
    data: SubjectData,
    k: int,
    max_length: int,
    add_special_tokens: bool,
    protocol: str = "letters",
) -> _Prepared:
    """Token rows for every question of a subject, dropping shots until each prompt fits."""
    tests = data.test
    shots_pool = data.dev[:k]
    contexts = [build_prompt(subject, shots_pool, q, protocol) for q in tests]
    conts = [continuations(q, protocol) for q in tests]
    encs = _encode_questions(tokenizer, contexts, add_special_tokens, conts)
    n_shots = [len(shots_pool)] * len(tests)
    truncated = [False] * len(tests)
    for i, q in enumerate(tests):
        while not _fits(encs[i], max_length) and n_shots[i] > 0:
            n_shots[i] -= 1
            encs[i] = _encode_questions(
                tokenizer,
                [build_prompt(subject, shots_pool[: n_shots[i]], q, protocol)],
                add_special_tokens,
                [conts[i]],
            )[0]
        if not _fits(encs[i], max_length):
            truncated[i] = True
    rows: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}
    requests: list[_Request] = []
    for i, (ctx, conts) in enumerate(encs):
        for letter, cont in enumerate(conts):
            full = (ctx + cont)[-(max_length + 1) :]  # lm_eval's left truncation (no-op when it fits)
            row = tuple(full[:-1])
            if row not in index:
                index[row] = len(rows)
                rows.append(list(row))
            requests.append(_Request(i, letter, index[row], cont))
    return _Prepared(rows, requests, n_shots, truncated)


def _encode_questions(
    tokenizer, contexts: list[str], add_special_tokens: bool, choices: Sequence[Sequence[str]] | None = None
) -> list[tuple[list[int], list[list[int]]]]:
    """Per context: its tokens and the tokens of each of its continuations (`` A``..`` D`` unless ``choices``
    gives each context its own), as lm_eval's _encode_pair."""
    choices = choices or [CONTINUATIONS] * len(contexts)
    texts: list[str] = []
    for c, cs in zip(contexts, choices):
        for cont in cs:
            ctx, full_cont = _split_pair(c, cont)
            texts.append(ctx + full_cont)
        texts.append(_split_pair(c, cs[0])[0])
    ids = _encode(tokenizer, texts, add_special_tokens)
    out = []
    start = 0
    for cs in choices:
        block = ids[start : start + len(cs) + 1]
        start += len(cs) + 1
        ctx = block[-1]
        conts = [whole[len(ctx) :] for whole in block[:-1]]
        for text, cont in zip(cs, conts):
            if not cont:
                raise ValueError(
                    f"the tokenizer gives no tokens for the continuation {text!r} after the prompt; cannot score it"
                )
        out.append((ctx, conts))
    return out


def _fits(enc: tuple[list[int], list[list[int]]], max_length: int) -> bool:
    ctx, conts = enc
    return all(len(ctx) + len(c) <= max_length + 1 for c in conts)


# --------------------------------------------------------------------------------- scoring
def _model_device(model) -> torch.device:
    for p in model.parameters() if hasattr(model, "parameters") else ():
        return p.device
    return torch.device("cpu")


def _supports_logits_to_keep(model) -> bool:
    base = _unwrap(model)
    try:
        from transformers import PreTrainedModel
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401 (2D positions support)
    except ImportError:
        return False
    if not isinstance(base, PreTrainedModel):
        return False
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _padded_batch(
    rows: list[list[int]], chunk: list[int], pad_id: int, positions: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` of the rows in ``chunk`` (longest first), and the
    (B, positions) indices of each row's last ``positions`` positions (clamped at 0 for short rows)."""
    width = len(rows[chunk[0]])
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for b, i in enumerate(chunk):
        ids[b, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
        mask[b, : len(rows[i])] = 1
    lengths = torch.tensor([len(rows[i]) for i in chunk])
    pos = (lengths[:, None] - positions + torch.arange(positions)[None, :]).clamp(min=0)
    return ids, mask, pos


def _sum_continuations(
    logp: torch.Tensor, chunk: list[int], conts: list[list[list[int]]], positions: int
) -> dict[int, list[float]]:
    """``{row: [summed log-probability of each of its continuations]}`` from the (B, P, V) log-softmax of a
    batch; every needed (batch row, position, token) is gathered in one indexing op."""
    bi, pi, ti, owner = [], [], [], []
    for b, i in enumerate(chunk):
        for j, c in enumerate(conts[i]):
            for t, tok in enumerate(c):
                bi.append(b)
                pi.append(positions - len(c) + t)
                ti.append(tok)
                owner.append((i, j))
    index = [torch.tensor(v, device=logp.device) for v in (bi, pi, ti)]
    vals = logp[index[0], index[1], index[2]].double().cpu().tolist()
    out = {i: [0.0] * len(conts[i]) for i in chunk}
    for (i, j), v in zip(owner, vals):
        out[i][j] += v
    return out


@torch.no_grad()
def score_rows(
    model,
    rows: list[list[int]],
    conts: list[list[list[int]]],
    batch_size: int = 8,
    pad_id: int = 0,
    bf16: bool = True,
    keep_logits: bool | None = None,
) -> list[list[float]]:
    """Summed log-probabilities of continuations at the end of token rows.

    ``conts[i]`` lists the continuations scored on row ``i``: continuation ``c`` is predicted by the
    last ``len(c)`` positions of the row (the row is ``context + c[:-1]``, lm_eval's input). Returns
    ``out[i][j]`` = sum of the log-softmax (float32, or the logits' dtype if wider) of ``conts[i][j]``.
    Rows are scored longest first in right-padded batches with an attention mask; only the needed
    log-probabilities leave the device.
    """
    device = _model_device(model)
    if keep_logits is None:
        keep_logits = _supports_logits_to_keep(model)
    call_kwargs: dict[str, Any] = {}
    if getattr(_unwrap(model), "config", None) is not None:
        call_kwargs["use_cache"] = False
    positions = max((len(c) for cs in conts for c in cs), default=1)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), rows[i]))
    out: list[list[float]] = [[] for _ in rows]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask, pos = _padded_batch(rows, chunk, pad_id, positions)
        pos = pos.to(device)
        kwargs = dict(call_kwargs, logits_to_keep=pos) if keep_logits else call_kwargs
        with autocast:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
        if not keep_logits:
            logits = torch.take_along_dim(logits, pos.to(logits.device)[..., None], dim=1)
        elif logits.shape[:2] != pos.shape:
            raise RuntimeError(
                f"{type(model).__name__} ignored logits_to_keep (logits {tuple(logits.shape)}); "
                f"call with keep_logits=False"
            )
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (B, P, V)
        del logits
        for i, sums in _sum_continuations(logp, chunk, conts, positions).items():
            out[i] = sums
    return out


# --------------------------------------------------------------------------------- results
@dataclass
class SubjectResult:
    subject: str
    category: str
    correct: int
    n: int
    shots_requested: int
    shots_used: list[int]
    truncated: int
    predictions: list[int] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def shots_dropped(self) -> int:
        return sum(self.shots_requested - s for s in self.shots_used)

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "accuracy": self.accuracy if self.n else None,
            "correct": self.correct,
            "n": self.n,
            "shots_requested": self.shots_requested,
            "shots_used_min": min(self.shots_used) if self.shots_used else self.shots_requested,
            "shots_used_mean": sum(self.shots_used) / len(self.shots_used) if self.shots_used else 0.0,
            "shots_dropped": self.shots_dropped,
            "questions_with_dropped_shots": sum(s < self.shots_requested for s in self.shots_used),
            "truncated": self.truncated,
        }


def _acc(correct: int, n: int) -> dict[str, Any]:
    return {"accuracy": correct / n if n else None, "correct": correct, "n": n}


@dataclass
class MMLUResult:
    """Per-subject results; categories and overall are micro-averages computed from them."""

    subjects: dict[str, SubjectResult]
    k: int
    grouping: str
    split: str = "test"
    wall_time_s: float = 0.0
    date: str = ""
    protocol: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    category_order: tuple[str, ...] = CATEGORIES  # a custom benchmark's (mmlu_data.category_names)

    @property
    def correct(self) -> int:
        return sum(s.correct for s in self.subjects.values())

    @property
    def n(self) -> int:
        return sum(s.n for s in self.subjects.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def categories(self) -> dict[str, dict[str, Any]]:
        out = {}
        for cat in self.category_order:
            subs = [s for s in self.subjects.values() if s.category == cat]
            out[cat] = {
                **_acc(sum(s.correct for s in subs), sum(s.n for s in subs)),
                "subjects": sorted(s.subject for s in subs),
            }
        return out

    def predictions(self) -> dict[str, list[int]]:
        return {name: list(s.predictions) for name, s in self.subjects.items()}

    def to_dict(
        self,
        model: Mapping[str, Any] | None = None,
        adapter: Mapping[str, Any] | None = None,
        include_predictions: bool = False,
    ) -> dict[str, Any]:
        subs = {name: s.to_dict() for name, s in sorted(self.subjects.items())}
        d: dict[str, Any] = {
            "format": FORMAT,
            "task": "mmlu",
            "split": self.split,
            "k": self.k,
            "grouping": self.grouping,
            "date": self.date,
            "wall_time_s": self.wall_time_s,
            "overall": _acc(self.correct, self.n),
            "categories": self.categories(),
            "subjects": subs,
            "shots": {
                "requested": self.k,
                "dropped": sum(s["shots_dropped"] for s in subs.values()),
                "questions_with_dropped_shots": sum(s["questions_with_dropped_shots"] for s in subs.values()),
                "truncated_questions": sum(s["truncated"] for s in subs.values()),
            },
            "protocol": dict(self.protocol),
            "data": dict(self.data),
            "model": dict(model) if model is not None else None,
            "adapter": dict(adapter) if adapter is not None else None,
        }
        if include_predictions:
            d["predictions"] = {name: list(s.predictions) for name, s in sorted(self.subjects.items())}
        return d


def _resolve_data(data, source, subjects, k, grouping, split, categories):
    """``(subjects' data, {subject: category}, category order, data info)`` of what :func:`evaluate_mmlu` got."""
    if not isinstance(data, Mapping):
        src = detect_source(data) if source == "auto" else source
        loaded = load_mmlu(data, source=src, subjects=subjects, k=k, split=split)
        where = data if src == "csv" else None  # a CSV root may carry its own subjects.json
        return loaded, subject_categories(grouping, where), category_names(where), {"path": str(data), "source": src}
    cats = dict(categories) if categories is not None else subject_categories(grouping)
    order = tuple(dict.fromkeys(cats.values())) if categories is not None else CATEGORIES
    loaded = dict(data)
    if subjects is not None and subjects != "available":
        wanted = list(subjects) if categories is not None else resolve_subjects(subjects)
        missing = [s for s in wanted if s not in loaded]
        if missing:
            raise ValueError(f"subjects {missing} are not in the loaded MMLU data ({sorted(loaded)})")
        loaded = {s: loaded[s] for s in wanted}
    for s, d in loaded.items():
        if k > len(d.dev):
            raise ValueError(f"MMLU subject {s!r}: k={k} shots requested but only {len(d.dev)} dev questions")
    return loaded, cats, order, {}


# ------------------------------------------------------------------------------ evaluation
def evaluate_mmlu(
    model,
    tokenizer,
    data: str | os.PathLike | Mapping[str, SubjectData],
    *,
    source: str = "auto",
    subjects: str | Sequence[str] | None = None,
    k: int = 5,
    grouping: str = "original",
    batch_size: int = 8,
    max_length: int | None = None,
    bf16: bool = True,
    add_special_tokens: bool = True,
    split: str = "test",
    progress: bool = True,
    keep_logits: bool | None = None,
    categories: Mapping[str, str] | None = None,
    protocol: str = "letters",
) -> MMLUResult:
    """Evaluate ``model`` on MMLU; ``data`` is a data directory / hub name or :func:`load_mmlu`'s output.

    ``k``: shots per prompt (0 = zero-shot); ``max_length``: context length (default: from the model
    config, see :func:`model_max_length`); ``bf16``: bf16 autocast when the model is on CUDA;
    ``grouping``: ``original`` or ``lm_eval`` categories; ``subjects``: ``None`` (all 57, each must be
    present), a list or comma-separated string of names, or ``"available"`` (whatever the data holds);
    ``keep_logits``: project only the needed positions onto the vocabulary (default: when supported);
    ``protocol``: ``letters`` (lm_eval's ``mmlu``) or ``continuation`` (``mmlu_continuation``, see the module
    docstring); ``categories``: ``{subject: category}`` of a benchmark with its own subjects when ``data`` is
    already loaded (a data directory with a ``subjects.json`` brings its own, see :mod:`nora.eval.mmlu_data`).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown MMLU protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    loaded, cats, order, data_info = _resolve_data(data, source, subjects, k, grouping, split, categories)
    data_info["n_subjects"] = len(loaded)
    max_len = int(max_length) if max_length else model_max_length(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if keep_logits is None:
        keep_logits = _supports_logits_to_keep(model)
    cont_toks = continuation_tokens(tokenizer, add_special_tokens=add_special_tokens)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    t0 = time.perf_counter()
    results: dict[str, SubjectResult] = {}
    try:
        from tqdm.auto import tqdm

        bar = tqdm(sorted(loaded), desc="MMLU", unit="subject", disable=not progress)
        for subject in bar:
            bar.set_postfix_str(subject)
            results[subject] = _evaluate_subject(
                model,
                tokenizer,
                subject,
                loaded[subject],
                cats[subject],
                k,
                max_len,
                batch_size,
                pad_id,
                bf16,
                add_special_tokens,
                keep_logits,
                protocol,
            )
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    wall = time.perf_counter() - t0
    _warn_truncated(results, max_len, max_length)
    letters = protocol == "letters"
    protocol = {
        "name": protocol,
        "prompt": "lm_eval mmlu (default)" if letters else "lm_eval mmlu_continuation",
        "continuations": list(CONTINUATIONS) if letters else "' ' + each choice's text",
        "continuation_tokens": cont_toks if letters else None,
        "single_token_continuations": all(len(v) == 1 for v in cont_toks.values()) if letters else None,
        "max_length": max_len,
        "batch_size": batch_size,
        "bf16_autocast": bool(bf16 and _model_device(model).type == "cuda"),
        "add_special_tokens": add_special_tokens,
    }
    return MMLUResult(
        results,
        k=k,
        grouping=grouping,
        split=split,
        wall_time_s=round(wall, 3),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        protocol=protocol,
        data=data_info,
        category_order=order,
    )


def _warn_truncated(results: Mapping[str, "SubjectResult"], max_len: int, max_length: int | None) -> None:
    """A warning when questions did not fit ``max_len`` even zero-shot: they were cut from the left (as lm_eval
    does), so their scores read a cut question; the count is in ``mmlu.json`` too."""
    cut, n = sum(r.truncated for r in results.values()), sum(r.n for r in results.values())
    if cut:
        where = "max_length" if max_length else "the model's context length"
        warnings.warn(
            f"MMLU: {cut} of {n} questions do not fit {where} ({max_len} tokens) even zero-shot and were "
            "cut from the left: their scores read a truncated question and the accuracy is not comparable; "
            "raise mmlu.max_length (null: the model's context length)",
            stacklevel=3,
        )


def _evaluate_subject(
    model,
    tokenizer,
    subject,
    data: SubjectData,
    category,
    k,
    max_len,
    batch_size,
    pad_id,
    bf16,
    add_special_tokens,
    keep_logits,
    protocol="letters",
) -> SubjectResult:
    prep = _prepare_subject(tokenizer, subject, data, k, max_len, add_special_tokens, protocol)
    conts: list[list[list[int]]] = [[] for _ in prep.rows]
    slot = []
    for r in prep.requests:
        slot.append(len(conts[r.row]))
        conts[r.row].append(r.cont)
    sums = score_rows(model, prep.rows, conts, batch_size=batch_size, pad_id=pad_id, bf16=bf16, keep_logits=keep_logits)
    n = len(data.test)
    scores = [[0.0] * len(LETTERS) for _ in range(n)]
    for r, j in zip(prep.requests, slot):
        scores[r.question][r.letter] = sums[r.row][j]
    preds = [max(range(len(LETTERS)), key=lambda j: (s[j], -j)) for s in scores]
    answers = [q.answer for q in data.test]
    return SubjectResult(
        subject,
        category,
        sum(p == a for p, a in zip(preds, answers)),
        n,
        k,
        prep.shots,
        sum(prep.truncated),
        preds,
        answers,
        scores,
    )


# ---------------------------------------------------------------------------------- output
def write_mmlu_json(
    result: MMLUResult,
    directory: str | os.PathLike,
    model: Mapping[str, Any] | None = None,
    adapter: Mapping[str, Any] | None = None,
    include_predictions: bool = False,
) -> Path:
    """Write ``result.to_dict(...)`` atomically to ``mmlu.json`` in ``directory`` (a run directory, or
    ``runs/eval/<model>`` for a base model); returns its path."""
    path = Path(directory) / MMLU_FILE
    write_json_atomic(path, result.to_dict(model, adapter, include_predictions))
    return path


def run_mmlu(
    model,
    tokenizer,
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    source: str = "auto",
    subjects: str | Sequence[str] | None = None,
    k: int = 5,
    grouping: str = "original",
    batch_size: int = 8,
    max_length: int | None = None,
    bf16: bool = True,
    split: str = "test",
    model_identity: Mapping[str, Any] | None = None,
    adapter_identity: Mapping[str, Any] | None = None,
    include_predictions: bool = False,
    progress: bool = True,
    protocol: str = "letters",
) -> MMLUResult:
    """Evaluate and, when ``out_dir`` is given, write ``out_dir/mmlu.json``; the entry point for eval.py."""
    result = evaluate_mmlu(
        model,
        tokenizer,
        path,
        source=source,
        subjects=subjects,
        k=k,
        grouping=grouping,
        batch_size=batch_size,
        max_length=max_length,
        bf16=bf16,
        split=split,
        progress=progress,
        protocol=protocol,
    )
    if out_dir is not None:
        write_mmlu_json(
            result, out_dir, model=model_identity, adapter=adapter_identity, include_predictions=include_predictions
        )
    return result
