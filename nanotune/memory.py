"""Memory for long sequences: tiled MLPs, activation offload that overlaps with compute, frozen-layer offload.

At long context the activations, not the weights, fill the GPU. Three switches trade a little time for memory, each
exactly equal to the plain computation (docs/long-context.md):

- `apply_tiled_mlp(model, tile)` (`train.tiled_mlp`): each decoder layer's MLP runs over tiles of `tile` tokens and
  recomputes them in the backward, so its (tokens x intermediate) activations exist for one tile at a time
  (ALST, Bekman et al., 2025, "Arctic Long Sequence Training"). The MLP is per token, so tiling changes no number
  but the order of some sums.
- `ActivationOffload` (`train.activation_offload = "overlap"`): tensors saved for the backward are copied to pinned
  host memory on a side CUDA stream while the forward goes on, and copied back, a layer ahead, while the backward
  goes on. `"sync"` is torch's save_on_cpu: every copy waits.
- `LayerOffload` (`train.layer_offload`, LoRA / QLoRA): the frozen weights of every decoder layer live in pinned host
  memory; each layer's are copied to the device one layer ahead, in the forward and in the backward, and freed after.

On CPU there are no streams: the same hooks run, and every copy is a plain copy, which the tests compare with the
plain computation.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn

# --------------------------------------------------------------------------------------------------- tiled MLP


class _TiledMLPFunction(torch.autograd.Function):
    """out = run(x) computed tile by tile, saving only x; the backward recomputes each tile and differentiates it.

    run(x_tile (1, n, D), *per_token_tiles) -> (1, n, D), or a tuple whose first entry is that and whose others are
    sums over tokens (an MoE block's routing statistics): tiles are concatenated, sums are added up. `per_token` are
    tensors with one row per token (or None), cut like x. `params` are the trainable parameters `run` uses: their
    gradients are returned through autograd like any other input's, so accumulation, hooks and sharding see them.
    """

    @staticmethod
    def forward(ctx, run, tile: int, num_per_token: int, x, *per_token_and_params):
        per_token, params = per_token_and_params[:num_per_token], per_token_and_params[num_per_token:]
        ctx.run, ctx.tile, ctx.num_per_token = run, tile, num_per_token
        ctx.params = params  # leaves: kept by reference, never offloaded or copied like saved activations
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        # the recompute must draw the random numbers the forward drew (LoRA dropout), as activation checkpointing does
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x, *[t for t in per_token if t is not None])
        ctx.per_token_is_none = [t is None for t in per_token]
        result = sums = None
        for start in range(0, x.shape[1], tile):
            out = _as_tuple(run(x[:, start:start + tile], *_cut(per_token, start, tile)))
            if result is None:  # (1, N, D_out), filled tile by tile (no list of pieces and a copy of them all)
                result = out[0].new_empty((1, x.shape[1], *out[0].shape[2:]))
                sums = list(out[1:])
            else:
                sums = [s.add_(o) for s, o in zip(sums, out[1:])]
            result[:, start:start + tile] = out[0]
        return (result, *sums)

    @staticmethod
    def backward(ctx, grad_out, *grad_sums):
        x, *saved = ctx.saved_tensors
        saved = iter(saved)
        per_token = [None if none else next(saved) for none in ctx.per_token_is_none]
        params = ctx.params
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        grad_params = [None] * len(params)
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(ctx.device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            for start in range(0, x.shape[1], ctx.tile):
                x_tile = x[:, start:start + ctx.tile].detach().requires_grad_(grad_x is not None)
                outs = _as_tuple(ctx.run(x_tile, *_cut(per_token, start, ctx.tile)))
                grads_in = (grad_out[:, start:start + ctx.tile], *grad_sums)
                pairs = [(o, g) for o, g in zip(outs, grads_in) if o.requires_grad and g is not None]
                inputs = ([x_tile] if grad_x is not None else []) + list(params)
                if not pairs or not inputs:
                    continue
                grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
                if grad_x is not None:
                    grad_x[:, start:start + ctx.tile] = grads[0] if grads[0] is not None else 0
                    grads = grads[1:]
                grad_params = [a if b is None else (b if a is None else a.add_(b)) for a, b in zip(grad_params, grads)]
        return (None, None, None, grad_x, *([None] * ctx.num_per_token), *grad_params)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _cut(per_token, start: int, tile: int) -> list:
    return [None if t is None else t[start:start + tile] for t in per_token]


class TiledMLP:
    """Mixed into an MLP's own class by `apply_tiled_mlp`: the same module, parameters and names, run over tiles.

    The MLP sees (1, n, D) tiles of the flattened (B * T) tokens; arguments with one entry per token (the MoE block's
    padding weights) are cut the same way.
    """

    tiled_mlp_tile: int = 4096

    def forward(self, x: torch.Tensor, *per_token):
        B, T, D = x.shape
        if B * T <= self.tiled_mlp_tile:
            return super().forward(x, *per_token)
        params = [p for p in self.parameters() if p.requires_grad]
        untiled, stats_type = super().forward, None

        def run(x_tile, *per_token_tile):  # an MoE block's (out, RouterStats) as a flat tuple of tensors
            nonlocal stats_type
            out = untiled(x_tile, *per_token_tile)
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], tuple):
                stats_type = type(out[1])
                return (out[0], *out[1])
            return out

        out = _TiledMLPFunction.apply(run, self.tiled_mlp_tile, len(per_token), x.reshape(1, B * T, D),
                                      *per_token, *params)
        out = _as_tuple(out)
        first = out[0].view(B, T, D)
        if stats_type is not None:
            return first, stats_type(*out[1:])
        return first if len(out) == 1 else (first, *out[1:])


@functools.cache
def _tiled_class(cls: type) -> type:
    return type(f"Tiled{cls.__name__}", (TiledMLP, cls), {})


def apply_tiled_mlp(model: nn.Module, tile_tokens: int) -> int:
    """Make every decoder layer's `mlp` run over tiles of `tile_tokens` tokens; returns the number of MLPs.

    The module stays the same object (its class gains TiledMLP, as torch's fully_shard does with FSDPModule), so
    parameter names, checkpoints, LoRA swaps and sharding plans see no difference. Apply after the module swaps
    that replace MLPs (LoRA's linears inside it are fine; `train.kernels` replaces whole MLPs).
    """
    count = 0
    for layer in model.model.layers:
        mlp = layer.mlp
        if not isinstance(mlp, TiledMLP):
            mlp.__class__ = _tiled_class(type(mlp))
        mlp.tiled_mlp_tile = tile_tokens
        count += 1
    return count


# ------------------------------------------------------------------------------------------ activation offload

OFFLOAD_MODES = ("none", "sync", "overlap")


def offload_mode(setting: bool | str) -> str:
    """train.activation_offload as one of OFFLOAD_MODES (true means "overlap", false "none")."""
    mode = {True: "overlap", False: "none"}.get(setting, setting) if isinstance(setting, bool) else setting
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"train.activation_offload = {setting!r}: choose true / false or one of {OFFLOAD_MODES}")
    return mode


class ActivationOffload:
    """Saved activations to (pinned) host memory on a side stream, back a layer ahead of the backward that needs them.

        offload = ActivationOffload(model, device)          # once
        with offload.saving():                             # each forward whose backward follows
            loss = model(...)
        loss.backward()

    Forward: each tensor autograd saves (of at least `min_bytes`, not a parameter) is copied to host memory on the side
    stream once the compute stream has produced it; the device copy is then free to go as soon as the forward drops
    it. The decoder layers' forward pre-hooks tell which layer each tensor belongs to. Backward: the first tensor of
    layer i that the backward asks for starts the copies of all of layer i - 1's tensors to the device, on the side
    stream, so that they are there when its backward starts. On CPU (`device.type != "cuda"`) the same code runs with
    plain copies and no streams. Inside an activation-checkpointed layer torch's checkpoint keeps what it saves itself.
    """

    def __init__(self, model: nn.Module, device: torch.device, min_bytes: int | None = None):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.min_bytes = (1 << 20 if self.stream is not None else 0) if min_bytes is None else min_bytes
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
        self.hooks = [layer.register_forward_pre_hook(functools.partial(self._enter_layer, i))
                      for i, layer in enumerate(model.model.layers)]
        self._reset()

    def _reset(self) -> None:
        self.layer = -1  # the decoder layer the forward is in (-1: before the first)
        self.saved: list[_Offloaded] = []  # a handle is an index into it
        self.by_layer: dict[int, list[_Offloaded]] = {}
        self.fetched: set[int] = set()
        # (storage, offset, shape, stride, dtype, version) -> (a weak reference to the storage, handle)
        self.by_storage: dict[tuple, tuple] = {}

    def _enter_layer(self, index: int, module, args) -> None:
        self.layer = index

    def saving(self):
        """The context of one forward: what it saves for the backward goes through this offloader."""
        self._reset()
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if (t.device.type != self.device.type or t.numel() * t.element_size() < self.min_bytes
                or isinstance(t, nn.Parameter) or t.untyped_storage().data_ptr() in self.parameters):
            return t  # kept as it is: small, already in host memory, or a weight that stays on the device anyway
        # the same tensor saved by several ops (a layer input feeds q, k and v) is copied once
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, t._version)
        earlier = self.by_storage.get(key)
        if earlier is not None and earlier[0]() is not None:  # the storage it was copied from is still alive
            return earlier[1]
        entry = _Offloaded(self.layer, t.device)
        if self.stream is None:
            entry.host = t.detach().clone()
        else:  # copy once the compute stream has produced t; t's memory is not reused before the copy is done
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                entry.host = torch.empty_like(t, device="cpu", pin_memory=True)
                entry.host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
        self.saved.append(entry)
        self.by_layer.setdefault(self.layer, []).append(entry)
        self.by_storage[key] = (weakref.ref(t.untyped_storage()), len(self.saved) - 1)
        return len(self.saved) - 1

    def _unpack(self, handle):
        if isinstance(handle, torch.Tensor):
            return handle
        entry = self.saved[handle]
        self._fetch_layer(entry.layer)  # this layer's tensors, if the backward of the layer after it has not
        self._fetch_layer(entry.layer - 1)  # and the previous layer's, ahead of its backward
        handed = entry.handed() if entry.handed is not None else None
        if handed is not None:  # saved by several ops: the copy one of them got is still in use
            return handed
        if entry.on_device is None:  # handed out and freed (a graph kept for a second backward): fetch it again
            self._fetch(entry)
        t, arrived = entry.on_device, entry.arrived
        entry.on_device = entry.arrived = None  # from here on autograd holds it, and frees it after its use
        entry.handed = weakref.ref(t)
        if arrived is not None:
            compute = torch.cuda.current_stream(t.device)
            compute.wait_event(arrived)
            t.record_stream(compute)  # allocated on the side stream, used and freed on this one
        return t

    def _fetch_layer(self, layer: int) -> None:
        if layer not in self.fetched:
            self.fetched.add(layer)
            for entry in self.by_layer.get(layer, ()):
                self._fetch(entry)

    def _fetch(self, entry: "_Offloaded") -> None:
        if self.stream is None:
            entry.on_device = entry.host.clone()
            return
        with torch.cuda.stream(self.stream):  # the stream of the copy out: ordered after it
            entry.on_device = entry.host.to(entry.device, non_blocking=True)
            entry.arrived = torch.cuda.Event()
            entry.arrived.record()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


class _Offloaded:
    """One saved tensor: its host copy, and its device copy once fetched back (with the event that says it arrived)."""

    def __init__(self, layer: int, device: torch.device):
        self.layer, self.device = layer, device
        self.host: torch.Tensor | None = None
        self.on_device: torch.Tensor | None = None
        self.arrived = None  # CUDA event, recorded on the side stream after the copy back
        self.handed = None  # weak reference to the device copy autograd got


# ---------------------------------------------------------------------------------------------- layer offload


class LayerOffload:
    """Frozen decoder-layer weights in (pinned) host memory, on the device only around their layer's forward and
    backward, copied there one layer ahead on a side stream (LoRA / QLoRA: the trained adapters stay on the device).

    Each frozen tensor keeps its identity (autograd, LoRA's fused function and NF4's matmul hold references to it);
    only its storage comes and goes: resized to the full size and filled from the host copy when its layer is needed,
    resized to zero after (FSDP2 frees unsharded parameters the same way). Forward: layer i's pre-hook waits for its
    weights and starts copying layer i + 1's. Backward: a hook on layer i's output gradient, which runs before layer
    i's backward, does the same for layer i and layer i - 1. At most two layers' weights are on the device at a time.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        pin = self.stream is not None
        self.layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per layer: (the storage's filler, host copy)
        for layer in model.model.layers:
            frozen = [t for t in [*layer.parameters(), *layer.buffers()] if not t.requires_grad and _owns_storage(t)]
            host = [t.detach().to("cpu", copy=True).pin_memory() if pin else t.detach().clone() for t in frozen]
            self.layers.append(list(zip(map(_filler, frozen), host)))
        self.arrived: dict[int, object] = {}  # layer -> CUDA event of its copy (None on CPU): resident or on its way
        self.hooks = []
        for i, layer in enumerate(model.model.layers):
            self.hooks.append(layer.register_forward_pre_hook(functools.partial(self._before_forward, i)))
            self.hooks.append(layer.register_forward_hook(functools.partial(self._after_forward, i)))
        for i in range(len(self.layers)):
            self._free(i)

    def bytes_offloaded(self) -> int:
        return sum(host.numel() * host.element_size() for layer in self.layers for _, host in layer)

    def _before_forward(self, i: int, module, args) -> None:
        in_backward = torch._C._current_graph_task_id() != -1  # the recompute of a checkpointed layer
        self._use(i, ahead=i - 1 if in_backward else i + 1)

    def _after_forward(self, i: int, module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad and torch._C._current_graph_task_id() == -1:
            out.register_hook(functools.partial(self._before_backward, i))

    def _before_backward(self, i: int, grad):
        self._use(i, ahead=i - 1)
        return grad

    def _use(self, i: int, ahead: int | None) -> None:
        """Layer i's weights on the device (waiting for their copy), `ahead`'s on their way, other layers' freed."""
        keep = {i, ahead}
        for j in list(self.arrived):
            if j not in keep:
                self._free(j)
        self._load(i)
        if self.stream is not None and self.arrived[i] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.arrived[i])
            self.arrived[i] = None  # waited for: resident
        if ahead is not None and 0 <= ahead < len(self.layers):
            self._load(ahead)

    def _load(self, i: int) -> None:
        if i in self.arrived:
            return
        for t, host in self.layers[i]:  # allocated on the compute stream: freeing it later is ordered after its use
            t.untyped_storage().resize_(host.numel() * host.element_size())
        if self.stream is None:
            for t, host in self.layers[i]:
                t.copy_(host)
            self.arrived[i] = None
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the memory's earlier use is done
        with torch.cuda.stream(self.stream):
            for t, host in self.layers[i]:
                t.copy_(host, non_blocking=True)
            self.arrived[i] = torch.cuda.Event()
            self.arrived[i].record()

    def _free(self, i: int) -> None:
        for t, _ in self.layers[i]:
            t.untyped_storage().resize_(0)
        self.arrived.pop(i, None)

    def close(self) -> None:
        """Every layer's weights back on the device for good (before saving or merging), hooks removed."""
        for hook in self.hooks:
            hook.remove()
        for i in range(len(self.layers)):
            self._load(i)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.arrived.clear()


def _owns_storage(t: torch.Tensor) -> bool:
    """Whether `t` is its storage, whole (then freeing the storage frees exactly `t`)."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _filler(t: torch.Tensor) -> torch.Tensor:
    """A second tensor on `t`'s storage, with a version counter of its own: refilling the storage through it does not
    look to autograd like an in-place change of `t` (which autograd may have saved for the backward)."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, t.shape, t.stride())
