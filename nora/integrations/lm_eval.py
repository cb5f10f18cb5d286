"""lm-evaluation-harness model ``nora``: a training run's base model plus its adapters (LoRA, DoRA, NoRA, NoRA++,
full fine-tuning), scored by lm_eval on any of its tasks.

lm_eval finds models only through its own registry and has no plugin entry point, so this module registers
``nora`` and then hands the command line to lm_eval's own CLI (``lm_eval.__main__.cli_evaluate``): every
lm_eval option works as usual::

    python -m nora.integrations.lm_eval --model nora --model_args run_dir=runs/<run_name> \\
        --tasks mmlu --num_fewshot 5 --device cuda --batch_size 8

``--model_args``: ``run_dir`` (a training run: base model rebuilt from its ``config.yaml``, adapters from its
``adapter/``), or ``pretrained`` (a Hugging Face model id or directory) with ``adapter`` (an adapter directory,
a run directory, or a Hub id written by :func:`nora.app.publish.push_to_hub`); optional ``dtype`` (float32,
bfloat16, ...) and ``model_path`` (a local copy of the run's base weights). ``--device`` defaults to cuda when
available. Other ``HFLM`` arguments pass through. In Python,
``import nora.integrations.lm_eval`` registers the model for ``lm_eval.simple_evaluate(model="nora", ...)``.

A NoRA or NoRA++ adapter is also a peft adapter (``peft_type`` ``NORA``, registered by ``import nora``), so lm_eval's
own ``hf`` model loads it with ``peft=`` through this entry point (or ``simple_evaluate`` after ``import nora``)::

    python -m nora.integrations.lm_eval --model hf \
        --model_args pretrained=meta-llama/Meta-Llama-3-8B,peft=runs/<run_name>/adapter --tasks mmlu --num_fewshot 5
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from nora.app.adapters import apply_adapter, resolve_adapter
from nora.app.reload import load_trained_model
from nora.errors import UserError
from nora.models.causal_lm import resolve_dtype


def _load(
    run_dir: str | None,
    pretrained: str | None,
    adapter: str | None,
    dtype: str | None,
    model_path: str | None,
    device: str | None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the trained model on ``device``, frozen, in eval mode."""

    if (run_dir is None) == (pretrained is None):
        raise UserError(
            "lm_eval model nora: pass either run_dir=<training run> or pretrained=<model> "
            "(with adapter=<adapter dir or hub id>) in --model_args"
        )
    if run_dir is not None:
        trained = load_trained_model(run_dir, device=device, dtype=dtype, model_path=model_path)
        return trained.model, trained.tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": resolve_dtype(dtype)} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    if adapter is not None:
        model, _ = apply_adapter(model, resolve_adapter(adapter))
    return model.to(device) if device else model, tokenizer


@register_model("nora")
class NoraLM(HFLM):
    """lm_eval's ``hf`` model on a model that nora loaded (so NoRA activations and NoRA++ adapters are intact)."""

    def __init__(
        self,
        run_dir: str | None = None,
        pretrained: str | None = None,
        adapter: str | None = None,
        dtype: str | None = None,
        model_path: str | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = _load(run_dir, pretrained, adapter, dtype, model_path, device)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)


def main() -> None:
    """lm_eval's own command line, with the ``nora`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
