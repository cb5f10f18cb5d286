"""A real byte-level BPE tokenizer built offline, for tests and tiny models (no hub access).

``build_offline_tokenizer()`` trains a small byte-level BPE (the scheme LLaMA-3 and GPT-2 use) on a
built-in English corpus with the Hugging Face ``tokenizers`` library and wraps it in a
``PreTrainedTokenizerFast`` with ``<|begin_of_text|>``/``<|end_of_text|>`` and a pad token, so data
pipelines and evaluation run through exactly the same calls as with a hub tokenizer. Training is
deterministic; the result is cached under ``$NORA_CACHE_DIR/tokenizers``.
"""

from __future__ import annotations

import hashlib
import os

from nora.files import cache_dir

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"

_CORPUS = """\
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Below is an instruction that describes a task, paired with an input that provides further context.
### Instruction:
### Input:
### Response:
### System:
### User:
### Assistant:
The following are multiple choice questions (with answers) about abstract algebra.
The following are multiple choice questions (with answers) about high school biology.
Answer: A
Answer: B
Answer: C
Answer: D
A. B. C. D.
What is the capital of France? Paris is the capital of France.
Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.
Translate the sentence into French. Summarize the following paragraph in one sentence.
You are a helpful assistant, who always provides explanation. Think like you are answering to a five year old.
Find the degree of the field extension. The answer is 4 because the minimal polynomial has degree four.
Which of the following is true? All of the above. None of the above. Both statements are false.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000
Cells, genes, proteins, energy, force, mass, velocity, acceleration, history, law, economics, philosophy.
"""


def train_bpe_tokenizer(lines, vocab_size: int, uniform_word_starts: bool = False):
    """A byte-level BPE tokenizer trained on ``lines`` (deterministic), as ``PreTrainedTokenizerFast`` with
    ``<|begin_of_text|>`` prepended, ``<|end_of_text|>`` and a pad token.

    ``uniform_word_starts``: a word has the same token after a space, after a newline and at the start of a text:
    every newline is a piece of its own and every piece gets a leading space (``add_prefix_space`` applied to each
    line, not only to the text), so ``"Rome"`` after ``"### Response:\n"`` is the token ``" Rome"`` that follows
    ``"Answer:"`` in MMLU's continuation protocol and every sentence of pretraining text. Tiny models need that to
    carry an answer learned in one prompt format to another (the offline LLM demo). Decoding then shows those
    spaces (``" \n Rome"``); prompts still tokenise as a prefix of prompt + response, since they end in a
    newline or a word."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=True)]
        )
        if uniform_word_starts
        else pre_tokenizers.ByteLevel(add_prefix_space=False)
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def build_offline_tokenizer(vocab_size: int = 512, corpus: str | None = None, cache: bool = True):
    """Train (or load from cache) a byte-level BPE tokenizer; returns ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    text = corpus if corpus is not None else _CORPUS
    key = hashlib.sha256(f"{vocab_size}|{text}".encode()).hexdigest()[:16]
    root = cache_dir("tokenizers", key)
    if cache and (root / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(root))
    fast = train_bpe_tokenizer(text.splitlines() * 4, vocab_size)
    if cache:
        import shutil

        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        fast.save_pretrained(str(tmp))
        if not (root / "tokenizer.json").exists():
            try:
                os.replace(tmp, root)
            except OSError:
                pass  # another process finished first; its identical copy is used
        shutil.rmtree(tmp, ignore_errors=True)
        return PreTrainedTokenizerFast.from_pretrained(str(root))
    return fast
