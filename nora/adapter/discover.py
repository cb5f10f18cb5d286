"""Find a model's feed-forward activations by what they are, and where their channels are.

Default targets (``NoraConfig.target_modules=None``): every activation module of a known kind (torch's,
transformers' and timm's GELU / SiLU / ReLU variants, :data:`DEFAULT_KINDS`) that sits inside a
feed-forward block: a dense or gated MLP, every expert of an MoE (fused experts share one activation
module) and its shared experts, in every layer. An activation is inside a feed-forward block when one of
its ancestors is one by class or attribute name (``mlp``, ``ffn``, ``intermediate``, ``experts``,
``DenseReluDense``, ``SwiGLU``, ...), or when its parent holds the MLP's input and output projections itself
(``fc1``/``fc2`` on an OPT, BART or Whisper layer, ``pwconv1``/``pwconv2`` on HF ConvNeXt). Anything under
an attention block, a squeeze-excite block, a router, a token mixer or a classifier head is never a default
target, and neither is ``nn.Identity`` (nor a sigmoid/tanh gate).

Layout: the channels an activation sees are found from the layers around it: the input width of the MLP's
output projection (``fc2``, ``fc_out``, ``down_proj``, ``c_proj``, ``wo``, ...; for gated and fused ``gate_up``
MLPs this is the activation's width) or the output width of its input projection (``fc1``, ``fc_in``, ...), for
``nn.Linear``, transformers' ``Conv1D`` (GPT-2), ``nn.Conv1d/2d`` (conv-layout MLPs: channels on dim 1), fused MoE
expert tensors (``(E, out, in)`` as Mixtral's, or ``(E, in, out)`` as Llama-4's and gpt-oss's: the orientation is
the one in which the input and output tensors chain, or the module's ``is_transposed``) and BatchNorm (channels on
dim 1). An activation whose next layer with weights is a convolution runs on the conv layout even inside a
channels-last block (PVTv2's extra ReLU between ``fc1`` and its depthwise conv). The readings are checked against
each other where a block holds both projections: a width or layout that does not chain is an :class:`AdapterError`
that names the module and what was read, at apply time. Peft-wrapped layers are looked through.

When nothing is found, :func:`activation_census` lists the activation modules that are there (by type and count,
with the ``target_modules`` patterns that name them) and :func:`inline_blocks` the feed-forward blocks that hold
weights but no activation module (gpt-oss's experts compute theirs inline: nothing to replace).

Nothing here imports transformers, timm or peft: classes are recognised by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from nora.adapter.config import AdapterError
from nora.adapter.layer import GroupRational

# activation class name -> fitting target (nn.GELU is resolved through its `approximate` field)
KNOWN_ACTIVATIONS = {
    "GELU": "gelu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "GELUPytorchTanh": "gelu_tanh",
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "Swish": "silu",
    "ReLU": "relu",
    "Identity": "identity",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "QuickGELU": "quick_gelu",
    "QuickGELUActivation": "quick_gelu",
    "Mish": "mish",
    "MishActivation": "mish",
    "ReLUSquaredActivation": "relu2",
    "Hardswish": "hardswish",
    "HardSwish": "hardswish",
}
# the kinds found by default in feed-forward blocks (the ones without a known name are fitted from their forward)
DEFAULT_KINDS = frozenset(
    {
        "GELU",
        "GELUActivation",
        "GELUTanh",
        "PytorchGELUTanh",
        "NewGELUActivation",
        "FastGELUActivation",
        "GELUPytorchTanh",
        "QuickGELU",
        "QuickGELUActivation",
        "AccurateGELUActivation",
        "SiLU",
        "SiLUActivation",
        "Swish",
        "ReLU",
        "Mish",
        "MishActivation",
        "BloomGelu",
        "ReLUSquaredActivation",
        "Hardswish",
        "HardSwish",
    }
)

_FF_CLASS = re.compile(r"mlp|feedforward|feed_forward|ffn|intermediate|dense(relu|act|gated)|expert|moe|glu|layerff")
_FF_ATTR = re.compile(
    r"mlp|mlp_.*|.*_mlp|ffn|ff|feed_forward|feedforward|intermediate|experts?|shared_experts?"
    r"|densereludense|moe|block_sparse_moe"
)
_NOT_FF_CLASS = re.compile(
    r"attention|attn|squeezeexcit|semodule|selayer|seblock|effectivese|router|topk|head$"
    r"|classifier|pooler"
)
_NOT_FF_ATTR = frozenset(
    {
        "attn",
        "attention",
        "self_attn",
        "self_attention",
        "cross_attn",
        "crossattention",
        "se",
        "router",
        "gate",
        "token_mixer",
        "pos_embed",
        "head",
        "classifier",
        "pooler",
    }
)

# the MLP's output projection (its input width is the activation's width) and input projection
_OUTPUT_PROJ = (
    "fc2",
    "fc_out",
    "down_proj",
    "c_proj",
    "wo",
    "w2",
    "dense_4h_to_h",
    "lin2",
    "pwconv2",
    "proj_out",
    "ffn_output",
)
_INPUT_PROJ = (
    "fc1",
    "fc_in",
    "gate_proj",
    "w1",
    "c_fc",
    "dense_h_to_4h",
    "wi",
    "wi_0",
    "lin1",
    "fc1_g",
    "pwconv1",
    "dense",
    "up_proj",
    "gate_up_proj",
    "w13",
    "w3",
    "ffn",
)
_PEFT_SEGMENT = "base_layer"


# ------------------------------------------------------------------------------------------ peft names
def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


PEFT_PREFIX = "base_model.model."


def strip_peft(name: str) -> str:
    """A module or tensor name in peft's terms as it is in the base model: peft's ``base_model.model.`` prefix and its
    wrapper segments (``base_layer``) removed. The one place that knows how peft wraps a name."""
    return ".".join(p for p in name.removeprefix(PEFT_PREFIX).split(".") if p != _PEFT_SEGMENT)


def canonical_name(model: nn.Module, name: str) -> str:
    """Name relative to the unwrapped base model (:func:`strip_peft` on a peft model), so a name is the same with or
    without LoRA."""
    return strip_peft(name) if is_peft_model(model) else name


def module_index(model: nn.Module) -> dict[str, str]:
    """Canonical module name -> its real name in ``model`` (the innermost one where peft nests wrappers)."""
    if not is_peft_model(model):
        return {n: n for n, _ in model.named_modules()}
    index: dict[str, str] = {}
    for name, _ in model.named_modules():
        index[canonical_name(model, name)] = name  # later (deeper) names win: the wrapped module itself
    return index


def resolve_name(model: nn.Module, canonical: str, index: dict[str, str] | None = None) -> str:
    """The real name in ``model`` of the module called ``canonical`` (see :func:`canonical_name`)."""
    if not is_peft_model(model):
        return canonical
    index = index if index is not None else module_index(model)
    return index.get(canonical, f"base_model.model.{canonical}")


def unwrap(module):
    """The layer under peft's wrappers (``base_layer`` chains)."""
    while isinstance(module, nn.Module) and isinstance(getattr(module, _PEFT_SEGMENT, None), nn.Module):
        module = module.base_layer
    return module


# ------------------------------------------------------------------------------------------ kinds
def is_rational(module: nn.Module) -> bool:
    return isinstance(module, GroupRational)


def is_activation(module: nn.Module) -> bool:
    """An activation module of a known name (any of :data:`KNOWN_ACTIVATIONS` or :data:`DEFAULT_KINDS`), not
    ``nn.Identity`` and not already a rational."""
    name = type(module).__name__
    return (
        (name in KNOWN_ACTIVATIONS or name in DEFAULT_KINDS or isinstance(module, nn.GELU))
        and name != "Identity"
        and not is_rational(module)
    )


def is_default_kind(module: nn.Module) -> bool:
    return (
        type(module).__name__ in DEFAULT_KINDS or isinstance(module, (nn.GELU, nn.SiLU, nn.ReLU, nn.Hardswish))
    ) and not is_rational(module)


def is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or type(module).__name__ == "Identity"


def _has_projections(parent: nn.Module) -> bool:
    """The parent holds an MLP's input and output projections itself (OPT, BART, Whisper, HF ConvNeXt layers)."""
    has = lambda names: any(_weight_widths(getattr(parent, a, None)) is not None for a in names)  # noqa: E731
    return has(_INPUT_PROJ) and has(_OUTPUT_PROJ)


def in_feed_forward(model: nn.Module, name: str) -> bool:
    """Whether the module at ``name`` sits in a feed-forward block: an ancestor is one by attribute or class name, or
    its parent holds the MLP's two projections itself. Never under an ancestor attribute named like attention,
    squeeze-excite, router, token mixer or head; an ancestor class named so (``Attention``, ``SEModule``,
    ``...Head``) excludes what lies below it unless a feed-forward block sits deeper (MaxViT's ``mlp`` inside its
    ``PartitionAttention`` block is one; Swin-v2's ``cpb_mlp`` inside ``attn`` is not)."""
    parts = name.split(".")
    mod, last_ff, last_excluded = model, -1, -1
    for depth, part in enumerate(parts[:-1]):
        mod = getattr(mod, part)
        cls, attr = type(mod).__name__.lower(), part.lower()
        if attr in _NOT_FF_ATTR:
            return False
        if _NOT_FF_CLASS.search(cls):
            last_excluded = depth
        if part != _PEFT_SEGMENT and (_FF_ATTR.fullmatch(attr) or _FF_CLASS.search(cls)):
            last_ff = depth
    if last_excluded >= last_ff and last_excluded >= 0:
        return False
    return last_ff >= 0 or _has_projections(unwrap(mod))


def default_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical name -> module of every default target (see the module docstring)."""
    return {
        canonical_name(model, n): m
        for n, m in model.named_modules()
        if n and is_default_kind(m) and in_feed_forward(model, n)
    }


# ------------------------------------------------------------------------------------------ what is there
_ACTIVATION_HOMES = ("torch.nn.modules.activation", "transformers.activations", "timm.layers.activations")
_NOT_ACTIVATION = frozenset({"Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention", "GLU", "Threshold"})
_ACTIVATION_NAME = re.compile(
    r"(activation|act|gelu|relu\d*|silu|swish|mish|elu|sigmoid|tanh|softplus|squared)$", re.IGNORECASE
)


def looks_like_activation(module: nn.Module) -> bool:
    """An activation module of any kind, known or not: a parameterless leaf of torch's, transformers' or timm's
    activation modules or named like one (``ReLU6``, ``LeakyReLU``, ``XyzActivation``); never a rational, an
    ``nn.Identity``, a softmax or a GLU (which halves its input)."""
    cls = type(module)
    if (
        is_rational(module)
        or is_identity(module)
        or cls.__name__ in _NOT_ACTIVATION
        or next(module.children(), None) is not None
        or next(module.parameters(), None) is not None
    ):
        return False
    return (
        is_activation(module)
        or cls.__module__.startswith(_ACTIVATION_HOMES)
        or bool(_ACTIVATION_NAME.search(cls.__name__))
    )


def name_pattern(name: str) -> str:
    """A ``target_modules`` regex for ``name`` and its siblings in the other layers (layer indices as ``\\d+``)."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def activation_census(model: nn.Module) -> tuple[dict[str, list[str]], list[str]]:
    """(activation class name -> canonical names of its modules, in model order; ``target_modules`` patterns that
    name the ones inside feed-forward blocks, or all of them where none is): what an error says is there."""
    found: dict[str, list[str]] = {}
    in_ff: list[str] = []
    for name, mod in model.named_modules():
        if name and looks_like_activation(mod):
            cname = canonical_name(model, name)
            found.setdefault(type(mod).__name__, []).append(cname)
            if in_feed_forward(model, name):
                in_ff.append(cname)
    names = in_ff or [n for ns in found.values() for n in ns]
    return found, list(dict.fromkeys(name_pattern(n) for n in names))


def inline_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Feed-forward blocks that hold their weights themselves (fused expert tensors, or linear layers as direct
    children) and no activation module anywhere below them: their activation is computed inline in ``forward``
    (gpt-oss's experts), where no module can be replaced. Class name -> canonical names."""
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        attr, cls = name.rpartition(".")[2].lower(), type(mod).__name__
        if (
            not name
            or not (_FF_ATTR.fullmatch(attr) or _FF_CLASS.search(cls.lower()))
            or _NOT_FF_CLASS.search(cls.lower())
            or attr in _NOT_FF_ATTR
        ):
            continue
        owns = any(_is_expert_tensor(p) for p in mod.parameters(recurse=False)) or any(
            isinstance(unwrap(c), nn.Linear) or type(unwrap(c)).__name__ == "Conv1D" for c in mod.children()
        )
        if owns and not any(looks_like_activation(m) or is_rational(m) for m in mod.modules()):
            out.setdefault(cls, []).append(canonical_name(model, name))
    return out


# ------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Layout:
    """The channels an activation sees: ``width`` channels on dimension ``channel_dim`` (-1 or 1)."""

    width: int | None
    channel_dim: int = -1
    source: str = ""  # the layer it was read from, for messages


def _weight_widths(mod) -> tuple[int, int, int] | None:
    """(input width, output width, channel dim) of a projection layer, or None."""
    mod = unwrap(mod)
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features, -1
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return mod.in_channels, mod.out_channels, 1
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # transformers' GPT-2 Conv1D: weight (in, out)
        return mod.weight.shape[0], mod.nf, -1
    if isinstance(mod, nn.Parameter) and mod.dim() == 3:  # fused MoE experts: (E, out, in)
        return mod.shape[2], mod.shape[1], -1
    return None


def _fused(attr: str, parent: nn.Module) -> bool:
    return "gate_up" in attr or attr == "w13" or type(parent).__name__ == "GluMlp"


def _named(parent: nn.Module, names: tuple[str, ...]) -> list[tuple[str, tuple[int, int, int]]]:
    """(attribute, widths) of the 2-D projections (Linear, Conv1D, Conv) ``parent`` holds under ``names``."""
    return [
        (a, w)
        for a in names
        if not _is_expert_tensor(getattr(parent, a, None))
        and (w := _weight_widths(getattr(parent, a, None))) is not None
    ]


def _kind(parent: nn.Module, attr: str) -> str:
    return type(unwrap(getattr(parent, attr))).__name__


def activation_layout(model: nn.Module, name: str, index: dict[str, str] | None = None) -> Layout:
    """The :class:`Layout` of the activation at canonical ``name`` (width None if it cannot be told).

    Raises :class:`AdapterError` where the layers around it contradict each other (the output projection takes a
    width the input projection does not give, fused expert tensors that chain in neither orientation, a convolution
    right after the activation that takes another width): a misread would fail at the first forward, or silently
    group the wrong dimension."""
    real = resolve_name(model, name, index)
    parent_name, _, attr = real.rpartition(".")
    parent = unwrap(model.get_submodule(parent_name) if parent_name else model)
    where = f"{name} (in {parent_name or 'the model'}, {type(parent).__name__})"
    if isinstance(parent, nn.modules.batchnorm._BatchNorm):  # e.g. timm's BatchNormAct2d
        return Layout(parent.num_features, 1, f"{parent_name} ({type(parent).__name__})")
    experts = _expert_layout(parent, where)
    if experts is not None:
        return experts
    outputs, inputs = _named(parent, _OUTPUT_PROJ), _named(parent, _INPUT_PROJ)
    if outputs:
        out_attr, w = outputs[0]
        lay = Layout(w[0], w[2], f"{out_attr} ({_kind(parent, out_attr)})")
        for in_attr, v in inputs:  # the layer that feeds the activation gives what the output projection takes
            gives = v[1] // 2 if _fused(in_attr, parent) and v[1] % 2 == 0 else v[1]
            if gives != lay.width:
                raise AdapterError(
                    f"cannot tell the width of {where}: {out_attr} ({_kind(parent, out_attr)}) takes "
                    f"{lay.width} channels but {in_attr} ({_kind(parent, in_attr)}) gives {v[1]}; "
                    "target another activation or report this layout"
                )
    elif inputs:
        in_attr, w = inputs[0]
        width = w[1] // 2 if _fused(in_attr, parent) else w[1]
        lay = Layout(width, w[2], f"{in_attr} ({_kind(parent, in_attr)})")
    else:
        return _neighbour_layout(parent, attr, where)
    return _conv_after(parent, attr, lay, where)


def _conv_after(parent: nn.Module, attr: str, lay: Layout, where: str) -> Layout:
    """``lay``, or the conv layout where the next layer with weights after the activation (in registration order)
    is a convolution: an activation that feeds a conv runs on (N, C, H, W) even inside a channels-last block
    (PVTv2-li's ReLU between ``fc1`` and the depthwise conv)."""
    if lay.channel_dim == 1 or attr not in parent._modules:
        return lay
    names = list(parent._modules)
    for child in names[names.index(attr) + 1 :]:
        mod = unwrap(parent._modules[child])
        if mod is None:
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if mod.in_channels != lay.width:
                raise AdapterError(
                    f"cannot tell the layout of {where}: {lay.source} says {lay.width} channels last, "
                    f"but {child} ({type(mod).__name__}) right after it takes {mod.in_channels} "
                    "channels on dim 1"
                )
            return Layout(
                lay.width,
                1,
                f"{child} ({type(mod).__name__}, right after the activation; {lay.width} also read from {lay.source})",
            )
        if next(mod.parameters(), None) is not None:
            return lay
    return lay


# ------------------------------------------------------------------------------------------ fused experts
def _is_expert_tensor(t) -> bool:
    return isinstance(t, nn.Parameter) and t.dim() == 3


def _expert_reading(out, inp, transposed: bool) -> tuple[int, int] | None:
    """(activation width, hidden width) of fused expert tensors read as ``(E, in, out)`` if ``transposed`` else
    ``(E, out, in)``; None if the input and output tensors do not chain that way."""

    def io(t):  # (in, out) of one expert
        return (t.shape[1], t.shape[2]) if transposed else (t.shape[2], t.shape[1])

    if out is not None:
        width, hidden = io(out[1])
        if inp is not None:
            h_in, gives = io(inp[1])
            if h_in != hidden or gives != width * (2 if _fused(inp[0], None) else 1):
                return None
        return width, hidden
    h_in, gives = io(inp[1])
    if _fused(inp[0], None) and gives % 2:
        return None
    return (gives // 2 if _fused(inp[0], None) else gives), h_in


def _expert_layout(parent: nn.Module, where: str) -> Layout | None:
    """The layout of an activation inside fused MoE experts (3-D ``down_proj`` / ``gate_up_proj`` tensors), None if
    ``parent`` holds none: the orientation whose tensors chain (``down_proj`` takes what ``gate_up_proj`` gives,
    and gives what it takes), narrowed by the module's ``is_transposed`` and ``hidden_size``/``hidden_dim``."""
    out = next(((a, getattr(parent, a)) for a in _OUTPUT_PROJ if _is_expert_tensor(getattr(parent, a, None))), None)
    inp = next(((a, getattr(parent, a)) for a in _INPUT_PROJ if _is_expert_tensor(getattr(parent, a, None))), None)
    if out is None and inp is None:
        return None
    readings = {t: r for t in (False, True) if (r := _expert_reading(out, inp, t)) is not None}
    flag = getattr(parent, "is_transposed", None)
    if isinstance(flag, bool):
        readings = {t: r for t, r in readings.items() if t == flag}
    hidden = next((v for a in ("hidden_size", "hidden_dim") if isinstance(v := getattr(parent, a, None), int)), None)
    if hidden is not None:
        readings = {t: r for t, r in readings.items() if r[1] == hidden}
    shapes = ", ".join(f"{a} {tuple(t.shape)}" for a, t in (out, inp) if t is not None)
    widths = {r[0] for r in readings.values()}
    if len(widths) != 1:
        why = (
            "chain in neither (E, out, in) nor (E, in, out)"
            if not widths
            else f"chain both as (E, out, in) (width {readings[False][0]}) and (E, in, out) (width {readings[True][0]})"
        )
        raise AdapterError(
            f"cannot tell the width of {where}: its expert tensors {shapes} {why}"
            + (f" with hidden size {hidden}" if hidden is not None else "")
        )
    transposed = next(iter(readings))
    orient = "(E, in, out)" if transposed else "(E, out, in)"
    return Layout(widths.pop(), -1, f"{shapes}, read as {orient}")


def _projections(module: nn.Module) -> list[tuple[str, tuple[int, int, int]]]:
    return [
        (n, w)
        for n, m in module.named_modules()
        if n.rpartition(".")[2] != _PEFT_SEGMENT and (w := _weight_widths(m)) is not None
    ]


def _neighbour_layout(parent: nn.Module, attr: str, where: str = "") -> Layout:
    """Unnamed projections (LeViT's ``ln1``/``ln2``, ``conv1``/``conv2``, ``dense1``/``dense2``): the first
    projection registered after the activation, else the one before it (an error where the projections before it
    give different widths and none after it tells which one feeds it)."""
    names = list(parent._modules)
    if attr not in names:
        return Layout(None, -1, "")
    at = names.index(attr)
    for child in names[at + 1 :]:
        found = _projections(parent._modules[child]) if parent._modules[child] is not None else []
        if found:
            sub, w = found[0]
            return Layout(w[0], w[2], f"{child}{'.' + sub if sub else ''} (after the activation)")
    direct = [(child, w) for child in names[:at] if (w := _weight_widths(parent._modules[child])) is not None]
    if len({w[1] for _, w in direct}) > 1:
        raise AdapterError(
            f"cannot tell the width of {where}: no layer with weights after it, and the ones before it "
            "give " + ", ".join(f"{n} {w[1]}" for n, w in direct[-4:])
        )
    for child in reversed(names[:at]):
        found = _projections(parent._modules[child]) if parent._modules[child] is not None else []
        if found:
            sub, w = found[-1]
            return Layout(w[1], w[2], f"{child}{'.' + sub if sub else ''} (before the activation)")
    return Layout(None, -1, "")


# ------------------------------------------------------------------------------------------ layers
def layer_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated layers of a model: the outermost non-container modules held in a ModuleList/Sequential."""
    units: list[tuple[str, nn.Module]] = []
    containers = (nn.ModuleList, nn.Sequential, nn.ModuleDict)

    def walk(prefix: str, mod: nn.Module, in_container: bool) -> None:
        for child_name, child in mod._modules.items():
            if child is None:
                continue
            full = f"{prefix}.{child_name}" if prefix else child_name
            if in_container and not isinstance(child, containers):
                units.append((full, child))
            elif not is_rational(child):
                walk(full, child, isinstance(child, containers))

    walk("", model, False)
    return units


def coverage(model: nn.Module, targets: list[str]) -> tuple[dict[str, dict], list[str], list[str]]:
    """Per layer type: how many layers it has, how many hold targets, how many targets; warnings for layer types
    only partly covered, and notes for layer types that hold no target at all."""
    units = [(canonical_name(model, n), m) for n, m in layer_units(model)]
    per: dict[str, dict] = {}
    for uname, unit in units:
        kind = type(unit).__name__
        inside = [t for t in targets if t.startswith(uname + ".")]
        row = per.setdefault(kind, {"layers": 0, "with_targets": 0, "targets": 0, "without": []})
        row["layers"] += 1
        row["targets"] += len(inside)
        if inside:
            row["with_targets"] += 1
        else:
            row["without"].append(uname)
    partial, notes = [], []
    for kind, row in per.items():
        if 0 < row["with_targets"] < row["layers"]:
            partial.append(
                f"only {row['with_targets']} of {row['layers']} {kind} layers hold a target; none in "
                + ", ".join(row["without"][:4])
                + (" ..." if len(row["without"]) > 4 else "")
            )
    covered = {k: r for k, r in per.items() if r["with_targets"]}
    for kind, row in per.items():
        if not row["with_targets"] and covered:
            notes.append(f"no target in the {row['layers']} {kind} layer(s) (no feed-forward activation found there)")
    for row in per.values():
        row.pop("without")
    return per, partial, notes
