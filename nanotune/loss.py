"""Cross-entropy summed over trained tokens; the caller divides by the trainable tokens of the whole optimizer step.

Labels are pre-shifted (see nanotune/packing.py): `labels[b, t]` is the target of the logits at position t, and -100
marks positions that are not trained. Summing here and normalising once per optimizer step (not per micro-batch)
makes the loss and its gradients independent of micro-batch size, accumulation steps and the number of processes.

Two ways to the same number:

    loss_sum = cross_entropy_sum(model(input_ids), labels)                                  # the plain oracle
    hidden = model(input_ids, return_hidden=True)                                           # (B, T, D)
    loss_sum = linear_cross_entropy_sum(hidden, lm_head_weight(model.lm_head), labels)      # fused LM head + CE

The plain loss keeps (B, T, V) logits, their fp32 copy and the softmax for the backward: for Llama 3 (V = 128256) at
8192 tokens that is ~2 + 4 + 4 GiB. The fused loss (the idea of Liger-Kernel's fused linear cross-entropy, Hsu et al.,
2024, and of Wijmans et al., 2024, "Cut Your Losses in Large-Vocabulary Language Models") projects `chunk_size` tokens
at a time and computes each chunk's gradients w.r.t. hidden and weight right away, in the forward, so no logits
outlive their chunk and the backward only scales the stored gradients.

Models with a final-logit softcap (Gemma 2: `cap * tanh(logits / cap)`) pass
`softcap=model.config.final_logit_softcapping`; it is applied to the logits before the cross-entropy, as the model's
own `softcap_logits` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from nanotune.packing import IGNORE_INDEX  # the batch contract's "not trained" label


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) -> the summed token losses (fp32 scalar)."""
    logits = logits.flatten(0, 1).float()  # (B*T, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_size: int = 1024, softcap: float | None = None,
                             use_triton: bool | None = None) -> torch.Tensor:
    """The same sum from hidden states (B, T, D) and the LM-head weight (V, D), `chunk_size` tokens at a time.

    Every position is projected and untrained ones (label -100) are masked inside each chunk, so that the shapes never
    depend on the labels: no boolean gather, no host sync, nothing that stops torch.compile (the cost: the LM head also
    runs on prompt and padding tokens, a few percent of a step). Peak extra memory is about chunk_size x V x 10 bytes
    (the chunk's logits in the compute dtype, in fp32, and its gradient) plus one gradient the size of `weight`; with
    V = 128256, 1024 tokens a chunk is ~1.2 GiB. Gradients are exact (no recomputation); the weight gradient is accumulated over chunks in the
    weight's dtype, as a matmul would. Not differentiable twice.

    use_triton: compute each chunk's loss and gradient in place in its logits with one Triton kernel
    (nanotune/kernels/cross_entropy.py: no fp32 copy, ~chunk_size x V x 2 bytes a chunk); None = on CUDA when triton
    is installed. The PyTorch path below is its reference.
    """
    if not torch.is_grad_enabled():  # evaluation: no gradient may be computed, for the weight either
        hidden, weight = hidden.detach(), weight.detach()
    if use_triton is None:
        use_triton = hidden.is_cuda and _triton_available()
    # (N, D) and (N,) over all B*T positions, untrained ones included
    return _LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, labels.flatten(), chunk_size, softcap, use_triton)


def lm_head_weight(lm_head: torch.nn.Module) -> torch.Tensor:
    """The (V, D) weight to give `linear_cross_entropy_sum`, refusing heads whose logits are not `x @ weight.T`."""
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        raise ValueError(
            f"the fused loss needs the LM head to be a plain nn.Linear without bias, got {type(lm_head).__name__}"
            f"{' with bias' if getattr(lm_head, 'bias', None) is not None else ''} (a LoRA or quantised head); "
            "use cross_entropy_sum on the model's logits instead"
        )
    return lm_head.weight


def _triton_available() -> bool:
    from nanotune.kernels import triton_available

    return triton_available()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_n CE(softcap(h_n @ W^T), y_n), with the gradients computed chunk by chunk during the forward."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, chunk_size: int, softcap: float | None, use_triton: bool):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = labels_N.shape[0]
        dtype = hidden_ND.dtype  # compute dtype of the matmuls (bf16 under autocast, the model's dtype otherwise)
        w_VD = weight_VD.to(dtype)  # a no-op unless the weight is kept in another dtype (fp32 master weights)
        grad_hidden_ND = torch.empty_like(hidden_ND) if need_hidden_grad else None
        grad_weight_VD = torch.zeros_like(weight_VD) if need_weight_grad else None
        chunk_fn = _chunk_triton if use_triton else _chunk_torch
        total = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
        with torch.autocast(hidden_ND.device.type, enabled=False):  # dtypes are chosen here, explicitly
            for start in range(0, N, chunk_size):
                h_nD, y_n = hidden_ND[start : start + chunk_size], labels_N[start : start + chunk_size]
                loss_sum, grad_nV = chunk_fn(h_nD, w_VD, y_n, softcap)  # grad_nV (n, V) in the compute dtype
                total += loss_sum
                if need_hidden_grad:
                    grad_hidden_ND[start : start + chunk_size] = grad_nV @ w_VD  # (n, D)
                if need_weight_grad:
                    if grad_weight_VD.dtype == dtype:
                        grad_weight_VD.addmm_(grad_nV.t(), h_nD)  # (V, D) += (V, n) @ (n, D), no temporary
                    else:
                        grad_weight_VD += (grad_nV.t() @ h_nD).to(grad_weight_VD.dtype)
                del grad_nV
        ctx.save_for_backward(grad_hidden_ND, grad_weight_VD)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        grad_hidden_ND, grad_weight_VD = ctx.saved_tensors
        # the stored gradients are used once: scale them in place rather than allocate a second (V, D) tensor
        if grad_hidden_ND is not None:
            grad_hidden_ND = grad_hidden_ND.mul_(grad_total.to(grad_hidden_ND.dtype))
        if grad_weight_VD is not None:
            grad_weight_VD = grad_weight_VD.mul_(grad_total.to(grad_weight_VD.dtype))
        return grad_hidden_ND, grad_weight_VD, None, None, None, None


def _chunk_torch(h_nD, w_VD, y_n, softcap):
    """One chunk in PyTorch (the reference): (summed loss, d loss / d logits (n, V) in h's dtype).

    Rows labelled -100 add 0 to the loss and get a zero gradient."""
    logits_nV = (h_nD @ w_VD.t()).float()  # (n, V) fp32: the only logits alive at any time
    if softcap is not None:
        tanh_nV = torch.tanh(logits_nV.div_(softcap))
        logits_nV = tanh_nV * softcap
    trained_n = y_n != IGNORE_INDEX  # (n,)
    target_n = torch.where(trained_n, y_n, 0)[:, None]  # (n, 1) a valid column for every row; untrained rows masked
    lse_n = torch.logsumexp(logits_nV, dim=-1)  # (n,)
    loss_sum = torch.where(trained_n, lse_n - logits_nV.gather(1, target_n).squeeze(1), 0.0).sum()
    # d loss / d logits = softmax - one_hot(y), built in place in the fp32 logits buffer, zero on untrained rows
    grad_nV = logits_nV.sub_(lse_n[:, None]).exp_()
    del logits_nV
    grad_nV.scatter_add_(1, target_n, grad_nV.new_full(target_n.shape, -1.0))
    if softcap is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
        grad_nV.mul_(1.0 - tanh_nV * tanh_nV)
    grad_nV.mul_(trained_n[:, None])
    return loss_sum, grad_nV.to(h_nD.dtype)


def _chunk_triton(h_nD, w_VD, y_n, softcap):
    """One chunk with the Triton kernel: the logits, in the compute dtype, become their gradient in place."""
    from nanotune.kernels.cross_entropy import cross_entropy_chunk_

    grad_nV = h_nD @ w_VD.t()  # (n, V) logits
    return cross_entropy_chunk_(grad_nV, y_n, softcap).sum(), grad_nV  # untrained rows: loss 0, gradient 0
