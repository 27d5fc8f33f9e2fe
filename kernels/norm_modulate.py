"""Fused LayerNorm (no affine) + adaLN modulation, the DiT's per-token prologue.

    y[b, f*N + n] = LayerNorm(x[b, f*N + n]) * (1 + scale[b, f]) + shift[b, f]

``x [B, F*N, D]``; ``shift, scale [B, F, D]`` (one row per frame, N tokens per frame). The Triton
kernel does it in one pass per token (statistics in float32); ``norm_modulate`` dispatches to it
for CUDA inference and to ``norm_modulate_reference`` otherwise (CPU, autograd, no Triton).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is used
    triton = None


def norm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    f = shift.shape[1]
    n = x.shape[1] // f
    h = F.layer_norm(x, x.shape[-1:], eps=eps).unflatten(1, (f, n))
    return (h * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


if triton is not None:

    @triton.jit
    def _norm_modulate_kernel(x_ptr, shift_ptr, scale_ptr, y_ptr, tokens_per_frame, rows_per_batch, frames, dim, eps,
                              BLOCK: tl.constexpr):
        row = tl.program_id(0)  # one token
        b = row // rows_per_batch
        frame = (row % rows_per_batch) // tokens_per_frame
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / dim
        centred = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centred * centred, axis=0) / dim
        h = centred / tl.sqrt(var + eps)
        cond = (b * frames + frame) * dim + cols
        shift = tl.load(shift_ptr + cond, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + cond, mask=mask, other=0.0).to(tl.float32)
        y = h * (1.0 + scale) + shift
        tl.store(y_ptr + row * dim + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def norm_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1); no autograd."""
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    b, rows, dim = x.shape
    frames = shift.shape[1]
    y = torch.empty_like(x)
    _norm_modulate_kernel[(b * rows,)](x, shift, scale, y, rows // frames, rows, frames, dim, eps,
                                       BLOCK=triton.next_power_of_2(dim))
    return y


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused kernel for CUDA inference, the reference everywhere else (forward-mode dual inputs included)."""
    if (triton is not None and x.is_cuda and not (torch.is_grad_enabled() and (x.requires_grad or shift.requires_grad))
            and all(fwAD.unpack_dual(t).tangent is None for t in (x, shift, scale))):
        return norm_modulate_triton(x, shift, scale, eps)
    return norm_modulate_reference(x, shift, scale, eps)
