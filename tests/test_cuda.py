"""GPU-only checks (skipped on machines without CUDA): graphs replay exactly what eager mode computes."""

import pytest
import torch
import torch.nn.functional as F

from worldmodel.actions import make_action
from worldmodel.model import build_model
from worldmodel.session import Session

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("block_size", [1, 3])
def test_cuda_graph_session_equals_eager(block_size):
    model = build_model("tiny", seed=0, block_size=block_size)
    runs = []
    for graphs in (False, True):
        s = Session(model, device="cuda", seed=1, cuda_graphs=graphs)
        frames = [s.reset(None).frames]
        a = make_action(model.action_spec, ["W"], dx=5.0).cuda()[None]
        a = a if block_size == 1 else a[:, None].expand(-1, block_size, -1)
        for _ in range(3 * s.cache.capacity):
            frames.append(s.step(a).frames.reshape(1, -1))
        runs.append(torch.cat([f.reshape(1, -1) for f in frames], 1).float())
    assert (runs[0] - runs[1]).abs().max() <= 1.0  # uint8 frames: at most one level of rounding apart


def test_flex_kernel_options_compute_the_dense_masked_attention():
    """FlexAttention with FLEX_KERNEL_OPTIONS (compiled, bf16), forward and input gradients, against SDPA with the
    dense teacher-forcing mask in float64, on fresh random inputs."""
    from torch.nn.attention.flex_attention import flex_attention

    from worldmodel.transformer import FLEX_KERNEL_OPTIONS, flex_block_mask, frame_mask, token_mask

    frames, tokens = frame_mask("teacher_forcing", 5, 1, "cuda"), 64
    q, k, v = (torch.randn(2, 4, 10 * tokens, 64, device="cuda", dtype=torch.float64) for _ in range(3))
    grad = torch.randn_like(q)
    mask = flex_block_mask(frames, tokens)
    attend = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=mask, kernel_options=FLEX_KERNEL_OPTIONS))
    results = []
    for fn, dtype in ((attend, torch.bfloat16),
                      (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(frames, tokens)),
                       torch.float64)):
        inputs = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*inputs)
        out.backward(grad.to(dtype))
        results.append([out.double(), *(t.grad.double() for t in inputs)])
    for got, want in zip(*results):
        assert (got - want).abs().max() < 0.05 * want.abs().max()
