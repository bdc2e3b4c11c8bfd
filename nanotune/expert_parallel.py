"""Expert parallelism for stacked MoE experts: each process of a group holds E / ep of the experts of every layer, and
tokens travel to the process that holds their expert and back (GShard, Lepikhin et al. 2020; dropless, as in
MegaBlocks, Gale et al. 2022: no capacity factor, no token dropped).

    apply_expert_parallel(model, mesh)      # a 1-D DeviceMesh of the ep processes; on the meta device or loaded

Each stacked expert tensor becomes a DTensor of its whole shape (E, ...), sharded by experts over the ep processes
(`Shard(0)`: process p holds experts [p * E / ep, (p + 1) * E / ep), contiguous). Whoever shards the model further sees
whole-shape tensors: the sharded loader reads each process's experts from the checkpoint, DCP saves and reshards them,
the streamed `final/` gathers them, and FSDP2 shards each process's experts over the data-parallel processes that hold
the same ones (nanotune/parallel.py).

Per MoE layer and forward, on every process (its own tokens, its own router decisions, replicated router):
1. the K slots of each token are sorted by global expert (`sort_by_expert`): the rows for process p's experts are one
   contiguous run, so the send buffer is the sorted rows themselves;
2. the per-expert counts are exchanged (one small all-to-all) and their per-process sums read back to the host: the
   split sizes of the token all-to-all (the one host sync, which a dropless exchange cannot avoid);
3. all-to-all of the rows; the received rows (grouped by source process, then by local expert) are regrouped by local
   expert and run through the grouped GEMMs of the local experts;
4. the results go back by the reverse all-to-all, in the order the rows left, and are combined with the routing
   weights as on one process.
The all-to-alls are autograd-aware (torch.distributed.nn), so the backward sends gradients the same way back.

The router losses: by default each process computes them over its own tokens, as a micro-batch of one process would
(the trainer's convention: a data-parallel process is one micro-batch of the step). With `global_router_losses` the
model sums its routing statistics over the group first (`QwenMoeForCausalLM.router_group`), so that every process
gets the loss of all the group's tokens together. Gradients of the replicated parameters (attention, router, norms)
are per process and are summed over the group by whoever trains (FSDP / DDP / a plain all-reduce); an expert's
gradient is complete for the group's tokens on the process that holds it (the reverse all-to-all brings it there).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from models.qwen_moe import Experts, combine, grouped_matmul, sort_by_expert
from nanotune.lora_experts import FrozenExperts


class ExpertParallelExperts(Experts):
    """One process's share of a layer's stacked experts: global experts [first, first + E_local)."""

    def __init__(self, base: Experts, mesh):
        nn.Module.__init__(self)
        self.split_over(mesh, base.num_experts)
        for name in ("gate_up_proj", "down_proj"):  # whole-shape DTensors, each process holding its experts
            self.register_parameter(name, by_experts(getattr(base, name), mesh))
        self.use_grouped_mm = base.use_grouped_mm

    def split_over(self, mesh, num_experts: int) -> None:
        self.mesh, self.group = mesh, mesh.get_group()
        self.ep, rank = mesh.size(), mesh.get_local_rank()
        E = num_experts
        if E % self.ep:
            raise ValueError(f"parallel.ep = {self.ep} does not divide the {E} experts of each layer")
        self.num_experts, self.num_local = E, E // self.ep
        self.first = rank * self.num_local

    def project(self, name: str, x_MK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by local expert times this process's experts of `name` (E_local, out, in)."""
        weight = getattr(self, name)
        if isinstance(weight, DTensor):  # under FSDP2 too: gathered, it is the ep-sharded DTensor again
            weight = weight.to_local()
        return grouped_matmul(x_MK, weight, counts_E, self.use_grouped_mm)

    def forward(self, x_ND: torch.Tensor, expert_NK: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
        if self.use_grouped_mm is None:
            self.choose_kernel(x_ND.device)
        order, token, counts = sort_by_expert(expert_NK, self.num_experts)  # (N*K,), (N*K,), (E,)
        send_EL = counts.view(self.ep, self.num_local)  # (ep, E_local): rows for each process's experts
        recv_EL = torch.empty_like(send_EL)
        dist.all_to_all_single(recv_EL, send_EL, group=self.group)  # recv[p, e]: rows from process p for my expert e
        splits = torch.stack([send_EL.sum(1), recv_EL.sum(1)]).tolist()  # the host sync: all-to-all split sizes
        send_sizes, recv_sizes = splits

        x_sent = x_ND[token]  # (N*K, D) sorted by global expert: process p's rows are one run
        x_recv = exchange(x_sent, recv_sizes, send_sizes, self.group)  # (M, D): by source process, then by expert
        local_expert = torch.repeat_interleave(
            torch.arange(self.num_local, device=x_ND.device).repeat(self.ep), recv_EL.flatten(), output_size=len(x_recv)
        )  # (M,)
        regroup = torch.argsort(local_expert, stable=True)  # (M,) received rows by local expert
        local_counts = recv_EL.sum(0)  # (E_local,)
        h = self.project("gate_up_proj", x_recv[regroup], local_counts)  # (M, 2I)
        gate, up = h.chunk(2, dim=-1)
        h = self.project("down_proj", torch.nn.functional.silu(gate) * up, local_counts)  # (M, D)
        h_recv = torch.empty_like(h).index_copy(0, regroup, h)  # back to the order the rows arrived in
        h_sent = exchange(h_recv, send_sizes, recv_sizes, self.group)  # (N*K, D): in the order the rows left
        # (N, D), as on one process; a copy, not the view combine returns: FSDP2 hooks this output, and warns of views
        return combine(h_sent, order, weight_NK).to(x_ND.dtype).clone()


class ExpertParallelFrozenExperts(ExpertParallelExperts, FrozenExperts):
    """LoRA / NF4 experts (nanotune/lora_experts.py) split by experts like ExpertParallelExperts: every stacked tensor
    by its first dimension, the NF4 codes and scales too (E*out rows: whole experts, contiguous), and the adapters
    (E, r, in) and (E, out, r). The dispatch is ExpertParallelExperts's; the product is FrozenExperts's, on this
    process's tensors."""

    def __init__(self, base: FrozenExperts, mesh):
        nn.Module.__init__(self)
        self.split_over(mesh, base.num_experts)
        for key in ("load_device", "shapes", "nf4", "nf4_dtype", "use_grouped_mm", "rank", "alpha", "rslora",
                    "scaling"):
            setattr(self, key, getattr(base, key))
        for name, param in base.named_parameters(recurse=False):  # the stacks, or NF4 codes and scales
            self.register_parameter(name, by_experts(param, mesh))
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in base.lora_A:
            self.lora_A[name] = by_experts(base.lora_A[name], mesh)
            self.lora_B[name] = by_experts(base.lora_B[name], mesh)

    project = FrozenExperts.project


def by_experts(param: nn.Parameter, mesh) -> nn.Parameter:
    """A whole-shape DTensor Parameter sharded by its first dimension over `mesh` (`hf_shape` kept for the loader)."""
    sharded = nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)]), requires_grad=param.requires_grad)
    if hasattr(param, "hf_shape"):
        sharded.hf_shape = param.hf_shape
    return sharded


def exchange(x: torch.Tensor, recv_sizes: list[int], send_sizes: list[int], group) -> torch.Tensor:
    """All-to-all of rows: send_sizes[p] rows of x (in order) to process p, recv_sizes[p] rows from it, concatenated
    by source process. Its backward is the reverse exchange of the gradients."""
    out = funcol.all_to_all_single_autograd(x, recv_sizes, send_sizes, group)
    return funcol.wait_tensor(out)


def apply_expert_parallel(model: nn.Module, mesh, global_router_losses: bool = False) -> list[str]:
    """Shard every stacked `Experts` of `model` by experts over the 1-D DeviceMesh `mesh` (see the module docstring).
    With `global_router_losses`, the router losses are computed over the tokens of all the group's processes.
    Returns the swapped module names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is Experts:
            model.set_submodule(name, ExpertParallelExperts(module, mesh))
            swapped.append(name)
        elif type(module) is FrozenExperts:  # LoRA / NF4 experts
            model.set_submodule(name, ExpertParallelFrozenExperts(module, mesh))
            swapped.append(name)
    if not swapped:
        raise ValueError("parallel.ep > 1, but the model has no stacked MoE experts")
    if global_router_losses:
        model.router_group = mesh.get_group()
    return swapped
