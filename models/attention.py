"""Attention backends behind one entry point, shared by every model family.

A model builds an `AttentionContext` once per forward (it holds the packing information and the masks, so that
every layer reuses them) and calls `attend(q, k, v, ctx, ...)` in each attention layer:

    ctx = build_context("sdpa", input_ids.shape, input_ids.device, position_ids=position_ids)
    out = attend(q, k, v, ctx, sliding_window=4096)          # q (B, Hq, T, D), k/v (B, Hkv, T, D)

Attention is always causal (decoder-only language models). A row is *packed* when it holds several documents. The
caller that knows says so (`packed=True / False`: the batch loader, for every batch of a run); the documents then come
from `cu_seqlens` over the flattened (B * T) tokens, or from `position_ids` restarting at 0, by ops whose shapes do not
depend on the data, without reading anything back to the host: a forward that torch.compile captures whole. With
`packed=None` the context finds out from the data (it reads the device, and checks `cu_seqlens`): for calls by hand.
A token never attends to a token of another document, whatever the backend. Documents never span rows: a row boundary
always starts a new document, also when `cu_seqlens` says otherwise.

Sliding windows follow HF semantics: query i sees key j when 0 <= i - j < sliding_window (itself included).
Logit softcapping (Gemma 2) replaces each scaled score s by softcap * tanh(s / softcap) before the softmax.

Backends (`attention.implementation`; what each can do is in CAPABILITIES and docs/attention.md):
- `eager`: matmul, mask, softmax; the oracle in tests. Everything, slowly: O(T^2) memory.
- `sdpa`: torch's scaled_dot_product_attention; unpacked rows without a window take the `is_causal` fast path
  (flash attention on CUDA), packed rows or sliding windows get a dense boolean mask (correct, but the slow path).
- `flex`: torch.nn.attention.flex_attention (Dong et al., 2024, "Flex Attention"). A BlockMask built once per
  forward from document ids (causal & same document & window) is reused by every layer; blocks that are fully
  masked are skipped, so packing costs nothing. Softcapping goes through a score_mod. Compiled on CUDA.
- `varlen`: torch.nn.attention.varlen.varlen_attn, the flash attention kernel over the flattened tokens with
  cu_seqlens (Dao, 2023, "FlashAttention-2"); sliding windows through window_size. CUDA, bf16/fp16 only.
- `auto`: the fastest correct backend, picked per call from the device and packing (known at build_context)
  and the features that call asks for (softcap, window, dtype); see `auto_backend`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flex", "varlen")

# What each backend can do, for refusals and docs. `devices`: device types it runs on.
CAPABILITIES = {
    "eager": dict(devices=("cpu", "cuda"), packing=True, sliding_window=True, softcap=True),
    "sdpa": dict(devices=("cpu", "cuda"), packing=True, sliding_window=True, softcap=False),
    "flex": dict(devices=("cpu", "cuda"), packing=True, sliding_window=True, softcap=True),  # no CPU backward
    "varlen": dict(devices=("cuda",), packing=True, sliding_window=True, softcap=False),  # bf16/fp16 only
}


@dataclass
class AttentionContext:
    """Per-forward attention state: the resolved backend, packing information and a cache of masks."""

    implementation: str  # the backend asked for, resolved: never "auto" (see `auto`)
    seq_len: int
    device: torch.device
    document_ids: torch.Tensor | None = None  # (B, T) int, None when every row is one document
    position_ids: torch.Tensor | None = None  # (B, T)
    cu_seqlens: torch.Tensor | None = None  # (num_docs + 1,) int32 over the flattened B*T tokens
    max_seqlen: int | None = None
    cache: dict = field(default_factory=dict)  # masks keyed by (kind, sliding_window), built once per forward
    auto: bool = False  # "auto" was asked: `implementation` is the default and each call may pick another
    batch_size: int = 1
    compile_flex: bool = False  # run flex through torch.compile (fused kernels); default: on CUDA
    # context parallelism (nanotune/context_parallel.py): each process holds part of every row, so `attend` hands the
    # call, with the same arguments, to this function, which gathers the keys and values of the whole row from the
    # other processes and masks by whole-row positions and documents. None: the backends below.
    attend_override: Callable | None = None

    @property
    def is_packed(self) -> bool:
        return self.document_ids is not None


# ------------------------------------------------------------------------------------------- packing information


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions restarting at 0 for each document -> (B, T) document index within each row."""
    starts = (position_ids == 0).to(torch.int32)  # (B, T)
    starts[:, 0] = 1  # a row always opens a document, even one that continues from a previous row
    return torch.cumsum(starts, dim=1) - 1


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """cu_seqlens over the flattened B*T tokens -> (B, T) document ids: documents that end at or before each token.

    Ids count over the whole batch; masks compare them within a row, so a row boundary always starts a new document.
    """
    token = torch.arange(batch * seq_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)  # (B*T,)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), token, right=True).view(batch, seq_len)


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) document ids -> (cu_seqlens int32 over the flattened tokens, max_seqlen)."""
    B, T = document_ids.shape
    # make ids unique across rows so that a document never continues into the next row
    flat = (document_ids + torch.arange(B, device=document_ids.device)[:, None] * (T + 1)).flatten()
    _, counts = torch.unique_consecutive(flat, return_counts=True)
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32, device=document_ids.device)
    cu[1:] = torch.cumsum(counts, 0)
    return cu, int(counts.max())


def split_at_rows(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Add every row boundary to cu_seqlens, so that a document never continues into the next row."""
    rows = torch.arange(0, batch * seq_len + 1, seq_len, device=cu_seqlens.device, dtype=torch.int32)
    return torch.unique(torch.cat([cu_seqlens.to(torch.int32), rows]))  # sorted


# ------------------------------------------------------------------------------------------- building a context


def build_context(
    implementation: str,
    shape: tuple[int, int],
    device: torch.device | str,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    packed: bool | None = None,
    compile_flex: bool | None = None,
    sliding_windows: tuple[int | None, ...] = (),
) -> AttentionContext:
    """Build once per forward. `shape` is (B, T) of the input ids.

    `packed`: whether rows may hold several documents, as the caller knows it (the loader does). Then the documents
    come from `cu_seqlens` when given, else from `position_ids` restarting at 0, with no host sync: a compiled forward
    has no graph break here. `cu_seqlens` is then trusted to start at 0, end at B*T and never cross a row (the loader's
    do). `packed=False`: one causal sequence per row (padding at the end of a row changes nothing before it).
    `packed=None`: found out from the data (`cu_seqlens` given, or `position_ids` restarting inside a row), with
    `cu_seqlens` checked and split at row boundaries; this reads the device (host syncs).
    Refuses, before any layer runs, a backend that cannot run on this device or that the installed torch lacks.
    `compile_flex` (default: True on CUDA) runs flex through torch.compile. `sliding_windows` (the windows the
    layers will ask for, None for none) builds their masks here rather than in the first layer, i.e. outside any
    compiled block; windows not listed are still built on first use.
    """
    device = torch.device(device)
    B, T = shape
    is_auto = implementation == "auto"
    if position_ids is not None and tuple(position_ids.shape) != (B, T):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)} but input_ids has {(B, T)}")
    if packed is None:
        cu_seqlens, max_seqlen = find_packing(B, T, position_ids, cu_seqlens, max_seqlen)
        packed = cu_seqlens is not None
    document_ids = None
    if packed:
        if cu_seqlens is not None:
            document_ids = document_ids_from_cu_seqlens(cu_seqlens, B, T)
        elif position_ids is not None:
            document_ids = document_ids_from_position_ids(position_ids)
        else:
            raise ValueError("packed rows need position_ids (restarting at 0 at each document) or cu_seqlens")
    else:
        cu_seqlens = max_seqlen = None  # one sequence per row: the backends take the fast unpacked paths
    implementation = resolve_implementation(implementation, device, is_packed=packed)
    if compile_flex is None:
        compile_flex = device.type == "cuda"
    ctx = AttentionContext(
        implementation, T, device, document_ids, position_ids, cu_seqlens, max_seqlen,
        auto=is_auto, batch_size=B, compile_flex=compile_flex,
    )  # fmt: skip
    for window in sliding_windows:
        build_mask(ctx, ctx.implementation, checked_window(window, T))
    return ctx


def find_packing(B: int, T: int, position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 max_seqlen: int | None) -> tuple[torch.Tensor | None, int | None]:
    """For callers that do not say whether rows are packed: (cu_seqlens split at rows, max_seqlen), or (None, None)
    for one document per row. Checks a given cu_seqlens; reads the device (host syncs)."""
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != B * T:
            raise ValueError(
                f"cu_seqlens must be a 1-d tensor that starts at 0 and ends at B*T = {B}*{T} = {B * T}, "
                f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else tuple(cu_seqlens.shape)}"
            )
        cu_seqlens = split_at_rows(cu_seqlens, B, T)
        return cu_seqlens, max_seqlen if max_seqlen is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if position_ids is not None and bool((position_ids[:, 1:] == 0).any()):
        return cu_seqlens_from_document_ids(document_ids_from_position_ids(position_ids))
    return None, None


def build_mask(ctx: AttentionContext, backend: str, sliding_window: int | None) -> None:
    """Build (and cache on ctx) what `backend` needs for this window: a dense mask, a BlockMask or cu_seqlens."""
    if backend == "flex":
        flex_block_mask(ctx, sliding_window)
    elif backend == "varlen":
        varlen_seqlens(ctx)
    elif backend == "eager" or ctx.is_packed or sliding_window is not None:  # sdpa's fast path needs no mask
        allowed_mask(ctx, sliding_window)


def resolve_implementation(implementation: str, device: torch.device, is_packed: bool = False) -> str:
    """Check the setting against the device and the installed torch; "auto" -> its default for this device."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is unknown; choose one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        # the default for calls that ask for nothing special; `auto_backend` may pick another per call
        return auto_backend(device.type, is_packed=is_packed, dtype=torch.bfloat16)
    if implementation == "flex" and flex_attention_fn() is None:
        raise ValueError(
            "attention.implementation = 'flex' needs torch.nn.attention.flex_attention, which the installed torch "
            "lacks; use 'sdpa' or upgrade torch"
        )
    if implementation == "varlen":
        if device.type != "cuda":
            raise ValueError(
                f"attention.implementation = 'varlen' runs flash attention kernels on CUDA only, not on {device.type}; "
                "use 'sdpa' (or 'flex' / 'eager' for logit softcapping) there"
            )
        if varlen_attn_fn() is None:
            raise ValueError(
                "attention.implementation = 'varlen' needs torch.nn.attention.varlen.varlen_attn, which the installed "
                "torch lacks; use 'flex' or 'sdpa' (or upgrade torch)"
            )
    return implementation


def auto_backend(
    device_type: str,
    *,
    is_packed: bool,
    dtype: torch.dtype,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> str:
    """The fastest correct backend for one call; depends only on its arguments, the installed torch and the GPU.

    CUDA: softcap -> flex (eager without flex); one document per row and no window -> sdpa (is_causal: flash);
    packed rows or a window in bf16/fp16 -> varlen (flash over cu_seqlens) when this torch and GPU have it, else
    flex; in fp32 -> flex (flash kernels need 16-bit inputs). Without flex, sdpa with a dense mask.
    CPU: sdpa (dense masks are cheap at CPU sizes); softcap -> eager (flex cannot backpropagate on CPU and its
    uncompiled path is no faster than eager).
    """
    if device_type != "cuda":
        return "eager" if softcap is not None else "sdpa"
    has_flex = flex_attention_fn() is not None
    if softcap is not None:
        return "flex" if has_flex else "eager"
    if not is_packed and sliding_window is None:
        return "sdpa"
    if dtype in (torch.bfloat16, torch.float16) and _varlen_usable_on_gpu(sliding_window):
        return "varlen"
    return "flex" if has_flex else "sdpa"


def _varlen_usable_on_gpu(sliding_window: int | None) -> bool:
    if not _gpu_has_varlen():
        return False
    return sliding_window is None or "window_size" in _parameters(varlen_attn_fn())


@functools.cache
def _gpu_has_varlen() -> bool:
    if varlen_attn_fn() is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (8, 0)  # flash attention 2 needs Ampere or newer


# ---------------------------------------------------------------------------------------------------- dispatch


def checked_window(sliding_window: int | None, seq_len: int) -> int | None:
    if sliding_window is None:
        return None
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of tokens or None, got {sliding_window}")
    return None if sliding_window >= seq_len else sliding_window  # a window longer than the row changes nothing


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: AttentionContext,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, Hq, T, D), k and v (B, Hkv, T, D) with Hq a multiple of Hkv -> (B, Hq, T, D)."""
    if ctx.attend_override is not None:
        return ctx.attend_override(q, k, v, sliding_window=sliding_window, softcap=softcap, scale=scale)
    if q.shape[2] != ctx.seq_len:
        raise ValueError(f"attend got {q.shape[2]} query positions but the context was built for T = {ctx.seq_len}")
    sliding_window = checked_window(sliding_window, ctx.seq_len)
    backend = ctx.implementation
    if ctx.auto:
        backend = auto_backend(
            ctx.device.type, is_packed=ctx.is_packed, dtype=q.dtype, sliding_window=sliding_window, softcap=softcap
        )
    elif softcap is not None and not CAPABILITIES[backend]["softcap"]:
        raise ValueError(
            f"attention.implementation = {backend!r} cannot apply logit softcapping; use 'flex' (or 'eager')"
        )

    if backend == "eager":
        return eager_attention(q, k, v, allowed_mask(ctx, sliding_window), softcap, scale)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, ctx, sliding_window, scale)
    if backend == "flex":
        return flex_attention(q, k, v, ctx, sliding_window, softcap, scale)
    if backend == "varlen":
        return varlen_attention(q, k, v, ctx, sliding_window, scale)
    raise AssertionError(backend)


# ------------------------------------------------------------------------------------------------ eager & sdpa


def allowed_mask(ctx: AttentionContext, sliding_window: int | None) -> torch.Tensor:
    """Boolean (B or 1, 1, T, T) mask, True where query i may attend key j. Cached on the context."""
    key = ("dense", sliding_window)
    if key not in ctx.cache:
        idx = torch.arange(ctx.seq_len, device=ctx.device)
        q_idx, kv_idx = idx[:, None], idx[None, :]
        mask = kv_idx <= q_idx  # (T, T) causal
        if sliding_window is not None:
            mask = mask & (q_idx - kv_idx < sliding_window)
        mask = mask[None, None]  # (1, 1, T, T)
        if ctx.document_ids is not None:
            doc = ctx.document_ids
            mask = mask & (doc[:, None, :, None] == doc[:, None, None, :])  # (B, 1, T, T)
        ctx.cache[key] = mask
    return ctx.cache[key]


def eager_attention(q, k, v, mask, softcap=None, scale=None):
    """The plain reference: (B, Hq, T, D) x (B, Hkv, T, D) with a boolean (B|1, 1, T, T) mask."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, Hq, T, T)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return probs @ v


def sdpa_attention(q, k, v, ctx: AttentionContext, sliding_window: int | None, scale: float | None):
    gqa = q.shape[1] != k.shape[1]
    if ctx.document_ids is None and sliding_window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # the slow path: a dense (B, 1, T, T) mask rules out the flash kernel (use flex or varlen for packed rows)
    mask = allowed_mask(ctx, sliding_window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


# -------------------------------------------------------------------------------------------------------- flex


@functools.cache
def flex_attention_fn():
    """torch's flex_attention, or None when the installed torch has none."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return flex_attention


@functools.cache
def _compiled_flex():
    # Uncompiled flex materialises the (T, T) scores; compiled, it is a fused kernel that skips masked blocks.
    # dynamic=False: one static kernel per (B, H, T, D). On torch 2.11 + CUDA, the dynamic-shape recompile that a
    # second shape triggers fails inside flex's backward-graph construction when a score_mod (softcap) is used
    # (seen on an H200: "all unwrapped values must be FakeTensor"); packed rows have one shape per run anyway.
    return torch.compile(flex_attention_fn(), dynamic=False)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask, dynamic=False)


@functools.cache
@torch.compiler.assume_constant_result  # a compiled forward takes the answer as a constant: the probe stays eager
def flex_backward_on_cpu() -> bool:
    """Whether the installed flex_attention can backpropagate on CPU (probed once on a tiny input)."""
    fn = flex_attention_fn()
    if fn is None:
        return False
    q = torch.zeros(1, 1, 8, 8, requires_grad=True)
    try:
        fn(q, q, q).sum().backward()
    except NotImplementedError:
        return False
    return True


def flex_block_mask(ctx: AttentionContext, sliding_window: int | None):
    """The BlockMask (causal & same document & window) for this batch; built once, reused by every layer."""
    key = ("flex", sliding_window)
    if key not in ctx.cache:
        from torch.nn.attention.flex_attention import create_block_mask

        doc = ctx.document_ids  # (B, T) or None

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = kv_idx <= q_idx
            if sliding_window is not None:
                allowed = allowed & (q_idx - kv_idx < sliding_window)
            if doc is not None:
                allowed = allowed & (doc[b, q_idx] == doc[b, kv_idx])
            return allowed

        B = None if doc is None else doc.shape[0]  # None: one mask broadcast over the batch
        T = ctx.seq_len
        # compiled, mask_mod is evaluated block by block instead of materialising (B, T, T) booleans
        create = _compiled_create_block_mask() if ctx.compile_flex else create_block_mask
        ctx.cache[key] = create(mask_mod, B, None, T, T, device=ctx.device)
    return ctx.cache[key]


def flex_attention(q, k, v, ctx: AttentionContext, sliding_window, softcap, scale):
    if ctx.device.type == "cpu" and not flex_backward_on_cpu():
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise ValueError(
                "attention.implementation = 'flex': the installed torch's flex_attention cannot backpropagate on CPU; "
                "use 'sdpa' (or 'eager' for logit softcapping) to train on CPU"
            )
        q, k, v = q.detach(), k.detach(), v.detach()  # under no_grad flex still refuses inputs that require grad
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, q_idx, kv_idx):  # the score arrives already scaled
            return softcap * torch.tanh(score / softcap)

    fn = _compiled_flex() if ctx.compile_flex else flex_attention_fn()
    block_mask = flex_block_mask(ctx, sliding_window)
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# ------------------------------------------------------------------------------------------------------ varlen


@functools.cache
def varlen_attn_fn():
    """torch's varlen_attn, or None when the installed torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def varlen_seqlens(ctx: AttentionContext) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max_seqlen) over the flattened tokens; one sequence per row when the rows are not packed.
    Packed rows given without cu_seqlens or max_seqlen get them from the document ids (a host sync)."""
    if ctx.is_packed and (ctx.cu_seqlens is None or ctx.max_seqlen is None):
        ctx.cu_seqlens, ctx.max_seqlen = cu_seqlens_from_document_ids(ctx.document_ids)
    if ctx.cu_seqlens is not None:
        return ctx.cu_seqlens.to(device=ctx.device, dtype=torch.int32), int(ctx.max_seqlen)
    if "rows" not in ctx.cache:
        B, T = ctx.batch_size, ctx.seq_len
        ctx.cache["rows"] = torch.arange(0, B * T + 1, T, device=ctx.device, dtype=torch.int32)
    return ctx.cache["rows"], ctx.seq_len


def varlen_attention(q, k, v, ctx: AttentionContext, sliding_window, scale, kernel=None):
    """Flash attention over the flattened tokens. `kernel` defaults to torch's varlen_attn (tests pass a stand-in)."""
    kernel = kernel or varlen_attn_fn()
    params = _parameters(kernel)
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"attention.implementation = 'varlen' runs flash attention, which needs bf16 or fp16 inputs, "
            f"not {q.dtype}; use 'flex' or 'sdpa' in fp32"
        )
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    options = {}
    if Hq != Hkv:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:  # older torch: give every query head its own copy of its key/value head
            k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, T, D)
            v = v.repeat_interleave(Hq // Hkv, dim=1)
    if "window_size" in params:
        # flash's window (left, right): query i sees keys i - left .. i + right; (-1, 0) is plain causal
        options["window_size"] = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    elif sliding_window is not None:
        raise ValueError(
            "attention.implementation = 'varlen': the installed torch's varlen_attn has no window_size, so it cannot "
            "apply a sliding window; use 'flex' (or 'sdpa')"
        )
    else:
        options["is_causal"] = True
    if scale is not None:
        if "scale" in params:
            options["scale"] = scale
        else:  # a kernel without `scale` uses 1/sqrt(D): fold the difference into q
            q = q * (scale * D**0.5)
    cu_seqlens, max_seqlen = varlen_seqlens(ctx)
    q_ND = q.transpose(1, 2).reshape(B * T, Hq, D)  # (B*T, Hq, D)
    k_ND = k.transpose(1, 2).reshape(B * T, k.shape[1], D)  # (B*T, Hkv, D)
    v_ND = v.transpose(1, 2).reshape(B * T, v.shape[1], D)
    out = kernel(q_ND, k_ND, v_ND, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **options)  # (B*T, Hq, D)
    return out.view(B, T, Hq, D).transpose(1, 2)
