"""Tiny models whose MLP activation inputs have a real pretrained LLM's heavy tails.

A random-initialised model keeps its activation inputs inside about [-3, 3]; a pretrained one does not. The profile
in ``tests/data/real_gate_input_profile.json`` (copied from the project's shared reference data) holds, per layer of a
real pretrained 270M-parameter decoder LLM, the quantiles of its gate inputs on 2,048 tokens of prose, the share of
inputs beyond |x| = 3, 6, 10, 20 and the five largest per-channel maxima (layer 0 reaches -40.2 and +14.0; 29 of its
2,048 channels exceed |x| = 10).

:func:`shape_like_profile` rescales the linear layer feeding each MLP activation (LLaMA's ``gate_proj``, a ViT's
``fc1``), one layer after the other on the same inputs, so that

* the bulk of the layer's inputs puts the profile layer's share beyond |x| = 3 there (one scale for every row), and
* the channels with the largest inputs reach the profile layer's five largest per-channel maxima, on the negative side,
  and the layer's asymmetry on the positive side (one scale and one bias per row: layer 0's largest channel spans
  [-40.2, +14.0], the profile's minimum and maximum). The tiny LLaMA has MLP biases for that (``mlp_bias=True``); a
  real LLaMA has none, and reaches the same asymmetry through its weights.

That gives a few outlier channels per layer carrying the tails, as in the real model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

PROFILE = json.loads((Path(__file__).resolve().parent / "data" / "real_gate_input_profile.json").read_text())
# the profile layers the stress models take, in order: the heaviest tails first (layer 0: -40 / +14, 7% beyond 3)
STRESS_LAYERS = (0, 4, 7, 6)


def _inputs_of(act: nn.Module, run: Callable[[], None]) -> torch.Tensor:
    """Every input the activation ``act`` sees during ``run()``, as (rows, channels)."""
    seen = []
    handle = act.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return torch.cat(seen)


def shape_like_profile(
    layers: list[tuple[nn.Linear, nn.Module]], run: Callable[[], None], profile_layers=STRESS_LAYERS
) -> list[dict]:
    """Rescale each ``(linear, activation)`` pair's linear layer (see the module docstring) in order; ``run()``
    feeds the model its calibration inputs. Returns, per layer, what its inputs then are (min, max, share beyond 3,
    the profile's)."""
    stats = []
    for (linear, act), index in zip(layers, profile_layers * (len(layers) // len(profile_layers) + 1)):
        want = PROFILE["layers"][index]
        x = _inputs_of(act, run)
        with torch.no_grad():
            # the bulk: one scale s with share(|s x| > 3) = the profile's share
            share = float(want["share_abs_gt"]["3"])
            s = 3.0 / torch.quantile(x.abs().flatten().float()[:1_000_000], 1.0 - share).item()
            linear.weight.mul_(s)
            if linear.bias is not None:
                linear.bias.mul_(s)
            x = x * s
            # the outliers: the channels with the largest inputs reach the profile's largest per-channel maxima on
            # the negative side, and (with a bias to shift them) the layer's asymmetry on the positive side:
            # [min, max] -> [-t, t * max/|min|] (layer 0: [-40.2, +14.0] for the largest)
            tops = sorted(want["top_channel_abs_max"], reverse=True)
            ratio = min(1.0, want["max"] / -want["min"]) if want["min"] < 0 else 1.0
            channels = x.abs().amax(0).argsort(descending=True)[: len(tops)]
            for c, target in zip(channels.tolist(), tops):
                lo, hi = x[:, c].min().item(), x[:, c].max().item()
                if hi > -lo:  # the channel's extreme on the negative side
                    lo, hi, sign = -hi, -lo, -1.0
                else:
                    sign = 1.0
                if linear.bias is None:
                    a, b = sign * target / -lo, 0.0
                else:
                    a = sign * target * (1 + ratio) / (hi - lo)
                    b = -target - sign * a * lo
                linear.weight[c].mul_(a)
                if linear.bias is not None:
                    linear.bias[c].mul_(a).add_(b)
        x = _inputs_of(act, run)
        stats.append(
            {
                "min": x.min().item(),
                "max": x.max().item(),
                "share_gt_3": (x.abs() > 3).float().mean().item(),
                "profile_layer": index,
                "profile_share_gt_3": share,
                "profile_min": want["min"],
                "profile_max": want["max"],
            }
        )
    return stats


def stress_llama(seed: int = 0, layers: int = 3, vocab: int = 96):
    """A tiny ``LlamaForCausalLM`` (real constructor, SiLU gated MLP 64 -> 256) shaped like the profile on its
    calibration tokens; returns ``(model, ids, stats)`` with ``ids`` held-out tokens (not the calibration ones)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        mlp_bias=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    calibration = torch.randint(0, vocab, (8, 32), generator=gen)
    held_out = torch.randint(0, vocab, (4, 32), generator=gen)
    pairs = [(layer.mlp.gate_proj, layer.mlp.act_fn) for layer in model.model.layers]
    stats = shape_like_profile(pairs, lambda: model(calibration))
    return model, held_out, stats


def stress_vit(seed: int = 0, depth: int = 3):
    """A tiny timm ``VisionTransformer`` (real constructor, GELU MLP 64 -> 256) shaped like the profile on its
    calibration images; returns ``(model, images, stats)`` with held-out images."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4, mlp_ratio=4, num_classes=10
    ).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    calibration = torch.randn(16, 3, 32, 32, generator=gen)
    held_out = torch.randn(8, 3, 32, 32, generator=gen)
    pairs = [(block.mlp.fc1, block.mlp.act) for block in model.blocks]
    stats = shape_like_profile(pairs, lambda: model(calibration))
    return model, held_out, stats
