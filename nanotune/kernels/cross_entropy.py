"""Cross-entropy and its gradient for one chunk of logits, in place, in one Triton kernel (used by nanotune/loss.py).

For each row z (V,) of a chunk of logits in the compute dtype (bf16): z <- softcap(z) if asked, lse = logsumexp(z)
by an online max / sum over blocks of the vocabulary (Milakov & Gimelshein, 2018), loss = lse - z[y], then the row
is overwritten with d loss / d z = softmax(z) - one_hot(y) (times 1 - tanh^2 under a softcap). Two reads and one
write of the bf16 logits, where the PyTorch path (`cross_entropy_chunk_reference`) makes an fp32 copy and a softmax.
A row labelled -100 (not trained) gets loss 0 and a zero gradient, so the caller keeps every row: no boolean gather.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanotune.kernels.launch import check_device
from nanotune.packing import IGNORE_INDEX  # the batch contract's "not trained" label


def cross_entropy_chunk_reference(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None = None):
    """logits (n, V), labels (n,) -> (per-row loss (n,) fp32, d sum(loss) / d logits (n, V)); rows labelled
    IGNORE_INDEX (-100) have loss 0 and gradient 0."""
    z = logits.float()
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    trained = labels != IGNORE_INDEX
    target = torch.where(trained, labels, 0)
    lse = torch.logsumexp(z, dim=-1)
    loss = torch.where(trained, lse - z.gather(1, target[:, None]).squeeze(1), 0.0)
    grad = torch.softmax(z, dim=-1)
    grad[torch.arange(len(labels)), target] -= 1.0
    if softcap is not None:
        grad = grad * (1.0 - t * t)
    return loss, (grad * trained[:, None]).to(logits.dtype)


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _cross_entropy_chunk(LOGITS, stride_row, LABELS, LOSS, V, softcap, IGNORE: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    y = tl.load(LABELS + row)
    m = tl.full([], float("-inf"), tl.float32)  # running max
    d = tl.full([], 0.0, tl.float32)  # running sum of exp(z - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    trained = y != IGNORE
    z_y = tl.load(ptr + tl.where(trained, y, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)
    tl.store(LOSS + row, tl.where(trained, lse - z_y, 0.0))
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(z / softcap)
            z = softcap * t
        g = tl.exp(z - lse)
        g = tl.where(cols == y, g - 1.0, g)
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        g = tl.where(trained, g, 0.0)  # an untrained row: no gradient
        tl.store(ptr + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def cross_entropy_chunk_(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """In place: logits (n, V) become d sum(loss) / d logits; returns the per-row losses (n,) in fp32.

    Rows labelled IGNORE_INDEX (-100) get loss 0 and a zero gradient: the caller needs no boolean gather.
    """
    check_device(logits)
    if logits.stride(-1) != 1:
        raise ValueError("cross_entropy_chunk_: the logits' last dim must be contiguous (it is written in place)")
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(V), 4096)
    _cross_entropy_chunk[(n,)](logits, logits.stride(0), labels, loss, V, softcap or 1.0, IGNORE=IGNORE_INDEX,
                               HAS_SOFTCAP=softcap is not None, BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
    return loss
