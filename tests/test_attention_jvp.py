"""Attention JVP: the reference against finite differences and the hand-derived formula (float64),
the Triton kernel against the reference (on the CPU through Triton's interpreter, see conftest.py;
on a GPU in a subprocess without the interpreter), the tile layout, dispatch and mask checks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from kernels import attention_jvp as aj
from kernels.attention_jvp import attention_jvp, attention_jvp_reference, math_attention, tile_layout
from worldmodel.transformer import frame_mask, token_mask

F64 = torch.float64


def inputs(b, h, lq, lk, d, dtype=torch.float32, seed=0):
    """``(q, k, v, tq, tk, tv)``: q-like ``[b, h, lq, d]``, k-like ``[b, h, lk, d]``."""
    g = torch.Generator().manual_seed(seed)
    q, tq = (torch.randn(b, h, lq, d, generator=g, dtype=F64) for _ in range(2))
    k, v, tk, tv = (torch.randn(b, h, lk, d, generator=g, dtype=F64) for _ in range(4))
    return tuple(t.to(dtype) for t in (q, k, v, tq, tk, tv))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


MASKS = {  # name: (frames or None, tokens_per_frame, Lq, Lk)
    "full": (None, 1, 7, 7),
    "causal": (frame_mask("causal", 4, 2), 3, 12, 12),
    "teacher_forcing": (frame_mask("teacher_forcing", 3, 1), 2, 12, 12),
    "cached": (None, 1, 4, 10),
}


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("name", list(MASKS))
def test_reference_matches_central_difference(name):
    frames, n, lq, lk = MASKS[name]
    q, k, v, tq, tk, tv = inputs(2, 2, lq, lk, 8, F64)
    mask = token_mask(frames, n)
    eps = 1e-5

    def f(e):
        return math_attention(q + e * tq, k + e * tk, v + e * tv, mask)

    fd = (f(eps) - f(-eps)) / (2 * eps)
    o, to = attention_jvp_reference(q, k, v, tq, tk, tv, frames, n)
    assert torch.allclose(o, f(0.0), rtol=0, atol=1e-14)
    assert rel(to, fd) < 1e-8


@pytest.mark.parametrize("name", list(MASKS))
def test_reference_matches_hand_derived_formula(name):
    frames, n, lq, lk = MASKS[name]
    q, k, v, tq, tk, tv = inputs(1, 3, lq, lk, 4, F64, seed=1)
    scale = 0.7
    s = scale * q @ k.transpose(-1, -2)
    ds = scale * (tq @ k.transpose(-1, -2) + q @ tk.transpose(-1, -2))
    if frames is not None:
        s = s.masked_fill(~token_mask(frames, n), float("-inf"))
    p = torch.softmax(s, -1)
    mu = (p * ds).sum(-1, keepdim=True)
    want = (p * (ds - mu)) @ v + p @ tv
    o, to = attention_jvp_reference(q, k, v, tq, tk, tv, frames, n, scale=scale)
    assert torch.allclose(o, p @ v, atol=1e-13)
    assert torch.allclose(to, want, atol=1e-12)


def test_reference_inside_a_dual_level_and_with_gradients():
    """As the network calls it: inside ``fwAD.dual_level`` (no torch.func.jvp nesting), and the
    output keeps its autograd graph."""
    frames, n, lq, lk = MASKS["teacher_forcing"]
    q, k, v, tq, tk, tv = inputs(1, 2, lq, lk, 8, F64)
    want = attention_jvp_reference(q, k, v, tq, tk, tv, frames, n)
    q.requires_grad_(True)
    with fwAD.dual_level():
        got = attention_jvp(q, k, v, tq, tk, tv, frames, n)
        got[0].sum().backward()
    assert torch.allclose(got[0], want[0], atol=1e-14) and torch.allclose(got[1], want[1], atol=1e-14)
    assert q.grad is not None and q.grad.norm() > 0


# ----------------------------------------------------------------------------- checks


def test_a_query_frame_that_sees_nothing_is_rejected():
    frames = frame_mask("causal", 3, 1).clone()
    frames[1] = False
    args = inputs(1, 1, 6, 6, 16)
    with pytest.raises(ValueError, match="rows \\[1\\] attend to no key"):
        attention_jvp(*args, frames=frames, tokens_per_frame=2)
    with pytest.raises(ValueError, match="attend to no key"):
        attention_jvp_reference(*(t.double() for t in args), frames=frames, tokens_per_frame=2)


@pytest.mark.parametrize("frames, n, why", [(torch.ones(3, 3, dtype=torch.bool), 3, "does not cover"),
                                             (torch.ones(3, 3), 2, "bool"),
                                             (None, 1, "tangent tk")])
def test_bad_shapes_are_rejected(frames, n, why):
    q, k, v, tq, tk, tv = inputs(1, 1, 6, 6, 16)
    if why == "tangent tk":
        tk = tk[:, :, :5]
    with pytest.raises(ValueError, match=why):
        attention_jvp(q, k, v, tq, tk, tv, frames, n)


# ----------------------------------------------------------------------------- tile layout


def brute_layout(frames, n, lq, lk, bm, bn):
    """Per (query tile, key tile): any allowed pair, every pair allowed (and the key tile complete)."""
    allowed = torch.ones(lq, lk, dtype=torch.bool) if frames is None else token_mask(frames, n)
    tq, tk = -(-lq // bm), -(-lk // bn)
    anyp, allp = torch.zeros(tq, tk, dtype=torch.bool), torch.zeros(tq, tk, dtype=torch.bool)
    for i in range(tq):
        for j in range(tk):
            tile = allowed[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            anyp[i, j] = tile.any()
            allp[i, j] = tile.all() and (j + 1) * bn <= lk
    return anyp, allp


def visited(idx, num):
    out = torch.zeros(idx.shape, dtype=torch.bool)
    for i in range(idx.shape[0]):
        out[i, idx[i, :num[i]].long()] = True
        assert bool((idx[i, :num[i]].diff() > 0).all())  # ascending
    return out


@pytest.mark.parametrize("frames, n, lq, lk, bm, bn", [
    (frame_mask("causal", 7, 2), 5, 35, 35, 16, 16),
    (frame_mask("teacher_forcing", 6, 1), 8, 96, 96, 16, 32),
    (torch.rand(5, 9, generator=torch.Generator().manual_seed(0)) < 0.4, 3, 15, 27, 16, 16),
    (None, 1, 20, 50, 16, 16),
])
def test_tile_layout_visits_exactly_the_tiles_with_allowed_pairs(frames, n, lq, lk, bm, bn):
    full_idx, full_num, part_idx, part_num = tile_layout(frames, n, lq, lk, bm, bn, "cpu")
    anyp, allp = brute_layout(frames, n, lq, lk, bm, bn)
    full, part = visited(full_idx, full_num), visited(part_idx, part_num)
    assert torch.equal(full, allp) and torch.equal(part, anyp & ~allp)


def test_the_teacher_forcing_mask_skips_tiles():
    """Cost follows the mask's density: at 64 tokens a frame the tiles align with frames, so the
    kernel visits exactly the fraction of tiles that the frame mask allows (about 27% for T = 13)."""
    t, n = 13, 64
    frames = frame_mask("teacher_forcing", t, 1)
    full_idx, full_num, part_idx, part_num = tile_layout(frames, n, 2 * t * n, 2 * t * n, 64, 64, "cpu")
    total = full_idx.numel()
    visits = int(full_num.sum() + part_num.sum())
    assert visits / total == pytest.approx(float(frames.double().mean()), abs=1e-9)  # tiles align with frames
    assert int(part_num.sum()) == 0


# ----------------------------------------------------------------------------- the kernel (interpreter)

triton_cases = pytest.mark.skipif(aj.triton is None or not aj._interpreting(),
                                  reason="needs triton and TRITON_INTERPRET=1 (conftest.py sets it)")


def kernel_vs_reference(args, frames, n, dtype=torch.float32, **kw):
    args = [t.to(dtype) for t in args]
    o, to = aj.attention_jvp_triton(*args, frames, n, **kw)
    ro, rto = attention_jvp_reference(*(t.double() for t in args), frames, n)
    assert o.dtype == dtype and o.shape == ro.shape and to.shape == rto.shape
    return rel(o, ro), rel(to, rto)


@triton_cases
@pytest.mark.parametrize("b, h, lq, lk, d, frames, n", [
    (1, 2, 32, 32, 16, None, 1),                                   # full attention, whole tiles
    (2, 1, 30, 30, 32, frame_mask("causal", 5, 2), 6),             # causal blocks, tails (30 = 16 + 14)
    (1, 2, 36, 36, 16, frame_mask("teacher_forcing", 3, 1), 6),    # [clean | noisy] of 2T = 6 frames
    (1, 1, 40, 40, 16, frame_mask("teacher_forcing", 4, 2), 5),    # blocks of 2, frames straddle tiles
    (1, 2, 10, 35, 16, None, 1),                                   # cached: one block's queries, longer keys
    (1, 1, 10, 35, 16, torch.tensor([[True] * 5 + [False] * 2] * 2), 5),  # cached with hidden key frames
    (1, 1, 21, 21, 24, frame_mask("causal", 3, 1), 7),             # head size not a power of 2
])
def test_kernel_matches_reference_in_the_interpreter(b, h, lq, lk, d, frames, n):
    errs = kernel_vs_reference(inputs(b, h, lq, lk, d, seed=lq + d), frames, n)
    assert max(errs) < 2e-6, errs


@triton_cases
def test_kernel_with_one_token_a_frame_and_wide_key_tiles():
    """A key tile of 64 keys spanning 64 frames (every bit of the per-tile frame bits, the sign bit
    too) and a tail tile of 6."""
    frames = torch.rand(70, 70, generator=torch.Generator().manual_seed(5)) < 0.5
    frames[:, 63] = True  # bit 63 of the first key tile
    frames[torch.arange(70), torch.arange(70)] = True
    errs = kernel_vs_reference(inputs(1, 1, 70, 70, 16, seed=9), frames, 1, block_m=32, block_n=64)
    assert max(errs) < 2e-6, errs


@triton_cases
def test_kernel_half_precision_and_strided_inputs():
    """float16 (bfloat16 has no tl.dot in the interpreter: the GPU test covers it) and q, k, v as
    non-contiguous views of one qkv projection, as the network makes them."""
    b, l, h, d = 1, 24, 2, 16
    g = torch.Generator().manual_seed(3)
    qkv, tqkv = torch.randn(2, b, l, 3, h, d, generator=g).unbind(0)
    args = (*qkv.permute(2, 0, 3, 1, 4).unbind(0), *tqkv.permute(2, 0, 3, 1, 4).unbind(0))
    assert not args[0].is_contiguous()
    frames = frame_mask("teacher_forcing", 2, 1)
    assert max(kernel_vs_reference(args, frames, 6)) < 2e-6
    assert max(kernel_vs_reference(args, frames, 6, dtype=torch.float16)) < 3e-3


def shifted_inputs(b, h, l, d, seed=0):
    """Inputs whose dS has a large part common to a row (keys and tangents share a mean direction):
    the softmax ignores it, so the tangent is a small difference of large terms."""
    q, k, v, tq, tk, tv = inputs(b, h, l, l, d, F64, seed)
    mean = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return q + 2 * mean, k + 2 * mean, v, tq + 3 * mean, tk + 3 * mean, tv


@triton_cases
def test_kernel_keeps_the_tangent_when_ds_has_a_large_common_part():
    """float16 (bfloat16 on the GPU): dS is taken relative to a per-row constant before its cast."""
    args = shifted_inputs(1, 1, 64, 32)
    frames = frame_mask("causal", 4, 1)
    o_err, to_err = kernel_vs_reference(args, frames, 16, dtype=torch.float16)
    assert o_err < 1e-3 and to_err < 2e-3, (o_err, to_err)


@triton_cases
def test_dispatch(monkeypatch):
    """The kernel for float32 CPU tensors under the interpreter; the reference for float64 and for
    inputs that need gradients. An in-place edit of the mask is seen (the layout cache keys on it)."""
    calls = []
    real = aj.attention_jvp_triton
    monkeypatch.setattr(aj, "attention_jvp_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    frames = frame_mask("causal", 3, 1).clone()
    args = inputs(1, 1, 12, 12, 16)
    o, to = attention_jvp(*args, frames=frames, tokens_per_frame=4)
    assert calls == [1]
    attention_jvp(*(t.double() for t in args), frames=frames, tokens_per_frame=4)
    q = args[0].clone().requires_grad_(True)
    attention_jvp(q, *args[1:], frames=frames, tokens_per_frame=4)[0].sum().backward()
    assert calls == [1] and q.grad is not None
    frames[2, 1] = False
    o2, to2 = attention_jvp(*args, frames=frames, tokens_per_frame=4)
    ro, rto = attention_jvp_reference(*(t.double() for t in args), frames, 4)
    assert calls == [1, 1] and rel(o2, ro) < 2e-6 and rel(to2, rto) < 2e-6


# ----------------------------------------------------------------------------- the kernel (GPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_benchmark_says_it_needs_a_gpu():
    from kernels import bench_attention_jvp

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_attention_jvp.main([])


@pytest.mark.skipif(not torch.cuda.is_available() or aj.triton is None, reason="needs a CUDA GPU and triton")
def test_kernel_on_gpu():
    """Compiled kernel (a subprocess without TRITON_INTERPRET) against the float64 reference."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, __file__], env=env, cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all gpu checks passed" in done.stdout


GPU_CASES = [  # b, h, lq, lk, d, frames, n
    (2, 4, 1664, 1664, 64, frame_mask("teacher_forcing", 13, 1), 64),  # the default preset's training pass
    (1, 4, 1664, 1664, 64, frame_mask("teacher_forcing", 13, 3), 64),
    (2, 2, 832, 832, 32, frame_mask("causal", 13, 1), 64),
    (1, 2, 64 * 3, 64 * 13, 64, torch.ones(3, 13, dtype=torch.bool), 64),  # cached: 3 frames against 13
    (1, 2, 64, 64 * 13, 128, None, 1),
    (2, 3, 1000, 1000, 64, frame_mask("causal", 8, 2), 125),  # tails
    (1, 2, 777, 777, 128, None, 1),
    (1, 2, 150, 150, 32, frame_mask("teacher_forcing", 5, 1), 15),
    (2, 2, 160, 160, 16, frame_mask("teacher_forcing", 5, 1), 16),  # the tiny preset's head size
]


def gpu_checks(device="cuda", cases=GPU_CASES, frames_t=13, tokens=64):
    """bf16 / fp16 / fp32 against the float64 reference on the same (rounded) inputs: teacher
    forcing over 2x13 frames of 64 tokens, causal blocks, cached (Lq != Lk), tails, head sizes
    16 / 32 / 64 / 128, and non-contiguous q, k, v (views of one projection)."""
    if device == "cuda":
        assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "the GPU checks run compiled kernels"
    tol = {torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 4e-3), torch.float32: (2e-5, 5e-5)}  # fp32: tf32x3
    for b, h, lq, lk, d, frames, n in cases:
        args = [t.to(device) for t in inputs(b, h, lq, lk, d, seed=lq + d)]
        fr = None if frames is None else frames.to(device)
        for dtype, (to_, tt) in tol.items():
            low = [t.to(dtype) for t in args]
            ro, rto = attention_jvp_reference(*(t.double() for t in low), fr, n)  # on the rounded inputs
            o, to = attention_jvp(*low, frames=fr, tokens_per_frame=n)
            eo, et = rel(o, ro), rel(to, rto)
            print(f"{str(dtype):15} b{b} h{h} lq{lq} lk{lk} d{d} n{n} mask={frames is not None}: "
                  f"o {eo:.1e}  to {et:.1e}")
            assert o.dtype == dtype and torch.isfinite(o).all() and torch.isfinite(to).all()
            assert eo < to_ and et < tt, (dtype, eo, et)
    low = [t.to(device).bfloat16() for t in shifted_inputs(2, 4, 2 * frames_t * tokens, 64)]
    ro, rto = attention_jvp_reference(*(t.double() for t in low), frame_mask("teacher_forcing", frames_t, 1, device),
                                      tokens)
    o, to = attention_jvp(*low, frames=frame_mask("teacher_forcing", frames_t, 1, device), tokens_per_frame=tokens)
    print(f"bf16 with a large common part of dS: o {rel(o, ro):.1e}  to {rel(to, rto):.1e}")
    assert rel(o, ro) < 1e-2 and rel(to, rto) < 2e-2
    g = torch.Generator(device=device).manual_seed(0)
    qkv, tqkv = torch.randn(2, 2, 2 * frames_t * tokens, 3, 4, 64, generator=g, device=device).unbind(0)
    args = [t.bfloat16() for t in (*qkv.permute(2, 0, 3, 1, 4).unbind(0), *tqkv.permute(2, 0, 3, 1, 4).unbind(0))]
    frames = frame_mask("teacher_forcing", frames_t, 1, device=device)
    ro, rto = attention_jvp_reference(*(t.double() for t in args), frames, tokens)
    o, to = attention_jvp(*args, frames=frames, tokens_per_frame=tokens)
    assert not args[0].is_contiguous() and rel(o, ro) < 1e-2 and rel(to, rto) < 2e-2
    print("all gpu checks passed")


if __name__ == "__main__":
    gpu_checks()
