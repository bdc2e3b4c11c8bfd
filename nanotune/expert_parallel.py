"""Expert parallelism for stacked MoE experts: each process of a group holds E / ep of the experts of every layer, and
tokens travel to the process that holds their expert and back (GShard, Lepikhin et al. 2020; dropless, as in
MegaBlocks, Gale et al. 2022: no capacity factor, no token dropped).

    apply_expert_parallel(model, group)     # on a loaded model; every process of `group` built the same one

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

The router losses must see every process's tokens (as one process would): the model sums its routing statistics over
`group` before computing them (`QwenMoeForCausalLM.router_group`), so every process gets the same, global auxiliary
loss. Gradients of the replicated parameters (attention, router, norms) are per process and are summed over the group
by whoever trains (FSDP / DDP / a plain all-reduce); the experts' gradients are complete on their process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_to_all_single

from models.qwen_moe import Experts, combine, sort_by_expert


class ExpertParallelExperts(Experts):
    """One process's share of a layer's stacked experts: global experts [first, first + E_local)."""

    def __init__(self, base: Experts, group):
        nn.Module.__init__(self)
        self.group = group
        self.ep, rank = dist.get_world_size(group), dist.get_rank(group)
        E = base.num_experts
        if E % self.ep:
            raise ValueError(f"parallel.ep = {self.ep} does not divide the {E} experts of each layer")
        self.num_experts, self.num_local = E, E // self.ep
        self.first = rank * self.num_local
        local = slice(self.first, self.first + self.num_local)
        self.gate_up_proj = nn.Parameter(base.gate_up_proj.data[local].clone(), base.gate_up_proj.requires_grad)
        self.down_proj = nn.Parameter(base.down_proj.data[local].clone(), base.down_proj.requires_grad)
        self.use_grouped_mm = base.use_grouped_mm

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
        x_recv = all_to_all_single(x_sent.new_empty(sum(recv_sizes), x_ND.shape[1]), x_sent, recv_sizes, send_sizes,
                                   group=self.group)  # (M, D): by source process, then by local expert
        local_expert = torch.repeat_interleave(
            torch.arange(self.num_local, device=x_ND.device).repeat(self.ep), recv_EL.flatten(), output_size=len(x_recv)
        )  # (M,)
        regroup = torch.argsort(local_expert, stable=True)  # (M,) received rows by local expert
        local_counts = recv_EL.sum(0)  # (E_local,)
        h = self.project("gate_up_proj", x_recv[regroup], local_counts)  # (M, 2I)
        gate, up = h.chunk(2, dim=-1)
        h = self.project("down_proj", torch.nn.functional.silu(gate) * up, local_counts)  # (M, D)
        h_recv = torch.empty_like(h).index_copy(0, regroup, h)  # back to the order the rows arrived in
        h_sent = all_to_all_single(h.new_empty(x_sent.shape), h_recv, send_sizes, recv_sizes, group=self.group)
        return combine(h_sent, order, weight_NK).to(x_ND.dtype)  # (N, D), as on one process


def apply_expert_parallel(model: nn.Module, group) -> list[str]:
    """Shard every stacked `Experts` of `model` over `group` (each process keeps its slice) and make the router
    losses global over the group. Returns the swapped module names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is Experts:
            model.set_submodule(name, ExpertParallelExperts(module, group))
            swapped.append(name)
    if not swapped:
        raise ValueError("parallel.ep > 1, but the model has no stacked MoE experts")
    model.router_group = group
    return swapped
