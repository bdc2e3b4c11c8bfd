"""4-bit NormalFloat (NF4) base weights for QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

The frozen base linear weights are stored in NF4 and every matmul dequantises on the fly and runs in `compute_dtype`
(bf16). Only the LoRA adapters (nanotune/lora.py) are trained, in full precision. An adapted layer (`QLoRALinear`
there) takes the weight from `NF4Linear.dequantize` and runs the matmul itself, so that it can keep the dequantised
weight for the backward under activation checkpointing instead of dequantising a third time.

Storage: two plain tensors per weight W (out, in), both with one row per output feature, so that FSDP2, which shards
every parameter by rows (dim 0), gives each process whole rows and so whole quantisation blocks:

    weight         (out, in_padded / 2) uint8     two 4-bit codes per byte (high nibble first), indices into NF4_VALUES
    weight_absmax  (out, in_padded / 64) bf16     the absolute maximum of each block of 64 weights of a row

Each row is quantised in blocks of its own (in_padded = in rounded up to a multiple of 64, the padding quantised as
zeros), so a block of rows quantises to exactly those rows of the whole weight's codes and scales: a process can
quantise only the rows it holds. The QLoRA paper also quantises the block scales to 8 bits ("double quantisation",
0.127 instead of 0.25 bits per weight); its offset is the mean over the whole tensor, which a process holding some
rows cannot know, so the scales are kept per block in bf16 here (0.53 bytes per weight in all, against 0.52).

Quantisation happens while the checkpoint streams in: `quantize_nf4(model)` swaps `nn.Linear` modules of a
model still on the meta device for `NF4Linear`, and the model loader calls `NF4Linear.load_hf_weight` with one
tensor at a time (with several processes, `parallel.load_sharded` calls `load_hf_rows` with this process's rows), so
peak memory stays near the quantised size instead of the full bf16 model. Dequantisation uses bitsandbytes' kernel
(CPU and CUDA backends); `dequantize_nf4_reference` is the same arithmetic in plain PyTorch, the tests' oracle.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

NF4_BLOCKSIZE = 64  # weights per absmax scale, as in the QLoRA paper
# the 16 NF4 values: quantiles of a standard normal scaled to [-1, 1], with an exact zero (QLoRA, appendix E)
NF4_VALUES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as e:
        raise ImportError(
            "QLoRA (lora.quantize = \"nf4\") needs bitsandbytes; install it with `pip install 'nanotune[quant]'` "
            "or `pip install bitsandbytes`."
        ) from e
    return bitsandbytes


def padded_in_features(in_features: int) -> int:
    return -(-in_features // NF4_BLOCKSIZE) * NF4_BLOCKSIZE


@torch.no_grad()
def quantize_nf4_rows(w: torch.Tensor, chunk_elements: int = 2**24) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a weight (rows, in) -> (codes (rows, in_padded / 2) uint8, absmax (rows, in_padded / 64) bf16).

    Each weight is scaled by its block's absmax (rounded to bf16 first, so that dequantising with the stored scale
    inverts the scaling) and rounded to the nearest NF4 value. Rows are independent: quantising rows a..b of W gives
    rows a..b of quantising W. Done `chunk_elements` at a time, so the fp32 scratch stays small (~9 bytes each).
    """
    rows, in_features = w.shape
    padded = padded_in_features(in_features)
    codes = torch.empty(rows, padded // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(rows, padded // NF4_BLOCKSIZE, dtype=torch.bfloat16, device=w.device)
    values = NF4_VALUES.to(w.device)
    midpoints = (values[1:] + values[:-1]) / 2
    step = max(1, chunk_elements // padded)
    for start in range(0, rows, step):
        chunk = F.pad(w[start:start + step].float(), (0, padded - in_features))  # (n, in_padded), zeros appended
        blocks = chunk.view(chunk.shape[0], -1, NF4_BLOCKSIZE)  # (n, blocks, 64)
        scale = blocks.abs().amax(dim=-1).to(torch.bfloat16)  # (n, blocks)
        blocks.div_(scale.float().clamp(min=1e-30).unsqueeze(-1)).clamp_(-1, 1)
        nearest = torch.bucketize(chunk, midpoints, out_int32=True).to(torch.uint8)  # (n, in_padded), 0..15
        codes[start:start + step] = nearest[:, 0::2] << 4 | nearest[:, 1::2]
        absmax[start:start + step] = scale
    return codes, absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """codes (out, in_padded / 2) uint8, absmax (out, in_padded / 64) -> W (out, in_features) in `dtype`, by
    bitsandbytes' kernel: it reads the codes as one flat tensor in blocks of 64, which are a row's blocks in turn."""
    functional = _bnb().functional
    shape = (codes.shape[0], 2 * codes.shape[1])  # (out, in_padded)
    state = functional.QuantState(absmax=absmax.float().reshape(-1), shape=shape, blocksize=NF4_BLOCKSIZE,
                                  quant_type="nf4", dtype=dtype)
    w = functional.dequantize_4bit(codes.reshape(-1, 1), state)  # (out, in_padded)
    return w if shape[1] == in_features else w[:, :in_features]


def dequantize_nf4_reference(codes: torch.Tensor, absmax: torch.Tensor, in_features: int,
                             dtype: torch.dtype) -> torch.Tensor:
    """dequantize_nf4 in plain PyTorch: value of each code times its block's absmax, in fp32, then cast."""
    rows = codes.shape[0]
    indices = torch.stack((codes >> 4, codes & 15), dim=-1).view(rows, -1, NF4_BLOCKSIZE).long()  # (out, blocks, 64)
    w = NF4_VALUES.to(codes.device)[indices] * absmax.float().unsqueeze(-1)  # (out, blocks, 64) fp32
    return w.view(rows, -1)[:, :in_features].to(dtype)


class _DequantizedLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W = dequantize() frozen: W is dequantised again for the input gradient instead of being
    saved, so no layer keeps a full-precision copy of its weight from its forward to its backward."""

    @staticmethod
    def forward(ctx, x, bias, dequantize):
        ctx.dequantize = dequantize
        return F.linear(x, dequantize(), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ ctx.dequantize() if ctx.needs_input_grad[0] else None  # (..., in)
        return grad_x, None, None


class NF4Linear(nn.Module):
    """A frozen `nn.Linear` whose weight is stored in NF4: y = x @ dequant(W)^T + b, computed in `compute_dtype`.

    `weight` (out, in_padded / 2) uint8 holds the codes, `weight_absmax` (out, in_padded / 64) bf16 the block scales
    (see the module docstring); `weight` keeps the HF name, so the loader hands this module the checkpoint's weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, quant_device=None):
        super().__init__()
        if in_features % 2:
            raise ValueError(f"NF4 packs two weights per byte; in_features = {in_features} is odd.")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        # where weights are quantised as they stream in; None (or meta: the model is only planned for now): the device
        # the tensor arrives on
        self.quant_device = None if quant_device is None or torch.device(quant_device).type == "meta" \
            else torch.device(quant_device)
        padded = padded_in_features(in_features)
        self._store(torch.empty(out_features, padded // 2, dtype=torch.uint8, device="meta"),
                    torch.empty(out_features, padded // NF4_BLOCKSIZE, dtype=torch.bfloat16, device="meta"))
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device="meta"), requires_grad=False)

    def _store(self, codes: torch.Tensor, absmax: torch.Tensor) -> None:
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight.hf_shape = (self.out_features, self.in_features)  # what the checkpoint holds: the loader checks it
        self.weight_absmax = nn.Parameter(absmax, requires_grad=False)
        self.weight_absmax.hf_shape = None  # made from the weight while loading: no checkpoint holds it

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype=torch.bfloat16, quant_device=None) -> "NF4Linear":
        """An NF4Linear for `linear`; quantised now if `linear` holds real weights, else filled by the loader."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, quant_device)
        if linear.weight.device.type != "meta":
            module.quant_device = module.quant_device or linear.weight.device
            module.load_hf_weight("weight", linear.weight.detach())
            if linear.bias is not None:
                module.load_hf_weight("bias", linear.bias.detach())
        return module

    def load_hf_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Called by the model loader with one checkpoint tensor (`name` is "weight" or "bias")."""
        device = self.quant_device or tensor.device
        if name == "weight":
            if tuple(tensor.shape) != (self.out_features, self.in_features):
                raise ValueError(f"NF4Linear expects a weight of shape {(self.out_features, self.in_features)}, "
                                 f"got {tuple(tensor.shape)}.")
            self._store(*quantize_nf4_rows(tensor.to(device=device, dtype=self.compute_dtype)))
        elif name == "bias":
            self.bias = nn.Parameter(tensor.to(device=device, dtype=self.compute_dtype), requires_grad=False)
        else:
            raise KeyError(f"NF4Linear has no parameter {name!r} (it has 'weight' and 'bias').")

    @torch.no_grad()
    def load_hf_rows(self, rows: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, device=None) -> None:
        """Sharded loading: quantise `rows` (n, in) of the checkpoint's weight on `device` (by default where the shards
        are; the GPU also when they are kept in host memory) into this process's rows of `weight` and `weight_absmax`
        (`codes` (n, in_padded / 2) and `absmax` (n, in_padded / 64), local shards)."""
        c, a = quantize_nf4_rows(rows.to(device=device or codes.device, dtype=self.compute_dtype))
        codes.copy_(c)
        absmax.copy_(a)

    def materialize_after_load(self, device) -> None:
        """Move the quantised weight to `device`; a weight the checkpoint lacked stays on meta (reported missing)."""
        device = torch.device(device)
        if not self.weight.is_meta and self.weight.device != device:
            self._store(self.weight.data.to(device), self.weight_absmax.data.to(device))
        if self.bias is not None and not self.bias.is_meta and self.bias.device != device:
            self.bias = nn.Parameter(self.bias.data.to(device), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The full weight, (out_features, in_features) in compute_dtype. Under FSDP2 call it inside the forward (or
        backward), where `weight` and `weight_absmax` are the gathered tensors."""
        self._check_loaded()
        return dequantize_nf4(self.weight, self.weight_absmax, self.in_features, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        y = _DequantizedLinear.apply(x.to(self.compute_dtype), self.bias, self.dequantize)  # (..., out)
        return y.to(x.dtype)

    def _check_loaded(self):
        if self.weight.is_meta:
            raise RuntimeError("NF4Linear has no weight yet: load the checkpoint (models.from_pretrained) first.")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, nf4")


def quantize_nf4(model: nn.Module, skip=("lm_head",), compute_dtype=torch.bfloat16, device=None) -> list[str]:
    """Swap every `nn.Linear` of `model` (except names ending in `skip`) for an `NF4Linear`, in place.

    Call it on the meta model (inside `models.from_pretrained(prepare=...)`) so that weights are quantised as they
    stream in, with `device` the device the model is being loaded onto (quantising there is much faster than on CPU);
    on a loaded model it quantises immediately. Returns the names of the swapped modules.
    """
    _bnb()  # fail early, before any work, when bitsandbytes is missing
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(name == s or name.endswith("." + s) for s in skip):
            continue
        model.set_submodule(name, NF4Linear.from_linear(module, compute_dtype, device))
        swapped.append(name)
    return swapped
