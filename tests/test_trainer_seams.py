"""The seams with the trainers people use, kept working: a ``NoraPeftConfig`` adapter trained by TRL's ``SFTTrainer``
(handed the config as ``peft_config``, so TRL calls ``peft.get_peft_model`` itself) and by transformers' ``Trainer``
(handed a peft model), saved by the trainer, reloaded onto a fresh base model with peft's own
``PeftModel.from_pretrained``, and giving the trained model's logits exactly. Tiny random LLaMA, offline tokenizer,
a handful of CPU steps.
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers as hf
import trl
from datasets import Dataset

import nora
from nora.models.tokenizer import build_offline_tokenizer
from nora.tuner import NoraPeftConfig

TEXTS = [
    "What is the capital of France? Paris is the capital of France.",
    "Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.",
    "The quick brown fox jumps over the lazy dog.",
    "Find the degree of the field extension. The answer is 4.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_offline_tokenizer()


def base_model(tok) -> hf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return hf.LlamaForCausalLM(cfg).eval()


def common_args(tmp_path) -> dict:
    return dict(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )


def probe(tok) -> dict:
    return tok(TEXTS[:2], return_tensors="pt", padding=True)


def check_round_trip(tok, trained: torch.nn.Module, saved, n_targets: int, lora: bool, bf16: bool) -> None:
    """The trainer trained NoRA (and LoRA), and peft's PeftModel.from_pretrained gives the same logits (``bf16``: both
    under CPU bf16 autocast, as SFTConfig's default bf16=True makes accelerate run the trained model's forward)."""
    layers = {n: m for n, m in trained.named_modules() if isinstance(m, nora.NoraActivation)}
    assert len(layers) == n_targets
    assert all(m.nora_B_den.abs().sum() > 0 for m in layers.values())  # NoRA's update moved off zero
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert trainable and all("nora_" in n or "lora_" in n for n in trainable), trainable
    assert any("lora_" in n for n in trainable) == lora
    batch = probe(tok)
    trained.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        want = trained(**batch).logits.float()
        fresh = base_model(tok)
        before = fresh(**batch).logits.float()
        loaded = peft.PeftModel.from_pretrained(fresh, saved)
        got = loaded(**batch).logits.float()
    assert isinstance(loaded.peft_config["default"], NoraPeftConfig)
    assert torch.equal(got, want)
    assert (want - before).abs().max() > 1e-4  # the trained adapter changes the model: the check can fail


def test_trl_sft_trainer_trains_saves_and_peft_reloads_a_nora_pp_adapter(tokenizer, tmp_path):
    config = NoraPeftConfig(task_type="CAUSAL_LM", lora_r=2, lora_target_modules="all-linear")
    args = trl.SFTConfig(**common_args(tmp_path), max_length=32, dataset_text_field="text", packing=False)
    assert args.bf16  # TRL's default: bf16 mixed precision, on the CPU too
    trainer = trl.SFTTrainer(
        model=base_model(tokenizer),
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        peft_config=config,
    )
    assert isinstance(trainer.model, peft.PeftModel)
    result = trainer.train()
    assert result.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    check_round_trip(tokenizer, trainer.model, tmp_path / "adapter", n_targets=2, lora=True, bf16=True)


def test_hf_trainer_trains_saves_and_peft_reloads_a_nora_adapter(tokenizer, tmp_path):
    model = peft.get_peft_model(base_model(tokenizer), NoraPeftConfig(task_type="CAUSAL_LM"))
    data = Dataset.from_dict({"text": TEXTS}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"]
    )
    trainer = hf.Trainer(
        model=model,
        args=hf.TrainingArguments(**common_args(tmp_path)),
        train_dataset=data,
        data_collator=hf.DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    result = trainer.train()
    assert result.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    trainer.save_model(str(tmp_path / "adapter"))
    check_round_trip(tokenizer, trainer.model, tmp_path / "adapter", n_targets=2, lora=False, bf16=False)
