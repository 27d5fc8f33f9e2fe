"""The training benchmark: its analytic FLOP counts against torch's FlopCounterMode on a real tiny
DiT (attention through the math backend, which the counter sees as dense matmuls), the mask
densities against the token masks, and one tiny end-to-end run of both variants (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from train import algorithms as alg
from train import bench
from train.clips import Clip
from worldmodel.rollout import CachedRollout
from worldmodel.model import dit_config, model_config
from worldmodel.transformer import DiTConfig, WorldDiT, sequence_frames, token_mask

CAMERA_SLACK = 1e-3  # the camera rays' few 4x4 matmuls per frame, which the bench does not count


def tiny_dit(block_size: int = 2, window_frames: int = 4) -> WorldDiT:
    torch.manual_seed(0)
    return WorldDiT(DiTConfig(latent_channels=4, latent_height=8, latent_width=8, patch_size=2, dim=32, depth=2, heads=2,
                              mlp_ratio=3.0, action_dim=7, block_size=block_size, window_frames=window_frames, sink_frames=1))


def clip_inputs(batch: int = 2, frames: int = 5):
    x = torch.randn(batch, frames, 4, 8, 8)
    return x, torch.rand(batch, frames), torch.randn(batch, frames, 7), torch.eye(4).expand(batch, frames, 4, 4).clone()


def counted(fn) -> int:
    """FLOPs torch counts for ``fn()``, attention as the dense matmuls of the math backend."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def test_bidirectional_forward_flops_match_the_counter():
    dit, (x, s, a, p) = tiny_dit(), clip_inputs()
    expected = bench.sequence_forward_flops(dit.cfg, 2, 5, "bidirectional")
    assert counted(lambda: dit(x, s, a, p, mode="bidirectional")) == pytest.approx(expected, rel=CAMERA_SLACK)


@pytest.mark.parametrize("mode", ["causal", "teacher_forcing"])
@torch.no_grad()
def test_masked_forward_flops_are_the_dense_count_at_the_masks_density(mode):
    dit, (x, s, a, p) = tiny_dit(), clip_inputs()
    clean = x if mode == "teacher_forcing" else None
    dense = bench.sequence_forward_flops(dit.cfg, 2, 5, mode, density=1.0)
    assert counted(lambda: dit(x, s, a, p, mode="causal", clean=clean)) == pytest.approx(dense, rel=CAMERA_SLACK)
    density = bench.mask_density(mode, 5, 2)
    assert density == token_mask(sequence_frames(mode, 5, 2)[0], dit.cfg.tokens_per_frame).double().mean().item()
    tokens = (8 if mode == "teacher_forcing" else 5) * dit.cfg.tokens_per_frame  # the last block's clean copy left out
    attention = bench.attention_flops(dit.cfg, 2, tokens, tokens)
    assert bench.sequence_forward_flops(dit.cfg, 2, 5, mode) == pytest.approx(dense - (1 - density) * attention)


def test_frame_wise_mask_densities_have_their_closed_forms():
    t = 13
    assert bench.mask_density("bidirectional", t, 1) == 1.0
    assert bench.mask_density("causal", t, 1) == pytest.approx((t + 1) / (2 * t))
    assert bench.mask_density("teacher_forcing", t, 1) == pytest.approx(t * t / (2 * t - 1) ** 2)  # t - 1 clean frames


def test_a_trained_forward_costs_three_forwards():
    dit, (x, s, a, p) = tiny_dit(), clip_inputs()
    forward = bench.sequence_forward_flops(dit.cfg, 2, 5, "teacher_forcing", density=1.0)
    trained = counted(lambda: dit(x, s, a, p, mode="causal", clean=x).sum().backward())
    assert 0.97 * bench.TRAINED * forward < trained <= bench.TRAINED * forward  # no input gradient for the latents


@torch.no_grad()
def test_rollout_flops_match_the_counter_over_a_real_rollout():
    """One sampling step (exit step always 0), so the expected count is exact; a window of 4 frames
    with 1 sink makes the cache full from the third block on."""
    dit, (x, _, a, p) = tiny_dit(block_size=2, window_frames=2), clip_inputs(frames=7)
    rollout = CachedRollout(dit, Clip(a, p))

    def run():
        alg.self_forcing_rollout(rollout, x[:, :1], x[:, None], [1.0], [0] * (len(rollout.blocks) - 1))

    expected = bench.rollout_flops(dit.cfg, 2, 7, 1, trained=False)
    assert counted(run) == pytest.approx(expected, rel=CAMERA_SLACK)
    assert bench.rollout_flops(dit.cfg, 2, 7, 3, trained=False) > expected  # one more denoising forward per block


@torch.no_grad()
def test_played_rollout_flops_match_the_counter():
    """A rollout whose blocks are all played (trained_from past the clip): every one of 2 steps, each commit folded."""
    dit, (x, _, a, p) = tiny_dit(block_size=2, window_frames=2), clip_inputs(frames=7)
    rollout = CachedRollout(dit, Clip(a, p))
    noise = torch.stack([x, x], 1)

    def run():
        alg.self_forcing_rollout(rollout, x[:, :1], noise, [1.0, 0.5], [0] * (len(rollout.blocks) - 1), trained_from=7)

    expected = bench.rollout_flops(dit.cfg, 2, 7, 2, trained=False, trained_from=7)
    assert counted(run) == pytest.approx(expected, rel=CAMERA_SLACK)


def stage_config(stage: str, **sections) -> OmegaConf:
    model = model_config("tiny", "procedural")
    return OmegaConf.create({"stage": stage, "model": OmegaConf.to_container(model), "data": {"batch": 4, "clip_len": 5},
                             **sections})


def test_step_flops_per_stage():
    dit = dit_config(model_config("tiny", "procedural"))
    bi, tf = (bench.sequence_forward_flops(dit, 4, 5, mode) for mode in ("bidirectional", "teacher_forcing"))
    assert bench.step_flops(stage_config("teacher"), 0) == 3 * bi
    assert bench.step_flops(stage_config("ar_teacher"), 0) == 3 * tf
    assert bench.step_flops(stage_config("causal_cd", cd={"guidance": 3.0}), 0) == pytest.approx((2 + 1 + 3) * tf)
    assert bench.step_flops(stage_config("causal_cd", cd={"guidance": 1.0}), 0) == pytest.approx((1 + 1 + 3) * tf)
    assert bench.step_flops(stage_config("causal_scm", scm={"guidance": 3.0}), 0) == pytest.approx((2 + 2 + 3) * tf)
    assert bench.step_flops(stage_config("autoencoder"), 0) is None

    dmd = stage_config("dmd", dmd={"critic_updates": 5, "guidance": 3.0, "score_frames": 0})
    steps = len(dmd.model.sampler.steps)
    critic_turn = bench.rollout_flops(dit, 4, 5, steps, trained=False) + 3 * bi
    generator_turn = bench.rollout_flops(dit, 4, 5, steps, trained=True) + (3 + 2 + 1) * bi
    assert bench.step_flops(dmd, 5) == pytest.approx(generator_turn)
    assert bench.step_flops(dmd, 6) == pytest.approx(critic_turn)
    assert bench.window_flops(dmd, 10) == pytest.approx((2 * generator_turn + 8 * critic_turn) / 10)  # steps 10 and 15

    long = stage_config("dmd", dmd={"critic_updates": 1, "guidance": 1.0, "score_frames": 3})
    scored = bench.sequence_forward_flops(dit, 4, 3, "bidirectional")
    expected = bench.rollout_flops(dit, 4, 5, steps, trained=True, trained_from=2) + (3 + 1 + 1) * scored
    assert bench.step_flops(long, 0) == pytest.approx(expected)


def test_failures_say_what_went_wrong():
    oom = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert bench.failure(1, oom) == "out of memory"
    assert bench.failure(2, "error: unknown config key 'data.bach'\n") == "error: unknown config key 'data.bach'"
    assert bench.failure(-9, "") == "exit status -9"
    row = {"stage": "dmd", "preset": "default", "batch": 512, "variant": "after", "status": "out of memory"}
    assert bench.table([row]).splitlines()[-1] == "| dmd | default | 512 | after | - | - | - | - | - | - | - | out of memory |"


def test_a_tiny_run_of_both_variants(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert bench.main(["--stages", "teacher", "--preset", "tiny", "--batches", "2", "--window", "2", "--device", "cpu",
                       "--source", "synthetic", "--episodes", "2", "--frames", "6", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["status"]) for r in rows] == [("before", "ok"), ("after", "ok")]
    dit = dit_config(model_config("tiny", "procedural"))
    for r in rows:
        assert r["gflop_per_step"] * 1e9 == pytest.approx(3 * bench.sequence_forward_flops(dit, 2, 5, "bidirectional"))
        assert r["frames_per_second"] == pytest.approx(2 * 5 / (r["step_ms"] / 1000))
        assert r["tflops"] == pytest.approx(r["gflop_per_step"] / r["step_ms"]) and r["peak_memory_gb"] is None
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-4].startswith("| stage | preset | batch | variant | step ms")
    assert printed[-2].startswith("| teacher | tiny | 2 | before |") and printed[-1].endswith("| - | ok |")


def test_profile_runs_a_third_window_and_prints_its_top_kernels(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert bench.main(["--stages", "teacher", "--preset", "tiny", "--batches", "2", "--variants", "after", "--window", "2",
                       "--device", "cpu", "--source", "synthetic", "--episodes", "2", "--frames", "6", "--profile",
                       "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["profile"].startswith("steps 4..6 of teacher\n")
    assert "aten::" in row["profile"] and "Self CPU" in row["profile"]
    assert "top kernels by device time" in capsys.readouterr().out


@pytest.mark.parametrize("mode, frames, block_size", [("causal", 13, 1), ("teacher_forcing", 13, 1), ("teacher_forcing", 7, 3),
                                                      ("causal", 5, 2)])
@pytest.mark.parametrize("tokens_per_frame", [64, 80, 48, 200])
def test_tile_work_counts_the_tiles_flex_attention_computes(mode, frames, block_size, tokens_per_frame):
    from worldmodel.transformer import flex_block_mask
    mask = sequence_frames(mode, frames, block_size)[0]
    block = flex_block_mask(mask, tokens_per_frame)
    tiles = int(block.kv_num_blocks.sum()) + int(block.full_kv_num_blocks.sum())
    allowed = token_mask(mask, tokens_per_frame).double().sum().item()
    assert bench.tile_work(mode, frames, block_size, tokens_per_frame) == pytest.approx(tiles * 128**2 / allowed, rel=1e-12)


def test_tile_work_is_one_when_frames_line_up_with_tiles_and_none_without_a_mask():
    assert bench.tile_work("teacher_forcing", 13, 1, 128) == 1.0
    assert bench.tile_work("bidirectional", 13, 1, 80) is None
    assert bench.tile_work("teacher_forcing", 13, 1, 80) > bench.tile_work("teacher_forcing", 13, 1, 64) > 1.0


@pytest.mark.parametrize("stage, compile_setting, device, expected", [
    ("ar_teacher", "auto", "cuda", True), ("causal_cd", True, "cuda:0", True), ("causal_cd", True, "cpu", False),
    ("ar_teacher", "auto", "cpu", False),
    ("causal_scm", False, "cuda", False), ("teacher", True, "cuda", False), ("dmd", "auto", "cuda", False)])
def test_stage_tile_work_only_where_flex_attention_runs(stage, compile_setting, device, expected):
    cfg = OmegaConf.create({"stage": stage, "run": {"compile": compile_setting, "device": device}, "data": {"clip_len": 13},
                            "model": model_config("default", "doom")})
    tiles = bench.stage_tile_work(cfg)
    assert tiles == (pytest.approx(bench.tile_work("teacher_forcing", 13, 1, 80)) if expected else None)
