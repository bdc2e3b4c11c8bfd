"""Context parallelism: the tokens of every row split over the `cp` processes, attention still over the whole row.

    cp = ContextParallel.build(model, dist)     # None unless parallel.cp > 1; hooks the model's attention layers
    train_loader = cp.wrap(train_loader)        # each micro-batch: this process's part of every row
    cp.prepare(batch, device)                   # before each forward: the attention context of that micro-batch
    model(batch["input_ids"], batch["position_ids"], ...)

Load balancing (as in Megatron-LM and torchtitan): a row of T tokens is cut into 2 cp chunks of T / (2 cp) and process
r holds chunks r and 2 cp - 1 - r. Under a causal mask the late tokens attend to more keys than the early ones, so one
early and one late chunk give every process the same attention work.

Attention is exact. In every layer each process all-gathers the keys and values of the whole row from its cp group
(with grouped-query attention they are a small part of the activations) and its queries attend to them under a mask
built from whole-row positions and document ids, which the loader's batch states before it is split: key j is visible
to query i when j <= i, both belong to the same document, and i - j < window on a sliding-window layer. So packed rows
stay exact, also when a document spans processes. The backward reduce-scatters the gradients of the gathered keys and
values back to the processes that computed them. Backends: sdpa with that boolean mask, eager (also for logit
softcapping), or flex with the same mask as a BlockMask (no dense mask, masked blocks skipped). The model reaches this
code through `AttentionContext.attend_override` (models/attention.py).

Position ids are sliced from the whole row's, so RoPE sees whole-row positions. Labels are pre-shifted
(nanotune/packing.py), so slicing them with the tokens keeps every target, and `num_trainable_tokens` becomes this
process's count: the trainer's normalisation (token losses summed over all processes, divided by the trainable tokens
of the whole step) is unchanged. MoE routers: the routing statistics of every process are summed over the cp group
before the load-balancing loss, which is then the whole row's, as in one process.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models import attention
from nanotune.config import ConfigError
from nanotune.packing import IGNORE_INDEX

BACKENDS = ("auto", "sdpa", "eager", "flex")  # attention.implementation values that can take the gathered keys' mask


def check_config(cfg) -> None:
    """Refuse, before anything is built, what context parallelism cannot do exactly (the mesh checks are in
    parallel.resolve_layout)."""
    cp = cfg.parallel.cp
    if cp == 1:
        return
    step = 2 * cp
    if cfg.data.seq_len % step:
        below, above = cfg.data.seq_len // step * step, (cfg.data.seq_len // step + 1) * step
        fits = " or ".join(str(n) for n in (below, above) if n > 0)
        raise ConfigError(f"data.seq_len = {cfg.data.seq_len} is not a multiple of 2 x parallel.cp = {step}: every row "
                          f"is cut into {step} equal chunks; set data.seq_len to {fits}")
    if cfg.attention.implementation not in BACKENDS:
        raise ConfigError(f"attention.implementation = {cfg.attention.implementation!r} cannot take the mask of "
                          "context parallelism (queries of part of the row against the keys of all of it) yet; use "
                          "'auto', 'sdpa', 'flex' or 'eager' with parallel.cp > 1")
    if cfg.train.compile != "none":
        raise ConfigError(f"train.compile = {cfg.train.compile!r} with parallel.cp > 1 is not supported yet; set "
                          "train.compile = 'none'")


def rank_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """(seq_len // cp,) the row positions process `rank` holds: chunks rank and 2 cp - 1 - rank of 2 cp."""
    chunk = seq_len // (2 * cp)
    early = torch.arange(rank * chunk, (rank + 1) * chunk)
    late = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    return torch.cat([early, late])


# ----------------------------------------------------------------------------------------------- collectives


class _AllGather(torch.autograd.Function):
    """Concatenate every process's x along dim 0, in rank order; backward: each process gets the sum over the group of
    the gradients of its own rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


class _AllReduceSum(torch.autograd.Function):
    """The sum of x over the group on every process; backward: the sum of the gradients over the group. Every process
    then adds the same loss of the sum, and FSDP2's average over the processes gives that loss's gradient once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather_keys_values(k: torch.Tensor, v: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, Hkv, T/cp, D) of this process -> (B, Hkv, T, D) of the whole row, keys in rank order (one
    collective for both)."""
    kv = torch.stack([k, v]).movedim(3, 0)  # (T/cp, 2, B, Hkv, D): gathered along dim 0
    kv = _AllGather.apply(kv, group).movedim(0, 3)  # (2, B, Hkv, T, D)
    return kv[0], kv[1]


# ----------------------------------------------------------------------------------------------- one micro-batch


class RowSplit:
    """What attention needs of one micro-batch beyond this process's tokens: the whole rows' document ids and where
    this process's queries and the gathered keys sit in the row."""

    def __init__(self, document_ids: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor,
                 num_real_tokens: int):
        self.document_ids = document_ids  # (B, T) of the whole rows
        self.query_index = query_index  # (T/cp,) row position of each of this process's tokens
        self.key_index = key_index  # (T,) row position of each gathered key (every process's tokens, in rank order)
        self.num_real_tokens = num_real_tokens  # tokens that are not padding in the whole micro-batch

    def to(self, device) -> RowSplit:
        return RowSplit(self.document_ids.to(device), self.query_index.to(device), self.key_index.to(device),
                        self.num_real_tokens)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """(B, 1, T/cp, T) boolean: query i sees key j when j <= i, same document, and i - j < sliding_window."""
        q_pos, k_pos = self.query_index[:, None], self.key_index[None, :]  # (T/cp, 1), (1, T)
        allowed = k_pos <= q_pos  # (T/cp, T) causal, in row positions
        if sliding_window is not None:
            allowed = allowed & (q_pos - k_pos < sliding_window)
        doc = self.document_ids
        same = doc[:, self.query_index, None] == doc[:, None, self.key_index]  # (B, T/cp, T)
        return (allowed & same)[:, None]

    def block_mask(self, sliding_window: int | None, compiled: bool):
        """The same mask as a flex BlockMask: evaluated block by block (compiled), never (T/cp, T) booleans at once;
        blocks of keys that no query of a block sees are skipped by flex attention."""
        from torch.nn.attention.flex_attention import create_block_mask

        q_pos, k_pos, doc = self.query_index, self.key_index, self.document_ids

        def mask_mod(b, h, q_idx, kv_idx):
            i, j = q_pos[q_idx], k_pos[kv_idx]  # whole-row positions
            allowed = (j <= i) & (doc[b, i] == doc[b, j])
            if sliding_window is not None:
                allowed = allowed & (i - j < sliding_window)
            return allowed

        create = _compiled(create_block_mask) if compiled else create_block_mask
        return create(mask_mod, doc.shape[0], None, len(q_pos), len(k_pos), device=doc.device)


def split_batch(batch: dict, cp: int, rank: int) -> dict:
    """A loader micro-batch (nanotune/packing.py) -> this process's part of every row, with the same keys plus
    `context_parallel` (a RowSplit). Rows whose length is not a multiple of 2 cp (unpacked micro-batches are as long
    as their longest example) get padding first: a segment of its own at the end, never trained, seen by nothing."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    position_ids, real = batch["position_ids"], batch["attention_mask"]
    B, T = input_ids.shape
    cu_seqlens = attention.split_at_rows(batch["cu_seqlens"], B, T)
    document_ids = attention.document_ids_from_cu_seqlens(cu_seqlens, B, T)  # (B, T)
    pad = -T % (2 * cp)
    if pad:
        def padded(x, value):
            return torch.cat([x, x.new_full((B, pad), value)], dim=1)

        input_ids, labels, real = padded(input_ids, 0), padded(labels, IGNORE_INDEX), padded(real, False)
        position_ids = torch.cat([position_ids, torch.arange(pad).expand(B, pad)], dim=1)
        document_ids = padded(document_ids, int(document_ids.max()) + 1)
        T += pad
    query_index = rank_positions(T, cp, rank)
    key_index = torch.cat([rank_positions(T, cp, r) for r in range(cp)])
    local_labels = labels[:, query_index]
    T_local = T // cp
    return {
        "input_ids": input_ids[:, query_index],
        "labels": local_labels,
        "position_ids": position_ids[:, query_index],  # whole-row positions: RoPE as in one process
        # the model's own packing information is not used (each attention layer gets this process's context from
        # ContextParallel); one segment per row keeps the batch contract's shapes
        "cu_seqlens": torch.arange(0, B * T_local + 1, T_local, dtype=torch.int32),
        "max_seqlen": T_local,
        "packed": False,
        "num_trainable_tokens": int((local_labels != IGNORE_INDEX).sum()),
        "attention_mask": real[:, query_index],
        "num_tokens": int(real[:, query_index].sum()),
        "context_parallel": RowSplit(document_ids, query_index, key_index, int(real.sum())),
    }


# ----------------------------------------------------------------------------------------------- the model


class ContextParallel:
    """The cp group of this process, and the hooks that give the model's attention layers the whole row."""

    def __init__(self, group, rank: int, size: int, implementation: str = "auto"):
        self.group, self.rank, self.size = group, rank, size
        self.implementation = implementation  # attention.implementation: sdpa, eager, flex; auto: sdpa (eager for
        # logit softcapping)
        self.rows: RowSplit | None = None  # the micro-batch being trained (prepare), on the model's device
        self.context: attention.AttentionContext | None = None
        self._routing: list[torch.Tensor] | None = None  # MoE statistics of the forward running now

    @classmethod
    def build(cls, model: nn.Module, info) -> ContextParallel | None:
        """For parallel.cp > 1: the cp sub-mesh's group, applied to the model (see `apply`)."""
        if info.layout["cp"] == 1:
            return None
        mesh = info.mesh["cp"]
        cp = cls(mesh.get_group(), mesh.get_local_rank(), info.layout["cp"], model.config.attn_implementation)
        cp.apply(model)
        return cp

    def wrap(self, loader):
        return SplitLoader(loader, self) if loader is not None else None

    def split(self, batch: dict) -> dict:
        return split_batch(batch, self.size, self.rank)

    def prepare(self, batch: dict, device: torch.device) -> None:
        """Before the forward of a split micro-batch: its attention context, used until the next one (the backward's
        recomputation of checkpointed layers included)."""
        self.rows = batch["context_parallel"].to(device)
        B, T_local = batch["input_ids"].shape
        backend = "sdpa" if self.implementation == "auto" else self.implementation  # auto: eager for softcapping
        self.context = attention.AttentionContext(backend, T_local, device, batch_size=B, attend_override=self.attend)

    # ------------------------------------------------------------------------------------------- hooks

    def apply(self, model: nn.Module) -> None:
        """Forward pre-hooks on every attention layer hand it this process's context (in place of the one the model
        built from its local tokens); MoE models also get their load-balancing loss over the whole rows."""
        layers = [m for name, m in model.named_modules() if name.endswith(".self_attn")]
        if not layers:
            raise ConfigError(f"parallel.cp > 1: {type(model).__name__} has no `self_attn` layers to gather keys for")
        for layer in layers:
            layer.register_forward_pre_hook(self._swap_context)  # forward(x, cos, sin, ctx)
        from models.qwen_moe import SparseMoeBlock

        routers = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        if routers:
            for router in routers:
                router.register_forward_hook(self._record_routing)
            model.register_forward_pre_hook(self._start_routing)
            model.register_forward_hook(self._whole_row_aux_loss)

    def _swap_context(self, module, args):
        if self.context is None:
            raise RuntimeError("parallel.cp > 1: call ContextParallel.prepare(batch, device) with the split "
                               "micro-batch before the model's forward")
        x, cos, sin, _ = args[:4]
        return (x, cos, sin, self.context, *args[4:])

    def _start_routing(self, module, args):
        self._routing = []

    def _record_routing(self, module, args, output):
        if self._routing is not None:  # not in the backward's recomputation of a checkpointed layer
            self._routing.append(output[1])  # RouterStats: slot counts, probability and z sums of this process's tokens

    def _whole_row_aux_loss(self, model, args, output):
        """Replace the model's aux_loss (its own tokens only) by the one over the whole rows: the statistics summed
        over the cp group, divided by the real tokens of the whole micro-batch (qwen_moe.load_balancing_loss and
        router_z_loss). The statistics are those of real tokens because the trainer passes `aux_loss_mask` (padding
        left out)."""
        from models.qwen_moe import RouterStats, load_balancing_loss, router_z_loss

        routing, self._routing = self._routing, None
        if routing:
            E = model.config.num_experts
            local = torch.stack([torch.cat([s.tokens_per_expert, s.prob_sum, s.z_sum.reshape(1)]) for s in routing])
            total = _AllReduceSum.apply(local, self.group)  # (layers, 2 E + 1), summed over the rows
            stats = [RouterStats(t[:E], t[E:2 * E], t[2 * E]) for t in total]
            num_tokens = self.rows.num_real_tokens
            model.aux_loss = model.config.router_aux_loss_coef * load_balancing_loss(stats, num_tokens, E)
            if model.config.router_z_loss_coef:
                model.aux_loss = model.aux_loss + model.config.router_z_loss_coef * router_z_loss(stats, num_tokens)

    def attend(self, q, k, v, *, sliding_window=None, softcap=None, scale=None) -> torch.Tensor:
        """q (B, Hq, T/cp, D), k and v (B, Hkv, T/cp, D) of this process -> (B, Hq, T/cp, D) over the whole rows."""
        if q.shape[2] != len(self.rows.query_index):
            raise ValueError(f"context parallelism: attention got {q.shape[2]} tokens but the prepared micro-batch "
                             f"has {len(self.rows.query_index)} on this process; call prepare() with each split "
                             "micro-batch")
        k, v = gather_keys_values(k, v, self.group)  # (B, Hkv, T, D)
        T = k.shape[2]
        if sliding_window is not None and sliding_window >= T:
            sliding_window = None
        if self.implementation == "flex":
            return self.flex_attend(q, k, v, sliding_window, softcap, scale)
        cache = self.context.cache  # one mask per window and micro-batch, shared by the layers
        if ("dense", sliding_window) not in cache:
            cache["dense", sliding_window] = self.rows.mask(sliding_window)
        mask = cache["dense", sliding_window]  # (B, 1, T/cp, T)
        if self.implementation == "eager" or softcap is not None:
            return attention.eager_attention(q, k, v, mask, softcap, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    def flex_attend(self, q, k, v, sliding_window, softcap, scale) -> torch.Tensor:
        """attend with flex attention (q of T/cp queries, k and v gathered): compiled on CUDA, as models/attention.py
        runs it; on CPU uncompiled, where the installed torch may not backpropagate it (refused, as there)."""
        on_cuda = q.device.type == "cuda"
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if not on_cuda and needs_grad and not attention.flex_backward_on_cpu():
            raise ValueError("attention.implementation = 'flex': the installed torch's flex_attention cannot "
                             "backpropagate on CPU; use 'sdpa' (or 'eager' for logit softcapping) to train on CPU")
        cache = self.context.cache
        if ("flex", sliding_window) not in cache:
            cache["flex", sliding_window] = self.rows.block_mask(sliding_window, compiled=on_cuda)
        score_mod = None
        if softcap is not None:
            def score_mod(score, b, h, q_idx, kv_idx):  # the score arrives already scaled
                return softcap * torch.tanh(score / softcap)

        flex = _compiled(attention.flex_attention_fn()) if on_cuda else attention.flex_attention_fn()
        return flex(q, k, v, score_mod=score_mod, block_mask=cache["flex", sliding_window], scale=scale,
                    enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _compiled(fn):
    """fn through torch.compile with static shapes, as models/attention.py compiles flex (and for its reason)."""
    return torch.compile(fn, dynamic=False)


class SplitLoader:
    """A BatchLoader whose micro-batches are this process's part of every row; everything else is the loader's."""

    def __init__(self, loader, cp: ContextParallel):
        self.loader, self.cp = loader, cp

    def __iter__(self):
        return map(self.cp.split, self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # epoch, set_epoch, rewind, state_dict, load_state_dict
        return getattr(self.loader, name)
