"""Softmax attention and its forward-mode derivative (JVP) in one pass, under a frame-level mask.

    S = scale q k^T (+ mask: -inf where not allowed),  P = softmax(S),  o = P v
    dS = scale (tq k^T + q tk^T),  mu_i = sum_j P_ij dS_ij,  to = (P * (dS - mu)) v + P tv

``q, tq [B, H, Lq, hd]``; ``k, v, tk, tv [B, H, Lk, hd]``; ``frames [Lq/N, Lk/N]`` bool (True =
attend; N = ``tokens_per_frame``) or None (full attention). The Triton kernel is FlashAttention-2
style: per (batch, head, query tile) one sweep over the key tiles with an online softmax (running
max m, normaliser l, and sum p v, sum p tv, sum p dS v, sum p dS, all float32), so mu and the
tangent fall out at the end; key tiles the frame mask fully hides are never visited, tiles it fully
allows skip the element mask. ``attention_jvp`` dispatches to it (CUDA; CPU tensors under
``TRITON_INTERPRET=1``) and to ``attention_jvp_reference`` (``torch.func.jvp`` over math
attention) otherwise: float64, no Triton, or inputs that need autograd.
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch
import torch.autograd.forward_ad as fwAD

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is used
    triton = None

Tensor = torch.Tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- checks


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, frames: Tensor | None,
                  tokens_per_frame: int) -> None:
    """Shapes of the inputs and of the frame mask (its content: :func:`_check_frames`)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, hd]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if k.shape != (b, h, lk, d) or v.shape != (b, h, lk, d):
        raise ValueError(f"k and v must be [B, H, Lk, hd] = [{b}, {h}, Lk, {d}]; "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    for name, t, p in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if t.shape != p.shape:
            raise ValueError(f"tangent {name} has shape {tuple(t.shape)}, its primal {tuple(p.shape)}")
    if lq == 0 or lk == 0:
        raise ValueError(f"empty attention: Lq = {lq}, Lk = {lk}")
    if frames is None:
        return
    if frames.dtype != torch.bool or frames.dim() != 2:
        raise ValueError(f"frames must be a bool [Fq, Fk] frame mask; got {frames.dtype} {tuple(frames.shape)}")
    n = int(tokens_per_frame)
    fq, fk = frames.shape
    if n < 1 or fq * n != lq or fk * n != lk:
        raise ValueError(f"frames {tuple(frames.shape)} x tokens_per_frame {tokens_per_frame} does not cover "
                         f"Lq = {lq}, Lk = {lk} tokens")


def _check_frames(frames: Tensor | None) -> None:
    """Every query frame sees at least one key frame (ValueError otherwise)."""
    if frames is None:
        return
    blind = (~frames.any(1)).nonzero().flatten()
    if blind.numel():
        raise ValueError(f"frame mask rows {blind.tolist()[:8]} attend to no key frame: every query must see at "
                         "least one key")


def _check(q, k, v, tq, tk, tv, frames, tokens_per_frame) -> None:
    _check_shapes(q, k, v, tq, tk, tv, frames, tokens_per_frame)
    _check_frames(frames)


def _token_mask(frames: Tensor | None, tokens_per_frame: int, device) -> Tensor | None:
    if frames is None:
        return None
    n = tokens_per_frame
    return frames.to(device).repeat_interleave(n, 0).repeat_interleave(n, 1)


# ----------------------------------------------------------------------------- reference


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Plain attention ``softmax(q k^T * scale, masked) v`` by explicit matmuls (no SDPA), any dtype.
    ``q [B, H, Lq, hd]``, ``k, v [B, H, Lk, hd]``, ``mask [Lq, Lk]`` bool token mask or None."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def attention_jvp_reference(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                            frames: Tensor | None = None, tokens_per_frame: int = 1,
                            scale: float | None = None) -> tuple[Tensor, Tensor]:
    """``(o, to)`` by ``torch.func.jvp`` over :func:`math_attention`, in the inputs' dtype; shapes as
    :func:`attention_jvp`. Inside an active ``torch.autograd.forward_ad.dual_level`` (the network's
    dual pass, where ``torch.func.jvp`` cannot nest) the same math runs on dual tensors of that
    level. Autograd flows through ``o`` (and through ``to`` outside a dual level)."""
    _check(q, k, v, tq, tk, tv, frames, tokens_per_frame)
    mask = _token_mask(frames, tokens_per_frame, q.device)
    if getattr(fwAD, "_current_level", -1) < 0:
        return torch.func.jvp(lambda q_, k_, v_: math_attention(q_, k_, v_, mask, scale), (q, k, v), (tq, tk, tv))
    duals = [fwAD.make_dual(p, t) for p, t in ((q, tq), (k, tk), (v, tv))]
    out = fwAD.unpack_dual(math_attention(*duals, mask, scale))
    return out.primal, out.tangent


# ----------------------------------------------------------------------------- dispatch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _use_kernel(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor) -> bool:
    if triton is None:
        return False
    tensors = (q, k, v, tq, tk, tv)
    if _interpreting():  # Triton's CPU interpreter: CPU tensors only, and it has no bfloat16 tl.dot
        if q.device.type != "cpu" or q.dtype == torch.bfloat16:
            return False
    elif not q.is_cuda:
        return False
    if any(t.device != q.device or t.dtype != q.dtype for t in tensors) or q.dtype not in KERNEL_DTYPES:
        return False
    if q.shape[-1] > MAX_HEAD_DIM:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, frames: Tensor | None = None,
                  tokens_per_frame: int = 1, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention output and its tangent ``(o [B, H, Lq, hd], to [B, H, Lq, hd])``.

    ``q, tq [B, H, Lq, hd]``; ``k, v, tk, tv [B, H, Lk, hd]``; ``frames [Lq/N, Lk/N]`` bool frame mask
    (True = attend, N = ``tokens_per_frame``; every query frame must see a key) or None (full);
    ``scale`` defaults to ``hd ** -0.5``. The Triton kernel (one pass, fp32 accumulation, fully
    masked tiles skipped; no autograd) runs for CUDA tensors of float16/bfloat16/float32 that need
    no gradient (under ``TRITON_INTERPRET=1``: for CPU tensors of float16/float32 instead); everything
    else takes the reference (float64, CPU, autograd, no Triton).
    """
    if _use_kernel(q, k, v, tq, tk, tv):
        return attention_jvp_triton(q, k, v, tq, tk, tv, frames, tokens_per_frame, scale)
    return attention_jvp_reference(q, k, v, tq, tk, tv, frames, tokens_per_frame, scale)


# ----------------------------------------------------------------------------- tile layout


_LAYOUTS: dict = {}


def tile_layout(frames: Tensor | None, tokens_per_frame: int, lq: int, lk: int, block_m: int, block_n: int,
                device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Which key tiles each query tile visits: ``(full_idx, full_num, part_idx, part_num)``, int32,
    ``*_idx [Tq, Tk]`` (the first ``*_num [Tq]`` entries of a row are the key tiles, ascending).
    Full tiles need no element mask; partial ones hold masked pairs or the key tail (Lk % block_n);
    tiles with no allowed pair are in neither list, so they cost nothing."""
    tq, tk = triton_cdiv(lq, block_m), triton_cdiv(lk, block_n)
    kt = torch.arange(tk)
    complete = (kt + 1) * block_n <= lk  # [Tk]
    if frames is None:
        full = complete[None, :].expand(tq, tk)
        part = ~full
    else:
        n = tokens_per_frame
        f = frames.detach().to("cpu", torch.int64)
        cum = torch.zeros(f.shape[0] + 1, f.shape[1] + 1, dtype=torch.int64)
        cum[1:, 1:] = f.cumsum(0).cumsum(1)
        qt = torch.arange(tq)
        fa, fb = qt * block_m // n, (torch.clamp((qt + 1) * block_m, max=lq) - 1) // n  # frame range per query tile
        ga, gb = kt * block_n // n, (torch.clamp((kt + 1) * block_n, max=lk) - 1) // n
        fa, fb, ga, gb = fa[:, None], fb[:, None], ga[None, :], gb[None, :]
        count = cum[fb + 1, gb + 1] - cum[fa, gb + 1] - cum[fb + 1, ga] + cum[fa, ga]
        area = (fb - fa + 1) * (gb - ga + 1)
        full = (count == area) & complete[None, :]
        part = (count > 0) & ~full
    out = []
    for visit in (full, part):
        idx = torch.argsort((~visit).to(torch.int8), dim=1, stable=True)
        out += [idx.to(device=device, dtype=torch.int32).contiguous(),
                visit.sum(1).to(device=device, dtype=torch.int32).contiguous()]
    return tuple(out)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def frame_bits(frames: Tensor, tokens_per_frame: int, lk: int, block_n: int) -> Tensor:
    """The frame mask per key tile as bits, ``[Fq, Tk]`` int64: bit d of ``[f, t]`` says whether
    query frame f sees key frame ``t * block_n // N + d`` (a tile of <= 64 keys spans <= 64 frames)."""
    if block_n > 64:
        raise ValueError(f"block_n {block_n} > 64: a key tile's frames must fit in 64 bits")
    fk = frames.shape[1]
    first = torch.arange(triton_cdiv(lk, block_n)) * block_n // tokens_per_frame  # [Tk]
    idx = first[:, None] + torch.arange(64)  # [Tk, 64]
    seen = frames.detach().cpu()[:, idx.clamp(max=fk - 1)] & (idx < fk)  # [Fq, Tk, 64]
    return (seen.to(torch.int64) << torch.arange(64)).sum(-1)  # distinct bits: the sum is their OR


def _cached_layout(frames: Tensor | None, tokens_per_frame: int, lq: int, lk: int, block_m: int, block_n: int,
                   device) -> tuple[Tensor | None, tuple[Tensor, ...]]:
    """``(frame_bits on device or None, tile_layout)``, validated and built once per mask (a frozen
    mask tensor is reused by every layer and step; the key holds its identity and version)."""
    ident = None if frames is None else (id(frames), frames._version, str(frames.device), tokens_per_frame)
    key = (ident, str(device), lq, lk, block_m, block_n)
    hit = _LAYOUTS.get(key)
    if hit is not None and (frames is None or hit[0]() is frames):
        return hit[1], hit[2]
    _check_frames(frames)
    layout = tile_layout(frames, tokens_per_frame, lq, lk, block_m, block_n, device)
    fr = None if frames is None else frame_bits(frames, tokens_per_frame, lk, block_n).to(device).contiguous()
    if len(_LAYOUTS) >= 64:
        _LAYOUTS.pop(next(iter(_LAYOUTS)))
    _LAYOUTS[key] = ((lambda: None) if frames is None else weakref.ref(frames), fr, layout)
    return fr, layout


# ----------------------------------------------------------------------------- Triton kernel


if triton is not None:

    @triton.jit
    def _jvp_tile(q, tq, m_i, l_i, mu_i, c, acc, tacc, k_base, tk_base, v_base, tv_base, fr_ptr,
                  s_kl, s_kd, s_tkl, s_tkd, s_vl, s_vd, s_tvl, s_tvd, offs_m, offs_d, start_n,
                  lq, lk, tokens_per_frame, k_tiles, qk_scale, scale,
                  MASKED: tl.constexpr, MASK_KV: tl.constexpr, HAS_FRAMES: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        """One key tile of the online softmax: updates the running max ``m_i`` (log2 units), the
        normaliser ``l_i = sum p``, ``mu_i = sum p (dS - c)``, the row constant ``c``, ``acc = sum p v``
        and ``tacc = sum p tv + sum p (dS - c) v``.
        MASKED: mask pairs (key tail, frame mask); MASK_KV: bounds-check the K/V loads."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptr = k_base + offs_n[:, None] * s_kl + offs_d[None, :] * s_kd
        tk_ptr = tk_base + offs_n[:, None] * s_tkl + offs_d[None, :] * s_tkd
        v_ptr = v_base + offs_n[:, None] * s_vl + offs_d[None, :] * s_vd
        tv_ptr = tv_base + offs_n[:, None] * s_tvl + offs_d[None, :] * s_tvd
        if MASK_KV:
            kv_ok = (offs_n < lk)[:, None] & (offs_d < HEAD_DIM)[None, :]
            k = tl.load(k_ptr, mask=kv_ok, other=0.0)
            tk = tl.load(tk_ptr, mask=kv_ok, other=0.0)
            v = tl.load(v_ptr, mask=kv_ok, other=0.0)
            tv = tl.load(tv_ptr, mask=kv_ok, other=0.0)
        else:  # a complete key tile of a power-of-2 head size
            k = tl.load(k_ptr)
            tk = tl.load(tk_ptr)
            v = tl.load(v_ptr)
            tv = tl.load(tv_ptr)
        kt = tl.trans(k)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # log2 units
        ds = tl.dot(q, tl.trans(tk), acc=tl.dot(tq, kt, input_precision=PRECISION), input_precision=PRECISION) * scale
        if MASKED:
            allowed = (offs_n < lk)[None, :] & (offs_m >= 0)[:, None]
            if HAS_FRAMES:  # bit d of bits[query frame, key tile]: the tile's key frame first + d is seen
                row_bits = tl.load(fr_ptr + (offs_m // tokens_per_frame) * k_tiles + start_n // BLOCK_N,
                                   mask=offs_m < lq, other=0)
                d = offs_n // tokens_per_frame - start_n // tokens_per_frame
                allowed = allowed & (((row_bits[:, None] >> d[None, :].to(tl.int64)) & 1) != 0)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no allowed key so far
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        p_sum = tl.sum(p, 1)
        pds = p * ds
        pds_sum = tl.sum(pds, 1)
        # dS is taken relative to a per-row constant c (any c gives the same tangent): the p-weighted
        # mean of dS over the first tile the row sees, so p (dS - c) is small and survives its cast
        # to the input dtype for the tl.dot when dS has a large common part
        c = tl.where((l_i == 0.0) & (p_sum > 0.0), pds_sum / tl.where(p_sum > 0.0, p_sum, 1.0), c)
        pds = pds - p * c[:, None]
        l_i = l_i * alpha + p_sum
        mu_i = mu_i * alpha + (pds_sum - p_sum * c)  # sum p (dS - c)
        p_in = p.to(v.dtype)
        acc = tl.dot(p_in, v, acc=acc * alpha[:, None], input_precision=PRECISION)
        tacc = tl.dot(p_in, tv, acc=tacc * alpha[:, None], input_precision=PRECISION)
        tacc = tl.dot(pds.to(v.dtype), v, acc=tacc, input_precision=PRECISION)
        return m_new, l_i, mu_i, c, acc, tacc

    @triton.jit
    def _attention_jvp_kernel(Q, K, V, TQ, TK, TV, O, TO, FR, FULL_IDX, FULL_NUM, PART_IDX, PART_NUM,
                              s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
                              s_tqb, s_tqh, s_tql, s_tqd, s_tkb, s_tkh, s_tkl, s_tkd, s_tvb, s_tvh, s_tvl, s_tvd,
                              heads, lq, lk, q_tiles, k_tiles, tokens_per_frame, qk_scale, scale,
                              HAS_FRAMES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        """One (batch, head, query tile): o and to of BLOCK_M query rows over the visited key tiles.
        O and TO are contiguous [B, H, Lq, HEAD_DIM]."""
        pid = tl.program_id(0)
        bh = pid // q_tiles  # consecutive programs share (b, h): their K/V stay in L2
        qt = pid % q_tiles
        b = (bh // heads).to(tl.int64)  # 64-bit offsets: B * H * L * hd may pass 2^31
        h = (bh % heads).to(tl.int64)
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_ok = (offs_m < lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd, mask=q_ok, other=0.0)
        tq = tl.load(TQ + b * s_tqb + h * s_tqh + offs_m[:, None] * s_tql + offs_d[None, :] * s_tqd, mask=q_ok,
                     other=0.0)
        k_base = K + b * s_kb + h * s_kh
        tk_base = TK + b * s_tkb + h * s_tkh
        v_base = V + b * s_vb + h * s_vh
        tv_base = TV + b * s_tvb + h * s_tvh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        mu_i = tl.zeros([BLOCK_M], tl.float32)
        c = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        tacc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_full = tl.load(FULL_NUM + qt)
        for i in range(0, n_full):  # tiles with every pair allowed: no element mask
            start_n = tl.load(FULL_IDX + qt * k_tiles + i) * BLOCK_N
            m_i, l_i, mu_i, c, acc, tacc = _jvp_tile(
                q, tq, m_i, l_i, mu_i, c, acc, tacc, k_base, tk_base, v_base, tv_base, FR,
                s_kl, s_kd, s_tkl, s_tkd, s_vl, s_vd, s_tvl, s_tvd, offs_m, offs_d, start_n,
                lq, lk, tokens_per_frame, k_tiles, qk_scale, scale,
                False, BLOCK_D != HEAD_DIM, HAS_FRAMES, BLOCK_N, HEAD_DIM, PRECISION)
        n_part = tl.load(PART_NUM + qt)
        for i in range(0, n_part):  # tiles with masked pairs or the key tail
            start_n = tl.load(PART_IDX + qt * k_tiles + i) * BLOCK_N
            m_i, l_i, mu_i, c, acc, tacc = _jvp_tile(
                q, tq, m_i, l_i, mu_i, c, acc, tacc, k_base, tk_base, v_base, tv_base, FR,
                s_kl, s_kd, s_tkl, s_tkd, s_vl, s_vd, s_tvl, s_tvd, offs_m, offs_d, start_n,
                lq, lk, tokens_per_frame, k_tiles, qk_scale, scale,
                True, True, HAS_FRAMES, BLOCK_N, HEAD_DIM, PRECISION)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past Lq (never stored)
        o = acc / l_i[:, None]
        to = tacc / l_i[:, None] - (mu_i / l_i)[:, None] * o  # mu_i / l_i = mu - c
        out = (bh.to(tl.int64) * lq + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(O + out, o.to(O.dtype.element_ty), mask=q_ok)
        tl.store(TO + out, to.to(TO.dtype.element_ty), mask=q_ok)

    _attention_jvp = _attention_jvp_kernel
else:
    _attention_jvp = None


def _config(head_dim: int, dtype: torch.dtype, device) -> dict:
    """Tile sizes and launch parameters per head size and dtype (small tiles in the interpreter).
    The CUDA ones compile for sm_90 without register spills for 16-bit inputs at hd <= 64
    (``python -m kernels.bench_attention_jvp --sweep`` times the alternatives)."""
    if device.type != "cuda":
        return {"block_m": 16, "block_n": 16, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:
        if head_dim <= 32:
            return {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
        return {"block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 2 if head_dim <= 64 else 1}
    if head_dim <= 32:
        return {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2}
    if head_dim <= 64:
        return {"block_m": 64, "block_n": 64, "num_warps": 8, "num_stages": 2}
    return {"block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 2}


def _precision(dtype: torch.dtype) -> str:
    """tl.dot precision of float32 inputs: "tf32x3" (about float32 accuracy on tensor cores) at
    torch's default matmul precision "highest", "tf32" at "high" / "medium"; 16-bit inputs ignore it."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def attention_jvp_triton(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                         frames: Tensor | None = None, tokens_per_frame: int = 1, scale: float | None = None,
                         block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None, precision: str | None = None) -> tuple[Tensor, Tensor]:
    """The Triton kernel (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); no autograd. Shapes as
    :func:`attention_jvp`; the tile sizes (powers of 2, 16 <= block_n <= 64), launch parameters
    and ``tl.dot`` precision of float32 inputs ("tf32x3", "tf32"; "ieee" is exact but slow and
    spills) default per head size and dtype. Outputs are contiguous."""
    if _attention_jvp is None:
        raise RuntimeError("the attention JVP kernel needs triton (pip install triton)")
    _check_shapes(q, k, v, tq, tk, tv, frames, tokens_per_frame)
    if q.dtype not in KERNEL_DTYPES or any(t.dtype != q.dtype for t in (k, v, tq, tk, tv)):
        raise ValueError(f"the kernel takes float16/bfloat16/float32 inputs of one dtype; got "
                         f"{sorted({str(t.dtype) for t in (q, k, v, tq, tk, tv)})}")
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head size {d} > {MAX_HEAD_DIM}")
    cfg = _config(d, q.dtype, q.device)
    bm, bn = block_m or cfg["block_m"], block_n or cfg["block_n"]
    if any(x < 16 or x & (x - 1) for x in (bm, bn)) or bn > 64:
        raise ValueError(f"tile sizes must be powers of 2, >= 16, block_n <= 64; got block_m {bm}, block_n {bn}")
    fr, (full_idx, full_num, part_idx, part_num) = _cached_layout(frames, tokens_per_frame, lq, lk, bm, bn, q.device)
    scale = d ** -0.5 if scale is None else float(scale)
    o = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    to = torch.empty_like(o)
    if o.numel() == 0:
        return o, to
    q_tiles, k_tiles = triton_cdiv(lq, bm), triton_cdiv(lk, bn)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attention_jvp[(b * h * q_tiles,)](
            q, k, v, tq, tk, tv, o, to, full_idx if fr is None else fr, full_idx, full_num, part_idx, part_num,
            *q.stride(), *k.stride(), *v.stride(), *tq.stride(), *tk.stride(), *tv.stride(),
            h, lq, lk, q_tiles, k_tiles, int(tokens_per_frame), scale * 1.4426950408889634, scale,  # log2(e)
            HAS_FRAMES=frames is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(d)),
            HEAD_DIM=d, PRECISION=precision or _precision(q.dtype),
            num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"])
    return o, to
