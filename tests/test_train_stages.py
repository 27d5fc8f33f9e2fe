"""Every stage runs a few steps on the tiny preset from recordings (CPU), chained as in the real
pipeline; a run killed between checkpoints and resumed equals an uninterrupted one bit for bit;
wrong inputs and configs are refused with one clear line."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from train import trainer as trainer_module
from train.__main__ import main
from train.bench import write_synthetic
from train.inputs import StageInputError, check_same_autoencoder, kept_blocks, rebuilt
from train.config import compose
from train.trainer import run
from worldmodel import checkpoint
from worldmodel.actions import ActionSpec, make_action
from worldmodel.camera import ControllerSpec, integrate
from worldmodel.model import PRESETS, WorldModel, build_model
from worldmodel.session import Session

REPO = Path(__file__).resolve().parents[1]
FAST = ["optim.warmup_steps=1", "optim.lr=1e-3"]  # upstream stages move visibly in 3 steps
ODE = ["ode.num_batches=2", "ode.grid_steps=8"]


def write_episodes(root: Path, count: int = 2, length: int = 12, size: int = 32) -> Path:
    """Recordings whose frames depend on the camera yaw (so there is something to learn)."""
    return write_synthetic(root, count, length, (size, size))


@pytest.fixture(scope="module")
def episodes(tmp_path_factory) -> Path:
    return write_episodes(tmp_path_factory.mktemp("episodes"))


def args(episodes: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["preset=tiny", "data.source=recordings", f"data.recordings={episodes}", f"run.dir={run_dir}",
            f"run.steps={steps}", *extra]


@pytest.fixture(scope="module")
def chain(episodes, tmp_path_factory) -> dict[str, Path]:
    """The whole pipeline, a few steps per stage: stage name -> run dir."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {}

    def stage(name, key, steps, *extra):
        dirs[key] = root / key
        run(name, args(episodes, dirs[key], steps, *extra))

    stage("autoencoder", "autoencoder", 3, *FAST)
    stage("teacher", "teacher", 3, *FAST, f"init.autoencoder={dirs['autoencoder']}/model.safetensors",
          "run.sample_every=3", "sample.steps=4")
    stage("ar_teacher", "ar_teacher", 3, *FAST, f"init.teacher={dirs['teacher']}/model.safetensors",
          "run.sample_every=3", "sample.steps=4")
    stage("causal_cd", "causal_cd", 2, f"init.teacher={dirs['ar_teacher']}/model.safetensors", "run.sample_every=2")
    stage("causal_ode", "causal_ode", 2, f"init.teacher={dirs['ar_teacher']}/model.safetensors", *ODE)
    stage("causal_scm", "causal_scm", 2, f"init.teacher={dirs['ar_teacher']}/model.safetensors")
    stage("causal_ode", "causal_ode_bidirectional", 2, f"init.teacher={dirs['teacher']}/model.safetensors",
          "ode.trajectories=bidirectional", *ODE)
    stage("dmd", "dmd", 3, f"init.student={dirs['causal_cd']}/model.safetensors",
          f"init.teacher={dirs['teacher']}/model.safetensors", "dmd.critic_updates=2", "run.sample_every=3")
    return dirs


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


EXPECTED_LOSS = {"autoencoder": "loss", "teacher": "loss", "ar_teacher": "loss", "causal_cd": "loss",
                 "causal_ode": "loss", "causal_ode_bidirectional": "loss", "causal_scm": "loss", "dmd": "critic_loss"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_files_hold_training_settings_whose_clips_fit_the_cache(preset):
    """train/configs/model/<preset>.yaml adds only training settings to worldmodel.model.PRESETS, and its
    clips fit the preset's KV window + sink frames (as the files' comments say)."""
    from omegaconf import OmegaConf

    cfg, _ = compose("teacher", [f"preset={preset}"])
    dit = PRESETS[preset]["dit"]
    assert cfg.data.clip_len <= dit["window_frames"] + dit["sink_frames"]
    assert "model" not in OmegaConf.load(REPO / "train" / "configs" / "model" / f"{preset}.yaml")


@pytest.mark.parametrize("key", list(EXPECTED_LOSS))
def test_every_stage_trains_and_exports_a_loadable_model(chain, key):
    run_dir = chain[key]
    model = checkpoint.load(run_dir / "model.safetensors")
    assert model.config.stage == key.replace("_bidirectional", "")
    losses = [r[EXPECTED_LOSS[key]] for r in read_log(run_dir) if EXPECTED_LOSS[key] in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert "dit" in (run_dir / "config.yaml").read_text()  # the resolved config, model included


def test_autoencoder_export_normalises_latents(chain, episodes):
    model = checkpoint.load(chain["autoencoder"] / "model.safetensors")
    assert not torch.equal(model.autoencoder.latent_scale, torch.ones_like(model.autoencoder.latent_scale))


def test_autoencoder_goes_on_from_any_stage_checkpoint(chain, episodes, tmp_path):
    """A warm start continues the given autoencoder: a step at a negligible rate exports its weights."""
    source = checkpoint.load(chain["causal_cd"] / "model.safetensors")
    run("autoencoder", args(episodes, tmp_path / "ae0", 1, "optim.lr=1e-12",
                            f"init.autoencoder={chain['causal_cd']}/model.safetensors"))
    same = checkpoint.load(tmp_path / "ae0" / "model.safetensors").autoencoder.state_dict()
    for name, value in source.autoencoder.state_dict().items():
        if not name.startswith("latent_"):  # the latent statistics are measured again on export
            torch.testing.assert_close(same[name], value, rtol=0, atol=1e-9, msg=name)
    run("autoencoder", args(episodes, tmp_path / "ae2", 2, *FAST, f"init.autoencoder={chain['causal_cd']}/model.safetensors"))
    moved = checkpoint.load(tmp_path / "ae2" / "model.safetensors").autoencoder.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in source.autoencoder.state_dict().items())


def test_autoencoder_widens_a_narrower_input(chain, episodes, tmp_path, capsys):
    """More latent channels than the input's: the exported autoencoder codes the input's channels as the
    input did (one step at a negligible rate), its new ones are trained in, and a teacher runs on it."""
    source = checkpoint.load(chain["autoencoder"] / "model.safetensors").autoencoder
    wider = source.config.latent_channels + 2
    init = f"init.autoencoder={chain['autoencoder']}/model.safetensors"
    run("autoencoder", args(episodes, tmp_path / "wide", 1, "optim.lr=1e-12", init,
                            f"model.autoencoder.latent_channels={wider}"))
    wide = checkpoint.load(tmp_path / "wide" / "model.safetensors")
    assert wide.config.autoencoder.latent_channels == wider
    frames = torch.rand(1, 2, 3, source.config.frame_height, source.config.frame_width) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(wide.autoencoder.encode_moments(frames)[0][:, :, :wider - 2],
                                   source.encode_moments(frames)[0], rtol=0, atol=1e-5)
    run("teacher", args(episodes, tmp_path / "t", 1, f"init.autoencoder={tmp_path}/wide/model.safetensors"))
    capsys.readouterr()  # the runs' progress bars
    err = cli_error(capsys, ["autoencoder", *args(episodes, tmp_path / "x", 1, init, "autoencoder.train_encoder=false",
                                                 f"model.autoencoder.latent_channels={wider}")])
    assert "needs its encoder trained" in err


def test_teacher_starts_from_any_stage_autoencoder_unchanged(chain, episodes, tmp_path):
    """A teacher started from a student keeps the student's autoencoder bit for bit (so a later student
    shares the shipped latent space) and the DiT and sampler a teacher from an autoencoder run gets."""
    student = checkpoint.load(chain["causal_cd"] / "model.safetensors")
    run("teacher", args(episodes, tmp_path / "t", 1, *FAST, "sample.steps=4",
                        f"init.autoencoder={chain['causal_cd']}/model.safetensors"))
    teacher = checkpoint.load(tmp_path / "t" / "model.safetensors")
    from_autoencoder = checkpoint.load(chain["teacher"] / "model.safetensors").config
    assert teacher.config.stage == "teacher"
    assert teacher.config.dit == from_autoencoder.dit and teacher.config.sampler == from_autoencoder.sampler
    for name, value in student.autoencoder.state_dict().items():
        assert torch.equal(teacher.autoencoder.state_dict()[name], value), name
    assert not torch.equal(teacher.dit.final.weight, student.dit.final.weight)


def test_dmd_generator_is_updated_on_its_turns_only(chain):
    records = [r for r in read_log(chain["dmd"]) if "critic_loss" in r]
    assert ["generator_loss" in r for r in records] == [True, False, True]  # critic_updates=2


def test_dmd_long_rollout_scores_its_last_frames(chain, episodes, tmp_path, monkeypatch):
    """dmd.score_frames: an 11-frame rollout past the tiny preset's 7-frame cache, its first 6 frames played
    without gradient, and both losses on its last 5 frames."""
    from train import algorithms as alg

    seen = []

    def spy(name, what):  # records what(args, result) of each call of train.algorithms.NAME
        real = getattr(alg, name)

        def wrapped(*a, **k):
            out = real(*a, **k)
            seen.append((name, what(a, out)))
            return out
        monkeypatch.setattr(alg, name, wrapped)

    spy("self_forcing_rollout", lambda a, out: (out.shape[1], a[5]))  # frames played, trained from
    spy("dmd_loss", lambda a, out: a[0].shape[1])  # frames scored
    spy("critic_loss", lambda a, out: a[1].shape[1])
    run_dir = tmp_path / "dmd_long"
    run("dmd", args(episodes, run_dir, 2, f"init.student={chain['causal_cd']}/model.safetensors",
                    f"init.teacher={chain['teacher']}/model.safetensors", "dmd.critic_updates=1", "data.clip_len=11",
                    "dmd.score_frames=5"))
    assert seen == [("self_forcing_rollout", (11, 6)), ("dmd_loss", 5), ("critic_loss", 5)] * 2
    records = [r for r in read_log(run_dir) if "critic_loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["generator_loss"]) for r in records)
    assert checkpoint.load(run_dir / "model.safetensors").config.stage == "dmd"


@pytest.mark.parametrize("clip_len,score_frames,block_size,start", [(13, 0, 1, 0), (13, 13, 1, 0), (49, 13, 1, 36),
                                                                    (49, 12, 4, 37), (9, 2, 1, 7)])
def test_dmd_scored_window_starts_a_block(clip_len, score_frames, block_size, start):
    from train.dmd import scored_from

    assert scored_from(clip_len, score_frames, block_size) == start


@pytest.mark.parametrize("clip_len,score_frames,block_size", [(13, 1, 1), (13, 14, 1), (49, 13, 4), (13, -1, 1)])
def test_dmd_rejects_a_scored_window_off_the_blocks(clip_len, score_frames, block_size):
    from train.config import TrainConfigError
    from train.dmd import scored_from

    with pytest.raises(TrainConfigError, match="dmd.score_frames"):
        scored_from(clip_len, score_frames, block_size)


def test_sample_videos_are_written(chain):
    import imageio.v3 as iio

    for key in ("teacher", "ar_teacher", "causal_cd", "dmd"):
        (video,) = (chain[key] / "samples").glob("*.mp4")
        frames = iio.imread(video)
        assert frames.shape == (5, 32, 64, 3)  # real | generated, 5 frames


def test_teachers_export_their_euler_sampler_and_students_the_few_step_one(chain):
    from worldmodel.flow import sigma_grid

    teacher = checkpoint.load(chain["ar_teacher"] / "model.safetensors").config.sampler
    assert teacher.solver == "euler" and teacher.guidance == 1.0  # ar_teacher.yaml's sample.guidance
    assert list(teacher.steps) == pytest.approx(sigma_grid(4, 1.0)[:-1].tolist())  # sample.steps=4, ar_teacher.yaml shift
    for key in ("causal_cd", "causal_ode", "causal_scm", "dmd"):
        sampler = checkpoint.load(chain[key] / "model.safetensors").config.sampler
        assert sampler.solver == "renoise" and list(sampler.steps) == [1.0, 0.5] and sampler.guidance == 1.0
    session = Session(checkpoint.load(chain["ar_teacher"] / "model.safetensors"))
    assert session.solver == "euler" and len(session.steps) == 4


def test_distilled_model_plays_in_a_session(chain):
    model = checkpoint.load(chain["dmd"] / "model.safetensors")
    session = Session(model)
    session.reset(torch.zeros(32, 32, 3, dtype=torch.uint8))
    frame = session.step(make_action(model.action_spec, ["W"], dx=5)[None]).frames
    assert frame.shape == (1, 32, 32, 3) and frame.dtype == torch.uint8


def test_kept_blocks_are_evenly_spaced_and_keep_both_ends():
    assert kept_blocks(6, 6) == [0, 1, 2, 3, 4, 5]
    assert kept_blocks(6, 4) == [0, 2, 3, 5]
    assert kept_blocks(6, 3) == [0, 2, 5]
    assert kept_blocks(6, 1) == [5]
    with pytest.raises(StageInputError, match="depth 7"):
        kept_blocks(6, 7)


def test_a_shallower_rebuild_takes_the_kept_blocks_and_every_other_weight(chain):
    teacher = checkpoint.load(chain["ar_teacher"] / "model.safetensors")
    cfg = OmegaConf.merge(teacher.config, {"dit": {"depth": 1, "window_frames": 3}})
    small = rebuilt(cfg, teacher)
    assert len(small.dit.blocks) == 1 and small.dit.cfg.window_frames == 3
    state, small_state = teacher.state_dict(), small.state_dict()
    for name, value in small_state.items():
        source = name.replace("dit.blocks.0.", "dit.blocks.1.")
        assert torch.equal(value, state[source]), name
    assert len(state) - len(small_state) == len(teacher.dit.blocks[0].state_dict())


def test_a_smaller_tier_student_distils_from_the_full_teacher_and_plays(chain, episodes, tmp_path):
    """One block of the tiny teacher's two and a shorter KV window (model.dit.depth / window_frames); the
    frozen teacher keeps both blocks and its weights."""
    overrides = args(episodes, tmp_path / "cpu", 2, f"init.teacher={chain['ar_teacher']}/model.safetensors",
                     "model.dit.depth=1", "model.dit.window_frames=3", "data.clip_len=4")
    trainer = trainer_module.Trainer("causal_cd", overrides)
    source = checkpoint.load(chain["ar_teacher"] / "model.safetensors").dit.state_dict()
    teacher = trainer.stage.teacher.state_dict()
    assert len(trainer.stage.teacher.blocks) == 2 and len(trainer.stage.student.blocks) == 1
    assert teacher.keys() == source.keys() and all(torch.equal(teacher[k], source[k]) for k in source)
    trainer.train()
    model = checkpoint.load(tmp_path / "cpu" / "model.safetensors")
    assert len(model.dit.blocks) == 1 and model.dit.cfg.window_frames == 3
    session = Session(model)
    session.reset(torch.zeros(32, 32, 3, dtype=torch.uint8))
    for _ in range(6):  # past the window
        frame = session.step(make_action(model.action_spec, ["W"], dx=5)[None]).frames
    assert frame.shape == (1, 32, 32, 3)


def test_distillation_goes_on_from_an_earlier_student(chain, episodes, tmp_path, capsys):
    """init.student starts causal CD from that student, not from the teacher (a step at a negligible rate
    exports the student's weights); a student of another DiT size or of a teacher stage is refused."""
    student = checkpoint.load(chain["causal_cd"] / "model.safetensors")
    teacher = checkpoint.load(chain["ar_teacher"] / "model.safetensors")
    run("causal_cd", args(episodes, tmp_path / "cd", 1, "optim.lr=1e-12", f"init.teacher={chain['ar_teacher']}/model.safetensors",
                          f"init.student={chain['causal_cd']}/model.safetensors"))
    went_on = checkpoint.load(tmp_path / "cd" / "model.safetensors").dit.state_dict()
    for name, value in student.dit.state_dict().items():
        torch.testing.assert_close(went_on[name], value, rtol=0, atol=1e-9, msg=name)
    assert any(not torch.equal(student.dit.state_dict()[k], v) for k, v in teacher.dit.state_dict().items())
    config = student.config.copy()
    config.dit.mlp_ratio = 2.0
    wider = WorldModel(config)
    wider.autoencoder.load_state_dict(student.autoencoder.state_dict())
    checkpoint.save(tmp_path / "wider.safetensors", wider)
    capsys.readouterr()  # the run above's progress bars
    for path, expected in ((tmp_path / "wider.safetensors", "differs from init.teacher's in ['mlp_ratio']"),
                           (chain["teacher"] / "model.safetensors", "produced by stage 'teacher'")):
        err = cli_error(capsys, ["causal_cd", *args(episodes, tmp_path / "r", 1), f"init.student={path}",
                                 f"init.teacher={chain['ar_teacher']}/model.safetensors"])
        assert expected in err


def checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:09d}.safetensors"))


RESUME_CASES = {
    "autoencoder": lambda c: [f"init.autoencoder={c['autoencoder']}/model.safetensors", "autoencoder.train_encoder=false",
                              "autoencoder.adversarial_weight=0.5", "autoencoder.discriminator_channels=[8,16]"],
    "teacher": lambda c: ["optim.warmup_steps=1", f"init.autoencoder={c['autoencoder']}/model.safetensors"],
    "causal_ode": lambda c: [f"init.teacher={c['ar_teacher']}/model.safetensors", "ode.num_batches=3", "ode.grid_steps=8"],
    "causal_scm": lambda c: [f"init.teacher={c['ar_teacher']}/model.safetensors", "scm.tangent_warmup=3"],
    "dmd": lambda c: [f"init.student={c['causal_cd']}/model.safetensors",
                      f"init.teacher={c['teacher']}/model.safetensors", "dmd.critic_updates=2"],
}


@pytest.mark.parametrize("stage", list(RESUME_CASES))
def test_killed_run_resumes_to_the_same_weights(chain, episodes, tmp_path, monkeypatch, stage):
    extra = [*RESUME_CASES[stage](chain), "run.checkpoint_every=2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(stage, args(episodes, whole, 4, *extra))

    cls = trainer_module.stage_class(stage)
    original = cls.train_step

    def dies_at_step_3(self, batch, rng):
        if rng.step == 3:
            raise KeyboardInterrupt  # killed after step 3 of 4 ran, one step past the checkpoint at 2
        return original(self, batch, rng)

    monkeypatch.setattr(cls, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(stage, args(episodes, killed, 4, *extra))
    monkeypatch.setattr(cls, "train_step", original)
    run(stage, args(episodes, killed, 4, *extra))

    a, b = checkpoint_tensors(whole, 4), checkpoint_tensors(killed, 4)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = lambda log: [{k: v for k, v in r.items() if "second" not in k} for r in log if "critic_loss" in r or "loss" in r]  # noqa: E731
    assert losses(read_log(whole)) == losses(read_log(killed))


def test_two_ranks_match_one_rank_at_the_same_global_batch(chain, episodes, tmp_path):
    """torchrun with 2 CPU ranks (gloo): the same losses as 1 rank, the same weights to float precision."""
    extra = ["optim.warmup_steps=1", f"init.autoencoder={chain['autoencoder']}/model.safetensors", "data.batch=4"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "train", "teacher", *args(episodes, one, 2, *extra)], check=True, env=env,
                   capture_output=True, cwd=REPO)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           "-m", "train", "teacher", *args(episodes, two, 2, *extra)], env=env, capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    for r1, r2 in zip(read_log(one), read_log(two)):
        if "loss" in r1:
            assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5, abs=1e-7)
    a, b = checkpoint_tensors(one, 2), checkpoint_tensors(two, 2)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_batches_are_a_function_of_the_step(episodes):
    """Resume needs no loader state: the batch of step k is the same from any start, with any
    number of workers, and two ranks together see the one-rank batch."""
    from omegaconf import OmegaConf

    from train.data import StepBatches

    cfg = OmegaConf.create({"source": "recordings", "recordings": str(episodes), "clip_len": 5, "batch": 4, "workers": 0})
    one = StepBatches(cfg, seed=3)
    from_zero = one.loader(0)
    expected = [next(from_zero) for _ in range(6)]  # more than one epoch of the 16 clips
    assert not torch.equal(expected[0]["frames"], expected[1]["frames"])
    resumed = next(one.loader(4, workers=2))
    for k in resumed:  # true poses are NaN in these recordings
        torch.testing.assert_close(resumed[k], expected[4][k], rtol=0, atol=0, equal_nan=True)
    halves = [next(StepBatches(cfg, seed=3, rank=r, world_size=2).loader(4)) for r in (0, 1)]
    assert torch.equal(torch.cat([h["frames"] for h in halves]), expected[4]["frames"])


class FakeWorld:
    """A stand-in world (frames from seeds and steps) to test the world batch source on its own."""

    def __init__(self, batch):
        self.batch, self.action_spec, self.controller = batch, ActionSpec(), ControllerSpec()
        self.height = self.width = 32
        self.fps = 20.0

    def _step(self):
        from types import SimpleNamespace

        frames = (self.seeds[:, None, None, None] * 7 + self.t * 13) % 256 * torch.ones(self.batch, 32, 32, 3)
        return SimpleNamespace(frames=frames.to(torch.uint8), commanded_pose=torch.eye(4).expand(self.batch, 4, 4),
                               true_pose=torch.eye(4).expand(self.batch, 4, 4))

    def reset(self, seeds):
        self.seeds, self.t = torch.tensor(seeds), 0
        return self._step()

    def step(self, actions):
        self.t += 1
        return self._step()

    def close(self):
        pass


def test_world_batches_are_a_function_of_the_step(monkeypatch):
    from types import ModuleType

    from omegaconf import OmegaConf

    from train.data import StepBatches

    envs, policies = ModuleType("worldmodel.envs"), ModuleType("worldmodel.envs.policies")
    envs.make_world = lambda name, batch, device="cpu", **options: FakeWorld(batch)
    policies.make_policy = lambda name, spec, batch, seed: (lambda t, step: torch.zeros(batch, spec.width))
    monkeypatch.setitem(sys.modules, "worldmodel.envs", envs)
    monkeypatch.setitem(sys.modules, "worldmodel.envs.policies", policies)
    cfg = OmegaConf.create({"source": "world", "world": "fake", "world_options": {}, "policy": "mix", "split": "train",
                            "max_warmup": 3, "clip_len": 4, "batch": 2, "workers": 0})
    data = StepBatches(cfg, seed=5)
    assert (data.info.height, data.info.width, data.info.source) == (32, 32, "fake")
    stream = data.loader(0)
    expected = [next(stream) for _ in range(4)]
    assert not torch.equal(expected[2]["frames"], expected[3]["frames"])
    parallel = data.loader(1, workers=2)  # worker w plays every other step; the loader keeps step order
    for step in (1, 2, 3):
        got = next(parallel)
        assert all(torch.equal(got[k], expected[step][k]) for k in got)
    assert expected[0]["frames"].shape == (2, 4, 32, 32, 3)


def test_differentiable_cache_computes_what_the_cache_computes(chain):
    """The self-forcing rollout's cache (concatenation under grad) gives the inference cache's numbers."""
    from train.clips import Clip
    from worldmodel import flow
    from worldmodel.rollout import CachedRollout

    dit = checkpoint.load(chain["causal_cd"] / "model.safetensors").dit
    g = torch.Generator().manual_seed(0)
    actions, poses = torch.rand(2, 5, 7, generator=g), integrate(torch.zeros(2, 5, 7), ActionSpec())[0]
    latents = torch.randn(2, 5, 4, 4, 4, generator=g)
    ours = CachedRollout(dit, Clip(actions, poses))
    plain = CachedRollout(dit, Clip(actions, poses))
    plain.cache = dit.new_cache(2)
    for b in range(3):
        ours.commit(latents[:, b : b + 1], b)
        plain.commit(latents[:, b : b + 1], b)
    x = latents[:, 3:4].clone().requires_grad_(True)
    with torch.no_grad():
        expected = flow.x0_denoiser(plain.block_denoiser(3))(x, 0.7)
    got = flow.x0_denoiser(ours.block_denoiser(3))(x, 0.7)
    torch.testing.assert_close(got, expected)
    ours.commit(got.detach(), 3)  # an in-place write after a forward with grad ...
    got.sum().backward()  # ... leaves its graph intact
    assert x.grad is not None


def test_guidance_in_one_forward_equals_two_forwards(chain):
    from train.clips import Clip
    from train.networks import guided_velocity_fn
    from worldmodel import flow

    dit = checkpoint.load(chain["ar_teacher"] / "model.safetensors").dit
    g = torch.Generator().manual_seed(1)
    clip = Clip(torch.rand(2, 5, 7, generator=g), integrate(torch.zeros(2, 5, 7), ActionSpec())[0])
    x, clean = torch.randn(2, 5, 4, 4, 4, generator=g), torch.randn(2, 5, 4, 4, 4, generator=g)
    sigma = torch.rand(2, 5, generator=g)
    drop = torch.zeros(2, dtype=torch.bool)
    two_calls = lambda x_, s_, cond: dit(x_, s_, clip.actions, clip.poses, mode="causal", clean=clean,  # noqa: E731
                                         cond_keep=None if cond else drop)
    expected = flow.apply_cfg(two_calls(x, sigma, True), two_calls(x, sigma, False), 3.0)
    torch.testing.assert_close(guided_velocity_fn(dit, clip, "causal", 3.0, clean=clean)(x, sigma), expected,
                               rtol=1e-5, atol=1e-6)


def test_a_single_rank_run_stops_at_the_first_step_past_its_time_limit(episodes, tmp_path, monkeypatch):
    """Not at the next multiple of run.log_every (a long DMD step took 0.9 s on an H100, and 50 of them overshot)."""
    cls = trainer_module.stage_class("autoencoder")
    original = cls.train_step

    def slow_step(self, batch, rng):
        time.sleep(1.1)  # past the 1 s limit in one step
        return original(self, batch, rng)

    monkeypatch.setattr(cls, "train_step", slow_step)
    run("autoencoder", args(episodes, tmp_path / "ae", 10, *FAST, "run.log_every=10", "run.time_limit_s=1"))
    assert [r["step"] for r in read_log(tmp_path / "ae") if "step_seconds" in r] == [1]
    assert (tmp_path / "ae" / "model.safetensors").exists()


def test_non_finite_loss_stops_the_run(chain, episodes, tmp_path, monkeypatch):
    cls = trainer_module.stage_class("teacher")
    monkeypatch.setattr(cls, "train_step", lambda self, batch, rng: {"loss": torch.tensor(float("nan"))})
    with pytest.raises(trainer_module.TrainError, match="non-finite at step 1"):
        run("teacher", args(episodes, tmp_path / "r", 2, f"init.autoencoder={chain['autoencoder']}/model.safetensors"))


# ----------------------------------------------------------------------------- refusals


def cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_wrong_input_stage_is_refused(chain, episodes, tmp_path, capsys):
    err = cli_error(capsys, ["ar_teacher", *args(episodes, tmp_path / "r", 1),
                             f"init.teacher={chain['autoencoder']}/model.safetensors"])
    assert "produced by stage 'autoencoder'" in err and "'teacher'" in err


def test_missing_input_is_refused(episodes, tmp_path, capsys):
    assert "init.student is required" in cli_error(capsys, ["dmd", *args(episodes, tmp_path / "r", 1)])


def test_unknown_key_is_refused(capsys):
    assert "unknown config key 'optim.lrr'" in cli_error(capsys, ["teacher", "optim.lrr=1"])


def test_tensorboard_without_its_extra_is_refused_before_training(monkeypatch, capsys):
    from train import config

    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    assert "needs the tensorboard extra" in cli_error(capsys, ["teacher", "run.tensorboard=true", "--print-config"])


def test_model_keys_from_the_input_cannot_change(chain, episodes, tmp_path, capsys):
    err = cli_error(capsys, ["causal_cd", *args(episodes, tmp_path / "r", 1), "model.dit.dim=64",
                             f"init.teacher={chain['ar_teacher']}/model.safetensors"])
    assert "model.dit.dim cannot be changed in stage causal_cd" in err


def test_data_that_does_not_fit_the_model_is_refused(chain, tmp_path, capsys):
    big = write_episodes(tmp_path / "big", size=48)
    err = cli_error(capsys, ["teacher", *args(big, tmp_path / "r", 1), f"init.autoencoder={chain['autoencoder']}/model.safetensors"])
    assert "32x32 frames but the data has 48x48" in err


def test_resume_with_a_changed_config_is_refused(chain, episodes, capsys):
    err = cli_error(capsys, ["autoencoder", *args(episodes, chain["autoencoder"], 3), *FAST, "optim.lr=5e-4"])
    assert "config differs from the saved run in ['optim.lr']" in err


def test_existing_run_is_not_overwritten(chain, episodes, capsys):
    err = cli_error(capsys, ["autoencoder", *args(episodes, chain["autoencoder"], 3), *FAST, "run.resume=false"])
    assert "already holds checkpoints" in err


def test_trajectories_of_other_settings_are_not_reused(chain, episodes, tmp_path, capsys):
    shutil.copytree(chain["causal_ode"] / "trajectories", tmp_path / "r" / "trajectories")
    err = cli_error(capsys, ["causal_ode", *args(episodes, tmp_path / "r", 1), *ODE, "ode.guidance=2.0",
                             f"init.teacher={chain['ar_teacher']}/model.safetensors"])
    assert "generated with other settings" in err


def test_models_with_different_latent_spaces_are_refused_and_other_decoders_accepted():
    a, b = build_model("tiny", seed=0), build_model("tiny", seed=1)
    with pytest.raises(StageInputError, match="different encoder weights or latent statistics"):
        check_same_autoencoder(a, b, "init.student and init.teacher")
    b.autoencoder.encoder.load_state_dict(a.autoencoder.encoder.state_dict())
    check_same_autoencoder(a, b, "init.student and init.teacher")  # the decoders differ
    b.autoencoder.latent_scale.mul_(1.5)
    with pytest.raises(StageInputError, match="different encoder weights or latent statistics"):
        check_same_autoencoder(a, b, "init.student and init.teacher")


def test_context_noise_trains_on_a_noised_history_and_zero_is_the_clean_one(chain, episodes, tmp_path):
    """flow.context_noise=0 computes exactly the clean-history loss; a positive level changes it."""
    init = f"init.teacher={chain['teacher']}/model.safetensors"
    got = {}
    for level in ("0.0", "0.3"):
        run("ar_teacher", args(episodes, tmp_path / level, 2, *FAST, init, f"flow.context_noise={level}"))
        got[level] = [r["loss"] for r in read_log(tmp_path / level) if "loss" in r]
    clean = [r["loss"] for r in read_log(chain["ar_teacher"]) if "loss" in r][:2]
    assert got["0.0"] == pytest.approx(clean, rel=1e-6, abs=1e-7)
    assert all(math.isfinite(v) for v in got["0.3"]) and got["0.3"] != clean  # the tiny net barely reads its history yet


def test_noised_history_per_block_levels_and_noise():
    """Level 0: the clean history itself. Otherwise each block of each clip gets one level uniform in
    [0, level], and the history is (1 - s) x0 + s eps with eps the step's "context_noise" draw (float64)."""
    from train.stages import noised_history
    from train.trainer import StepRandom
    from worldmodel.transformer import block_ids

    x0 = torch.randn(64, 7, 2, 3, 3, dtype=torch.float64)
    blocks = block_ids(7, 2)  # the first frame, then blocks of 2
    rng = StepRandom(int(torch.randint(0, 1000, ())), 3, 0, 1, torch.device("cpu"))
    same, none = noised_history(x0, 0.0, blocks, rng)
    assert same is x0 and none is None
    history, sigma = noised_history(x0, 0.2, blocks, rng)
    assert sigma.shape == (64, 7) and 0 <= sigma.min() and sigma.max() <= 0.2 and sigma.std() > 0.03
    for b in range(int(blocks.max()) + 1):
        frames = (blocks == b).nonzero().flatten()
        assert torch.equal(sigma[:, frames], sigma[:, frames[:1]].expand(-1, len(frames)))
    eps = torch.randn(x0.shape, generator=rng.generator("context_noise")).double()
    s = sigma.double()[..., None, None, None]
    torch.testing.assert_close(history, (1 - s) * x0 + s * eps, rtol=1e-6, atol=1e-6)


def test_causal_cd_with_context_noise_trains_and_exports_its_play_level(chain, episodes, tmp_path):
    """cd.context_noise changes what the student learns from (its loss differs from the clean history's), and
    model.sampler.context_noise is the level the exported student plays with."""
    init = f"init.teacher={chain['ar_teacher']}/model.safetensors"
    losses = {}
    for level in ("0.0", "0.3"):
        run("causal_cd", args(episodes, tmp_path / level, 2, init, f"cd.context_noise={level}",
                              f"model.sampler.context_noise={float(level) / 3}"))
        losses[level] = [r["loss"] for r in read_log(tmp_path / level) if "loss" in r]
        assert checkpoint.load(tmp_path / level / "model.safetensors").config.sampler.context_noise == float(level) / 3
    assert all(math.isfinite(v) for v in losses["0.3"]) and losses["0.3"] != losses["0.0"]


def test_exports_on_the_run_clock_load_as_models(chain, episodes, tmp_path):
    run_dir = tmp_path / "timed"
    run("teacher", args(episodes, run_dir, 3, f"init.autoencoder={chain['autoencoder']}/model.safetensors",
                        "run.log_every=1", "run.export_every_s=0.001"))
    exports = [r for r in read_log(run_dir) if "export" in r]
    assert [r["step"] for r in exports] == [1, 2]  # every log step but the last (the final export is model.safetensors)
    assert all(a["run_seconds"] < b["run_seconds"] for a, b in zip(exports, exports[1:]))
    for record in exports:
        assert checkpoint.load(record["export"]).config.stage == "teacher"


def test_decoder_alone_keeps_the_latent_space_and_trains_against_a_discriminator(chain, episodes, tmp_path):
    """autoencoder.train_encoder=false: the encoder and the latent statistics stay the input's bit for bit
    (so the input's DiT still fits), the decoder moves, the discriminator trains from the first step and its
    term reaches the decoder from adversarial_start on."""
    source = checkpoint.load(chain["causal_cd"] / "model.safetensors")
    run("autoencoder", args(episodes, tmp_path / "dec", 3, *FAST, "autoencoder.train_encoder=false",
                            "autoencoder.adversarial_weight=0.5", "autoencoder.adversarial_start=1",
                            "autoencoder.discriminator_channels=[8,16]", "run.log_every=1",
                            f"init.autoencoder={chain['causal_cd']}/model.safetensors"))
    tuned = checkpoint.load(tmp_path / "dec" / "model.safetensors").autoencoder.state_dict()
    for name, value in source.autoencoder.state_dict().items():
        if not name.startswith("decoder."):
            assert torch.equal(tuned[name], value), name
    assert any(not torch.equal(tuned[k], v) for k, v in source.autoencoder.state_dict().items() if k.startswith("decoder."))
    rows = [r for r in read_log(tmp_path / "dec") if "loss" in r]
    assert all("discriminator_loss" in r for r in rows)  # the discriminator trains from the first step
    assert "adversarial" not in rows[0] and all(r["adversarial_weight"] >= 0 for r in rows[1:])
    saved = load_file(sorted((tmp_path / "dec" / "checkpoints").glob("*.safetensors"))[-1])
    assert any(k.startswith("module/discriminator/") for k in saved)


def test_a_copied_run_resumes_in_its_new_folder_with_another_adversarial_weight(chain, episodes, tmp_path, capsys):
    """A fork: run a copied to b resumes there with the adversarial term 4x stronger; a itself goes on at
    its own weight. At the first step after the fork both share the state, so b logs 4x a's weight."""
    extra = lambda w: [*FAST, "autoencoder.train_encoder=false", f"autoencoder.adversarial_weight={w}",  # noqa: E731
                       "autoencoder.adversarial_start=1", "autoencoder.discriminator_channels=[8,16]", "run.log_every=1",
                       "run.checkpoint_every=2", f"init.autoencoder={chain['causal_cd']}/model.safetensors"]
    a, b = tmp_path / "a", tmp_path / "b"
    run("autoencoder", args(episodes, a, 2, *extra(0.5)))
    shutil.copytree(a, b)
    run("autoencoder", args(episodes, a, 4, *extra(0.5), "run.resume=true"))
    run("autoencoder", args(episodes, b, 4, *extra(2.0), "run.resume=true"))
    assert OmegaConf.load(b / "config.yaml").autoencoder.adversarial_weight == 2.0
    rows = {d: {r["step"]: r for r in read_log(d) if "loss" in r} for d in (a, b)}
    assert rows[a][2] == rows[b][2] and sorted(rows[b]) == [1, 2, 3, 4]
    assert rows[b][3]["adversarial_weight"] == pytest.approx(4 * rows[a][3]["adversarial_weight"], rel=1e-6)
    capsys.readouterr()  # the runs' progress bars
    err = cli_error(capsys, ["autoencoder", *args(episodes, b, 6, *extra(2.0), "run.resume=true",
                                                 "autoencoder.adversarial_start=2")])
    assert "config differs from the saved run in ['autoencoder.adversarial_start']" in err


def test_decoder_alone_needs_an_autoencoder_to_start_from(episodes, tmp_path, capsys):
    assert main(["autoencoder", *args(episodes, tmp_path / "x", 1, "autoencoder.train_encoder=false")]) == 2
    assert "set init.autoencoder" in capsys.readouterr().err
