"""The fast training path: the latent cache equals encoding on the fly, batch for batch; training on it
(and compiled) computes the losses of the frames path step for step; FlexAttention block masks equal
the dense masks."""

from __future__ import annotations

import json

import pytest
import torch

from test_train_stages import FAST, args, write_episodes
from train.clips import encode
from train.config import compose
from train.data import StepBatches
from train.latents import LatentStore
from train.trainer import run
from worldmodel import checkpoint
from worldmodel.frames import to_model
from worldmodel.transformer import DiTConfig, WorldDiT


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    episodes = write_episodes(root / "episodes", count=3, length=9)
    run("autoencoder", args(episodes, root / "ae", 2, *FAST))
    return root, episodes, root / "ae" / "model.safetensors"


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(run_dir / "log.jsonl")) if "loss" in r]


def test_cached_batches_equal_encoded_frames(setup, tmp_path):
    root, episodes, ae_path = setup
    cfg, _ = compose("teacher", args(episodes, tmp_path, 1, "data.batch=4"))
    ae = checkpoint.load(ae_path).autoencoder.eval()
    data = StepBatches(cfg.data, seed=3)
    store = LatentStore.build(data.dataset, ae, "cpu", torch.float32, show_progress=False)
    assert len(store) == len(data.dataset)
    frames = data.loader([0, 5, 11], workers=0)
    for cached in store.batches(data.clip_indices([0, 5, 11])):
        real = next(frames)
        torch.testing.assert_close(cached["latents"], encode(ae, to_model(real["frames"])), rtol=0, atol=1e-5)
        for key in ("actions", "poses", "true_poses"):
            torch.testing.assert_close(cached[key], real[key].float(), rtol=0, atol=0, equal_nan=True)


def test_latent_cache_folder_is_reused_and_keyed_by_the_autoencoder(setup, tmp_path):
    root, episodes, ae_path = setup
    cfg, _ = compose("teacher", args(episodes, tmp_path, 1))
    dataset = StepBatches(cfg.data, seed=0).dataset
    ae = checkpoint.load(ae_path).autoencoder.eval()
    first = LatentStore.build(dataset, ae, "cpu", torch.float32, cache_dir=tmp_path, show_progress=False)
    files = list(tmp_path.glob("latents-*.safetensors"))
    assert len(files) == 1
    again = LatentStore.build(dataset, ae, "cpu", torch.float32, cache_dir=tmp_path, show_progress=False)
    torch.testing.assert_close(again.tensors["latents"], first.tensors["latents"], rtol=0, atol=0)
    with torch.no_grad():
        next(ae.parameters()).add_(0.5)
    LatentStore.build(dataset, ae, "cpu", torch.float32, cache_dir=tmp_path, show_progress=False)
    assert len(list(tmp_path.glob("latents-*.safetensors"))) == 2  # other weights, other entry


@pytest.mark.parametrize("stage,key", [("teacher", "autoencoder"), ("ar_teacher", "teacher")])
def test_training_on_the_cache_equals_training_on_frames(setup, stage, key):
    root, episodes, ae_path = setup
    init = ae_path
    if stage == "ar_teacher":
        run("teacher", args(episodes, root / "teacher_in", 1, *FAST, f"init.autoencoder={ae_path}"))
        init = root / "teacher_in" / "model.safetensors"
    got = {}
    for latents in ("false", "true"):
        run_dir = root / f"{stage}_{latents}"
        run(stage, args(episodes, run_dir, 3, *FAST, f"init.{key}={init}", f"data.latents={latents}", "data.batch=3"))
        got[latents] = losses(run_dir)
    assert len(got["true"]) == 3
    torch.testing.assert_close(torch.tensor(got["true"]), torch.tensor(got["false"]), rtol=1e-5, atol=1e-6)


def test_compiled_training_equals_eager(setup):
    root, episodes, ae_path = setup
    got = {}
    for compiled in ("false", "true"):
        run_dir = root / f"compiled_{compiled}"
        run("teacher", args(episodes, run_dir, 2, *FAST, f"init.autoencoder={ae_path}", f"run.compile={compiled}"))
        got[compiled] = losses(run_dir)
    torch.testing.assert_close(torch.tensor(got["true"]), torch.tensor(got["false"]), rtol=1e-4, atol=1e-5)


def test_latents_for_a_world_source_or_a_bad_switch_are_clear_errors(setup, tmp_path):
    root, episodes, ae_path = setup
    with pytest.raises(ValueError, match="data.latents=true needs data.source=recordings"):
        run("teacher", ["preset=tiny", "data.source=world", "data.world_options.height=32",
                        "data.world_options.width=32", f"run.dir={tmp_path / 'w'}", "run.steps=1",
                        "data.latents=true", f"init.autoencoder={ae_path}"])
    with pytest.raises(ValueError, match="run.compile must be true, false or auto"):
        run("teacher", args(episodes, tmp_path / "c", 1, f"init.autoencoder={ae_path}", "run.compile=sometimes"))
    with pytest.raises(ValueError, match="run.compile_mode must be one of"):
        run("teacher", args(episodes, tmp_path / "m", 1, f"init.autoencoder={ae_path}", "run.compile=true",
                            "run.compile_mode=reduce-overhead"))


@pytest.mark.parametrize("clean", [False, True])
def test_flex_block_masks_equal_dense_masks(clean):
    torch.manual_seed(0)
    cfg = DiTConfig(latent_channels=4, latent_height=8, latent_width=8, dim=32, depth=2, heads=2, window_frames=6,
                    block_size=2)
    dit = WorldDiT(cfg).double()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    b, t = 2, 5
    x = torch.randn(b, t, 4, 8, 8, dtype=torch.float64)
    sigma, actions = torch.rand(b, t, dtype=torch.float64), torch.randn(b, t, 7, dtype=torch.float64)
    poses = torch.eye(4, dtype=torch.float64).repeat(b, t, 1, 1)
    poses[..., 0, 3] = torch.randn(b, t, dtype=torch.float64)
    extra = {"clean": torch.randn_like(x)} if clean else {}
    with torch.no_grad():  # FlexAttention has no CPU backward; the GPU trains through it compiled
        dense = dit(x, sigma, actions, poses, mode="causal", **extra)
        dit.attention = "flex"
        flex = dit(x, sigma, actions, poses, mode="causal", **extra)
    torch.testing.assert_close(flex, dense, rtol=1e-10, atol=1e-12)
