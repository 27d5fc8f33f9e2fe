"""Triton kernels against their references (on the CPU through Triton's interpreter, see conftest.py)."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.norm_modulate import norm_modulate, norm_modulate_reference, norm_modulate_triton  # noqa: E402


@pytest.mark.parametrize("batch, frames, tokens, dim", [(2, 3, 4, 32), (1, 1, 5, 48), (3, 2, 2, 256)])
def test_norm_modulate_kernel_matches_reference(batch, frames, tokens, dim):
    """Under TRITON_INTERPRET=1 on CPU tensors; compiled on the GPU when the interpreter is off."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    x = torch.randn(batch, frames * tokens, dim, generator=g) * 3 + 1
    shift, scale = torch.randn(batch, frames, dim, generator=g), torch.randn(batch, frames, dim, generator=g)
    ref = norm_modulate_reference(x.double(), shift.double(), scale.double()).float()
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not (interpreting or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    device = "cpu" if interpreting else "cuda"
    out = norm_modulate_triton(x.to(device), shift.to(device), scale.to(device)).cpu()
    assert (out - ref).norm() / ref.norm() < 1e-5


def test_reference_matches_layer_norm_by_hand():
    x, shift, scale = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    h = (x - mean) / (var + 1e-6).sqrt()
    want = h * (1 + scale.repeat_interleave(2, 1)) + shift.repeat_interleave(2, 1)
    assert torch.allclose(norm_modulate_reference(x, shift, scale), want, atol=1e-12)


def test_dispatch_uses_the_reference_off_gpu_and_under_autograd():
    x = torch.randn(1, 4, 8, requires_grad=True)
    shift, scale = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
    out = norm_modulate(x, shift, scale)
    out.sum().backward()  # the reference path carries gradients
    assert x.grad is not None
