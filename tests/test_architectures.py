"""The architecture matrix: NoRA's defaults on tiny random models built with the real timm / transformers constructors.

For every family: the default targets (one per MLP activation: dense, gated, conv-layout, every expert and shared
expert of an MoE), function preservation at init (each rational within its fit error of the original on the inputs
it really sees), a few train-mode optimizer steps that move only NoRA (BatchNorm statistics included), the per-channel
property after training, save -> fresh model -> load with identical outputs, merge, and for decoders the NoRA++
round trip with peft LoRA on all linear layers.

``python tests/test_architectures.py`` prints the README's table of default targets and measured init errors;
``--readme`` writes it into README.md between its markers.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from typing import Callable

import peft
import pytest
import timm
import torch
import transformers as hf
from legacy_formats import write_two_part  # the format before NoRA was a peft method
from torch import nn

import nora
from nora.adapter.io import read_nora_config
from nora.adapter.peft_format import read_nora_layers

V = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
LM = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def timm_model(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)


def metaformer() -> nn.Module:
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, Pooling

    # PoolFormer stages (conv-layout MLPs, Conv2d 1x1) followed by attention stages (channels-last Linear MLPs), as
    # timm's caformer with pooling mixers and GELU
    return MetaFormer(
        num_classes=10,
        depths=(1, 1, 1, 1),
        dims=(16, 16, 32, 32),
        token_mixers=[Pooling, Pooling, Attention, Attention],
        mlp_act=nn.GELU,
        norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2,
    )


def levit() -> nn.Module:
    """A tiny LeViT; timm starts each residual branch's last BatchNorm at weight 0 (the branch outputs 0, and no
    gradient reaches its activation): set to 1, as training leaves them in a pretrained model."""
    model = timm.create_model(
        "levit_128s",
        pretrained=False,
        num_classes=10,
        img_size=64,
        embed_dim=(16, 32),
        key_dim=8,
        depth=(1, 1),
        num_heads=(2, 2),
    )
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm1d) and not mod.weight.any():
                mod.weight.fill_(1.0)
    return model


def causal_lm(cfg_cls, **kw) -> Callable[[], nn.Module]:
    return lambda: hf.AutoModelForCausalLM.from_config(cfg_cls(**{**LM, **kw}))


@dataclass
class Family:
    name: str
    build: Callable[[], nn.Module]
    kind: str  # image (timm), hf_image, lm (decoder), encoder (BERT), seq2seq (T5)
    expect: int  # MLP activations in the model
    layout: str = "channels last"
    image: int = 32
    lora_extra: dict | None = None  # more peft.LoraConfig fields for the NoRA++ round trip
    batch: int = 2  # images per batch (LeViT's BatchNorm1d head maps 2 images to +-1 whatever they are: 4)
    paper_tolerance: float = 0.1  # the paper's form: largest relative change of the output at step 0


FAMILIES = [
    Family("timm ViT", timm_model("vit_tiny_patch16_224", **V), "image", 2),
    Family("timm DeiT (distilled)", timm_model("deit_tiny_distilled_patch16_224", **V), "image", 2),
    Family(
        "timm Swin",
        timm_model(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            patch_size=2,
            window_size=4,
            embed_dim=16,
            depths=(1, 1),
            num_heads=(2, 2),
        ),
        "image",
        2,
    ),
    Family(
        "timm ConvNeXt conv_mlp=True",
        timm_model("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 16, 32, 32)),
        "image",
        4,
        "conv (N, C, H, W)",
    ),
    Family(
        "timm ConvNeXt conv_mlp=False",
        timm_model("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), conv_mlp=False),
        "image",
        4,
        "channels last (N, H, W, C)",
    ),
    Family("timm MetaFormer (pooling + attention)", metaformer, "image", 4, "conv, then channels last"),
    Family(
        "timm InceptionNeXt",
        timm_model("inception_next_tiny", depths=(1, 1), dims=(16, 32)),
        "image",
        2,
        "conv (N, C, H, W)",
    ),
    Family(
        "timm FastViT",
        timm_model("fastvit_t8", layers=(1, 1), embed_dims=(16, 32), token_mixers=("repmixer", "repmixer")),
        "image",
        2,
        "conv (N, C, H, W)",
    ),
    Family(
        "timm EVA-02 (SwiGLU)",
        timm_model("eva02_tiny_patch14_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2),
        "image",
        2,
    ),
    Family("timm BEiT", timm_model("beit_base_patch16_224", **V), "image", 2),
    Family("timm MobileViT (BatchNorm)", timm_model("mobilevit_xxs"), "image", 9),
    Family("LLaMA", causal_lm(hf.LlamaConfig), "lm", 2),
    Family("Qwen2", causal_lm(hf.Qwen2Config), "lm", 2),
    Family("Mistral", causal_lm(hf.MistralConfig), "lm", 2),
    Family("Gemma 2", causal_lm(hf.Gemma2Config, head_dim=8), "lm", 2),
    Family("Gemma 3", causal_lm(hf.Gemma3TextConfig, head_dim=8), "lm", 2),
    Family("Phi-3 (fused gate_up)", causal_lm(hf.Phi3Config, pad_token_id=0), "lm", 2),
    Family(
        "GPT-2 (Conv1D)",
        lambda: hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "lm",
        2,
    ),
    Family(
        "BERT",
        lambda: hf.BertForSequenceClassification(
            hf.BertConfig(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
            )
        ),
        "encoder",
        2,
    ),
    Family(
        "HF ViT",
        lambda: hf.ViTForImageClassification(
            hf.ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                num_labels=10,
            )
        ),
        "hf_image",
        2,
    ),
    Family(
        "T5 (ReLU)",
        lambda: hf.T5ForConditionalGeneration(
            hf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        ),
        "seq2seq",
        4,
    ),
    Family("Mixtral (fused experts)", causal_lm(hf.MixtralConfig, num_local_experts=4, num_experts_per_tok=2), "lm", 2),
    Family(
        "Qwen2-MoE (mlp_only_layers=[0])",
        causal_lm(
            hf.Qwen2MoeConfig,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            mlp_only_layers=[0],
            decoder_sparse_step=1,
        ),
        "lm",
        3,
    ),
    Family(
        "DeepSeek-V3 (first_k_dense_replace=1)",
        causal_lm(
            hf.DeepseekV3Config,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_key_value_heads=4,
        ),
        "lm",
        3,
    ),
    # the families whose width or layout was misread (fc_in/fc_out, (E, I, H) experts, a conv-layout ReLU inside a
    # channels-last MLP) or whose activation was not a known kind (ReLU², Hardswish)
    Family(
        "GPT-J (fc_in/fc_out)",
        lambda: hf.GPTJForCausalLM(
            hf.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)
        ),
        "lm",
        2,
    ),
    Family(
        "CodeGen (fc_in/fc_out)",
        lambda: hf.CodeGenForCausalLM(
            hf.CodeGenConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)
        ),
        "lm",
        2,
    ),
    # layer 0 dense, layer 1 MoE: experts store gate_up_proj (E, H, 2I) and down_proj (E, I, H), transposed against
    # Mixtral's; peft's LoRA cannot wrap Llama4Router (an nn.Linear whose forward returns a tuple): kept out of LoRA
    Family(
        "Llama-4 text (experts (E, I, H))",
        causal_lm(
            hf.Llama4TextConfig,
            intermediate_size_mlp=96,
            num_local_experts=4,
            num_experts_per_tok=1,
            head_dim=8,
            interleave_moe_layer_step=2,
        ),
        "lm",
        3,
        "channels last; experts (E, in, out)",
        lora_extra=dict(exclude_modules=r".*\.router"),
    ),
    Family(
        "timm PVTv2-li (ReLU on conv layout)",
        timm_model(
            "pvt_v2_b0",
            linear=True,
            depths=(1, 1, 1, 1),
            embed_dims=(16, 32, 64, 64),
            num_heads=(1, 2, 4, 4),
            mlp_ratios=(2, 2, 2, 2),
        ),
        "image",
        8,
        "ReLU conv (N, C, H, W), GELU channels last",
    ),
    # ReLU²'s fit error (0.020 on [-3, 3]) is large next to the tiny model's activations (|y| < 0.3): the paper's
    # form moves its output by 12% (the residual form: exact)
    Family("Nemotron (ReLU²)", causal_lm(hf.NemotronConfig), "lm", 2, paper_tolerance=0.2),
    Family("timm LeViT (Hardswish)", levit, "image", 3, image=64, batch=4),
]
BY_NAME = {f.name: f for f in FAMILIES}


def make_inputs(fam: Family) -> dict:
    g = torch.Generator().manual_seed(1)
    if fam.kind in ("image", "hf_image"):
        return {"x": torch.randn(fam.batch, 3, fam.image, fam.image, generator=g)}
    ids = torch.randint(1, 64, (2, 12), generator=g)
    if fam.kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, 64, (2, 6), generator=g)}
    return {"input_ids": ids}


def run(fam: Family, model: nn.Module, inputs: dict) -> torch.Tensor:
    if fam.kind == "image":
        return model(inputs["x"])
    if fam.kind == "hf_image":
        return model(pixel_values=inputs["x"]).logits
    return model(**inputs).logits


def build(fam: Family, state: dict | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = fam.build().eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def record_activations(model: nn.Module, names, fam: Family, inputs: dict) -> tuple[torch.Tensor, dict]:
    """The model's output and every call of each target activation (input, output); MoE experts call theirs once
    per expert hit."""
    calls: dict[str, list] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: calls[n].append((a[0].detach().clone(), o.detach().clone()))
        )
        for n in names
    ]
    with torch.no_grad():
        out = run(fam, model, inputs)
    for h in hooks:
        h.remove()
    return out, calls


def train_steps(fam: Family, model: nn.Module, inputs: dict, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.02)
    model.train()
    for _ in range(steps):
        loss = run(fam, model, inputs).float().pow(2).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def per_channel_outputs_constant(model: nn.Module) -> None:
    """A constant-over-space input gives a constant-over-space output, for every trained activation; and one value
    everywhere gives an output that is constant within each channel group and differs between groups."""
    for name, mod in nora.nora_modules(model).items():
        c, g = mod.width, mod.groups
        if mod.channel_dim == 1:
            x = torch.randn(1, c, 1, 1).expand(2, c, 5, 7).contiguous()
            y = mod(x)
            assert torch.equal(y, y[:, :, :1, :1].expand_as(y)), name
            per_channel = mod(torch.full((1, c, 3, 3), 0.7))[0, :, 0, 0]
            assert torch.equal(mod(torch.full((1, c, 3, 3), 0.7)), per_channel[None, :, None, None].expand(1, c, 3, 3))
        else:
            x = torch.randn(1, 1, c).expand(2, 5, c).contiguous()
            y = mod(x)
            assert torch.equal(y, y[:, :1].expand_as(y)), name
            per_channel = mod(torch.full((1, 3, c), 0.7))[0, 0]
        blocks = per_channel.reshape(g, c // g)
        assert torch.equal(blocks, blocks[:, :1].expand_as(blocks)), name  # one value per group
        assert len(set(blocks[:, 0].tolist())) > 1, name  # and the trained groups differ


def check_family(fam: Family, tmp_path) -> dict:
    """Every check of the matrix on one family; returns the measured numbers (for the README table)."""
    t0 = time.perf_counter()
    model = build(fam)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = make_inputs(fam)
    targets = nora.find_targets(model, nora.NoraConfig())
    assert len(targets) == fam.expect, sorted(targets)
    before, calls = record_activations(model, targets, fam, inputs)
    assert all(calls.values()), [n for n, c in calls.items() if not c]

    # the paper's form: each rational replaces its activation, within its fit error where the fit holds
    paper = build(fam, state)
    report = nora.apply_nora(paper, nora.NoraConfig(residual=False))
    fit_err = report.max_error()
    paper_err = in_range = 0.0
    with torch.no_grad():
        for name, seen in calls.items():
            mod = paper.get_submodule(nora.adapter.inject.resolve_name(paper, name))
            lo, hi = mod.fit_range
            for inp, out in seen:
                err = (mod(inp) - out).abs()
                paper_err = max(paper_err, err.max().item())
                mask = (inp >= lo) & (inp <= hi)
                if mask.any():
                    in_range = max(in_range, err[mask].max().item())
        assert in_range <= fit_err * 1.01 + 1e-6  # where the fit holds, each rational is within its fit error
        paper_e2e = ((run(fam, paper, inputs) - before).abs().max() / before.abs().max()).item()
    assert paper_e2e < fam.paper_tolerance

    # the default (residual) form: every activation and the model's output are the original's at step 0
    report = nora.apply_nora(model, nora.NoraConfig())
    assert len(report) == fam.expect and not report.warnings, report.summary()
    assert all(t["width"] and t["width"] % 8 == 0 for t in report.targets.values())
    init_err = 0.0
    with torch.no_grad():
        for name, seen in calls.items():
            mod = model.get_submodule(nora.adapter.inject.resolve_name(model, name))
            for inp, out in seen:
                init_err = max(init_err, ((mod(inp) - out).abs() / out.abs().clamp_min(1.0)).max().item())
        after = run(fam, model, inputs)
    assert init_err <= 1e-6, init_err  # the kernels' own GELU/SiLU: a few float32 ulps from torch's at most
    e2e = ((after - before).abs().max() / before.abs().max()).item()
    assert e2e <= 1e-5

    # (BatchNorm's num_batches_tracked still counts; with momentum 0 it changes nothing)
    buffers = {k: v.clone() for k, v in model.named_buffers() if "base_" not in k and "num_batches" not in k}
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    train_steps(fam, model, inputs)
    for k, v in model.named_buffers():
        if k in buffers:
            assert torch.equal(v, buffers[k]), f"{k} moved in train mode"
    for k, v in model.named_parameters():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert all(m.nora_B_den.abs().sum() > 0 for m in nora.nora_modules(model).values())
    per_channel_outputs_constant(model)

    with torch.no_grad():
        want = run(fam, model, inputs)
    nora.save_nora(model, tmp_path / "nora")
    specs = json.loads((tmp_path / "nora" / "adapter_config.json").read_text())["layer_specs"]
    assert {n: i["width"] for n, i in specs.items()} == {n: t["width"] for n, t in report.targets.items()}
    fresh = build(fam, state)
    nora.load_nora(fresh, tmp_path / "nora")
    with torch.no_grad():
        assert torch.equal(run(fam, fresh, inputs), want)
        nora.merge_nora(fresh)
        merged = run(fam, fresh, inputs)
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if fam.kind == "lm":
        check_nora_pp(fam, state, inputs, set(targets), tmp_path / "pp")
    originals = sorted({t["original"] for t in report.targets.values()})
    return {
        "family": fam.name,
        "targets": sorted(targets),
        "originals": originals,
        "layout": fam.layout,
        "fit_error": fit_err,
        "paper_init_error": paper_err,
        "paper_output_change": paper_e2e,
        "init_error": init_err,
        "output_change": e2e,
        "seconds": time.perf_counter() - t0,
    }


def check_nora_pp(fam: Family, state: dict, inputs: dict, targets: set, directory) -> None:
    """LoRA on every linear layer + NoRA: trained, saved as one NORA peft adapter, reloaded onto a fresh model by
    nora.load_nora (peft's PeftModel.from_pretrained); the earlier two-part format (tests/legacy_formats.py) loads
    too, its NoRA half keyed by canonical names."""
    model = peft.get_peft_model(
        build(fam, state), peft.LoraConfig(r=2, target_modules="all-linear", **(fam.lora_extra or {}))
    )
    nora.apply_nora(model)
    train_steps(fam, model, inputs, steps=2)
    with torch.no_grad():
        want = run(fam, model, inputs)
    nora.save_nora(model, directory)
    assert set(read_nora_layers(directory)) == targets
    loaded = nora.load_nora(build(fam, state), directory)
    with torch.no_grad():
        assert torch.equal(run(fam, loaded, inputs), want)
    write_two_part(model, directory / "two_part")
    assert set(read_nora_config(directory / "two_part")["layers"]) == targets
    loaded = nora.load_nora(build(fam, state), directory / "two_part")
    assert set(nora.nora_modules(loaded)) == targets
    with torch.no_grad():
        assert torch.equal(run(fam, loaded, inputs), want)


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])
def test_architecture(fam, tmp_path):
    check_family(fam, tmp_path)


IDS = {"input_ids": torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(2))}
SEQ2SEQ = {**IDS, "decoder_input_ids": IDS["input_ids"][:, :4]}
L2 = dict(num_hidden_layers=2, num_attention_heads=4)
# (name, builder, inputs, targets expected, widths expected): discovery on more layouts (activation on the layer
# itself next to fc1/fc2, QuickGELU, a custom GELU class, shared ALBERT layers, more MoE families)
MORE = [
    (
        "OPT (fc1/fc2 on the layer)",
        lambda: hf.OPTForCausalLM(
            hf.OPTConfig(
                vocab_size=64, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64, **L2
            )
        ),
        IDS,
        2,
        {64},
    ),
    (
        "BART",
        lambda: hf.BartForConditionalGeneration(
            hf.BartConfig(
                vocab_size=64,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=64,
            )
        ),
        SEQ2SEQ,
        4,
        {64},
    ),
    (
        "CLIP vision (QuickGELU)",
        lambda: hf.CLIPVisionModel(
            hf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, image_size=32, patch_size=8, **L2)
        ),
        {"pixel_values": torch.randn(1, 3, 32, 32)},
        2,
        {64},
    ),
    (
        "HF ConvNeXt (pwconv1/pwconv2)",
        lambda: hf.ConvNextForImageClassification(
            hf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
        ),
        {"pixel_values": torch.randn(1, 3, 32, 32)},
        2,
        {64, 128},
    ),
    ("Falcon", lambda: hf.FalconForCausalLM(hf.FalconConfig(vocab_size=64, hidden_size=32, **L2)), IDS, 2, {128}),
    (
        "GPT-NeoX",
        lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, **L2)),
        IDS,
        2,
        {64},
    ),
    (
        "DistilBERT",
        lambda: hf.DistilBertModel(hf.DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=2, n_heads=4)),
        IDS,
        2,
        {64},
    ),
    (
        "ALBERT (one shared layer)",
        lambda: hf.AlbertModel(
            hf.AlbertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, embedding_size=16, **L2)
        ),
        IDS,
        1,
        {64},
    ),
    (
        "BLOOM (BloomGelu)",
        lambda: hf.BloomForCausalLM(hf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)),
        IDS,
        2,
        {128},
    ),
    (
        "Qwen3-MoE",
        lambda: hf.Qwen3MoeForCausalLM(
            hf.Qwen3MoeConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                moe_intermediate_size=32,
                num_experts=4,
                num_experts_per_tok=2,
                num_key_value_heads=2,
                head_dim=8,
                **L2,
            )
        ),
        IDS,
        2,
        {32},
    ),
    (
        "GraniteMoE (block_sparse_moe)",
        lambda: hf.GraniteMoeForCausalLM(
            hf.GraniteMoeConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_local_experts=4,
                num_experts_per_tok=2,
                num_key_value_heads=2,
                **L2,
            )
        ),
        IDS,
        2,
        {64},
    ),
]


@pytest.mark.parametrize("name,builder,inputs,count,widths", MORE, ids=[m[0] for m in MORE])
def test_default_targets_on_more_families(name, builder, inputs, count, widths):
    torch.manual_seed(0)
    model = builder().eval()
    with torch.no_grad():
        before = model(**inputs)[0]
    report = nora.apply_nora(model)
    assert len(report) == count and {t["width"] for t in report.targets.values()} == widths, report.summary()
    seen = {}

    def note(name, module, args):
        seen.setdefault(name, args[0].shape[module.channel_dim])

    hooks = [m.register_forward_pre_hook(functools.partial(note, n)) for n, m in nora.nora_modules(model).items()]
    with torch.no_grad():
        after = model(**inputs)[0]  # every rational sees its width on its channel dimension
    for h in hooks:
        h.remove()
    assert seen == {n: t["width"] for n, t in report.targets.items()}
    # step 0 is the original model (the residual form; QuickGELU and BloomGelu through their own modules)
    assert ((after - before).abs().max() / before.abs().max()).item() <= 1e-5


# timm layouts that trip name- or class-based rules: an MLP inside MaxViT's PartitionAttention blocks (targets),
# Swin-v2's cpb_mlp inside attention (not a target), RepViT's unnamed conv1/conv2 projections (conv layout), and
# EfficientFormerV2's activations inside BatchNormAct2d of a conv MLP: (model, kwargs, image, MLP class, acts each)
MORE_TIMM = [
    ("maxvit_nano_rw_256", dict(img_size=64), 64, "Mlp", 1),
    (
        "swinv2_tiny_window8_256",
        dict(img_size=64, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
        64,
        "Mlp",
        1,
    ),
    ("repvit_m0_9", {}, 64, "RepVitMlp", 1),
    ("efficientformerv2_s0", {}, 224, "ConvMlpWithNorm", 2),
]


@pytest.mark.parametrize("name,kw,image,mlp_class,per_mlp", MORE_TIMM, ids=[m[0] for m in MORE_TIMM])
def test_default_targets_on_more_timm_layouts(name, kw, image, mlp_class, per_mlp):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    mlps = sum(type(m).__name__ == mlp_class for m in model.modules())
    assert mlps > 0
    report = nora.apply_nora(model)
    assert len(report) == mlps * per_mlp, report.summary()
    assert not any("cpb_mlp" in n for n in report.targets)
    seen = {}

    def note(n, module, args):
        seen.setdefault(n, args[0].shape[module.channel_dim])

    hooks = [m.register_forward_pre_hook(functools.partial(note, n)) for n, m in nora.nora_modules(model).items()]
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, image, image))).all()
    for h in hooks:
        h.remove()
    assert seen == {n: t["width"] for n, t in report.targets.items()}


# ------------------------------------------------------------------------------------------ refusals and misreads
def gpt_oss() -> nn.Module:
    torch.manual_seed(0)
    return hf.GptOssForCausalLM(
        hf.GptOssConfig(
            **{
                **LM,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "head_dim": 8,
                "layer_types": ["full_attention"] * 2,
            }
        )
    ).eval()


def test_gpt_oss_is_a_clear_refusal_on_both_paths():
    """gpt-oss computes its activation inline in GptOssExperts.forward: one line says NoRA cannot reach it, with
    apply_nora and with peft's get_peft_model, and nothing of the model changes."""
    model = gpt_oss()
    want = (
        "NoRA cannot reach the feed-forward activations of GptOssForCausalLM: GptOssExperts x2 "
        "(model.layers.0.mlp.experts, ...) compute them inline in forward, with no activation module to replace"
    )
    with pytest.raises(nora.AdapterError) as info:
        nora.apply_nora(model)
    assert want in str(info.value) and "\n" not in str(info.value)
    assert "target_modules" not in str(info.value)  # nothing there to name
    assert not nora.nora_modules(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(nora.AdapterError, match=re.escape(want)):
        peft.get_peft_model(gpt_oss(), nora.NoraPeftConfig())


@pytest.mark.parametrize(
    "pattern,refusal",
    [
        (
            r".*\.mlp\.experts",
            r"'model.layers.0.mlp.experts' \(GptOssExperts\) is not an activation: it holds parameters "
            r"\(gate_up_proj \(4, 32, 128\), .*\); GptOssExperts computes its activation inline in "
            r"forward, so NoRA cannot reach it",
        ),
        (
            r".*\.mlp\.router",
            r"'model.layers.0.mlp.router' \(GptOssTopKRouter\) is not an activation: it holds "
            r"parameters \(weight \(4, 32\), bias \(4,\)\); point target_modules at an activation module",
        ),
        (r".*\.mlp", r"'model.layers.0.mlp' \(GptOssMLP\) is not an activation: it has submodules"),
    ],
)
def test_an_explicit_target_that_is_no_activation_is_refused_at_apply_time(pattern, refusal):
    for apply in (
        lambda m: nora.apply_nora(m, nora.NoraConfig(target_modules=[pattern])),
        lambda m: peft.get_peft_model(m, nora.NoraPeftConfig(target_modules=[pattern])),
    ):
        with pytest.raises(nora.AdapterError, match=refusal):
            apply(gpt_oss())


def test_no_default_target_lists_what_is_there_and_the_line_that_targets_it():
    """A LLaMA with ReLU6 (no kind nora fits by name): the error lists the activation modules by type and count and
    gives the target_modules line (NoraPeftConfig on the peft path); that very line then works."""
    build = causal_lm(hf.LlamaConfig, hidden_act="relu6")
    line = r'target_modules=[r"model\.layers\.\d+\.mlp\.act_fn"]'
    with pytest.raises(nora.AdapterError) as info:
        nora.apply_nora(build())
    msg = str(info.value)
    assert (
        f"activation modules found: ReLU6 x2 (model.layers.0.mlp.act_fn, ...); target them with NoraConfig({line})"
    ) in msg, msg
    with pytest.raises(nora.AdapterError) as info:
        peft.get_peft_model(build(), nora.NoraPeftConfig())
    assert f"target them with NoraPeftConfig({line})" in str(info.value)
    config = eval(re.search(r"NoraConfig\((.*?\])\)", msg).group(0), {"NoraConfig": nora.NoraConfig})
    model = build()
    report = nora.apply_nora(model, config)
    assert {n: (t["width"], t["original"]) for n, t in report.targets.items()} == {
        f"model.layers.{i}.mlp.act_fn": (64, "ReLU6") for i in range(2)
    }
    with pytest.raises(nora.AdapterError, match=r"activation modules found: none"):
        nora.apply_nora(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)))


def test_relu_squared_and_hardswish_are_known_kinds_with_their_fit_errors():
    """ReLU² (Nemotron) and Hardswish (LeViT) are fitted by name; measured (5, 4) fit errors on [-3, 3], form A:
    ReLU² 0.0204 max (0.0059 RMS), Hardswish 2.8e-13 (the polynomial x (x + 3) / 6 there)."""
    relu2 = nora.fit_rational("relu2")
    assert 0.015 < relu2.max_error < 0.025 and 0.004 < relu2.rms_error < 0.008
    assert nora.fit_rational("hardswish").max_error < 1e-9
    x = torch.linspace(-6, 6, 101)
    for module, name in ((hf.activations.ReLUSquaredActivation(), "relu2"), (nn.Hardswish(), "hardswish")):
        assert nora.adapter.inject.activation_target(module)[0] == name
        assert torch.equal(nora.adapter.layer.original_function(name)(x), module(x))


def test_pvt_v2_li_relu_is_read_on_channels_when_feature_map_width_equals_hidden_width():
    """PVTv2-li's extra ReLU runs on (B, C, H, W) inside a channels-last MLP. With a 32 x 32 feature map and a
    hidden width of 32 a channels-last reading would pass every shape check and group image columns: the ReLU is
    read on dim 1, and after training its output commutes with permuting image columns but not channel groups."""
    torch.manual_seed(0)
    model = timm.create_model(
        "pvt_v2_b0",
        pretrained=False,
        num_classes=10,
        linear=True,
        depths=(1, 1, 1, 1),
        embed_dims=(8, 16, 16, 16),
        num_heads=(1, 1, 1, 1),
        mlp_ratios=(4, 2, 2, 2),
    ).eval()
    x = torch.randn(2, 3, 128, 128)
    report = nora.apply_nora(model)
    relu = "stages.0.blocks.0.mlp.relu"
    assert (report.targets[relu]["width"], report.targets[relu]["channel_dim"]) == (32, 1)
    assert (
        report.targets["stages.0.blocks.0.mlp.act"]["width"],
        report.targets["stages.0.blocks.0.mlp.act"]["channel_dim"],
    ) == (32, -1)
    seen = {}
    hook = model.get_submodule(relu).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    train_steps(Family("pvt", lambda: model, "image", 8), model, {"x": x}, steps=2)
    hook.remove()
    inp = seen["x"]
    assert inp.shape == (2, 32, 32, 32)  # (B, C, H, W) with C == W: shapes alone cannot tell
    mod = model.get_submodule(relu)
    with torch.no_grad():
        y = mod(inp)
        cols = torch.randperm(32, generator=torch.Generator().manual_seed(0))
        assert torch.equal(mod(inp[..., cols]), y[..., cols])  # per channel: image columns are not grouped
        swap = torch.cat([torch.arange(4, 32), torch.arange(4)])  # move the first group's channels to the end
        assert not torch.equal(mod(inp[:, swap]), y[:, swap])


class FusedExperts(nn.Module):
    """Fused expert tensors as transformers stores them: ``(E, out, in)`` (Mixtral) or ``(E, in, out)`` (Llama-4)."""

    def __init__(self, gate_up: tuple, down: tuple, hidden_size: int | None = None, transposed: bool | None = None):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(gate_up))
        self.down_proj = nn.Parameter(torch.zeros(down))
        self.act_fn = nn.SiLU()
        if hidden_size is not None:
            self.hidden_size = hidden_size
        if transposed is not None:
            self.is_transposed = transposed


class Holder(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.experts = experts


@pytest.mark.parametrize(
    "gate_up,down,kw,width",
    [
        ((4, 128, 32), (4, 32, 64), {}, 64),  # Mixtral: (E, 2I, H), (E, H, I)
        ((4, 32, 128), (4, 64, 32), {}, 64),  # Llama-4: (E, H, 2I), (E, I, H)
        ((4, 64, 64), (4, 64, 32), {}, 32),  # H = 2I, (E, out, in)
        ((4, 64, 64), (4, 32, 64), {}, 32),  # H = 2I, (E, in, out)
        ((4, 64, 32), (4, 32, 32), {}, 32),  # H = I: both orientations give 32
        ((4, 32, 64), (4, 32, 32), {"transposed": True}, 32),
    ],
)
def test_fused_expert_widths_in_both_layouts(gate_up, down, kw, width):
    model = Holder(FusedExperts(gate_up, down, **kw))
    lay = nora.adapter.activation_layout(model, "mlp.experts.act_fn")
    assert (lay.width, lay.channel_dim) == (width, -1), lay


@pytest.mark.parametrize(
    "gate_up,down,kw,refusal",
    [
        ((4, 128, 32), (4, 32, 48), {}, r"chain in neither \(E, out, in\) nor \(E, in, out\)"),
        ((4, 128, 32), (4, 32, 64), {"transposed": True}, r"chain in neither"),  # Mixtral's tensors, flagged transposed
        ((4, 128, 32), (4, 32, 64), {"hidden_size": 64}, r"chain in neither .* with hidden size 64"),
    ],
)
def test_fused_experts_that_do_not_chain_are_an_apply_time_error(gate_up, down, kw, refusal):
    model = Holder(FusedExperts(gate_up, down, **kw))
    with pytest.raises(
        nora.AdapterError,
        match=r"cannot tell the width of mlp\.experts\.act_fn \(in mlp\.experts, "
        r"FusedExperts\): its expert tensors down_proj \(4, 32, \d+\), "
        r"gate_up_proj \(4, 128, 32\) " + refusal,
    ):
        nora.apply_nora(model)


class TwoLayerMLP(nn.Module):
    def __init__(self, first: str, second: str, conv_width: int | None = None):
        super().__init__()
        setattr(self, first, nn.Linear(32, 128))
        setattr(self, second, nn.Linear(128, 32))
        self.act = nn.GELU()
        if conv_width is not None:
            self.dwconv = nn.Conv2d(conv_width, conv_width, 3, padding=1, groups=conv_width)


def test_widths_and_layouts_that_contradict_each_other_are_an_apply_time_error():
    ok = Holder(nn.Module())
    ok.mlp = TwoLayerMLP("fc_in", "fc_out")
    assert nora.apply_nora(ok).targets["mlp.act"]["width"] == 128  # GPT-J's naming: fc_in feeds, fc_out takes
    bad = Holder(nn.Module())
    bad.mlp = TwoLayerMLP("fc1", "fc_out")
    bad.mlp.fc1 = nn.Linear(32, 96)
    with pytest.raises(
        nora.AdapterError,
        match=r"cannot tell the width of mlp\.act \(in mlp, TwoLayerMLP\): fc_out "
        r"\(Linear\) takes 128 channels but fc1 \(Linear\) gives 96",
    ):
        nora.apply_nora(bad)
    conv = Holder(nn.Module())
    conv.mlp = TwoLayerMLP("fc1", "fc2", conv_width=64)  # the conv right after the activation takes 64, fc2 128
    with pytest.raises(
        nora.AdapterError,
        match=r"cannot tell the layout of mlp\.act .*: fc2 \(Linear\) says 128 "
        r"channels last, but dwconv \(Conv2d\) right after it takes 64 "
        r"channels on dim 1",
    ):
        nora.apply_nora(conv)
    unnamed = nn.Sequential(nn.Linear(32, 128), nn.Linear(128, 32), nn.GELU())
    with pytest.raises(
        nora.AdapterError,
        match=r"cannot tell the width of 2 .*: no layer with weights after it, "
        r"and the ones before it give 0 128, 1 32",
    ):
        nora.apply_nora(unnamed, nora.NoraConfig(target_modules=["2"]))


def test_matrix_has_the_families_the_issue_names():
    assert len(FAMILIES) >= 15
    names = " ".join(f.name for f in FAMILIES)
    for family in (
        "ViT",
        "DeiT",
        "Swin",
        "conv_mlp=True",
        "conv_mlp=False",
        "MetaFormer",
        "EVA",
        "MobileViT",
        "LLaMA",
        "Qwen2",
        "Mistral",
        "Gemma",
        "Phi-3",
        "GPT-2",
        "BERT",
        "HF ViT",
        "T5",
        "Mixtral",
        "Qwen2-MoE",
        "GPT-J",
        "CodeGen",
        "Llama-4",
        "PVTv2-li",
        "Nemotron",
        "LeViT",
    ):
        assert family in names, family


def table(rows: list[dict]) -> str:
    lines = [
        "| family | default targets | original | layout | fit error | step-0 error: activation, output "
        "(residual, the default) | (paper's form) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        names = r["targets"]
        shown = ", ".join(f"`{n}`" for n in names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
        lines.append(
            f"| {r['family']} | {len(names)}: {shown} | {', '.join(r['originals'])} | {r['layout']} | "
            f"{r['fit_error']:.1e} | {r['init_error']:.1e}, {r['output_change']:.1e} | "
            f"{r['paper_init_error']:.1e}, {r['paper_output_change']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    import tempfile
    import warnings
    from pathlib import Path

    warnings.simplefilter("ignore")
    rows = []
    t = time.perf_counter()
    for fam in FAMILIES:
        with tempfile.TemporaryDirectory() as d:
            rows.append(check_family(fam, Path(d)))
    text = table(rows)
    print(text)
    print(f"\n{len(rows)} families, {time.perf_counter() - t:.1f} s")
    if "--readme" in sys.argv:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        start, end = "<!-- architecture table:", "<!-- end of architecture table -->"
        body = readme.read_text()
        head, rest = body.split(start, 1)
        marker, rest = rest.split("\n", 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}{marker}\n{text}\n{end}{tail}")
    print(json.dumps([{k: v for k, v in r.items() if k != "targets"} for r in rows], indent=1))
