"""The LLM demo's world files and pretrained backbone, each generated once and cached (:mod:`nora.demo.llm` runs
the rest). The cache key covers the settings and this module's code with the world generator's and the
tokenizer trainer's, so an edit to any of them pretrains afresh; editing the fine-tuning or reporting does not."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

from nora.data import world as world_mod
from nora.data.instruct.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT
from nora.errors import UserError
from nora.eval.mmlu import description
from nora.files import atomic_dir, write_text_atomic
from nora.files import cache_dir as nora_cache_dir
from nora.models.tokenizer import train_bpe_tokenizer

log = logging.getLogger(__name__)

PKG = Path(__file__).resolve().parents[1]
BACKBONE_CODE = ("data/world.py", "models/tokenizer.py", "demo/llm_backbone.py")


def _key(*parts) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for rel in BACKBONE_CODE:
        h.update((PKG / rel).read_bytes())
    return h.hexdigest()[:10]


def world_data(conf: dict) -> Path:
    """The world's files (pretrain.txt, alpaca.json, mmlu/), generated once per world settings and code."""
    root = nora_cache_dir("demo_llm") / f"world_{_key(conf['world'])}"
    if (root / "DONE").exists():
        return root
    with atomic_dir(root) as tmp:
        info = world_mod.write_world(world_mod.make_world(**conf["world"]), Path(tmp))
        (Path(tmp) / "DONE").write_text(json.dumps(info, indent=1))
    return root


def tokenizer_corpus(text: str) -> list[str]:
    """What the tokenizer learns from: the world's text plus the prompt scaffolding the pipeline adds (Alpaca's
    templates, the MMLU descriptions), so those are a few tokens each rather than dozens."""
    scaffold = [ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT] + [
        description(s, p) for s in world_mod.SUBJECTS for p in ("letters", "continuation")
    ]
    return text.splitlines() + "\n".join(scaffold).splitlines() * 50


def pretrain_backbone(conf: dict, data: Path) -> Path:
    """Pretrain the backbone once (cached by its settings, the world and the code) and return its folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    key = _key(conf["world"], conf["tokenizer"], conf["backbone"], conf["pretrain"])
    out = nora_cache_dir("demo_llm") / f"backbone_{key}"
    if (out / "config.json").exists():
        return out
    pre = conf["pretrain"]
    text = (data / "pretrain.txt").read_text(encoding="utf-8")
    tok = train_bpe_tokenizer(tokenizer_corpus(text), conf["tokenizer"]["vocab_size"], uniform_word_starts=True)
    ids: list[int] = []
    for doc in tok(text.split("\n\n"), add_special_tokens=False)["input_ids"]:
        ids += [tok.bos_token_id, *doc, tok.eos_token_id]
    stream = torch.tensor(ids)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_act="silu",
        **conf["backbone"],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(int(pre["threads"]))  # fixed, so the cached backbone is the same on every machine
    try:
        torch.manual_seed(pre["seed"])
        model = LlamaForCausalLM(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            f"pretraining the LLM demo's backbone ({n_params:,} parameters, {len(ids):,} tokens of world text, "
            f"{pre['steps']} steps; cached in {out})",
        )
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        rest = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": pre["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
            lr=pre["lr"],
            betas=(0.9, 0.95),
        )
        g = torch.Generator().manual_seed(pre["seed"])
        t0, losses = time.time(), []
        T, B, steps = int(pre["seq_len"]), int(pre["batch_size"]), int(pre["steps"])
        for step in range(steps):
            lr = pre["lr"] * min(1.0, (step + 1) / pre["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr
            starts = torch.randint(0, len(stream) - T - 1, (B,), generator=g)
            x = torch.stack([stream[s : s + T] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            if not torch.isfinite(loss):
                raise UserError(
                    f"LLM demo pretraining: loss {loss.item()} at step {step}; lower pretrain.lr in "
                    "configs/demo/demo_llm.yaml"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % 100 == 0 or step + 1 == steps:
                log.info(
                    f"  step {step + 1}/{steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                    f"({time.time() - t0:.0f} s)",
                )
    finally:
        torch.set_num_threads(threads)
    model.config.use_cache = False
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_text_atomic(
            Path(tmp) / "pretraining.json",
            json.dumps(
                {
                    "steps": steps,
                    "tokens_seen": steps * B * T,
                    "corpus_tokens": len(ids),
                    "parameters": n_params,
                    "final_loss": sum(losses[-50:]) / len(losses[-50:]),
                    "wall_time_s": round(time.time() - t0, 1),
                },
                indent=1,
            ),
        )
    return out
