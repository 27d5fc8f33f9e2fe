import pytest
import torch

from worldmodel.actions import ActionSpec
from worldmodel.camera import integrate
from worldmodel.transformer import (ConfigError, DiTConfig, WorldDiT, apply_rope, attention, block_ids, frame_mask,
                                   rope_rotation, token_positions)
from tests.test_camera import random_rigid

SPEC = ActionSpec()


def tiny_dit(seed, **kw):
    cfg = DiTConfig(**{"latent_channels": 4, "latent_height": 4, "latent_width": 4, "patch_size": 2, "dim": 32,
                       "depth": 2, "heads": 2, "action_dim": SPEC.width, "window_frames": 8, "sink_frames": 1, **kw})
    torch.manual_seed(seed)
    model = WorldDiT(cfg).double()
    with torch.no_grad():  # leave the zero init so every path (gates, action, camera) matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def random_inputs(batch, frames, seed, cfg):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, cfg.latent_channels, cfg.latent_height, cfg.latent_width, generator=g, dtype=torch.float64)
    sigma = torch.rand(batch, frames, generator=g, dtype=torch.float64)
    actions = torch.cat([(torch.rand(batch, frames, 5, generator=g) > 0.5).float(), torch.randn(batch, frames, 2, generator=g) * 30], -1)
    poses, _ = integrate(actions, SPEC)
    return x, sigma, actions.double(), poses.double()


def block_slices(frames, block_size):
    ids = block_ids(frames, block_size).tolist()
    return [[f for f in range(frames) if ids[f] == b] for b in range(max(ids) + 1)]


def context_poses(poses, frames):
    """Poses of a block plus the frame before it (the first pose repeated at the start)."""
    prev = max(frames[0] - 1, 0)
    return torch.cat([poses[:, prev : prev + 1], poses[:, frames]], 1)


@pytest.mark.parametrize("block_size, frames", [(1, 6), (2, 7), (3, 7)])
def test_cached_generation_equals_full_causal_forward(block_size, frames):
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_dit(seed, block_size=block_size, window_frames=frames)
    x, sigma, actions, poses = random_inputs(2, frames, seed, model.cfg)
    full = model(x, sigma, actions, poses, mode="causal")
    cache = model.new_cache(2, dtype=torch.float64)
    outs = [model.forward_cached(x[:, f], sigma[:, f], actions[:, f], context_poses(poses, f), cache, write=True)
            for f in block_slices(frames, block_size)]
    cached = torch.cat(outs, 1)
    assert (cached - full).norm() / full.norm() < 1e-4


@pytest.mark.parametrize("block_size, frames", [(1, 5), (2, 7)])
def test_teacher_forcing_equals_cached_clean_history(block_size, frames):
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_dit(seed, block_size=block_size, window_frames=frames)
    x, sigma, actions, poses = random_inputs(2, frames, seed, model.cfg)
    clean = torch.randn_like(x)
    full = model(x, sigma, actions, poses, mode="causal", clean=clean)
    cache = model.new_cache(2, dtype=torch.float64)
    for f in block_slices(frames, block_size):
        noisy = model.forward_cached(x[:, f], sigma[:, f], actions[:, f], context_poses(poses, f), cache, write=False)
        assert (noisy - full[:, f]).norm() / full[:, f].norm() < 1e-4
        model.forward_cached(clean[:, f], torch.zeros_like(sigma[:, f]), actions[:, f], context_poses(poses, f), cache, write=True)


@pytest.mark.parametrize("block_size, frames", [(1, 5), (2, 7), (3, 10)])
def test_teacher_forcing_mask_matches_loop(block_size, frames):
    mask = frame_mask("teacher_forcing", frames, block_size)
    block = lambda f: 0 if f == 0 else (f - 1) // block_size + 1  # noqa: E731
    for i in range(2 * frames):
        for j in range(2 * frames):
            qi, kj = i % frames, j % frames
            q_clean, k_clean = i < frames, j < frames
            if q_clean:
                want = k_clean and block(kj) <= block(qi)
            else:
                want = (k_clean and block(kj) < block(qi)) or (not k_clean and block(kj) == block(qi))
            assert bool(mask[i, j]) == want, (i, j)


def test_causal_ignores_future_bidirectional_does_not():
    model = tiny_dit(3)
    x, sigma, actions, poses = random_inputs(1, 4, 3, model.cfg)
    x2 = x.clone()
    x2[:, -1] += 1.0
    causal = [model(v, sigma, actions, poses, mode="causal")[:, :3] for v in (x, x2)]
    bidir = [model(v, sigma, actions, poses, mode="bidirectional")[:, :3] for v in (x, x2)]
    assert torch.allclose(causal[0], causal[1], atol=1e-12)
    assert not torch.allclose(bidir[0], bidir[1], atol=1e-6)


def test_rigid_transform_of_all_poses_leaves_output_unchanged():
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_dit(seed)
    x, sigma, actions, poses = random_inputs(2, 5, seed, model.cfg)
    moved = random_rigid(2, torch.Generator().manual_seed(seed))[:, None] @ poses
    for mode in ("causal", "bidirectional"):
        a, b = model(x, sigma, actions, poses, mode=mode), model(x, sigma, actions, moved, mode=mode)
        assert (a - b).norm() / a.norm() < 1e-5
    # and the camera does matter
    still = poses[:, :1].expand_as(poses)
    assert not torch.allclose(model(x, sigma, actions, still), model(x, sigma, actions, poses), atol=1e-6)


@pytest.mark.parametrize("sinks, held, commit, block, level", [(1, 7, 2, 2, 0.0), (2, 8, 2, 1, 0.0), (0, 6, 2, 2, 0.0),
                                                               (1, 5, 1, 2, 0.0), (1, 3, 2, 2, 0.0), (1, 7, 2, 2, 0.3)])
def test_folded_commit_equals_a_write_then_a_forward(sinks, held, commit, block, level):
    """One forward over [committed block | noisy block] writes what a separate write forward at the committed
    block's level (0: clean) writes and predicts what a forward after it predicts, also when the write
    overflows the window (by 1 or 2 frames)."""
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_dit(seed, block_size=2, window_frames=8 - sinks, sink_frames=sinks)
    x, sigma, actions, poses = random_inputs(1, held + commit + block, seed, model.cfg)
    separate = model.new_cache(1, dtype=torch.float64)
    with torch.no_grad():
        for f in range(held):
            model.forward_cached(x[:, [f]], sigma[:, [f]] * 0, actions[:, [f]], context_poses(poses, [f]), separate, write=True)
        folded = model.new_cache(1, dtype=torch.float64)
        folded.k.copy_(separate.k), folded.v.copy_(separate.v)
        folded.frames, folded.written = separate.frames, separate.written
        c, b = list(range(held, held + commit)), list(range(held + commit, held + commit + block))
        clean = (x[:, c], actions[:, c], context_poses(poses, c))
        model.forward_cached(clean[0], sigma[:, c] * 0 + level, clean[1], clean[2], separate, write=True)
        want = model.forward_cached(x[:, b], sigma[:, b], actions[:, b], context_poses(poses, b), separate)
        got = model.forward_cached(x[:, b], sigma[:, b], actions[:, b], context_poses(poses, b), folded, commit=clean,
                                   commit_sigma=level)
    assert (got - want).norm() / want.norm() < 1e-8  # rotary angles are float32
    assert (folded.frames, folded.written) == (separate.frames, separate.written)
    end = folded.frames * model.cfg.tokens_per_frame
    assert (folded.k[..., :end, :] - separate.k[..., :end, :]).abs().max() < 1e-8
    assert (folded.v[..., :end, :] - separate.v[..., :end, :]).abs().max() < 1e-8


def test_rolling_window_equals_recomputation_over_the_same_window():
    """The rolling cache attends to exactly the sinks + last W frames, at slot positions."""
    seed = int(torch.randint(0, 10_000, ()))
    sinks, window, frames = 1, 3, 9
    model = tiny_dit(seed, window_frames=window, sink_frames=sinks)
    cfg, n = model.cfg, model.cfg.tokens_per_frame
    x, sigma, actions, poses = random_inputs(1, frames, seed, cfg)
    rolling = model.new_cache(1, dtype=torch.float64)
    history = []  # per frame, per layer: (key without rotation, value)

    def rotate(k, slot):
        return apply_rope(k, rope_rotation(torch.tensor([[slot, 0, 0]]), cfg))

    for f in range(frames):
        fs = [f]
        out = model.forward_cached(x[:, fs], sigma[:, fs], actions[:, fs], context_poses(poses, fs), rolling, write=True)
        kept = list(range(min(sinks, f))) + list(range(max(sinks, f - window), f))
        fresh = WorldDiT(DiTConfig(**{**cfg.to_dict(), "window_frames": frames})).new_cache(1, dtype=torch.float64)
        for layer in range(cfg.depth):
            for slot, h in enumerate(kept):
                k, v = history[h][layer]
                fresh.k[layer, :, :, slot * n : (slot + 1) * n] = rotate(k, slot)
                fresh.v[layer, :, :, slot * n : (slot + 1) * n] = v
        fresh.frames = len(kept)
        ref = model.forward_cached(x[:, fs], sigma[:, fs], actions[:, fs], context_poses(poses, fs), fresh, write=True)
        new = slice(len(kept) * n, (len(kept) + 1) * n)
        history.append([(rotate(fresh.k[l, :, :, new], -len(kept)), fresh.v[l, :, :, new].clone()) for l in range(cfg.depth)])
        assert (out - ref).norm() / ref.norm() < 1e-6, f  # rotary angles are float32
    assert rolling.frames == sinks + window and rolling.written == frames


def test_bad_config_and_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown transformer config keys"):
        DiTConfig.from_dict({"dim": 32, "depht": 2})
    with pytest.raises(ConfigError, match="not divisible by patch"):
        DiTConfig(latent_height=5)
    model = tiny_dit(0)
    x, sigma, actions, poses = random_inputs(1, 3, 0, model.cfg)
    with pytest.raises(ConfigError, match="actions must be"):
        model(x, sigma, actions[..., :3], poses)
    with pytest.raises(ConfigError, match="unknown attention mode"):
        model(x, sigma, actions, poses, mode="sideways")


def test_rotary_with_the_norm_inside_equals_the_norm_then_the_rotary():
    """The query/key RMSNorm folded into the rotary's float32 pass computes what the module then the rotary do."""
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    cfg = DiTConfig(dim=64, heads=2)
    rotation = rope_rotation(token_positions(torch.arange(2, 5), cfg), cfg)
    norm = torch.nn.RMSNorm(cfg.head_dim, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn(cfg.head_dim, dtype=torch.float64))
    x = torch.randn(2, 2, rotation.shape[0], cfg.head_dim, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, rotation, norm), apply_rope(norm(x), rotation), rtol=1e-12, atol=1e-12)


def test_cpu_attention_equals_the_textbook_formula_on_strided_views():
    """The CPU path of ``attention`` (matmuls over contiguous copies) is softmax(q k^T / sqrt(d)) v, also
    for keys and values that are strided views of a larger store, as the KV cache hands them out."""
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    store = torch.randn(2, 3, 4, 40, 16, dtype=torch.float64)  # keys and values [B, H, L, d] of a larger cache
    k, v = store[0, :, :, 5:33], store[1, :, :, 5:33]
    q = torch.randn(3, 7, 4, 16, dtype=torch.float64).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    weights = torch.einsum("bhqd,bhkd->bhqk", q, k) / 4.0
    expected = torch.einsum("bhqk,bhkd->bhqd", weights.softmax(-1), v)
    torch.testing.assert_close(attention(q, k, v), expected, rtol=1e-12, atol=1e-12)


def test_compiled_full_cache_forwards_equal_the_eager_ones():
    """``compile_full_cache``: against a full cache the compiled blocks compute what the eager ones do, for a
    plain and a folded forward; against a filling cache the blocks stay eager."""
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_dit(seed, depth=1, window_frames=2).float()
    x, sigma, actions, poses = (t.float() for t in random_inputs(1, 6, seed, model.cfg))
    eager, compiled = model.new_cache(1), model.new_cache(1)
    with torch.no_grad():
        for f in range(3):  # fill both caches (sinks 1 + window 2): eager forwards either way
            for cache in (eager, compiled):
                model.forward_cached(x[:, [f]], sigma[:, [f]] * 0, actions[:, [f]], context_poses(poses, [f]), cache, write=True)
        runs = []
        compiled_frames = []
        for cache, compile_it in ((eager, False), (compiled, True)):
            if compile_it:
                model.compile_full_cache()
                block = model._full_cache_blocks[0]
                model._full_cache_blocks[0] = lambda *a: compiled_frames.append(a[4].frames) or block(*a)
            clean = (x[:, [3]], actions[:, [3]], context_poses(poses, [3]))
            folded = model.forward_cached(x[:, [4]], sigma[:, [4]], actions[:, [4]], context_poses(poses, [4]), cache, commit=clean)
            plain = model.forward_cached(x[:, [4]], sigma[:, [4]] / 2, actions[:, [4]], context_poses(poses, [4]), cache)
            runs.append((folded, plain, cache.k.clone()))
    for want, got in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert compiled_frames == [model.cfg.sink_frames + model.cfg.window_frames] * 2  # both ran compiled, on a full cache


def test_compiled_stages_roll_out_as_the_eager_blocks_and_compile_once():
    """``compile_cached_stages``: a self-forcing rollout (folded and separate commits, a gradient step per block,
    the cache rolling past its window) gives the eager rollout's clip and parameter gradients, float64; after a
    rollout without gradient, one with its steps' shapes at other fill levels makes no new graph."""
    from types import SimpleNamespace

    from train.algorithms import self_forcing_rollout
    from worldmodel.rollout import CachedRollout

    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_dit(seed, depth=2, block_size=2, window_frames=4)
    x, _, actions, poses = random_inputs(2, 9, seed, model.cfg)
    noise = torch.randn(2, 2, 9, *x.shape[2:], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    clip = SimpleNamespace(actions=actions, poses=poses)

    def rollout(exits):
        model.zero_grad()
        out = self_forcing_rollout(CachedRollout(model, clip, torch.float64), x[:, :1], noise, (1.0, 0.5), exits)
        (out * x).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    exits = [0, 1, 1, 0]  # blocks of frames 1-2, 3-4, 5-6, 7-8; a window of 4 + 1 sink overflows at the last
    want = rollout(exits)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.compile_cached_stages()
    got = rollout(exits)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # every block played, its commit folded into its first forward: 1 + 2 and 2 + 2 frames
        self_forcing_rollout(CachedRollout(model, clip, torch.float64), x[:, :1], noise, (1.0, 0.5), [1, 0, 0, 1], 9)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= before + 4  # before and after attention, with and without gradient, at least
    rollout([1, 0, 0, 1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_rollouts_fold_each_commit_into_the_next_blocks_first_forward():
    """``CachedRollout.generate`` commits each block within the next block's first forward (or, when that forward
    carries gradient, by a forward of its own just before): the clip and the gradients of a self-forcing rollout
    equal those of a separate commit forward after every block, float64 (to 1e-6 once the window rolls: the fold
    turns the sinks' keys ahead where the write turns the window's back, by float32 rotary tables); the folds save
    a forward per block."""
    from types import SimpleNamespace

    from train.algorithms import self_forcing_rollout
    from worldmodel.rollout import CachedRollout

    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_dit(seed, depth=2, block_size=2, window_frames=4)
    x, _, actions, poses = random_inputs(2, 9, seed, model.cfg)
    noise = torch.randn(2, 2, 9, *x.shape[2:], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    clip = SimpleNamespace(actions=actions, poses=poses)

    def separate_commits(rollout, first, sample_block):  # each block written by a forward of its own
        rollout.commit(first, 0)
        out = [first]
        for b, (start, end) in enumerate(rollout.blocks[1:], 1):
            out.append(sample_block(rollout.block_denoiser(b), b, (first.shape[0], end - start, *first.shape[2:])))
            rollout.commit(out[-1].detach(), b)
        return torch.cat(out, 1)

    def rollout(exits, trained_from, fold):
        model.zero_grad()
        played = CachedRollout(model, clip, torch.float64)
        if not fold:
            played.generate = lambda first, sample_block: separate_commits(played, first, sample_block)
        calls = []
        forward = model.forward_cached
        model.forward_cached = lambda *a, **k: calls.append(1) or forward(*a, **k)
        try:
            out = self_forcing_rollout(played, x[:, :1], noise, (1.0, 0.5), exits, trained_from)
        finally:
            del model.forward_cached
        if out.requires_grad:
            (out * x).sum().backward()
        return out.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()], len(calls)

    for exits, trained_from in (([0, 1, 1, 0], 0), ([1, 0, 0, 1], 9)):
        got, want = rollout(exits, trained_from, True), rollout(exits, trained_from, False)
        torch.testing.assert_close(got[0][:, :7], want[0][:, :7], rtol=1e-10, atol=1e-10)  # before the window rolls
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        for g, w in zip(got[1], want[1]):
            assert (g is None) == (w is None) and (g is None or torch.allclose(g, w, rtol=1e-6, atol=1e-6))
    assert (got[2], want[2]) == (4 * 2, 4 * 2 + 5)  # played without gradient: 2 steps a block, 5 commits folded


def test_clean_context_frames_are_the_frames_before_the_last_block():
    from worldmodel.transformer import clean_context_frames

    for frames in range(1, 30):
        for block_size in (1, 2, 3, 4, 7):
            ids = block_ids(frames, block_size)
            assert clean_context_frames(frames, block_size) == int((ids < ids[-1]).sum()), (frames, block_size)
