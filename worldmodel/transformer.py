"""The camera/action-conditioned diffusion transformer (DiT) with three attention modes.

Tokens: each latent frame [C, h, w] is cut into (h/p) x (w/p) patches, N tokens per frame.
Frames are grouped into blocks of ``block_size`` latent frames (1 = frame-wise); the first frame
of a clip (the start frame of a session) is a block of its own.

Attention modes over a clip of T frames:
- ``bidirectional``: every token sees the whole clip (stage 1 teacher).
- ``causal``: block b sees blocks <= b (what the KV-cached rollout computes).
- teacher forcing (``causal`` with ``clean`` given): the sequence is [clean | noisy]; clean block b
  sees clean blocks <= b, noisy block b sees clean blocks < b and itself; the two copies of a
  frame share positions (stage 2 AR teacher). The last block's clean copy, which no noisy block
  sees, is left out (:func:`sequence_frames`).

Conditioning:
- timestep (t = 1000 sigma) and the per-frame action go into adaLN (per-frame modulation);
- the camera enters as a Plücker ray map of each frame's camera relative to the previous frame's
  (per token, added to the token embedding). Relative motion is invariant to any rigid transform
  of all poses, and a cached frame's keys never need updating, however long the session;
- positions are 3-axis rotary embeddings over (time, row, column).
The action and camera input layers start at zero, as do all residual gates (adaLN-Zero), so a
conditioning path added to a trained network starts as a no-op. ``cond_keep`` [B] bool drops
action and camera per sample (classifier-free guidance).

The KV cache (``KVCache``) holds keys and values of ``sink_frames`` first frames and a rolling
window of the last ``window_frames`` frames. Cached frames have time positions by their slot
(sinks first, then the window in order, the new block after), so a session of any length sees the
positions it was trained on; memory is fixed at allocation.

Forward-mode JVPs (``torch.autograd.forward_ad`` dual inputs, the sCM stage) run through the same
full-sequence forward with ``attention = "jvp"``, whose attention has its own JVP kernel.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from kernels.norm_modulate import norm_modulate
from worldmodel.camera import relative_motion


class ConfigError(ValueError):
    """A model configuration that cannot be used."""


@dataclass
class DiTConfig:
    latent_channels: int = 8
    latent_height: int = 16
    latent_width: int = 16
    patch_size: int = 2
    dim: int = 256
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    action_dim: int = 7
    block_size: int = 1  # latent frames per block: 1 = frame-wise, >1 = chunk-wise
    window_frames: int = 12  # rolling KV window (frames), sinks excluded
    sink_frames: int = 1
    fov_degrees: float = 90.0  # horizontal field of view, for the Plücker rays
    translation_scale: float = 4.0  # world units -> Plücker moment units
    rope_theta: float = 10000.0

    def __post_init__(self):
        hd = self.dim // max(self.heads, 1)
        problems = []
        if self.dim % self.heads or hd % 8:
            problems.append(f"dim {self.dim} / heads {self.heads} must give a head size divisible by 8")
        if self.latent_height % self.patch_size or self.latent_width % self.patch_size:
            problems.append(
                f"latent {self.latent_height}x{self.latent_width} is not divisible by patch {self.patch_size}"
            )
        if self.block_size < 1 or self.window_frames < self.block_size or self.sink_frames < 0:
            problems.append("need block_size >= 1, window_frames >= block_size, sink_frames >= 0")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // self.patch_size) * (self.latent_width // self.patch_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown transformer config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t = 1000 sigma: ``sigma [...]`` -> ``[..., dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    angles = 1000.0 * sigma.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], -1)


def plucker_rays(poses: torch.Tensor, cfg: DiTConfig) -> torch.Tensor:
    """Per-patch Plücker coordinates of each frame's rays in the previous frame's camera.

    ``poses [B, T, 4, 4]`` -> ``[B, T, 6, h/p, w/p]``: (ray direction change, moment * scale).
    Zero for a frame that did not move (and for t = 0).
    """
    gh, gw = cfg.latent_height // cfg.patch_size, cfg.latent_width // cfg.patch_size
    focal = 1.0 / math.tan(math.radians(cfg.fov_degrees) / 2)
    xs = (torch.arange(gw, device=poses.device, dtype=poses.dtype) + 0.5) / gw * 2 - 1
    ys = ((torch.arange(gh, device=poses.device, dtype=poses.dtype) + 0.5) / gh * 2 - 1) * gh / gw
    dirs = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None], torch.full((gh, gw), focal, dtype=poses.dtype, device=poses.device)), -1)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)  # [gh, gw, 3], camera frame
    motion = relative_motion(poses)  # [B, T, 4, 4]: camera t in camera t-1
    rot, trans = motion[..., :3, :3], motion[..., :3, 3]
    moved = torch.einsum("btij,yxj->btyxi", rot, dirs)
    moment = torch.cross(trans[:, :, None, None, :].expand_as(moved), moved, dim=-1)
    rays = torch.cat([moved - dirs, moment * cfg.translation_scale], -1)
    return rearrange(rays, "b t y x c -> b t c y x")


def rope_splits(cfg: DiTConfig) -> tuple[int, int, int]:
    """Rotary pairs per axis (time, row, col): the time pairs come first in the head dimension."""
    half = cfg.head_dim // 2
    s_pairs = (half - half // 4) // 2
    return half - 2 * s_pairs, s_pairs, s_pairs


def rope_rotation(positions: torch.Tensor, cfg: DiTConfig) -> torch.Tensor:
    """Rotary factors for ``positions [L, 3]`` (time, row, col) -> ``[L, head_dim, 2]``: per dimension the
    cosine of its pair's angle and the sine, negative on a pair's first dimension (see :func:`apply_rope`).

    A quarter of the pairs encode time, the rest rows and columns. Real-valued (no complex
    tensors), so the training forward compiles with Inductor.
    """
    splits = rope_splits(cfg)
    angles = []
    for axis, n in enumerate(splits):
        freqs = cfg.rope_theta ** (-torch.arange(n, device=positions.device, dtype=torch.float32) / max(n, 1))
        angles.append(positions[:, axis : axis + 1].float() * freqs)
    angles = torch.cat(angles, -1).repeat_interleave(2, -1)  # [L, hd]: each pair's angle on both of its dims
    sign = torch.tensor([-1.0, 1.0], device=positions.device).repeat(angles.shape[-1] // 2)
    return torch.stack([angles.cos(), angles.sin() * sign], -1)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor, norm: nn.RMSNorm | None = None) -> torch.Tensor:
    """Rotate adjacent pairs (a, b) of ``x [B, H, L, hd]`` by ``rotation [L, hd, 2]`` (:func:`rope_rotation`):
    (a cos - b sin, a sin + b cos), as ``x cos + (b, a) sin_signed``, computed in float32 or better. With
    ``norm`` (the query or key RMSNorm) ``x`` is first normalised by it, in the same precision (one cast back)."""
    dtype = x.dtype
    work = torch.promote_types(dtype, torch.float32)
    x = x.to(work)
    if norm is not None:
        x = F.rms_norm(x, norm.normalized_shape, norm.weight.to(work), norm.eps)
    cos, sin = rotation.to(work).unbind(-1)
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return (x * cos + torch.stack([b, a], -1).flatten(-2) * sin).to(dtype)


def token_positions(frame_positions: torch.Tensor, cfg: DiTConfig) -> torch.Tensor:
    """``frame_positions [F]`` (time index of each frame) -> token positions ``[F * N, 3]``."""
    gh, gw = cfg.latent_height // cfg.patch_size, cfg.latent_width // cfg.patch_size
    device = frame_positions.device
    rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    grid = torch.stack([rows.flatten(), cols.flatten()], -1)  # [N, 2]
    f = len(frame_positions)
    t = repeat(frame_positions, "f -> (f n) 1", n=grid.shape[0])
    return torch.cat([t, grid.repeat(f, 1)], -1)


# ----------------------------------------------------------------------------- masks


def block_ids(num_frames: int, block_size: int, device=None) -> torch.Tensor:
    """Block of each frame ``[F]``: the first frame (the start frame) is a block of its own, then
    blocks of ``block_size`` frames: 0 | 1..bs | bs+1..2bs | ... (frame-wise: block = frame)."""
    f = torch.arange(num_frames, device=device)
    return torch.where(f == 0, 0, (f - 1).clamp(min=0) // block_size + 1)


def frame_mask(mode: str, num_frames: int, block_size: int, device=None) -> torch.Tensor | None:
    """Which frame may attend to which, ``[F, F]`` bool (True = attend), or None for full attention.

    ``mode``: "bidirectional" (None), "causal" (block b sees blocks <= b) or "teacher_forcing"
    (the result is [2T, 2T] over [clean | noisy] for ``num_frames`` = T: clean b sees clean <= b;
    noisy b sees clean < b and noisy b).
    """
    if mode == "bidirectional":
        return None
    blocks = block_ids(num_frames, block_size, device)
    if mode == "causal":
        return blocks[None, :] <= blocks[:, None]
    if mode == "teacher_forcing":
        q, k = blocks[:, None], blocks[None, :]
        clean_sees_clean = k <= q
        noisy_sees_clean = k < q
        noisy_sees_noisy = k == q
        top = torch.cat([clean_sees_clean, torch.zeros_like(clean_sees_clean)], 1)
        bottom = torch.cat([noisy_sees_clean, noisy_sees_noisy], 1)
        return torch.cat([top, bottom], 0)
    raise ConfigError(f"unknown attention mode {mode!r}; use bidirectional, causal or teacher_forcing")


def clean_context_frames(num_frames: int, block_size: int) -> int:
    """Clean frames of the teacher-forcing sequence: those before the last block (:func:`block_ids`). No noisy
    frame attends to the last block's clean copy, so it is left out (it changes no output). Plain integers, so a
    compiled forward traces it without a graph break."""
    return 0 if num_frames <= 1 else 1 + (num_frames - 2) // block_size * block_size


def sequence_frames(mode: str, num_frames: int, block_size: int, device=None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The frame mask (:func:`frame_mask`) and the time index ``[F]`` of each frame of a full-sequence forward over
    ``num_frames`` frames; in teacher forcing [the :func:`clean_context_frames` clean frames | the noisy ones]."""
    mask, times = frame_mask(mode, num_frames, block_size, device), torch.arange(num_frames, device=device)
    if mode != "teacher_forcing":
        return mask, times
    keep = torch.cat([times[: clean_context_frames(num_frames, block_size)], num_frames + times])
    return mask[keep][:, keep], times[keep % num_frames]


def token_mask(frames: torch.Tensor | None, tokens_per_frame: int) -> torch.Tensor | None:
    """Expand a frame mask ``[Fq, Fk]`` to tokens ``[Fq*N, Fk*N]``."""
    if frames is None:
        return None
    return repeat(frames, "q k -> (q n) (k m)", n=tokens_per_frame, m=tokens_per_frame)


FLEX_KERNEL_OPTIONS = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
                       "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                       "bwd_num_warps": 4, "bwd_num_stages": 3}
"""FlexAttention's tiles on CUDA. On an H100 at head dim 64, B 256, the teacher-forcing mask over 13 frames of 64
tokens (``train/scripts/flex_bench.py``): the forward took 1.42 ms with them against 3.64 ms with Inductor's default
128x128 tiles on 4 warps, and the backward 3.58 ms against 4.50 with its default tiles."""


def flex_block_mask(frames: torch.Tensor | None, tokens_per_frame: int) -> BlockMask | None:
    """The frame mask ``[F, F]`` as a FlexAttention block mask over ``F*N`` tokens: fully masked
    tiles are skipped, so the cost follows the mask's density (None: full attention)."""
    if frames is None:
        return None
    length = frames.shape[0] * tokens_per_frame

    def allowed(b, h, q, k):
        return frames[q // tokens_per_frame, k // tokens_per_frame]

    return create_block_mask(allowed, None, None, length, length, device=frames.device)


@dataclass(frozen=True)
class FrameMask:
    """The ``jvp`` backend's mask: the frame mask ``frames [Fq, Fk]`` (None: full attention) and its
    expansion ``tokens [Fq*N, Fk*N]``. Forward-mode dual inputs (a JVP through the network,
    ``torch.autograd.forward_ad``) go through :func:`kernels.attention_jvp.attention_jvp` on the
    frame mask (one-pass kernel on CUDA, its reference elsewhere); plain inputs take SDPA on the
    token mask."""

    frames: torch.Tensor | None
    tokens: torch.Tensor | None
    tokens_per_frame: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of ``q, k, v [B, H, L, hd]`` (dual or plain) -> ``[B, H, L, hd]``."""
        from kernels.attention_jvp import attention_jvp  # only JVP runs need it

        parts = [fwAD.unpack_dual(t) for t in (q, k, v)]
        if all(p.tangent is None for p in parts):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.tokens)
        tangents = [torch.zeros_like(p.primal) if p.tangent is None else p.tangent for p in parts]
        out, tangent = attention_jvp(*(p.primal for p in parts), *tangents, frames=self.frames,
                                     tokens_per_frame=self.tokens_per_frame)
        return fwAD.make_dual(out, tangent)


def frame_level_mask(frames: torch.Tensor | None, tokens_per_frame: int) -> FrameMask:
    """The ``jvp`` backend's :class:`FrameMask` of a frame mask ``[F, F]`` (or None)."""
    return FrameMask(frames, token_mask(frames, tokens_per_frame), tokens_per_frame)


ATTENTION_BACKENDS = ("sdpa", "flex", "jvp")


# ----------------------------------------------------------------------------- network


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked ``softmax(q k^T / sqrt(d)) v`` over ``[B, H, L, d]``: SDPA's fused kernel on a GPU; on
    the CPU two matmuls and a softmax over contiguous copies (the cache's keys are strided views), which
    at play's sizes (64 queries, about 900 keys, bf16, one thread) take 40% of the time of SDPA's CPU
    kernel."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)
    q, k, v = (q * q.shape[-1] ** -0.5).contiguous(), k.contiguous(), v.contiguous()
    return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


def gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x [B, F*N, D]`` times the per-frame ``gate [B, F, D]``."""
    return (rearrange(x, "b (f n) d -> b f n d", f=gate.shape[1]) * gate[:, :, None]).flatten(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def project(self, x: torch.Tensor, rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, L, D]`` -> q, k, v ``[B, H, L, hd]`` (q and k normalised and rotated)."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return apply_rope(q, rotation, self.q_norm), apply_rope(k, rotation, self.k_norm), v

    def attend(self, q, k, v, mask=None, cache=None, layer=0) -> torch.Tensor:
        """The heads' attention output ``[B, L, D]`` (before ``proj``); with ``cache`` the tokens also attend to its
        frames."""
        if isinstance(mask, FoldedCommit):
            (commit_k, commit_v), (block_k, block_v) = cache.attend_folded(layer, k, v, mask)
            split = mask.tokens
            out = torch.cat([attention(q[:, :, :split], commit_k, commit_v), attention(q[:, :, split:], block_k, block_v)], 2)
            return rearrange(out, "b h l d -> b l (h d)")
        if cache is not None:
            k, v = cache.attend(layer, k, v)
        if isinstance(mask, FrameMask):
            out = mask.attend(q, k, v)
        elif isinstance(mask, BlockMask):
            out = flex_attention(q.to(v.dtype), k.to(v.dtype), v, block_mask=mask,
                                 kernel_options=FLEX_KERNEL_OPTIONS if v.is_cuda else None)
        elif mask is None:
            out = attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return rearrange(out, "b h l d -> b l (h d)")


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.attn = Attention(cfg)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim))
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.compiled_stages: tuple | None = None  # (before, after) attention, compiled for cached forwards

    def before_attention(self, x, cond, rotation) -> tuple[torch.Tensor, ...]:
        """q, k, v ``[B, H, L, hd]`` of ``x [B, F*N, D]`` under ``cond [B, F, D]``, and the modulation that
        :meth:`after_attention` takes (four ``[B, F, D]``)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(cond)).chunk(6, -1)
        return *self.attn.project(norm_modulate(x, shift1, scale1), rotation), gate1, shift2, scale2, gate2

    def after_attention(self, x, attended, gate1, shift2, scale2, gate2) -> torch.Tensor:
        """The block's output ``[B, F*N, D]`` from its input ``x`` and the heads' output ``attended [B, F*N, D]``."""
        x = x + gated(self.attn.proj(attended), gate1)
        return x + gated(self.mlp(norm_modulate(x, shift2, scale2)), gate2)

    def forward(self, x, cond, rotation, mask=None, cache=None, layer=0):
        """``x [B, F*N, D]``, ``cond [B, F, D]`` (per-frame conditioning). Against a ``cache``, the stages around
        the attention run compiled once :meth:`compile_stages` has run."""
        before, after = self.before_attention, self.after_attention
        if cache is not None and self.compiled_stages is not None:
            before, after = self.compiled_stages
        q, k, v, *modulation = before(x, cond, rotation)
        return after(x, self.attn.attend(q, k, v, mask, cache, layer), *modulation)

    def compile_stages(self) -> None:
        """Compile (``torch.compile``, static shapes) the work before and after the attention for the cached
        forwards (self-forcing rollouts); the attention and its KV cache stay eager, so no cache fill level, only
        the token count and grad mode, makes a new graph."""
        self.compiled_stages = (torch.compile(self.before_attention, dynamic=False),
                                torch.compile(self.after_attention, dynamic=False))


class KVCache:
    """Per-layer rotary keys and values of ``sink_frames`` + a rolling window of frames.

    Storage is allocated once: ``k, v [depth, B, H, (capacity + 2 * block_size) * N, hd]``. Frames are
    kept in order (sinks, then the window oldest to newest), each key rotated for its slot; the
    slots after the held frames are scratch for the blocks of a forward (two: a folded commit and
    the block being generated). Writing past capacity drops the oldest window frames and rotates the
    remaining window keys back in time by as many frames, so every frame keeps its slot position
    (sinks stay at 0..S-1).
    """

    def __init__(self, cfg: DiTConfig, batch: int, device=None, dtype=torch.float32):
        self.cfg = cfg
        self.capacity = cfg.sink_frames + cfg.window_frames
        shape = (cfg.depth, batch, cfg.heads, (self.capacity + 2 * cfg.block_size) * cfg.tokens_per_frame, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.frames = 0  # frames held now
        self.written = 0  # frames written over the session
        self._turns: dict = {}  # time-shift rotations, by (frames, device, dtype)

    def reset(self):
        self.frames = 0
        self.written = 0

    def overflow(self, block_frames: int) -> int:
        """Window frames that writing a block of ``block_frames`` frames now would drop."""
        return max(0, self.frames + block_frames - self.capacity)

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Put a forward's (k, v) ``[B, H, L, hd]`` in the scratch slots; return all (k, v) to attend to.

        Under grad mode (a self-forcing exit step) the block is joined by concatenation instead, so
        later in-place writes to the buffer cannot invalidate the autograd graph; a ``write=True``
        forward then still commits it through the buffer.
        """
        start = self.frames * self.cfg.tokens_per_frame
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            held_k, held_v = self.k[layer, :, :, :start], self.v[layer, :, :, :start]
            self.k[layer, :, :, start : start + k.shape[2]] = k.detach()
            self.v[layer, :, :, start : start + v.shape[2]] = v.detach()
            return torch.cat([held_k, k.to(self.k.dtype)], 2), torch.cat([held_v, v.to(self.v.dtype)], 2)
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend_folded(self, layer: int, k: torch.Tensor, v: torch.Tensor, fold: "FoldedCommit"):
        """:meth:`attend` for a folded commit's (k, v) ``[B, H, Tc*N + Tb*N, hd]`` ([commit | block]): the
        (k, v) its commit attends to (the held frames and itself, as a separate write forward would) and
        the (k, v) its block attends to (what it would see after that write: without the ``overflow``
        oldest window frames, and the sinks moved ``overflow`` frames ahead in time, as the roll leaves
        them relative to the rest)."""
        all_k, all_v = self.attend(layer, k, v)
        n = self.cfg.tokens_per_frame
        commit_end = self.frames * n + fold.tokens
        commit = all_k[:, :, :commit_end], all_v[:, :, :commit_end]
        if not fold.overflow:
            return commit, (all_k, all_v)
        sinks, drop = self.cfg.sink_frames * n, (self.cfg.sink_frames + fold.overflow) * n
        ahead = self._time_shifted(all_k[:, :, :sinks], fold.overflow)
        return commit, (torch.cat([ahead, all_k[:, :, drop:]], 2), torch.cat([all_v[:, :, :sinks], all_v[:, :, drop:]], 2))

    def _time_shifted(self, keys: torch.Tensor, frames: int) -> torch.Tensor:
        """Rotary ``keys [..., L, hd]`` moved ``frames`` frames in time: only the time pairs turn, all by
        the same angles, so one matmul with a ``[2p, 2p]`` rotation (built once per shift) does it."""
        time_dims = 2 * rope_splits(self.cfg)[0]
        key = (frames, keys.device, keys.dtype)
        if key not in self._turns:
            shift = torch.zeros(1, 3, device=keys.device)
            shift[:, 0] = frames
            cos, sin = rope_rotation(shift, self.cfg)[0, :time_dims].unbind(-1)  # sin: negative on first dims
            a = torch.arange(0, time_dims, 2, device=keys.device)
            turn = torch.diag(cos)
            turn[a + 1, a], turn[a, a + 1] = sin[a], sin[a + 1]
            self._turns[key] = turn.to(keys.dtype)  # row vector (x_a, x_b) @ turn = (a cos - b sin, a sin + b cos)
        return torch.cat([keys[..., :time_dims] @ self._turns[key], keys[..., time_dims:]], -1)

    def roll(self, block_frames: int):
        """Keep the block in the scratch slots; if that overflows, drop the oldest window frames."""
        n, sinks = self.cfg.tokens_per_frame, self.cfg.sink_frames
        overflow = self.overflow(block_frames)
        if overflow:
            src, dst, end = (sinks + overflow) * n, sinks * n, (self.frames + block_frames) * n
            self.k[:, :, :, dst : end - overflow * n] = self._time_shifted(self.k[:, :, :, src:end], -overflow)
            self.v[:, :, :, dst : end - overflow * n] = self.v[:, :, :, src:end].clone()

    def advance(self, block_frames: int):
        self.frames = min(self.capacity, self.frames + block_frames)
        self.written += block_frames


@dataclass(frozen=True)
class FoldedCommit:
    """How a forward over [clean block | noisy block] splits (a folded commit): the clean block's
    ``tokens`` come first, and writing it drops ``overflow`` window frames (:meth:`KVCache.attend_folded`)."""

    tokens: int
    overflow: int


class WorldDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        p, c, d = cfg.patch_size, cfg.latent_channels, cfg.dim
        self.patch_embed = nn.Linear(c * p * p, d)
        self.camera_embed = nn.Linear(6, d)
        self.time_embed = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.action_embed = nn.Sequential(nn.Linear(cfg.action_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_ada = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, c * p * p)
        for zero in (self.camera_embed, self.action_embed[-1], self.final_ada, self.final):
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)
        # masked full-sequence attention: "sdpa" (dense mask) | "flex" (block mask; compiled training) |
        # "jvp" (frame mask; forward-mode dual inputs through kernels.attention_jvp, plain ones through SDPA)
        self.attention = "sdpa"
        self._tables: dict = {}
        self._full_cache_blocks: list | None = None  # compiled blocks for forwards against a full cache

    def compile_full_cache(self) -> None:
        """Compile each block (``torch.compile``, static shapes) for the cached forwards against a full
        KV cache: a session's steady state after its first ``sink_frames + window_frames`` frames, with
        two shapes at most (a step's first, folded forward and the others). Forwards against a filling
        cache stay eager, so every block compiles once or twice, not once per fill level."""
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 4 * len(self.blocks))  # all blocks share one code object
        self._full_cache_blocks = [torch.compile(block, dynamic=False) for block in self.blocks]

    def compile_cached_stages(self) -> None:
        """Compile every block's work around its attention for the cached forwards of training rollouts
        (:meth:`DiTBlock.compile_stages`): one graph per token count and grad mode, at any cache fill level."""
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 16 * len(self.blocks))  # all blocks share the code objects
        for block in self.blocks:
            block.compile_stages()

    @torch.compiler.disable
    def sequence_tables(self, mode: str, frames: int, device) -> tuple:
        """(mask, rotation) of a full-sequence forward over ``frames`` frames in ``mode`` (teacher forcing:
        the clean and noisy sequence of :func:`sequence_frames`), built once per shape and kept: no mask or rotary
        work per step."""
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        key = (mode, frames, str(device), self.attention)
        if key not in self._tables:
            cfg = self.cfg
            allowed, frame_pos = sequence_frames(mode, frames, cfg.block_size, device)
            expand = {"sdpa": token_mask, "flex": flex_block_mask, "jvp": frame_level_mask}[self.attention]
            self._tables[key] = (expand(allowed, cfg.tokens_per_frame), rope_rotation(token_positions(frame_pos, cfg), cfg))
        return self._tables[key]

    # -- pieces shared by the full-sequence and the cached forward

    def _embed(self, x, sigma, actions, rays, cond_keep):
        """Tokens ``[B, T*N, D]`` and per-frame conditioning ``[B, T, D]``; ``rays [B, T, 6, y, x]``."""
        cfg = self.cfg
        patches = rearrange(x, "b t c (y p) (x q) -> b t y x (c p q)", p=cfg.patch_size, q=cfg.patch_size)
        camera = rearrange(rays, "b t c y x -> b t y x c")
        keep = None if cond_keep is None else cond_keep.to(x.dtype)[:, None, None, None, None]
        cam = self.camera_embed(camera.to(x.dtype))
        tokens = self.patch_embed(patches) + (cam if keep is None else cam * keep)
        act = self.action_embed(actions.to(x.dtype))
        if cond_keep is not None:
            act = act * cond_keep.to(x.dtype)[:, None, None]
        cond = self.time_embed(timestep_embedding(sigma, 256).to(x.dtype)) + act
        return rearrange(tokens, "b t y x d -> b (t y x) d"), cond

    def _unpatchify(self, tokens, cond, frames):
        cfg = self.cfg
        shift, scale = self.final_ada(F.silu(cond)).chunk(2, -1)
        out = self.final(norm_modulate(tokens, shift, scale))
        gh, gw = cfg.latent_height // cfg.patch_size, cfg.latent_width // cfg.patch_size
        return rearrange(
            out, "b (t y x) (c p q) -> b t c (y p) (x q)", t=frames, y=gh, x=gw, p=cfg.patch_size, q=cfg.patch_size
        )

    def _check(self, x, sigma, actions, poses):
        cfg = self.cfg
        b, t = x.shape[:2]
        want = (cfg.latent_channels, cfg.latent_height, cfg.latent_width)
        if x.ndim != 5 or tuple(x.shape[2:]) != want:
            raise ConfigError(f"latents must be [B, T, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}")
        if tuple(sigma.shape) != (b, t):
            raise ConfigError(f"sigma must be [B, T] = [{b}, {t}], got {tuple(sigma.shape)}")
        if tuple(actions.shape) != (b, t, cfg.action_dim):
            raise ConfigError(f"actions must be [{b}, {t}, {cfg.action_dim}], got {tuple(actions.shape)}")
        if tuple(poses.shape) != (b, t, 4, 4):
            raise ConfigError(f"poses must be [{b}, {t}, 4, 4], got {tuple(poses.shape)}")

    # -- full sequence (training)

    def forward(self, x, sigma, actions, poses, mode="bidirectional", clean=None, cond_keep=None, clean_sigma=None):
        """Velocity prediction ``[B, T, C, h, w]`` for noisy latents ``x [B, T, C, h, w]``.

        ``sigma [B, T]``; ``actions [B, T, A]`` (normalised, see worldmodel.actions);
        ``poses [B, T, 4, 4]``; ``clean [B, T, C, h, w]`` switches on teacher forcing
        (``mode`` must then be "causal"), its noise level ``clean_sigma [B, T]`` (default 0: context
        noise gives the history a small one); ``cond_keep [B]`` bool.
        """
        self._check(x, sigma, actions, poses)
        cfg, t = self.cfg, x.shape[1]
        rays = plucker_rays(poses.float(), cfg)
        tokens, cond = self._embed(x, sigma, actions, rays, cond_keep)
        if clean is not None:
            if mode != "causal":
                raise ConfigError("teacher forcing (clean=...) needs mode='causal'")
            clean_level = torch.zeros_like(sigma) if clean_sigma is None else clean_sigma
            tc = clean_context_frames(t, cfg.block_size)
            clean_tokens, clean_cond = self._embed(clean[:, :tc], clean_level[:, :tc], actions[:, :tc], rays[:, :tc],
                                                   cond_keep)
            tokens, cond = torch.cat([clean_tokens, tokens], 1), torch.cat([clean_cond, cond], 1)
            mode = "teacher_forcing"
        if mode not in ("bidirectional", "causal", "teacher_forcing"):
            raise ConfigError(f"unknown attention mode {mode!r}; use bidirectional, causal or teacher_forcing")
        mask, rotation = self.sequence_tables(mode, t, x.device)
        for block in self.blocks:
            tokens = block(tokens, cond, rotation, mask)
        return self._unpatchify(tokens[:, -t * cfg.tokens_per_frame :], cond[:, -t:], t)

    # -- cached, block by block (inference and self-forcing rollouts)

    def new_cache(self, batch: int, device=None, dtype=torch.float32) -> KVCache:
        return KVCache(self.cfg, batch, device, dtype)

    def forward_cached(self, x, sigma, actions, poses, cache: KVCache, write: bool = False, cond_keep=None,
                       commit: tuple | None = None, commit_sigma: float = 0.0):
        """Velocity for one block ``x [B, Tb, C, h, w]`` given the frames in ``cache``.

        ``poses [B, Tb + 1, 4, 4]``: the pose of the frame before the block first (for a session's
        first block, repeat its first pose), so relative camera motion is known.
        With ``write=True`` the block's keys/values are appended to the cache (use it with the
        clean block at sigma = 0 after sampling). ``commit``: a clean block ``(latents [B, Tc, C, h, w],
        actions [B, Tc, A], poses [B, Tc + 1, 4, 4])`` written into the cache in the same forward (a
        folded commit, without ``cond_keep``): exactly what a separate ``write=True`` forward at
        ``commit_sigma`` (the committed block's noise level: 0 for a clean block) would write, and ``x`` is
        predicted against the cache after that write.
        """
        cfg, tb = self.cfg, x.shape[1]
        if write and commit is not None:
            raise ConfigError("forward_cached writes either the block (write=True) or a folded commit, not both")
        tokens, cond = self._block_tokens(x, sigma, actions, poses, cond_keep)
        tc, mask = 0, None
        if commit is not None:
            latents, commit_actions, commit_poses = commit
            tc = latents.shape[1]
            clean_tokens, clean_cond = self._block_tokens(latents, latents.new_full(latents.shape[:2], commit_sigma),
                                                          commit_actions, commit_poses, None)
            tokens, cond = torch.cat([clean_tokens, tokens], 1), torch.cat([clean_cond, cond], 1)
            mask = FoldedCommit(tc * cfg.tokens_per_frame, cache.overflow(tc))
        rotation = self._cached_rotation(cache.frames, tc + tb, x.device)
        full = self._full_cache_blocks is not None and cache.frames == cache.capacity
        for layer, block in enumerate(self._full_cache_blocks if full else self.blocks):
            tokens = block(tokens, cond, rotation, mask, cache, layer)
        if write or commit is not None:
            cache.roll(tc or tb)
            cache.advance(tc or tb)
        return self._unpatchify(tokens[:, tc * cfg.tokens_per_frame :], cond[:, tc:], tb)

    def _block_tokens(self, x, sigma, actions, poses, cond_keep):
        """Tokens and conditioning (:meth:`_embed`) of one cached block with ``poses [B, Tb + 1, 4, 4]``."""
        cfg, tb = self.cfg, x.shape[1]
        if tb > cfg.block_size:
            raise ConfigError(f"a cached block holds at most block_size={cfg.block_size} frames, got {tb}")
        if poses.shape[1] != tb + 1:
            raise ConfigError(f"forward_cached needs poses for the block plus the frame before: {tb + 1}, got {poses.shape[1]}")
        self._check(x, sigma, actions, poses[:, 1:])
        rays = plucker_rays(poses.float(), cfg)[:, 1:]
        return self._embed(x, sigma, actions, rays, cond_keep)

    @torch.compiler.disable
    def _cached_rotation(self, first: int, frames: int, device) -> torch.Tensor:
        """Rotary factors of the tokens of ``frames`` frames from slot ``first`` on, built once and kept."""
        key = ("rotation", first, frames, str(device))
        if key not in self._tables:
            positions = torch.arange(first, first + frames, device=device)
            self._tables[key] = rope_rotation(token_positions(positions, self.cfg), self.cfg)
        return self._tables[key]
