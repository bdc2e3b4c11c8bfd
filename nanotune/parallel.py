"""Several processes, one DeviceMesh: data parallel (FSDP2 / HSDP) and tensor parallel, applied from outside the model.

    dist = init_distributed("auto", cfg.parallel)       # reads torchrun's RANK / WORLD_SIZE; builds the mesh
    model = parallelize(model, dist, cfg.parallel, precision="fp32", compile=False)

The processes form one mesh with named dimensions (dp_replicate, dp_shard, cp, tp); their sizes multiply to the
world size. Parallelism is applied in a fixed order, the one torchtitan documents:

1. tensor parallel: the model file's TP_PLAN (module-name patterns -> "colwise" / "rowwise" / "heads_norm") splits
   each attention and dense MLP matmul over the `tp` processes (Megatron-LM, Shoeybi et al. 2019);
2. activation checkpointing (a flag the model's forward reads);
3. torch.compile of each decoder block;
4. FSDP2 (ZeRO-3, `fully_shard`) over `dp_shard`, as HSDP (replicated across `dp_replicate`, sharded within) when
   dp_replicate > 1: each decoder layer is its own unit, then the root.

Data: the processes of one tensor-parallel or context-parallel group see the same micro-batches (`dp_rank`,
`dp_size`; a cp group splits every row, nanotune/context_parallel.py); gradients are averaged over the data-parallel
and context-parallel processes (`fsdp_size`). train.py scales its loss so that the result is the sum over all tokens
divided by the trainable tokens of the whole step, exactly as in one process. See docs/parallel.md.
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from nanotune.config import ConfigError, ParallelConfig

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    layout: dict = field(default_factory=lambda: dict.fromkeys(MESH_DIMS, 1))  # mesh dimension -> size
    mesh: object = None  # the DeviceMesh over all processes (None in one process)
    owns_process_group: bool = False  # set up here (and so torn down by cleanup), not by the caller
    ep: int = 1  # expert parallel: processes of dp_shard that split the experts of every MoE layer (a part of dp_shard)
    expert_mesh: object = None  # ep > 1: (dp_replicate, dp_shard_mod_ep, ep), the processes of dp_replicate x dp_shard

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        """Processes that see different data: dp_replicate x dp_shard."""
        return self.layout["dp_replicate"] * self.layout["dp_shard"]

    @property
    def fsdp_size(self) -> int:
        """Processes that average gradients under FSDP2: the data-parallel ones times cp (the processes of a context-
        parallel group hold the same parameters and train on different tokens of the same rows)."""
        return self.dp_size * self.layout["cp"]

    @property
    def dp_rank(self) -> int:
        """This process's index among the data-parallel ones (its tensor-parallel peers share it)."""
        if self.mesh is None:
            return 0
        return self.mesh["dp_replicate"].get_local_rank() * self.layout["dp_shard"] + self.mesh["dp_shard"].get_local_rank()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device = 'cuda' but no CUDA device is visible; set device = 'cpu' or 'auto'")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


# ----------------------------------------------------------------------------------------------- the layout


def resolve_layout(cfg: ParallelConfig, world_size: int) -> dict[str, int]:
    """Mesh sizes from the [parallel] keys, dp_shard = -1 filled in; refuses layouts that cannot cover the processes."""
    for key in ("dp_replicate", "cp", "tp", "ep"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"parallel.{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.dp_shard == 0 or cfg.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard must be -1 (the processes left over) or at least 1, got {cfg.dp_shard}")
    for key, choices in (("param_dtype", ("auto", *DTYPES)), ("reduce_dtype", ("auto", *DTYPES))):
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"parallel.{key} = {getattr(cfg, key)!r} is not one of {choices}")
    others = cfg.dp_replicate * cfg.cp * cfg.tp
    dp_shard = cfg.dp_shard
    if dp_shard == -1:
        if world_size % others:
            raise ConfigError(
                f"parallel.dp_replicate x cp x tp = {others} does not divide the {world_size} processes, so "
                f"parallel.dp_shard = -1 cannot fill the rest; launch a multiple of {others} processes or change them")
        dp_shard = world_size // others
    layout = {"dp_replicate": cfg.dp_replicate, "dp_shard": dp_shard, "cp": cfg.cp, "tp": cfg.tp}
    product = others * dp_shard
    if product != world_size:
        sizes = " x ".join(f"{k} {v}" for k, v in layout.items() if v > 1) or "1"
        raise ConfigError(
            f"the [parallel] layout ({sizes} = {product}) does not match the {world_size} processes launched; make "
            "parallel.dp_replicate x dp_shard x cp x tp equal the world size (dp_shard = -1 takes what is left)")
    if cfg.cp > 1:  # context parallelism with FSDP2 over dp_shard x cp; not yet with TP or HSDP
        for key in ("tp", "dp_replicate"):
            if getattr(cfg, key) > 1:
                raise ConfigError(f"parallel.cp = {cfg.cp} with parallel.{key} = {getattr(cfg, key)} is not supported "
                                  f"yet; set parallel.{key} = 1 (context parallelism composes with dp_shard)")
    if cfg.ep > 1:  # the experts are split over processes that hold different data: a part of dp_shard
        if dp_shard % cfg.ep:
            raise ConfigError(f"parallel.ep = {cfg.ep} does not divide parallel.dp_shard = {dp_shard}: expert "
                              "parallelism splits the experts over data-parallel processes of one FSDP2 group; make "
                              "ep a divisor of dp_shard")
        for key in ("cp", "tp"):
            if getattr(cfg, key) > 1:
                raise ConfigError(f"parallel.ep = {cfg.ep} with parallel.{key} = {getattr(cfg, key)} is not supported "
                                  f"yet; set parallel.{key} = 1 (expert parallelism composes with dp_shard and "
                                  "dp_replicate)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if cfg.tp > local:
        warnings.warn(f"parallel.tp = {cfg.tp} is larger than the {local} processes of one node: every layer's "
                      "tensor-parallel all-reduce crosses the network; keep tp within a node and use dp_shard / "
                      "dp_replicate across nodes")
    return layout


def check_model_layout(layout: dict[str, int], config, lora_cfg=None, ep: int = 1) -> None:
    """Refuse a tensor-parallel size that does not split the model's heads and MLP evenly, and LoRA variants the
    layout cannot run (before any weight is read)."""
    tp = layout["tp"]
    if ep > 1:
        experts = getattr(config, "num_experts", 0)
        if not experts:
            raise ConfigError(f"parallel.ep = {ep}: expert parallelism splits the experts of a mixture-of-experts "
                              f"model, and {config.model_type} has none; set parallel.ep = 1")
        if experts % ep:
            fits = [d for d in range(1, ep) if experts % d == 0]
            raise ConfigError(f"parallel.ep = {ep} does not divide the model's {experts} experts per layer; set "
                              f"parallel.ep to {fits[-1]} or another divisor of {experts}")
    sizes = {key: getattr(config, key) for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
             if getattr(config, key, None)}
    for key, value in sizes.items():
        if tp > 1 and value % tp:
            fits = [d for d in range(1, tp) if all(v % d == 0 for v in sizes.values())]
            raise ConfigError(
                f"parallel.tp = {tp} does not divide the model's {key} ({value}): each tensor-parallel process must "
                f"hold whole heads and an equal part of the MLP; set parallel.tp to {fits[-1]} or another divisor "
                f"of {', '.join(f'{k} ({v})' for k, v in sizes.items())}")
    if lora_cfg is None or not lora_cfg.enabled:
        return
    if tp > 1 and lora_cfg.quantize:
        raise ConfigError("lora.quantize = 'nf4' with parallel.tp > 1 is not supported (NF4 weights cannot be "
                          "split by tensor parallelism yet); set parallel.tp = 1 and shard with dp_shard")
    if tp > 1 and lora_cfg.dora:
        raise ConfigError("lora.dora = true with parallel.tp > 1 is not supported (DoRA's row norms are not "
                          "split yet); set parallel.tp = 1 or lora.dora = false")
    if lora_cfg.quantize and lora_cfg.dora and layout.get("dp_replicate", 1) * layout.get("dp_shard", 1) > 1:
        raise ConfigError("lora.dora = true with lora.quantize = 'nf4' and several data-parallel processes is not "
                          "supported yet (DoRA's merge is not streamed for NF4 bases); set lora.dora = false or "
                          "train in one process")


def init_distributed(device_name: str = "auto", cfg: ParallelConfig | None = None) -> DistInfo:
    """One process: nothing to set up. Under torchrun: the layout is checked, then a process group (NCCL on CUDA,
    gloo on CPU) and one DeviceMesh with the dimensions MESH_DIMS."""
    cfg = cfg or ParallelConfig()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    layout = resolve_layout(cfg, world_size)  # before any process group: a bad layout fails the same on every rank
    device = pick_device(device_name, local_rank)
    if cfg.cpu_offload and device.type != "cuda":
        raise ConfigError("parallel.cpu_offload = true keeps FSDP2's shards in host memory while a GPU computes; on "
                          f"{device.type} everything is in host memory already: set parallel.cpu_offload = false")
    if world_size == 1:
        return DistInfo(device=device)
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()  # a caller (a notebook, a test running several trainings) may have set it up
    if owns:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, tuple(layout[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
    expert_mesh = None
    if cfg.ep > 1:  # dp_shard seen as (groups holding the same experts) x ep, ep innermost: neighbouring ranks
        expert_mesh = mesh["dp_replicate", "dp_shard"]._unflatten(
            1, (layout["dp_shard"] // cfg.ep, cfg.ep), ("dp_shard_mod_ep", "ep"))
    return DistInfo(dist.get_rank(), world_size, local_rank, device, layout, mesh, owns, cfg.ep, expert_mesh)


# ----------------------------------------------------------------------------------------------- applying it


def parallelize(model: nn.Module, info: DistInfo, cfg: ParallelConfig, precision: str = "fp32",
                compile: bool = False) -> nn.Module:
    """TP plan / expert parallel -> (activation checkpointing: a flag already set on the model) -> compile each block
    -> FSDP2/HSDP."""
    if info.layout["tp"] > 1:
        apply_tp_plan(model, info.mesh["tp"], model.tp_plan)
    if info.ep > 1:  # each process keeps its experts (whole-shape DTensors over `ep`), see nanotune/expert_parallel.py
        from nanotune.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, info.expert_mesh["ep"])
    if compile:  # each decoder block compiled on its own: parameter names and the loop stay as they are
        for layer in model.model.layers:
            layer.compile()
    if info.fsdp_size > 1:
        apply_fsdp(model, data_parallel_mesh(info), cfg, precision, experts=expert_data_parallel(info))
    return model


def data_parallel_mesh(info: DistInfo):
    """The mesh FSDP2 shards over: 1-D (dp_shard), or 2-D (dp_replicate, dp_shard) for HSDP. With context
    parallelism, dp_shard x cp flattened into one dimension (as torchtitan does): the cp processes hold the same
    parameters, so they share the shards and their gradients are averaged with the data-parallel ones."""
    if info.layout["cp"] > 1:
        return info.mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    if info.layout["dp_replicate"] > 1:
        return info.mesh["dp_replicate", "dp_shard"]
    return info.mesh["dp_shard"]


def expert_data_parallel(info: DistInfo) -> tuple | None:
    """With expert parallelism: (the mesh FSDP2 shards the experts over, the divide factor of their gradients).
    A process's experts are held by one process of every ep group: dp_shard / ep of them (times dp_replicate for
    HSDP). Their gradients arrive summed over the ep group's tokens (the reverse all-to-all), so the reduction over
    those processes divides by all the data-parallel processes, as every other gradient's does."""
    if info.ep == 1:
        return None
    if info.layout["dp_replicate"] > 1:
        return info.expert_mesh["dp_replicate", "dp_shard_mod_ep"], info.fsdp_size
    return info.expert_mesh["dp_shard_mod_ep"], info.fsdp_size


def apply_fsdp(model: nn.Module, mesh, cfg: ParallelConfig, precision: str, experts: tuple | None = None) -> None:
    """FSDP2: every decoder layer is one unit (gathered just before its forward, resharded after), then the root.
    With expert parallelism (`experts` = (mesh, gradient divide factor)), each layer's experts are a unit of their own
    first, sharded over the processes that hold the same experts."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    amp = precision == "amp-bf16"  # fp32 master weights, bf16 compute: gather in bf16, reduce in fp32
    param_dtype = DTYPES.get(cfg.param_dtype, torch.bfloat16 if amp else None)
    reduce_dtype = DTYPES.get(cfg.reduce_dtype, torch.float32 if amp else None)
    options = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                   offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy())
    hf_shapes = hf_shapes_of(model)  # FSDP2's sharded Parameters do not keep them: set again below
    for layer in model.model.layers:
        if experts is not None:
            from nanotune.expert_parallel import ExpertParallelExperts

            expert_mesh, divide_factor = experts
            for module in layer.modules():
                if isinstance(module, ExpertParallelExperts):
                    fully_shard(module, reshard_after_forward=cfg.reshard_after_forward,
                                **{**options, "mesh": expert_mesh})
                    module.set_gradient_divide_factor(float(divide_factor))
                    if expert_mesh.device_type != "cuda" and expert_mesh.size(expert_mesh.ndim - 1) > 1:
                        # gloo has no pre-multiplied sum: sum, then divide (FSDP2 divides by itself when the shard
                        # group is one process, and would divide twice if forced)
                        module.set_force_sum_reduction_for_comms(True)
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **options)
    fully_shard(model, **options)  # the root: embeddings, final norm, LM head; kept gathered for the backward
    set_hf_shapes(model, hf_shapes)


def hf_shapes_of(model: nn.Module) -> dict:
    """Parameter name -> its `hf_shape`, what a quantised tensor stands for in checkpoints (models/__init__.py). FSDP2
    and `to_empty` replace Parameters by new (sharded) ones without the attributes of the old: `set_hf_shapes` after."""
    return {name: p.hf_shape for name, p in model.named_parameters() if hasattr(p, "hf_shape")}


def set_hf_shapes(model: nn.Module, shapes: dict) -> None:
    for name, p in model.named_parameters():
        if name in shapes:
            p.hf_shape = shapes[name]


def plan_matches(pattern: str, names: list[str]) -> list[str]:
    """Module names matching a plan pattern, where `*` stands for one name component (a layer index)."""
    regex = re.compile(re.escape(pattern).replace(r"\*", r"[^.]+") + "$")
    return [n for n in names if regex.match(n)]


def apply_tp_plan(model: nn.Module, mesh, plan: dict[str, str]) -> None:
    """Shard every module a plan pattern names. A pattern that matches nothing is fine (a MoE layer has no dense MLP)."""
    from torch.distributed.tensor.parallel import parallelize_module

    # torch's styles register new parameters that require grad: keep frozen weights (a LoRA base, its norms) frozen
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    names = [n for n, _ in model.named_modules()]
    for pattern, style in plan.items():
        for name in plan_matches(pattern, names):
            module = model.get_submodule(name)
            if is_lora(module):
                shard_lora_linear(module, mesh, style)
            else:
                parallelize_module(module, mesh, tp_style(style))
    for name, p in model.named_parameters():
        p.requires_grad_(trainable[name])


def tp_style(style: str):
    """Plan words -> torch's parallel styles. Activations between blocks stay whole (replicated) on every process:
    colwise takes the whole input and leaves each process its slice of the output features; rowwise takes that slice
    and all-reduces the partial sums into the whole output; heads_norm applies a per-head norm (its weight replicated,
    its gradient summed over processes) to (B, T, local heads, head_dim)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    styles = {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "heads_norm": lambda: SequenceParallel(sequence_dim=2, use_local_output=True),
    }
    if style not in styles:
        raise ValueError(f"TP plan style {style!r} is unknown; use one of {sorted(styles)}")
    return styles[style]()


def is_lora(module: nn.Module) -> bool:
    """A LoRA layer: its own lora_A and lora_B, or a fused projection with adapters on its parts (FusedLoRALinear)."""
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") or hasattr(module, "part_rows")


def shard_lora_linear(module: nn.Module, mesh, style: str) -> None:
    """LoRA on a split linear, y = W x + b + s B A x, kept exact:
    colwise (W, b split by output rows): B is split by its rows the same way, A is whole, so each process computes its
      slice of y; A's gradient (a sum over all output rows) is summed over the processes by DTensor.
    rowwise (W split by input columns): A is split by its columns the same way, B and b are whole; W x and A x are
      partial sums over the processes, all-reduced before b is added and the output leaves the module."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

    if style not in ("colwise", "rowwise"):
        raise ValueError(f"a LoRA layer can be split colwise or rowwise, not {style!r}")
    split = {"colwise": {"weight": Shard(0), "bias": Shard(0), "lora_B.weight": Shard(0)},
             "rowwise": {"weight": Shard(1), "lora_A.weight": Shard(1)}}[style]
    for name, placement in split.items():
        owner_name, _, local = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        param = getattr(owner, local)
        if param is not None:
            sharded = distribute_tensor(param.data, mesh, [placement])
            owner.register_parameter(local, nn.Parameter(sharded, requires_grad=param.requires_grad))
    input_placement = Replicate() if style == "colwise" else Shard(-1)

    def input_fn(mod, inputs, mesh):  # (B, T, in) whole, or (B, T, in / tp) for rowwise
        return tuple(DTensor.from_local(x, mesh, [input_placement], run_check=False) for x in inputs)

    def output_fn(mod, output, mesh):  # (B, T, out / tp) for colwise, (B, T, out) summed for rowwise
        return output.to_local() if style == "colwise" else output.redistribute(mesh, [Replicate()]).to_local()

    distribute_module(module, mesh, input_fn=input_fn, output_fn=output_fn)  # the rest (A or B, b) replicated


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, info: DistInfo) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most max_norm; returns the norm before clipping as a ()
    tensor on the device, not read back (the caller reads it when it logs: no host-device sync here).
    Under tensor or expert parallelism the parameters are plain tensors and DTensors on different meshes (split
    weights beside replicated norms, experts beside the rest), which torch's clip_grad_norm_ cannot mix: each
    gradient's norm is reduced over its own mesh."""
    if info.layout["tp"] == 1 and info.ep == 1:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g) for g in grads]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]  # () each, whole over its mesh
    if not norms:
        return torch.zeros((), device=info.device)
    total = torch.linalg.vector_norm(torch.stack(norms).float())
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # a non-finite norm is returned as is: the caller skips or stops
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total


# ----------------------------------------------------------------------------------------------- sharded loading


def loads_sharded(cfg, info: DistInfo) -> bool:
    """Whether this run builds the model on the meta device, parallelizes it, then fills each rank's shards from the
    checkpoint (NF4 weights: each process quantises the rows it holds). Otherwise every process loads the whole model
    and then shards it: one process, random init from model.size, and DoRA (magnitudes from whole rows), for now."""
    return info.enabled and bool(cfg.model.path) and not cfg.lora.dora


def local_box(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(this rank's local tensor, its offset in the whole tensor), for a DTensor or a plain (whole) tensor."""
    if not hasattr(param, "to_local"):
        return param.data, (0,) * param.ndim
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    assert tuple(local.shape) == tuple(shape), f"local shard {tuple(local.shape)} != expected {tuple(shape)}"
    return local, tuple(offset)


def overlap(region: list[tuple[int, int, bool]], local_shape, offset) -> tuple[tuple, tuple] | None:
    """region: per dimension of the whole parameter, (start, stop, squeezed) of one checkpoint tensor (an int index
    such as one expert of a stacked tensor is squeezed: not a dimension of the checkpoint tensor). -> (slices into
    the checkpoint tensor, index into the local shard) of the part both hold, or None when they hold nothing alike."""
    file_index, local_index = [], []
    for (start, stop, squeezed), size, off in zip(region, local_shape, offset):
        lo, hi = max(start, off), min(stop, off + size)
        if lo >= hi:
            return None
        if squeezed:
            local_index.append(lo - off)
        else:
            file_index.append(slice(lo - start, hi - start))
            local_index.append(slice(lo - off, hi - off))
    return tuple(file_index), tuple(local_index)


def key_region(shape, index) -> list[tuple[int, int, bool]]:
    """The box a checkpoint tensor fills in its parameter: all of it, or `index` (ints and slices, leading dims)."""
    index = () if index is None else (index if isinstance(index, tuple) else (index,))
    region = []
    for dim, size in enumerate(shape):
        item = index[dim] if dim < len(index) else slice(None)
        if isinstance(item, int):
            region.append((item, item + 1, True))
        else:
            start, stop, _ = item.indices(size)
            region.append((start, stop, False))
    return region


@torch.no_grad()
def load_sharded(model: nn.Module, path, device: torch.device, offload: bool = False) -> None:
    """Allocate this rank's shards of a meta-device, already parallelized model and fill them from the safetensors
    files, reading only the slices this rank owns (`safetensors_io.read_slice`): no process holds the whole model.
    An NF4 weight is read by the rows this process holds and quantised (`load_hf_rows`): blocks never straddle rows,
    so its codes and scales are those rows of the whole weight's. Adapters and RoPE tables, which checkpoints do not
    hold, are then initialised as in one process. With `offload` (parallel.cpu_offload) the shards are allocated in
    host memory, where FSDP2 keeps them, and only the RoPE tables on `device`."""
    from pathlib import Path

    from models import expected_checkpoint_keys, param_for_hf_key, safetensors_io

    hf_shapes = hf_shapes_of(model)
    model.to_empty(device="cpu" if offload else device)
    set_hf_shapes(model, hf_shapes)
    model.tie_weights()  # to_empty gives plain (not sharded) parameters new storage, which unties them
    expected = expected_checkpoint_keys(model)
    params = dict(model.named_parameters())
    for file in safetensors_io.checkpoint_files(Path(path)):
        with open(file, "rb") as f:
            for key, info in safetensors_io.read_header(file).items():
                if key not in expected:
                    continue
                name, index = param_for_hf_key(model, key)  # index: rows of a stacked or fused parameter
                target = params[name] if name in params else model.get_buffer(name)
                owner_name, _, local_name = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                if hasattr(owner, "load_hf_rows") and hasattr(owner, f"{local_name}_absmax"):  # NF4 codes and scales
                    codes, (first, _) = local_box(target)  # (rows here, in_padded / 2) uint8
                    absmax, _ = local_box(getattr(owner, f"{local_name}_absmax"))  # (rows here, in_padded / 64)
                    # the rows of the storage this checkpoint tensor fills: all, or one expert's of an NF4 stack
                    start, stop = (0, target.shape[0]) if index is None else owner.stack_rows(local_name, index)
                    lo, hi = max(start, first), min(stop, first + codes.shape[0])
                    if lo < hi:
                        rows = safetensors_io.read_slice(f, info, (slice(lo - start, hi - start),))
                        here = slice(lo - first, hi - first)  # quantised on the compute device
                        owner.load_hf_rows(rows, codes[here], absmax[here], device)
                    continue
                local, offset = local_box(target)
                where = overlap(key_region(target.shape, index), local.shape, offset)
                if where is not None:
                    file_index, local_index = where
                    local[local_index] = safetensors_io.read_slice(f, info, file_index).to(local.dtype)
    init_after_sharded_load(model, device)


def init_after_sharded_load(model: nn.Module, device: torch.device) -> None:
    """What from_pretrained's `materialize_after_load` does, for sharded tensors: RoPE tables are computed; a LoRA
    adapter is initialised whole (A Kaiming-uniform, B zero: the same random numbers as one process, drawn in the same
    module order) and each rank keeps its part."""
    import math

    def keep_part(param, whole):
        local, offset = local_box(param)
        local.copy_(whole[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))])

    for module in model.modules():
        if hasattr(module, "initial_adapters"):  # stacked MoE experts: per-expert adapters, drawn as in one process
            for adapters, name, whole in module.initial_adapters():
                keep_part(adapters[name], whole)
            module.choose_kernel(device)  # the NF4 codes and scales stay where FSDP2 keeps them
        elif hasattr(module, "lora_A") and hasattr(module, "lora_B"):
            for linear, init in ((module.lora_A, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5))),
                                 (module.lora_B, nn.init.zeros_)):
                whole = torch.empty(linear.weight.shape, dtype=linear.weight.dtype)
                init(whole)
                keep_part(linear.weight, whole)
        elif hasattr(module, "materialize_after_load") and not is_nf4(module):  # NF4 shards stay where FSDP2 keeps them
            module.materialize_after_load(device)


# ----------------------------------------------------------------------------------------------- streamed saving


def saves_streamed(cfg, model: nn.Module) -> bool:
    """Whether final/ and adapter/ can be written one gathered tensor at a time. Not yet: DoRA (its merge needs
    whole-row norms), which is gathered whole on rank 0 as before."""
    return not cfg.lora.dora


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (a collective for a DTensor: every process must call it, in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def is_nf4(module: nn.Module | None) -> bool:
    return hasattr(module, "weight_absmax")


def layer_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight W, gathered whole, (out, in): an NF4 layer's dequantised, in its compute dtype."""
    if not is_nf4(module):
        return whole(module.weight)
    from nanotune.qlora import dequantize_nf4

    return dequantize_nf4(whole(module.weight), whole(module.weight_absmax), module.in_features, module.compute_dtype)


def merged_lora_weight(module: nn.Module, original: torch.Tensor | None = None) -> torch.Tensor:
    """W + s B A of a LoRA layer, gathered whole, computed in fp32, in W's dtype: (out, in). W is `original` when given
    (QLoRA: the full-precision weight from the checkpoint), else the layer's own (an NF4 layer's dequantised)."""
    if hasattr(module, "part_rows"):  # a fused projection: each adapted part's update on its rows (FusedLoRALinear)
        return module.merged_weight(gather=whole).to(module.weight.dtype)
    w = layer_weight(module) if original is None else original
    delta = (whole(module.lora_B.weight).float() @ whole(module.lora_A.weight).float()) * module.scaling
    return (w.float() + delta).to(w.dtype)


def original_tensors(model: nn.Module, folder, by_key: bool = False) -> tuple[torch.dtype, dict[str, tuple]]:
    """(the dtype the HF folder's config.json declares, parameter name -> (shape, a function reading that tensor whole
    from the folder in that dtype)): what `lora.merge_adapter_into_base` starts from. Every process reads the tensors
    it is asked for, one at a time, so that all of them take part in the same gathers. `by_key`: every tensor of the
    folder under its checkpoint key (one expert's of a stacked parameter too)."""
    from pathlib import Path

    from models import param_for_hf_key, safetensors_io
    from nanotune.lora import checkpoint_dtype

    dtype = checkpoint_dtype(folder)

    def read(file, info):
        with open(file, "rb") as f:
            return safetensors_io.read_tensor(f, info).to(dtype)

    out = {}
    for file in safetensors_io.checkpoint_files(Path(folder)):
        for key, info in safetensors_io.read_header(file).items():
            name, index = param_for_hf_key(model, key)
            if index is None or by_key:
                reader = lambda file=file, info=info: read(file, info)  # noqa: E731
                out[key if by_key else name] = (torch.Size(info["shape"]), reader)
    return dtype, out


def final_tensors(model: nn.Module, merge_lora: bool, original=None) -> list[tuple]:
    """(checkpoint key, a function giving the whole tensor, shape, dtype), one per tensor of final/. With merge_lora a
    LoRA layer gives one merged weight instead of its three tensors; a tied LM head is left out, as HF does; an NF4
    layer gives its dequantised weight. With `original` (an HF folder: QLoRA's full-precision base), every frozen
    tensor is read from there and the adapters are merged into its weights, in its dtype: what one process writes
    with `lora.merge_adapter_into_base`."""
    from models import is_fused

    if hasattr(model, "hf_state_dict") or is_fused(model):
        return final_tensors_by_checkpoint_key(model, merge_lora, original)
    modules = dict(model.named_modules())
    skip = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    original_dtype, originals = original_tensors(model, original) if original is not None else (None, {})
    out = []
    for key, value in model.state_dict(keep_vars=True).items():
        owner_name, _, local = key.rpartition(".")
        owner = modules.get(owner_name)
        if key in skip or (merge_lora and ".lora_" in key) or (is_nf4(owner) and local == "weight_absmax"):
            continue
        shape, dtype = value.shape, value.dtype
        if is_nf4(owner) and local == "weight":
            shape, dtype = torch.Size((owner.out_features, owner.in_features)), owner.compute_dtype
        if original_dtype is not None and dtype.is_floating_point:
            dtype = original_dtype
        read = None
        if key in originals and not value.requires_grad:
            shape, read = originals[key]
        if merge_lora and local == "weight" and is_lora(owner):
            gather = lambda m=owner, r=read: merged_lora_weight(m, None if r is None else r())
        elif read is not None:
            gather = read
        elif local == "weight" and is_nf4(owner):
            gather = lambda m=owner: layer_weight(m)
        else:
            gather = lambda v=value, d=dtype: whole(v).to(d)  # d: the original's dtype for tensors trained in full
        out.append((key, gather, shape, dtype))
    return out


def final_tensors_by_checkpoint_key(model: nn.Module, merge_lora: bool, original=None) -> list[tuple]:
    """final_tensors for a model whose checkpoint layout differs from its parameters (stacked MoE experts, fused
    projections): each parameter is gathered once and cut into the checkpoint tensors that land in it
    (`param_for_hf_key`). Stacked experts with adapters (nanotune/lora_experts.py) give W_e + s B_e A_e, their NF4
    stacks dequantised; with `original`, frozen tensors come from that folder and the adapters are merged into its
    weights, as final_tensors."""
    from models import expected_checkpoint_keys, param_for_hf_key
    from nanotune.lora_experts import FrozenExperts

    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    # a Gemma 3 image-text checkpoint's text model is read under "language_model." and saved text-only, as
    # save_pretrained does
    prefix = getattr(model.config, "hf_key_prefix", "")
    by_param: dict[str, list] = {}  # parameter name -> [(key, index, shape)], so each parameter is gathered once
    for key, shape in expected_checkpoint_keys(model).items():
        name, index = param_for_hf_key(model, key)
        by_param.setdefault(name, []).append((key.removeprefix(prefix), index, torch.Size(shape)))
    original_dtype, originals = original_tensors(model, original, by_key=True) if original is not None else (None, {})
    cache: dict[str, torch.Tensor] = {}  # the one parameter gathered last

    def original_weight(name: str, owner: nn.Module) -> torch.Tensor | None:
        """A frozen parameter as the original folder holds it, whole, in its dtype; a stack put together from the
        folder's tensors of each expert. None: no folder, or a parameter trained in full."""
        param, keys = params[name], by_param[name]
        if not originals or param.requires_grad:
            return None
        if keys[0][1] is None:
            return originals[prefix + keys[0][0]][1]()
        local = name.rpartition(".")[2]
        w = torch.empty(owner.shapes[local] if isinstance(owner, FrozenExperts) else param.shape, dtype=original_dtype)
        for key, index, _ in keys:
            w[index] = originals[prefix + key][1]()
        return w

    def gathered(name: str) -> torch.Tensor:
        if name not in cache:
            cache.clear()
            owner_name, _, local = name.rpartition(".")
            owner = modules[owner_name]
            w = original_weight(name, owner)
            if isinstance(owner, FrozenExperts) and merge_lora:
                w = owner.merged_weight(local, w)
            elif isinstance(owner, FrozenExperts):
                w = owner.weight(local, whole) if w is None else w
            elif merge_lora and is_lora(owner) and local == "weight":
                w = merged_lora_weight(owner, w)
            elif w is None:
                w = layer_weight(owner) if local == "weight" and is_nf4(owner) else whole(params[name])
            cache[name] = w
        return cache[name]

    def dtype_of(name: str) -> torch.dtype:
        owner_name, _, local = name.rpartition(".")
        owner, param = modules[owner_name], params[name]
        nf4 = hasattr(owner, f"{local}_absmax")  # codes: final/ holds the weight they stand for
        if original_dtype is not None and (nf4 or param.dtype.is_floating_point):
            return original_dtype
        return owner.compute_dtype if nf4 else param.dtype

    return [(key, lambda n=name, i=index, d=dtype_of(name): (gathered(n) if i is None else gathered(n)[i]).to(d),
             shape, dtype_of(name)) for name, keys in by_param.items() for key, index, shape in keys]


@torch.no_grad()
def save_final_streamed(model: nn.Module, folder, info: DistInfo, merge_lora: bool = False,
                        max_shard_bytes: int = 5 * 10**9, original=None) -> None:
    """Write an HF-format folder (config.json + safetensors shards + index) from a sharded model: each tensor is
    gathered in turn (every process takes part), and rank 0 keeps at most one shard file's tensors before writing it,
    so no process holds the whole model. `original`: QLoRA's full-precision base folder (see final_tensors)."""
    import json
    from pathlib import Path

    import models

    folder = Path(folder)
    entries = final_tensors(model, merge_lora, original)
    shards: list[list] = [[]]  # planned from shapes and dtypes alone, so the file names are known before gathering
    size = 0
    for entry in entries:
        nbytes = entry[2].numel() * entry[3].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name, shard in zip(names, shards):
        tensors = {}
        for key, gather, _, _ in shard:
            tensor = gather()  # (whole shape) on every process
            if info.is_main:
                tensors[key] = tensor.contiguous().cpu()
            del tensor
        if info.is_main:
            models.safetensors_io.write_atomic(tensors, folder / name)
            weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if info.is_main:
        if len(shards) > 1:
            total = sum(e[2].numel() * e[3].itemsize for e in entries)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        models.write_config_json(model, folder, str(entries[0][3]).removeprefix("torch."))


@torch.no_grad()
def save_adapter_streamed(model: nn.Module, folder, info: DistInfo, base_model_name_or_path: str | None) -> None:
    """adapter/ in PEFT's format from a sharded model: the adapters are small, so they are gathered together."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from nanotune import lora

    config = lora.adapter_config(model, base_model_name_or_path)
    tensors = {k: whole(v).contiguous().cpu() for k, v in lora.adapter_state_dict(model).items()}
    if info.is_main:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / lora.ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / lora.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------- collectives


def all_reduce_sum(value: float | int, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item()


def all_reduce_sum_on_device(value: torch.Tensor | float, info: DistInfo) -> torch.Tensor:
    """The sum over all processes as an fp64 tensor on the device, not read back: no host-device sync. A host number
    becomes a tensor by a fill on the device (no copy from host memory, which would wait for the device)."""
    if not isinstance(value, torch.Tensor):
        value = torch.full((), float(value), dtype=torch.float64, device=info.device)
    value = value.to(torch.float64)
    if info.enabled:
        value = value.clone()  # all_reduce works in place
        dist.all_reduce(value)
    return value


def broadcast_from_main(value: int, info: DistInfo) -> int:
    """Rank 0's value on every rank: for decisions all ranks must take together (e.g. a checkpoint on the clock)."""
    if not info.enabled:
        return value
    t = torch.tensor(int(value), dtype=torch.int64, device=info.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and info.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


_watchdog: threading.Thread | None = None


def exit_when_launcher_dies(on_exit=None, interval_s: float = 1.0) -> None:
    """Under a launcher (torchrun), end this worker within seconds of the launcher's death: a `kill -9` of torchrun
    cannot pass a signal on, and the worker would otherwise train to the end. A daemon thread sees the parent pid
    change (the orphan is re-parented) and calls `on_exit(message)` (for the log), then exits at once: the other
    workers may be gone too, so nothing collective (such as a checkpoint) could finish."""
    global _watchdog
    if _watchdog is not None and _watchdog.is_alive():
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(interval_s)
        try:
            if on_exit is not None:
                on_exit(f"the launcher (pid {launcher}) is gone; stopping this worker (pid {os.getpid()})")
        finally:
            os._exit(1)

    _watchdog = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    _watchdog.start()
