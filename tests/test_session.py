import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from worldmodel import checkpoint
from worldmodel.actions import make_action
from worldmodel.camera import state_to_pose
from worldmodel.checkpoint import CheckpointError, atomic_save_file, read_metadata
from worldmodel.model import build_model, model_config, with_kv_cache
from worldmodel.session import Session, SessionError


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=1)


def walk(model, batch=1, dx=7.0):
    return make_action(model.action_spec, ["W"], dx=dx)[None].expand(batch, -1)


def test_session_shapes_and_determinism(tiny, tmp_path):
    h, w = tiny.frame_size
    start = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8)
    Image.fromarray(start.numpy()).save(tmp_path / "start.png")
    runs = []
    for source in (start, str(tmp_path / "start.png")):
        s = Session(tiny, batch=2, seed=5)
        first = s.reset(source)
        assert first.frames.shape == (2, h, w, 3) and first.frames.dtype == torch.uint8 and torch.equal(first.frames[0], start)
        assert first.true_pose is None and torch.equal(first.commanded_pose, state_to_pose(s.state).float())
        runs.append(torch.stack([s.step(walk(tiny, 2)).frames for _ in range(4)]))
        assert s.frame_index == 4
    assert torch.equal(runs[0], runs[1])
    generated = Session(tiny, seed=3).reset(None).frames
    assert generated.shape == (1, h, w, 3)
    again = Session(tiny, seed=0)
    again.reset(None)
    assert torch.equal(again.reset(None, seeds=[3]).frames, generated)  # reseeded as a session of seed 3


def write_pending(session):
    """The pending block into the cache with a t = 0 forward of its own: what a folded commit must equal."""
    if session._pending is not None:
        session.rollout.write(*session._pending)
        session._pending = None


def test_each_step_writes_the_block_before_it_once(tiny):
    s = Session(tiny, seed=0, steps=[1.0, 0.5])
    h, w = tiny.frame_size
    s.reset(torch.full((h, w, 3), 128, dtype=torch.uint8))
    assert s._pending is not None and s.cache.frames == 0
    for frames in (1, 2):
        s.step(walk(tiny))  # its first forward writes the block before it, its second none
        assert s._pending is not None and (s.cache.frames, s.cache.written) == (frames, frames)
    assert s.cache.k.abs().sum() > 0


def test_force_frame_writes_the_given_frame(tiny):
    h, w = tiny.frame_size
    a, b = Session(tiny, seed=0), Session(tiny, seed=0)
    start = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8)
    a.reset(start)
    b.reset(start)
    forced = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8)
    a.step(walk(tiny), force_frame=forced)
    b.step(walk(tiny))
    write_pending(a), write_pending(b)
    assert not torch.allclose(a.cache.k, b.cache.k)
    with pytest.raises(SessionError, match="force_frame"):
        a.step(walk(tiny), force_frame=forced[..., :2])


def test_chunkwise_session_takes_blocks_or_buffers_frames():
    """A chunk-wise model steps a block at a time, or a frame at a time: then each block's frames come
    out one a step, a block late (the start frame until then), equal to the block steps'."""
    model = lively(build_model("tiny", seed=2, block_size=2))
    actions = [walk(model, dx=dx) for dx in (-9.0, 3.0, 0.0, 9.0)]
    blocked, framed = Session(model, seed=1), Session(model, seed=1)
    start = blocked.reset(None).frames
    assert torch.equal(framed.reset(None).frames, start)
    blocks = [blocked.step(torch.stack(actions[i : i + 2], 1)) for i in (0, 2)]
    assert blocks[0].frames.shape == (1, 2, *model.frame_size, 3) and blocks[0].commanded_pose.shape == (1, 2, 4, 4)
    shown = [framed.step(a) for a in actions]
    assert torch.equal(shown[0].frames, start) and framed.frame_index == 4
    assert torch.equal(torch.stack([r.frames for r in shown[1:]], 1), torch.cat([b.frames for b in blocks], 1)[:, :3])
    poses = torch.stack([r.commanded_pose for r in shown], 1)  # the camera after each step's action
    torch.testing.assert_close(poses, torch.cat([b.commanded_pose for b in blocks], 1), rtol=0, atol=0)
    assert not torch.equal(shown[1].frames, shown[2].frames)
    with pytest.raises(SessionError, match=r"actions must be \[1, 7\] or \[1, 2, 7\]"):
        blocked.step(torch.stack(actions[:3], 1))
    with pytest.raises(SessionError, match="whole block"):
        framed.step(actions[0], force_frame=start)


def test_session_takes_a_world_camera_instead_of_integrating():
    """Side by side, the world integrates the action and the session takes its camera: the same play."""
    from worldmodel.envs import make_world

    model = lively(build_model("tiny", seed=1))
    world = make_world("procedural", batch=1, height=model.frame_size[0], width=model.frame_size[1])
    alone, beside = Session(model, seed=2), Session(model, seed=2)
    start = world.reset([0]).frames
    alone.reset(start), beside.reset(start)
    for dx in (5.0, -7.0, 0.0):
        truth = world.step(walk(model, dx=dx))
        a, b = alone.step(walk(model, dx=dx)), beside.step(walk(model, dx=dx), camera=world.commanded)
        assert torch.equal(a.frames, b.frames) and torch.equal(b.commanded_pose, truth.commanded_pose)


def lively(model):
    """``model`` with every DiT weight perturbed: no zero-initialised path left, so every input matters."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.dit.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_noise_groups_and_narrow_play_like_separate_sessions():
    """A batch of noise groups draws what separate sessions draw; narrowing to the first groups goes on as they would."""
    model = lively(build_model("tiny", seed=1))
    h, w = model.frame_size
    start = torch.randint(0, 256, (3, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    both = Session(model, batch=3, seed=[(2, 5), (1, 6)])
    first, second = Session(model, batch=2, seed=5), Session(model, batch=1, seed=6)
    assert torch.equal(both.reset(start).frames, torch.cat([first.reset(start[:2]).frames, second.reset(start[2:]).frames]))
    for t in range(6):
        dx = float(t % 3 - 1) * 9
        if t < 3:
            apart = torch.cat([first.step(walk(model, 2, dx)).frames, second.step(walk(model, 1, dx)).frames])
            assert torch.equal(both.step(walk(model, 3, dx)).frames, apart)
        else:
            assert torch.equal(both.step(walk(model, 2, dx)).frames, first.step(walk(model, 2, dx)).frames)
        if t == 2:
            with pytest.raises(SessionError, match="whole noise groups"):
                both.narrow(1)
            both.narrow(2)
            assert both.batch == 2 and state_to_pose(both.state).shape == (2, 4, 4)
    write_pending(both), write_pending(first)
    torch.testing.assert_close(both.cache.k, first.cache.k, atol=1e-5, rtol=1e-5)
    assert [g.get_state().tolist() for _, g in both._noise] == [first._noise[0][1].get_state().tolist()]  # one group left
    with pytest.raises(SessionError, match="adding up to the batch"):
        Session(model, batch=3, seed=[(2, 5)])


def test_forcing_some_rows_equals_forcing_a_separate_session():
    model = lively(build_model("tiny", seed=1))
    h, w = model.frame_size
    gen = torch.Generator().manual_seed(0)
    start, forced = (torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8, generator=gen) for _ in range(2))
    both = Session(model, batch=4, seed=[(2, 3), (2, 3)])
    free, teacher_forced = Session(model, batch=2, seed=3), Session(model, batch=2, seed=3)
    both.reset(torch.cat([start, start])), free.reset(start), teacher_forced.reset(start)
    for _ in range(3):
        out = both.step(walk(model, 4), force_frame=forced, force_rows=torch.tensor([2, 3])).frames
        apart = torch.cat([free.step(walk(model, 2)).frames, teacher_forced.step(walk(model, 2), force_frame=forced).frames])
        off = (out.int() - apart.int()).abs()  # batch 4 vs 2 rounds differently: a pixel may land one level over
        assert off.max() <= 1 and off.double().mean() < 1e-3
    with pytest.raises(SessionError, match="force_frame"):
        both.step(walk(model, 4), force_frame=forced, force_rows=torch.tensor([1]))


def test_guidance_is_one_forward_of_the_doubled_batch():
    """A guided teacher step: one network call per Euler step (conditional and unconditional halves together)
    and one cache write, each over twice the batch."""
    model = lively(build_model("tiny", seed=2))
    model.config.sampler = {"solver": "euler", "steps": [1.0, 0.6, 0.3], "first_frame_steps": [1.0], "guidance": 3.0}
    session = Session(model, batch=2, seed=0)
    session.reset(None)
    calls, forward = [], model.dit.forward_cached

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return forward(x, *args, **kwargs)

    model.dit.forward_cached = counted
    session.step(walk(model, 2))
    write_pending(session)
    assert calls == [4, 4, 4, 4]  # 3 Euler steps (the first also writes the start frame), then the cache write
    assert session.cache.k.shape[1] == 4


@pytest.mark.parametrize("block_size, guidance, sinks", [(1, 1.0, 1), (2, 1.0, 1), (1, 2.5, 2), (2, 1.0, 0)])
def test_folded_commit_plays_like_separate_writes(block_size, guidance, sinks):
    """Each step's first forward also writes the previous block into the cache: the frames (float64) equal
    those of a session that writes every block with a forward of its own, past the window's capacity."""
    model = lively(build_model("tiny", seed=3, block_size=block_size))
    model.dit.cfg.sink_frames = sinks
    model.config.sampler = {**model.config.sampler, "steps": [1.0, 0.6], "guidance": guidance}
    folded, separate = (Session(model, seed=4, dtype=torch.float64) for _ in range(2))
    start = torch.randint(0, 256, (1, *model.frame_size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    folded.reset(start), separate.reset(start)
    calls, forward = [], model.dit.forward_cached
    model.dit.forward_cached = lambda *a, **k: calls.append(k.get("commit") is not None) or forward(*a, **k)
    for t in range(folded.cache.capacity + 4):
        action = torch.stack([walk(model, dx=float((t + i) % 5 - 2) * 6) for i in range(block_size)], 1)
        write_pending(separate)
        a, b = folded.step(action).frames, separate.step(action).frames
        assert (a.int() - b.int()).abs().max() <= 1, t  # uint8 rounding of float64 latents equal to ~1e-12
        torch.testing.assert_close(folded._pending[0], separate._pending[0], rtol=1e-9, atol=1e-9)
    write_pending(folded), write_pending(separate)
    assert folded.cache.frames == separate.cache.frames == folded.cache.capacity
    held = folded.cache.frames * model.dit.cfg.tokens_per_frame  # the slots after them are scratch
    for part in ("k", "v"):
        torch.testing.assert_close(getattr(folded.cache, part)[..., :held, :], getattr(separate.cache, part)[..., :held, :],
                                   rtol=1e-9, atol=1e-9)
    assert sum(calls) >= folded.cache.capacity  # the folded session's steps folded their commits


def test_a_kv_cache_without_sinks_keeps_the_same_frames_until_the_window_rolls():
    """Sinks 1 + window 6 and sinks 0 + window 7 hold the same 7 frames in the same slots until the cache is
    full, so they play alike; past it the first drops the oldest window frame, the second the first frame."""
    model = build_model("tiny", seed=7)
    with torch.no_grad():  # its zero-initialised gates and output would make every frame ignore the cache
        for weight in model.dit.parameters():
            weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(weight.numel())))
    unsunk = with_kv_cache(model, 0, 7)
    assert unsunk.dit.cfg.sink_frames == 0 and unsunk.dit.cfg.window_frames == 7
    assert model.dit.cfg.sink_frames == model.config.dit.sink_frames == 1  # the original is untouched
    h, w = model.frame_size
    start = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    plays = []
    for played in (model, unsunk):
        s = Session(played, seed=4)
        s.reset(start)
        plays.append(torch.stack([s.step(walk(played)).frames for _ in range(10)]))
    assert torch.equal(plays[0][:7], plays[1][:7])
    assert not torch.equal(plays[0][7:], plays[1][7:])


def test_bad_session_calls(tiny):
    s = Session(tiny)
    with pytest.raises(SessionError, match="reset"):
        s.step(walk(tiny))
    s.reset(None)
    with pytest.raises(SessionError, match="NaN"):
        s.step(torch.full((1, 7), float("nan")))
    with pytest.raises(SessionError, match="width"):
        s.step(torch.zeros(1, 9))
    with pytest.raises(SessionError, match="denoising steps"):
        s.steps = [0.5, 0.8]
    with pytest.raises(ValueError, match="does not exist"):
        s.reset("/nonexistent/start.png")


def test_memory_is_flat_over_5000_steps():
    """5,000 frames through a rolling KV cache: same storage, same resident memory."""
    from worldmodel.transformer import DiTConfig, WorldDiT

    dit = WorldDiT(DiTConfig(latent_channels=2, latent_height=2, latent_width=2, patch_size=2, dim=16, depth=1,
                             heads=2, window_frames=4, sink_frames=1)).eval()
    cache = dit.new_cache(1)
    storage = (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape)
    x, sigma, actions, poses = torch.randn(1, 1, 2, 2, 2), torch.zeros(1, 1), torch.zeros(1, 1, 7), torch.eye(4).expand(1, 2, 4, 4)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    with torch.no_grad():
        for step in range(5000):
            if step == 500:
                before = rss()
            dit.forward_cached(x, sigma, actions, poses, cache, write=True)
    assert (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape) == storage
    assert cache.frames == cache.capacity and cache.written == 5000
    assert rss() - before < 8 * 2**20, "resident memory grew by more than 8 MiB over 4,500 frames"


def test_session_cache_stays_at_capacity(tiny):
    s = Session(tiny, steps=[1.0])
    s.reset(None)
    storage = s.cache.k.data_ptr()
    for _ in range(2 * s.cache.capacity):
        s.step(walk(tiny))
    write_pending(s)
    assert s.cache.frames == s.cache.capacity and s.cache.k.data_ptr() == storage
    assert s.cache.written == 2 * s.cache.capacity + 1


def test_checkpoint_round_trip(tiny, tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, tiny)
    loaded = checkpoint.load(path)
    outs = []
    for m in (tiny, loaded):
        s = Session(m, seed=4)
        s.reset(None)
        outs.append(s.step(walk(m)).frames)
    assert torch.equal(outs[0], outs[1])
    half = tmp_path / "half.safetensors"
    checkpoint.save(half, tiny, dtype=torch.float16)
    assert half.stat().st_size < path.stat().st_size * 0.6
    checkpoint.load(half)
    sharded = tmp_path / "shipped" / "model.safetensors"
    files = checkpoint.save(sharded, tiny, max_shard_mib=path.stat().st_size / 3 / 2**20)
    assert len(files) >= 3 and not sharded.exists() and all(f.stat().st_size < path.stat().st_size / 2 for f in files)
    assert all(torch.equal(a, b) for a, b in zip(checkpoint.load(sharded).state_dict().values(), tiny.state_dict().values()))
    files[1].unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        checkpoint.load(sharded)


def test_bad_checkpoints_give_clear_errors(tiny, tmp_path):
    good = tmp_path / "good.safetensors"
    checkpoint.save(good, tiny)
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(np.random.default_rng(0).bytes(1000))
    cases = {
        tmp_path / "missing.safetensors": "does not exist",
        tmp_path / "truncated.safetensors": "corrupt or truncated",
        tmp_path / "garbage.safetensors": "corrupt or truncated",
    }
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    cases[tmp_path / "foreign.safetensors"] = "not a worldmodel checkpoint"
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(path)

    cfg = read_metadata(good)["config"]
    for key, value, message in [("dit", {**cfg["dit"], "dim": 64}, "has shape"), ("dit", {**cfg["dit"], "depht": 3}, "unknown transformer config keys"),
                                ("colour", 1, "unknown model config keys")]:
        bad = {**cfg, key: value}
        atomic_save_file(tiny.state_dict(), tmp_path / "bad.safetensors",
                         {"format": "worldmodel", "version": "1", "config": json.dumps(bad)})
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(tmp_path / "bad.safetensors")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge")


def test_unknown_solver_is_refused():
    model = build_model("tiny", seed=0)
    model.config.sampler.solver = "heun"
    with pytest.raises(SessionError, match="sampler.solver"):
        Session(model)


def test_context_noise_noises_the_history_and_tells_the_network():
    """With ``sampler.context_noise`` s, each committed block is (1 - s) x + s eps, eps drawn after the
    block's sampling noise from the session's generator, and is written at level s."""
    model = lively(build_model("tiny", seed=4))
    level = 0.25
    model.config.sampler = {**model.config.sampler, "steps": [1.0, 0.6], "context_noise": level}
    session = Session(model, seed=7, dtype=torch.float64)
    start = torch.randint(0, 256, (1, *model.frame_size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    session.reset(start)
    clean = session._pending[0].clone()
    seen, forward = [], model.dit.forward_cached
    model.dit.forward_cached = lambda *a, **k: seen.append((k.get("commit"), k.get("commit_sigma"))) or forward(*a, **k)
    session.step(walk(model))
    model.dit.forward_cached = forward
    cfg = model.dit.cfg
    gen = torch.Generator().manual_seed(7)
    torch.randn((2, 1, 1, cfg.latent_channels, cfg.latent_height, cfg.latent_width), generator=gen, dtype=torch.float64)
    eps = torch.randn((1, *clean.shape), generator=gen, dtype=torch.float64)[0]
    commit, commit_sigma = seen[0]
    assert commit_sigma == level and all(c is None for c, _ in seen[1:])
    torch.testing.assert_close(commit[0], (1 - level) * clean + level * eps, rtol=0, atol=1e-12)


@pytest.mark.parametrize("level", [float("nan"), -0.1, 1.0])
def test_bad_context_noise_is_refused(level):
    model = build_model("tiny", seed=0)
    model.config.sampler.context_noise = level
    with pytest.raises(SessionError, match="sampler.context_noise"):
        Session(model)


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), -0.5])
def test_bad_guidance_is_refused(guidance):
    model = build_model("tiny", seed=0)
    model.config.sampler.guidance = guidance
    with pytest.raises(SessionError, match="sampler.guidance"):
        Session(model)
