"""Prompt templates: the Stanford Alpaca prompts and a chat prompt (the tokenizer's chat template when it has one)."""

from __future__ import annotations

from typing import Any, Mapping

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


def format_alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (the field's name)
    """The Stanford Alpaca prompt, with or without the input block; the response follows directly."""
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def format_chat_prompt(
    system_prompt: str, question: str, tokenizer=None, use_tokenizer_chat_template: bool = True
) -> str:
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


def render_example(
    record: Mapping[str, Any], name: str, template: str, tokenizer=None, use_tokenizer_chat_template: bool = True
) -> tuple[str, str]:
    """``(prompt, response)`` text of one raw record of dataset ``name`` under ``template``."""
    if name == "alpaca":
        system, instruction, inp, response = "", _s(record["instruction"]), _s(record["input"]), _s(record["output"])
    else:
        system, instruction, inp, response = (
            _s(record["system_prompt"]),
            _s(record["question"]),
            "",
            _s(record["response"]),
        )
    if template == "alpaca":
        if system:
            instruction = f"{system}\n\n{instruction}"
        return format_alpaca_prompt(instruction, inp), response
    user = f"{instruction}\n\n{inp}" if inp else instruction
    return format_chat_prompt(system, user, tokenizer, use_tokenizer_chat_template), response
