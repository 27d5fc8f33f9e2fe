"""CPU play speed work that must not change results: the cache roll turns only the time pairs (as rotating
every pair does, within rounding), the bf16 choice, the cast of a session, the controls help."""

import pytest
import torch

from play.controls import load_controls
from play.generator import FrameGenerator, native_bf16, play_dtype
from play.hud import help_lines
from worldmodel.actions import ActionSpec
from worldmodel.model import build_model
from worldmodel.session import Session
from worldmodel.transformer import DiTConfig, KVCache, apply_rope, rope_rotation


def reference_roll(cache: KVCache, block_frames: int) -> None:
    """The roll as first written: every rotary pair of the window keys turned back in time."""
    n, sinks = cache.cfg.tokens_per_frame, cache.cfg.sink_frames
    total = cache.frames + block_frames
    overflow = max(0, total - cache.capacity)
    if overflow:
        src, dst, end = (sinks + overflow) * n, sinks * n, total * n
        shift = torch.zeros(1, 3)
        shift[:, 0] = -overflow
        cache.k[:, :, :, dst : end - overflow * n] = apply_rope(cache.k[:, :, :, src:end], rope_rotation(shift, cache.cfg))
        cache.v[:, :, :, dst : end - overflow * n] = cache.v[:, :, :, src:end].clone()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("block_size", [1, 2])
def test_roll_matches_rotating_every_pair_in_float64(dtype, tolerance, block_size):
    """The roll turns the time pairs with one matmul: within the dtype's rounding of every pair turned in float64."""
    cfg = DiTConfig(dim=64, heads=2, depth=2, latent_height=4, latent_width=4, window_frames=4, block_size=block_size)
    fast, slow = KVCache(cfg, 2, dtype=dtype), KVCache(cfg, 2, dtype=torch.float64)
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    fast.k.copy_(torch.randn_like(fast.k) * 3)
    fast.v.copy_(torch.randn_like(fast.v))
    slow.k.copy_(fast.k)
    slow.v.copy_(fast.v)
    fast.frames = slow.frames = fast.capacity
    fast.roll(block_size)
    reference_roll(slow, block_size)
    assert ((fast.k.double() - slow.k).abs() <= tolerance * slow.k.abs().clamp(min=1)).all()
    assert torch.equal(fast.v.double(), slow.v)


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    assert native_bf16(cpuinfo)
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f\n")
    assert not native_bf16(cpuinfo)
    assert not native_bf16(tmp_path / "missing")
    assert play_dtype(torch.device("cuda")) == torch.float32


def test_generator_plays_a_cpu_session_in_bf16_where_native(monkeypatch):
    model = build_model("tiny")
    monkeypatch.setattr("play.generator.native_bf16", lambda: True)
    fast = FrameGenerator(Session(model, seed=1))
    assert fast.session.dtype == torch.bfloat16 and fast.session.cache.k.dtype == torch.bfloat16
    assert next(fast.session.model.parameters()).dtype == torch.bfloat16
    frame = fast.reset(0).frame
    assert frame.dtype.name == "uint8" and fast.step(torch.zeros(fast.spec.width)).frame.shape == frame.shape
    kept = FrameGenerator(Session(build_model("tiny"), seed=1), fast_cpu=False)
    assert kept.session.dtype == torch.float32


def test_bf16_frames_stay_close_to_fp32():
    """bf16 changes a frame only by rounding: the first generated frame (same noise) is close to fp32's."""
    frames = []
    for dtype in (torch.float32, torch.bfloat16):
        session = Session(build_model("tiny"), seed=3)
        session.cast(dtype)
        session.reset(torch.full((32, 32, 3), 120, dtype=torch.uint8))
        frames.append(session.step(torch.zeros(1, 7)).frames.float())
    assert (frames[0] - frames[1]).abs().mean() < 3.0  # uint8 levels


def test_help_names_the_mouse_strafing_and_every_command():
    controls = load_controls(ActionSpec())
    text = "\n".join(help_lines(controls))
    for expected in ("mouse: look around, turn left / right", "w / up: walk forward", "a / left: strafe left",
                     "d / right: strafe right", "left shift / right shift: sprint", "escape: free the mouse",
                     "q: quit", "1 2 3 4: denoising steps per frame", "f1 or ?: show / hide this help"):
        assert expected in text
