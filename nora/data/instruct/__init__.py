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
    ``text``, OpenOrca's ``id``) are ignored. ``null`` reads as an empty string in the fields that may be empty
    (Alpaca's ``input``, OpenOrca's ``system_prompt``); a ``null`` in any other field raises :class:`DataError`
    naming the file and the record (counting from 0).

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
    Alpaca-like length distribution (log-normal, median 120 tokens, clipped to [16, 512]) length grouping cuts the
    share of pad tokens from about half of every batch to a few percent; ``padding_waste`` measures it and
    ``tests/test_instruct_data.py::test_padding_waste`` holds the bounds.
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

from nora.data.instruct.cache import build_instruct_datasets
from nora.data.instruct.collate import BatchTokens, InstructCollator, build_dataloader, tokens_in_batch
from nora.data.instruct.config import DataError, DataNotFoundError, InstructDataConfig
from nora.data.instruct.dataset import InstructDataset, PackedInstructDataset, pack_lengths
from nora.data.instruct.templates import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    CHAT_PROMPT,
    CHAT_PROMPT_NO_SYSTEM,
    format_alpaca_prompt,
    format_chat_prompt,
    render_example,
)
from nora.data.instruct.tokenization import (
    IGNORE_INDEX,
    assemble,
    encode_examples,
    special_prefix,
    tokenizer_fingerprint,
)
from nora.data.sampling import LengthGroupedBatchSampler, padding_waste

__all__ = [
    "ALPACA_PROMPT_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "BatchTokens",
    "CHAT_PROMPT",
    "CHAT_PROMPT_NO_SYSTEM",
    "DataError",
    "DataNotFoundError",
    "IGNORE_INDEX",
    "InstructCollator",
    "InstructDataConfig",
    "InstructDataset",
    "LengthGroupedBatchSampler",
    "PackedInstructDataset",
    "assemble",
    "build_dataloader",
    "build_instruct_datasets",
    "encode_examples",
    "format_alpaca_prompt",
    "format_chat_prompt",
    "pack_lengths",
    "padding_waste",
    "render_example",
    "special_prefix",
    "tokenizer_fingerprint",
    "tokens_in_batch",
]
