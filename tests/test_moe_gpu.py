"""MoE on a GPU (cuda mark: skipped without one): the compiled decoder block (inductor, one graph) against eager, and
LoRA on NF4 stacked experts through torch._grouped_mm against the dense per-expert formula on the CPU."""

from __future__ import annotations

import pytest
import torch

from models import attention
from models.qwen_moe import Experts, grouped_mm_works
from nanotune.lora_experts import FrozenExperts
from tests.test_models_qwen_moe import loop_reference
from tests.test_moe_compile import block_loss, tiny_model

pytestmark = pytest.mark.cuda


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_compiled_block_on_cuda_is_one_graph_and_matches_eager(family):
    model = tiny_model(family).cuda()
    for module in model.modules():
        if isinstance(module, Experts):
            module.choose_kernel("cuda")
            assert module.use_grouped_mm, "torch._grouped_mm should run and compile in bf16 on this GPU"
    model.model.rotary_emb.materialize_after_load("cuda")
    block = model.model.layers[0]
    x = torch.randn(2, 64, 32, device="cuda", dtype=torch.bfloat16)
    position_ids = torch.arange(64, device="cuda").expand(2, 64)
    cos, sin = model.model.rotary_emb(position_ids, x.dtype)
    ctx = attention.build_context("sdpa", (2, 64), "cuda", position_ids)
    grads = []
    for fn in (block_loss, torch.compile(block_loss, fullgraph=True)):
        block.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        fn(block, x_in, cos, sin, ctx).backward()
        grads.append([x_in.grad, block.mlp.gate.weight.grad, block.mlp.experts.gate_up_proj.grad])
    for eager, compiled in zip(*grads):
        assert rel_err(compiled, eager) <= 3e-2


def test_lora_on_nf4_experts_on_cuda_matches_the_dense_formula():
    pytest.importorskip("bitsandbytes")
    assert grouped_mm_works("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    base = Experts(8, 256, 128)
    base.gate_up_proj = torch.nn.Parameter(torch.randn(8, 256, 256, generator=gen) / 16)
    base.down_proj = torch.nn.Parameter(torch.randn(8, 256, 128, generator=gen) / 16)
    module = FrozenExperts(base, nf4=True, device="cuda")
    module.materialize_after_load("cuda")
    module.add_adapters(["gate_up_proj"], rank=16, alpha=32)
    with torch.no_grad():
        module.lora_B["gate_up_proj"].normal_(0.0, 0.05)
    assert module.use_grouped_mm
    counts = torch.tensor([40, 0, 13, 64, 7, 0, 90, 26])
    x = torch.randn(int(counts.sum()), 256, generator=gen)
    x_cuda = x.to("cuda", torch.bfloat16).requires_grad_()
    out = module.project("gate_up_proj", x_cuda, counts.cuda())  # (M, 256)
    (out.float() * torch.linspace(-1, 1, 256, device="cuda")).sum().backward()

    # the CPU reference in fp32: the dequantised NF4 stack plus s B_e A_e, looped over experts
    merged = module.weight("gate_up_proj").float().cpu() + module.delta_weight("gate_up_proj").detach().cpu()
    x_ref = x.to(torch.bfloat16).float().requires_grad_()
    ref = loop_reference(x_ref, merged, counts)
    (ref * torch.linspace(-1, 1, 256)).sum().backward()
    assert rel_err(out.cpu(), ref) <= 2e-2
    assert rel_err(x_cuda.grad.cpu(), x_ref.grad) <= 3e-2
    assert module.lora_A["gate_up_proj"].grad.abs().max() > 0
