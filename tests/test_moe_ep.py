"""Expert parallelism on CPU with 2 and 4 gloo processes equals one process, for Qwen2-MoE (with its shared expert) and
Qwen3-MoE: the loss, the router auxiliary loss (load balancing + z-loss), tokens per expert, and every gradient (each
process's experts against their slice of the one-process gradient; the replicated parameters summed over processes).

The pytest test starts one torchrun job; inside it this file runs as a script (`worker`) that builds, in every process,
the same tiny model, computes the one-process reference on the whole batch, then shards the experts and runs its own
rows of the batch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_moe", "qwen3_moe")
ROWS_PER_PROCESS = 2


def tiny_model(family: str):
    import models
    from models.qwen_moe import QwenMoeConfig

    config = QwenMoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24 if family == "qwen2_moe" else 0, qkv_bias=family == "qwen2_moe",
        qk_norm=family == "qwen3_moe", router_aux_loss_coef=0.05, router_z_loss_coef=0.01, initializer_range=0.2,
        attn_implementation="sdpa", model_type=family,
    )  # fmt: skip
    model = models.build_model(config, "meta", torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def worker() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from nanotune.expert_parallel import ExpertParallelExperts, apply_expert_parallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    for family in FAMILIES:
        model = tiny_model(family)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 64, (ROWS_PER_PROCESS * world, 12), generator=gen)  # the same on every process
        labels = torch.randint(0, 64, ids.shape, generator=gen)

        reference = copy.deepcopy(model)  # one process, the whole batch
        loss = F.cross_entropy(reference(ids).flatten(0, 1), labels.flatten())
        (loss + reference.aux_loss).backward()

        apply_expert_parallel(model, mesh, global_router_losses=True)
        rows = slice(rank * ROWS_PER_PROCESS, (rank + 1) * ROWS_PER_PROCESS)
        logits = model(ids[rows])
        loss_sum = F.cross_entropy(logits.flatten(0, 1), labels[rows].flatten(), reduction="sum")
        # every process holds the same global aux loss: a mean over the processes adds it once
        (loss_sum / ids.numel() + model.aux_loss / world).backward()

        total = loss_sum.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total / ids.numel(), loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.aux_loss.detach(), reference.aux_loss.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(model.tokens_per_expert, reference.tokens_per_expert)
        ref_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            expected = ref_params[name].grad
            owner = model.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, ExpertParallelExperts):  # this process's experts: complete here
                expected = expected[owner.first:owner.first + owner.num_local]
                assert p.shape == ref_params[name].shape, "an expert tensor keeps its whole shape (E, ...)"
                grad = p.grad.to_local()
            else:  # replicated: each process has its tokens' share
                grad = p.grad.clone()
                dist.all_reduce(grad)
            assert expected.abs().max() > 0, f"{family}: {name} has no gradient in the reference"
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{family} {name}: {m}")
    dist.destroy_process_group()


@pytest.mark.parametrize("nproc", [2, 4])
def test_gloo_processes_equal_one_process(nproc):
    from tests.conftest import run_torchrun

    run_torchrun(__file__, nproc=nproc)


if __name__ == "__main__":
    worker()
