"""4-bit NormalFloat (NF4) base weights for QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

The frozen base linear weights are stored in NF4 with double quantisation (the per-block absmax scales are
themselves quantised to 8 bits), and every matmul dequantises on the fly and runs in `compute_dtype` (bf16).
Only the LoRA adapters (nanotune/lora.py) are trained, in full precision. An adapted layer (`QLoRALinear` there) takes
the weight from `NF4Linear.dequantize` and runs the matmul itself, so that it can keep the dequantised weight for the
backward under activation checkpointing instead of dequantising a third time.

Quantisation happens while the checkpoint streams in: `quantize_nf4(model)` swaps `nn.Linear` modules of a
model still on the meta device for `NF4Linear`, and the model loader calls `NF4Linear.load_hf_weight` with one
tensor at a time, so peak memory stays near the quantised size instead of the full bf16 model. The storage and
kernels come from bitsandbytes, which has a CPU backend (used by the tests) and a CUDA backend (real runs).
"""

import torch
import torch.nn as nn

NF4_BLOCKSIZE = 64  # elements per absmax scale, as in the QLoRA paper


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


class NF4Linear(nn.Module):
    """A frozen `nn.Linear` whose weight is stored in NF4: y = x @ dequant(W)^T + b, computed in `compute_dtype`.

    `weight` holds the packed 4-bit codes, two per byte: (out_features * in_features // 2, 1) uint8.
    `quant_state` (a bitsandbytes QuantState) holds the block scales, the code book and the original shape.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, quant_device=None):
        super().__init__()
        if (in_features * out_features) % 2:
            raise ValueError(f"NF4 packs two weights per byte; {out_features}x{in_features} has an odd size.")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        # where weights are quantised as they stream in; None: the device the tensor arrives on (CPU)
        self.quant_device = None if quant_device is None else torch.device(quant_device)
        packed = torch.empty(out_features * in_features // 2, 1, dtype=torch.uint8, device="meta")
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight.hf_shape = (out_features, in_features)  # what the checkpoint holds, for the loader's key check
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device="meta"), requires_grad=False)
        self.quant_state = None  # set when the weight is quantised

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
            w = tensor.to(device=device, dtype=self.compute_dtype)  # (out, in)
            packed, state = _bnb().functional.quantize_4bit(
                w, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
            self.weight = nn.Parameter(packed, requires_grad=False)  # (out * in // 2, 1)
            self.weight.hf_shape = (self.out_features, self.in_features)
            self.quant_state = state
        elif name == "bias":
            self.bias = nn.Parameter(tensor.to(device=device, dtype=self.compute_dtype), requires_grad=False)
        else:
            raise KeyError(f"NF4Linear has no parameter {name!r} (it has 'weight' and 'bias').")

    def materialize_after_load(self, device) -> None:
        """Move the quantised weight to `device`; a weight the checkpoint lacked stays on meta (reported missing)."""
        if self.quant_state is None:
            return
        device = torch.device(device)
        if self.weight.device != device:
            self.weight = nn.Parameter(self.weight.data.to(device), requires_grad=False)
            self.weight.hf_shape = (self.out_features, self.in_features)
            self.quant_state.to(device)  # moves the scales in place
        if self.bias is not None and self.bias.device.type != "meta" and self.bias.device != device:
            self.bias = nn.Parameter(self.bias.data.to(device), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The full weight, (out_features, in_features) in compute_dtype."""
        self._check_loaded()
        return _bnb().functional.dequantize_4bit(self.weight.data, self.quant_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_loaded()
        # (..., in) -> (..., out); bitsandbytes dequantises W block by block inside the matmul
        y = _bnb().matmul_4bit(x.to(self.compute_dtype), self.weight.t(), quant_state=self.quant_state, bias=self.bias)
        return y.to(x.dtype)

    def _check_loaded(self):
        if self.quant_state is None:
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

