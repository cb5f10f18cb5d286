"""torch.compile of models holding rational activations (trainer.compile=true).

Every kernel backend is a ``torch.library`` custom op, so ``torch.compile(..., fullgraph=True)`` traces a NoRA
ViT and a NoRA++ (peft LoRA + NoRA) LLaMA without a single graph break, forward and backward, and the compiled
gradients equal the eager ones. ``torch.library.opcheck`` checks each op's schema, fake implementation, autograd
registration and AOT dispatch. The Triton op is checked the same way under the interpreter in
``test_kernels_triton.py``. Tiny models: these compile on a couple of CPU cores.
"""

import peft
import pytest
import torch
from fixtures import require_cpu_extension
from timm.models.vision_transformer import VisionTransformer
from transformers import LlamaConfig, LlamaForCausalLM

import nora
from nora.kernels import rational_torch_op


def _require(backend):
    if backend == "cpu":
        require_cpu_extension()  # skips locally, fails under CI=true


def _cpu_op():
    from nora.kernels.cpu import rational_cpu_op

    return rational_cpu_op


def _opcheck_inputs(dtype, groups=4, d=16):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, d, generator=gen).to(dtype)
    a = (0.3 * torch.randn(groups, 6, generator=gen)).requires_grad_()
    b = (0.3 * torch.randn(groups, 4, generator=gen)).requires_grad_()
    return x.requires_grad_(), a, b


@pytest.mark.parametrize(
    "backend,dtype,groups",
    [
        ("torch", torch.float64, 4),
        ("torch", torch.float32, 16),
        ("cpu", torch.float32, 4),
        ("cpu", torch.float32, 16),
        ("cpu", torch.bfloat16, 2),
    ],
)
@pytest.mark.parametrize("form", ["A", "B"])
def test_opcheck(backend, dtype, groups, form):
    _require(backend)
    op = rational_torch_op if backend == "torch" else _cpu_op()
    x, a, b = _opcheck_inputs(dtype, groups)
    torch.library.opcheck(op, (x, a, b, form))
    go = torch.randn(x.shape).to(dtype)
    for need in (True, False):  # the backward op is not differentiable itself: no grad inputs
        torch.library.opcheck(op.backward_op, (x.detach(), a.detach(), b.detach(), go, form, need))


def test_the_ops_are_registered_under_one_namespace():
    assert torch.ops.nora.rational_torch.default is not None
    assert torch.ops.nora.rational_torch_backward.default is not None


# --------------------------------------------------------------------------- whole models
def _randomise_adapters(model):
    with torch.no_grad():
        for m in nora.nora_modules(model).values():
            m.nora_B_num.normal_(0, 0.1)
            m.nora_B_den.normal_(0, 0.1)


def _tiny_vit(backend, residual=True):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    nora.apply_nora(model, nora.NoraConfig(backend=backend, trainable_modules=["head"], residual=residual))
    _randomise_adapters(model)
    return model, torch.randn(4, 3, 32, 32)


def _tiny_llama_nora_pp(backend, residual=True):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = peft.get_peft_model(
        LlamaForCausalLM(cfg), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    nora.apply_nora(model, nora.NoraConfig(backend=backend, residual=residual))
    _randomise_adapters(model)
    with torch.no_grad():  # LoRA's B starts at zero: make its gradients (and A's) non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model, torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _loss_fn(model, kind):
    if kind == "vit":
        return lambda x: model(x).square().mean()
    return lambda ids: model(input_ids=ids, labels=ids).loss


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize(
    "kind,backend,compiler,residual",
    [
        ("vit", "cpu", "inductor", True),
        ("vit", "torch", "aot_eager", True),
        ("llama", "cpu", "inductor", True),
        ("llama", "torch", "aot_eager", True),
        ("llama", "cpu", "aot_eager", False),
        ("vit", "torch", "aot_eager", False),
    ],
)
@pytest.mark.slow  # 22 s here: end to end (make test-slow, CI)
def test_fullgraph_compile_no_graph_breaks_same_gradients(kind, backend, compiler, residual):
    """The training step's forward + loss, compiled with fullgraph=True (a graph break would raise), its backward
    through the compiled graph: loss and every trainable gradient equal eager's, in both forms (residual: the
    default; the paper's). ``aot_eager`` stands in for inductor on some cases to keep the suite fast on two cores
    (same dynamo graph, same AOT backward)."""
    _require(backend)
    model, inp = (_tiny_vit if kind == "vit" else _tiny_llama_nora_pp)(backend, residual)
    assert nora.nora_modules(model), "no activation was replaced"
    step = _loss_fn(model, kind)
    loss = step(inp)
    loss.backward()
    want = _grads(model)
    assert any("nora_" in n for n in want) and all(g.abs().sum() > 0 for n, g in want.items() if "nora_B" in n)
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(inp)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    loss2 = compiled(inp)
    loss2.backward()
    got = _grads(model)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    assert set(got) == set(want)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    # the compiled graph calls the backend's op, not a fallback
    op = f"nora.{'residual' if residual else 'rational'}_{backend}"
    ops = {str(node.target) for g in explained.graphs for node in g.graph.nodes if node.op == "call_function"}
    assert any(op in o for o in ops), sorted(ops)


def test_a_pending_fit_range_check_leaves_the_compiled_graph_whole():
    """apply_nora's fit-range check (init='fit') waits for the first forward. While torch.compile traces, its hooks
    do nothing: one graph, no break at every activation (breaks that left the compiled model in fragments even
    after the hooks were gone). The check stays pending until an eager forward runs it and removes the hooks; the
    trainer runs its first forward eagerly for that."""
    from nora.adapter.ranges import fit_range_check_pending

    model, inp = _tiny_vit("torch", residual=False)  # (the paper's form: the residual form needs no check)
    assert fit_range_check_pending(model)
    step = _loss_fn(model, "vit")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(inp)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    assert fit_range_check_pending(model)
    step(inp)
    assert not fit_range_check_pending(model)
