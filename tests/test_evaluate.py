import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from train import evaluate as ev
from train.evaluate import evaluation
from train.idm import idm_loss, training_pairs
from worldmodel import metrics
from worldmodel.actions import ActionSpec
from worldmodel.camera import ControllerSpec, integrate
from worldmodel.idm import IDMConfig, IDMError, InverseDynamics, controllability, load_idm, save_idm

SPEC, CTRL = ActionSpec(), ControllerSpec()


# ---------------------------------------------------------------- fake models (test fixtures)


def shifted(start: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``start [B, H, W, 3]`` rolled sideways by ``shift [B]`` pixels each."""
    return torch.stack([torch.roll(s, int(k), dims=1) for s, k in zip(start, shift)])


def toy_world(start: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """A toy ground truth: the view pans by the rounded mouse dx / 4 pixels each frame -> ``[B, T, H, W, 3]``."""
    pan = torch.cumsum((actions[..., -2] / 4).round(), 1)
    return torch.stack([shifted(start, pan[:, t]) for t in range(actions.shape[1])], 1)


def record(frames):
    """The part of a session's step record the evaluation reads."""
    return SimpleNamespace(frames=frames)


class CopySession:
    """Repeats the last frame in its cache (frame-wise: steps of one-frame blocks)."""

    def __init__(self, batch, seed):
        self.batch = batch

    def reset(self, start):
        self.last = start.clone()
        return record(start.clone())

    def step(self, actions, force_frame=None, force_rows=None):
        out = self.last.clone()
        if force_frame is None:
            self.last = out
        else:
            forced = force_frame[:, 0]
            self.last = forced.clone() if force_rows is None else out.index_copy(0, force_rows, forced)
        return record(out[:, None])

    def narrow(self, batch):
        """Keep the first ``batch`` rows of every per-row tensor."""
        self.batch = batch
        for name, value in list(vars(self).items()):
            if torch.is_tensor(value):
                setattr(self, name, value[:batch])


class ActionBlindSession(CopySession):
    """Pans one pixel per frame whatever the actions."""

    def reset(self, start):
        self.start, self.t = start.clone(), 0
        return record(start.clone())

    def step(self, actions, force_frame=None, force_rows=None):
        self.t += 1
        return record(shifted(self.start, torch.full((self.batch,), self.t))[:, None])


class ToyOracleSession(CopySession):
    """Follows the toy world exactly."""

    def reset(self, start):
        self.start, self.pan = start.clone(), torch.zeros(self.batch)
        return record(start.clone())

    def step(self, actions, force_frame=None, force_rows=None):
        self.pan = self.pan + (actions[:, 0, -2] / 4).round()
        return record(shifted(self.start, self.pan)[:, None])


class BlockSession(CopySession):
    """Block size 3: frame t is filled with the value t; records the forced frames it saw."""

    def reset(self, start):
        self.t, self.forced = 0, []
        return record(torch.zeros_like(start))

    def step(self, actions, force_frame=None, force_rows=None):
        assert actions.shape[1] == 3
        self.forced.append(force_frame)
        frames = [torch.full((self.batch, 4, 4, 3), self.t + i + 1, dtype=torch.uint8) for i in range(3)]
        self.t += 3
        return record(torch.stack(frames, 1))


def random_actions(batch, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = (torch.rand(batch, length, len(SPEC.keys), generator=gen) < 0.3).float()
    mouse = torch.randint(-12, 13, (batch, length, 2), generator=gen).float()
    actions = torch.cat([keys, mouse], -1)
    actions[:, 0] = 0
    return actions


def toy_starts(seeds, size=16):
    """One random start frame per world seed ``[B, size, size, 3]``."""
    return torch.stack([torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(s), dtype=torch.uint8)
                        for s in seeds])


def toy_episodes(batch=3, length=9, size=16, seed=0):
    seeds = [1000 * seed + i for i in range(batch)]
    actions = random_actions(batch, length, seed)
    frames = toy_world(toy_starts(seeds, size), actions)
    return {"frames": frames, "actions": actions, "poses": integrate(actions, SPEC, CTRL)[0], "seeds": seeds}


@pytest.fixture
def toy_ground_truth(monkeypatch):
    """evaluate() with the toy world in place of the held-out worlds."""
    blocks = {("clips", "mix"): 1, ("long", "mix"): 2, ("reference", "mix"): 3, ("long", "gazer"): 4}
    monkeypatch.setattr(evaluation, "heldout_episodes", lambda settings, which, count, length, policy="mix":
                        toy_episodes(count, length, seed=blocks[which, policy]))
    monkeypatch.setattr(evaluation, "replay", lambda settings, seeds, actions: toy_world(toy_starts(seeds), actions))


def tiny_idm(size=16, seed=0):
    torch.manual_seed(seed)
    return InverseDynamics(IDMConfig("procedural", SPEC, CTRL, (size, size), size=(16, 16), channels=(8, 8), feature_dim=8)).eval()


# ---------------------------------------------------------------- rollouts and baselines


def test_copying_model_scores_exactly_like_repeat_last_frame():
    ep = toy_episodes()
    truth, start = ep["frames"], ep["frames"][:, 0]
    ar = ev.rollout(CopySession(3, 0), start, ep["actions"])
    tf = ev.rollout(CopySession(3, 0), start, ep["actions"], forced=truth)
    assert torch.equal(ar, ev.repeat_first(truth)) and torch.equal(tf, ev.repeat_previous(truth))
    fid = ev.fidelity_report({"copy": (ar, truth), "repeat": (ev.repeat_first(truth), truth),
                              "copy tf": (tf, truth), "repeat tf": (ev.repeat_previous(truth), truth)}, [1, 4, 8])
    assert fid["rows"]["copy"] == fid["rows"]["repeat"]
    assert fid["rows"]["copy tf"] == fid["rows"]["repeat tf"]
    idm = tiny_idm()
    control = ev.control_report(idm, ep, {"copy": ar, "repeat": ev.repeat_first(truth)})
    assert control["copy"] == control["repeat"]


def test_ground_truth_rows_are_perfect_and_shifted_videos_are_not():
    ep = toy_episodes()
    truth = ep["frames"]
    fid = ev.fidelity_report({"gt": (truth, truth), "shift": (ev.repeat_previous(truth), truth)}, [1, 8])
    assert fid["rows"]["gt"]["psnr"] == {"1": math.inf, "8": math.inf}
    assert fid["rows"]["gt"]["ssim"]["8"] == pytest.approx(1.0, abs=1e-6)
    mse = metrics.mean_squared_error(metrics.uint8_to_frames(truth[:, 7]), metrics.uint8_to_frames(truth[:, 8]))
    assert fid["rows"]["shift"]["psnr"]["8"] == pytest.approx(10 * math.log10(4 / float(mse.mean())), rel=1e-12)
    ssim = metrics.ssim(metrics.uint8_to_frames(truth[:, 7]), metrics.uint8_to_frames(truth[:, 8])).mean()
    assert fid["rows"]["shift"]["ssim"]["8"] == pytest.approx(float(ssim), rel=1e-6)


def test_swap_test_fails_for_a_model_that_ignores_actions_and_passes_for_an_oracle():
    ep = toy_episodes(batch=4, length=10)
    truth, start, actions = ep["frames"], ep["frames"][:, 0], ep["actions"]
    swapped_actions = torch.roll(actions, 1, 0)
    rows = {}
    for name, cls in (("blind", ActionBlindSession), ("oracle", ToyOracleSession), ("copy", CopySession)):
        rows[name] = (ev.rollout(cls(4, 0), start, actions), ev.rollout(cls(4, 0), start, swapped_actions))
    report = ev.swap_report(truth, rows)
    assert report["blind"]["pass_fraction"] == 0.0
    assert report["copy"]["pass_fraction"] == 0.0
    assert report["oracle"]["pass_fraction"] == 1.0
    assert report["oracle"]["mse_own"] == 0.0
    assert report["oracle"]["pass_interval_95"] == pytest.approx(metrics.wilson_interval(4, 4))
    assert report["blind"]["pass_interval_95"] == pytest.approx(metrics.wilson_interval(0, 4))


def test_swap_test_by_horizon_scores_each_prefix_of_the_clip():
    """A rollout under its own actions that matches the truth for 3 frames and then drifts far, against a
    swapped one that is off by a little everywhere: it passes over frames 1-2 and 1-3 and fails later and
    over the whole clip, and each prefix equals the test run on the clip cut to that length."""
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    truth = torch.randint(40, 200, (3, 9, 8, 8, 3), dtype=torch.uint8)
    own, swapped = truth.clone(), truth.clone()
    own[:, 4:] = 255 - own[:, 4:]
    swapped[:, 1:] += 10
    report = ev.swap_report(truth, {"model": (own, swapped)}, horizons=(2, 3, 4, 8, 16))["model"]
    assert report["by_horizon"] == {"2": 1.0, "3": 1.0, "4": 0.0, "8": 0.0}  # 16 > the clip's 8 frames
    assert report["pass_fraction"] == 0.0
    for h in ("2", "4"):
        cut = ev.swap_report(truth[:, : int(h) + 1], {"model": (own[:, : int(h) + 1], swapped[:, : int(h) + 1])})
        assert cut["model"]["pass_fraction"] == report["by_horizon"][h]


def test_rollout_in_blocks_pads_the_last_block_and_forces_frames():
    actions = random_actions(2, 8)
    forced = torch.randint(0, 256, (2, 8, 4, 4, 3), dtype=torch.uint8)
    session = BlockSession(2, 0)
    frames = ev.rollout(session, torch.zeros(2, 4, 4, 3, dtype=torch.uint8), actions, block_size=3, forced=forced)
    assert frames.shape == (2, 8, 4, 4, 3)
    assert [int(frames[0, t, 0, 0, 0]) for t in range(8)] == list(range(8))
    assert torch.equal(session.forced[0], forced[:, 1:4])
    assert torch.equal(session.forced[2], torch.cat([forced[:, 7:8]] * 3, 1))  # frames 7, then padding


def lively_tiny_model(solver: str, block_size: int = 1):
    """The tiny preset with every DiT weight perturbed (its zero-initialised paths open: actions, cache
    and guidance all change the output); ``solver`` "euler" plays as a guided teacher."""
    from worldmodel.model import build_model

    model = build_model("tiny", seed=3, block_size=block_size)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.dit.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    if solver == "euler":
        model.config.sampler = {"solver": "euler", "steps": [1.0, 0.5], "first_frame_steps": [1.0], "guidance": 2.5}
    return model


@pytest.mark.parametrize("solver,block_size", [("renoise", 1), ("euler", 1), ("renoise", 2)])
def test_batched_rollouts_equal_one_session_per_run(solver, block_size):
    """evaluate()'s single batched session (noise groups, teacher forcing of some rows, runs leaving the
    batch, guidance as one doubled forward) gives every run what a session of its own gives: the old,
    unbatched evaluation (float32, CPU)."""
    from worldmodel.session import Session

    model = lively_tiny_model(solver, block_size)
    h, w = model.frame_size
    gen = torch.Generator().manual_seed(1)
    truth, long = (torch.randint(0, 256, (b, t, h, w, 3), generator=gen, dtype=torch.uint8) for b, t in ((3, 6), (2, 10)))
    actions = random_actions(3, 6, seed=1)
    runs = {"autoregressive": ev.Run(truth[:, 0], actions), "teacher-forced": ev.Run(truth[:, 0], actions, forced=truth),
            "swapped": ev.Run(truth[:, 0], torch.roll(actions, 1, 0)), "long": ev.Run(long[:, 0], random_actions(2, 10, seed=2))}
    references = {"autoregressive": truth, "teacher-forced": truth, "swapped": truth, "long": long}
    made = []

    def make_session(batch, seed):
        made.append(Session(model, batch=batch, seed=seed))
        return made[-1]

    batched = ev.rollouts(make_session, runs, 7, block_size)
    assert len(made) == 1 and made[0].batch == 2  # one session; at the end only the long run is left
    for name, run in runs.items():
        alone = Session(model, batch=run.rows, seed=7)
        frames = ev.rollout(alone, run.start, run.actions, block_size, forced=run.forced)
        assert frames.shape == batched[name].shape == references[name].shape
        assert (frames.int() - batched[name].int()).abs().max() <= 1, name
        scores = [ev.fidelity_report({"x": (v, references[name])}, [1, run.length - 1])["rows"]["x"] for v in (frames, batched[name])]
        for metric in ("psnr", "ssim"):
            for at in scores[0][metric]:
                # frames may differ by one level here and there; SSIM near 0 needs an absolute bound
                assert scores[1][metric][at] == pytest.approx(scores[0][metric][at], rel=1e-4, abs=1e-4), (name, metric, at)
    torch.testing.assert_close(made[0]._pending[0], alone._pending[0], atol=1e-4, rtol=1e-4)  # the long run's latents
    torch.testing.assert_close(made[0].cache.k, alone.cache.k, atol=1e-4, rtol=1e-4)
    assert not torch.equal(batched["autoregressive"], batched["swapped"])  # the actions matter
    assert not torch.equal(batched["autoregressive"][:, 2:], batched["teacher-forced"][:, 2:])  # so does forcing


def test_chunked_measures_equal_frame_by_frame():
    """The per-frame measures run over many frames at a time; they equal one frame index at a time."""
    ep = toy_episodes(batch=3, length=7)
    truth, other = ep["frames"], ev.repeat_previous(ep["frames"])
    for chunk in (1, 4, 1000):
        fid = ev.per_frame(lambda g, r: (metrics.mean_squared_error(g, r), metrics.ssim(g, r)), other, truth, chunk=chunk)
        for t in range(truth.shape[1]):
            g, r = metrics.uint8_to_frames(other[:, t]), metrics.uint8_to_frames(truth[:, t])
            torch.testing.assert_close(fid[0][:, t], metrics.mean_squared_error(g, r), rtol=1e-12, atol=0)
            torch.testing.assert_close(fid[1][:, t], metrics.ssim(g, r), rtol=1e-6, atol=1e-7)
    x = metrics.uint8_to_frames(truth).flatten(0, 1)
    stats = ev.window_stats(truth)
    assert stats["sharpness"] == pytest.approx(float(metrics.laplacian_variance(x).mean()) * ev.PIXEL**2, rel=1e-12)
    assert stats["colour_std"] == pytest.approx((metrics.colour_stats(x)[1].mean(0) * ev.PIXEL).tolist(), rel=1e-12)
    distance = ev.clip_distance(other, truth)
    mse = metrics.mean_squared_error(metrics.uint8_to_frames(other[:, 1:]), metrics.uint8_to_frames(truth[:, 1:]))
    torch.testing.assert_close(distance, mse.mean(1), rtol=1e-12, atol=0)


def test_runs_must_come_longest_first():
    ep = toy_episodes(batch=2, length=5)
    short, long = ev.Run(ep["frames"][:, 0], ep["actions"][:, :3]), ev.Run(ep["frames"][:, 0], ep["actions"])
    with pytest.raises(ev.EvalError, match="longest first"):
        ev.play_runs(CopySession(4, 0), [short, long])
    out = ev.rollouts(lambda b, s: CopySession(b, s), {"short": short, "long": long}, seed=0)
    assert out["short"].shape[1] == 3 and out["long"].shape[1] == 5


# ---------------------------------------------------------------- stability, speed and report


def test_stability_report_on_ground_truth_has_zero_frechet_distance():
    ep = toy_episodes(batch=2, length=13)
    idm = tiny_idm()
    report = ev.stability_report(idm, ep, ep["frames"], ep["frames"], window=4)
    assert [w["frames"] for w in report["windows"]] == [[1, 5], [5, 9], [9, 13]]
    for w in report["windows"]:
        assert w["frechet"]["model"] == pytest.approx(0.0, abs=1e-9)
        assert w["frechet"]["ground_truth_reference"] == pytest.approx(0.0, abs=1e-9)
        assert w["frechet"]["repeat_last_frame"] > 0
        assert w["frames_stats"]["model"] == w["frames_stats"]["ground_truth"]
        assert w["controllability"]["model"] == w["controllability"]["ground_truth"]
    # window stats in 0..255 units
    stats = ev.window_stats(torch.full((1, 2, 8, 8, 3), 200, dtype=torch.uint8))
    assert stats["colour_mean"] == pytest.approx([200.0] * 3) and stats["colour_std"] == pytest.approx([0.0] * 3)
    assert stats["sharpness"] == 0.0


def test_plain_and_markdown_helpers():
    assert ev.plain({"a": [math.inf, -math.inf, 1.5], "b": math.nan}) == {"a": ["inf", "-inf", 1.5], "b": "nan"}
    assert ev.fmt(math.inf) == "inf" and ev.fmt(0.12345) == "0.123"
    with pytest.raises(ev.EvalError, match="clips"):
        ev.EvalSettings(world="procedural", clips=1)
    with pytest.raises(ev.EvalError, match="window"):
        ev.EvalSettings(world="procedural", long_frames=10, window=20)


def toy_settings():
    return ev.EvalSettings(world="procedural", clips=3, horizon=6, horizons=(1, 4), long_frames=9, long_clips=2,
                           window=4, speed_frames=3)


def test_full_evaluation_of_a_copying_model_equals_the_baseline(toy_ground_truth, tmp_path):
    report = ev.evaluate(lambda b, s: CopySession(b, s), tiny_idm(), toy_settings(), sheets=tmp_path)
    assert report["sheets"] == {"frames": [0], "long": "long.jpg", "gaze": "gaze.jpg"}  # picks up to long_frames 9
    fid = report["fidelity"]["rows"]
    assert report["fidelity"]["horizons"] == [1, 4, 6]
    assert fid["model (autoregressive)"] == fid["repeat last frame (autoregressive)"]
    assert fid["model (teacher-forced)"] == fid["repeat last frame (teacher-forced)"]
    control = report["controllability"]
    assert control["model (autoregressive)"] == control["repeat last frame"]
    swap = report["swap_test"]
    assert swap["model"]["pass_fraction"] == 0.0 and swap["ground truth"]["pass_fraction"] == 1.0
    for w in report["stability"]["windows"] + report["gaze_stability"]["windows"]:
        assert w["frechet"]["model"] == w["frechet"]["repeat_last_frame"]
        assert w["frames_stats"]["model"] == w["frames_stats"]["repeat_last_frame"]
    assert report["gaze_stability"] != report["stability"]  # other actions, other frames
    ev.write_report(report, tmp_path, "copy")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["fidelity"]["rows"]["ground truth"]["psnr"]["1"] == "inf"
    assert "| model (autoregressive) |" in (tmp_path / "report.md").read_text()
    assert "| 95% interval |" in (tmp_path / "report.md").read_text()
    assert "## Stability while looking up and down" in (tmp_path / "report.md").read_text()
    assert "![gaze rollouts](gaze.jpg)" in (tmp_path / "report.md").read_text()
    for name in ("long.jpg", "gaze.jpg"):  # frame 0 of 2 clips, each truth above model: 4 tiles of 16 x 16
        with Image.open(tmp_path / name) as image:
            assert image.size == (16, 4 * 16 + 3 * 4)
    assert saved["plots"] == ["fidelity.png", "stability.png"]
    for name, size in (("fidelity.png", (1120, 360)), ("stability.png", (1120, 1080))):  # matplotlib at 100 dpi
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size == size and len(image.getcolors(1 << 16) or range(99)) > 10


def test_full_evaluation_of_an_oracle_is_perfect(toy_ground_truth, tmp_path):
    report = ev.evaluate(lambda b, s: ToyOracleSession(b, s), tiny_idm(), toy_settings())
    ev.write_report(report, tmp_path, "oracle")  # infinite PSNR curves still plot
    assert Image.open(tmp_path / "fidelity.png").format == "PNG"
    assert all(math.isinf(v) for v in report["fidelity"]["rows"]["model (autoregressive)"]["psnr"].values())
    assert report["swap_test"]["model"]["pass_fraction"] == 1.0
    assert report["controllability"]["model (autoregressive)"] == report["controllability"]["ground truth"]
    for w in report["stability"]["windows"] + report["gaze_stability"]["windows"]:
        assert w["frechet"]["model"] == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- the IDM


def test_idm_save_load_round_trip_and_errors(tmp_path):
    idm = tiny_idm()
    path = tmp_path / "idm.safetensors"
    save_idm(path, idm)
    loaded = load_idm(path)
    assert loaded.cfg == idm.cfg
    frames = toy_episodes(batch=2, length=4)["frames"]
    a, b = idm.predict(frames), loaded.predict(frames)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(IDMError, match="do not exist"):
        load_idm(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(IDMError, match="not a readable"):
        load_idm(tmp_path / "junk.safetensors")


def test_idm_predictions_are_scaled_forward_outputs():
    idm = tiny_idm()
    frames = toy_episodes(batch=2, length=3)["frames"]
    pred = idm.predict(frames)
    prev, cur = idm.prepare(frames[:, :-1].flatten(0, 1)), idm.prepare(frames[:, 1:].flatten(0, 1))
    raw = idm(prev, cur)
    scale = idm.scales()
    torch.testing.assert_close(pred["mouse"].flatten(0, 1), raw["mouse"] * scale["mouse"])
    torch.testing.assert_close(pred["translation"].flatten(0, 1), raw["translation"] * scale["translation"])
    torch.testing.assert_close(pred["keys"].flatten(0, 1), raw["keys"])


def test_controllability_of_perfect_predictions_is_perfect():
    ep = toy_episodes(batch=2, length=6)
    idm = tiny_idm()
    targets = idm.targets(ep["actions"], ep["poses"])
    scale = idm.scales()
    perfect = {k: targets[k] * scale.get(k, 1.0) for k in ("mouse", "yaw_pitch", "translation")}
    perfect["keys"] = targets["keys"] * 20 - 10
    scores = controllability(perfect, ep["actions"], ep["poses"], len(SPEC.keys))
    assert scores["key_accuracy"] == 1.0 and scores["key_exact"] == 1.0
    for name in ("mouse_error", "yaw_error_deg", "pitch_error_deg", "rotation_error_deg", "translation_error"):
        assert scores[name] == pytest.approx(0.0, abs=1e-3), name
    loss, parts = idm_loss({**{k: targets[k] for k in perfect}, "keys": perfect["keys"]}, targets)
    assert parts["mouse"] == 0.0 and parts["translation"] == 0.0 and parts["keys"] < 1e-4


def test_mirror_swaps_strafe_keys_and_negates_sideways_motion():
    from train.idm import mirror

    idm = tiny_idm()
    ep = toy_episodes(batch=2, length=5)
    targets = {k: v.flatten(0, 1) for k, v in idm.targets(ep["actions"], ep["poses"]).items()}
    prev, cur = idm.prepare(ep["frames"][:, :-1].flatten(0, 1)), idm.prepare(ep["frames"][:, 1:].flatten(0, 1))
    flip = torch.arange(8) % 2 == 0
    p2, c2, t2 = mirror(prev, cur, targets, flip, SPEC.keys)
    assert torch.equal(p2[0], prev[0].flip(-1)) and torch.equal(p2[1], prev[1]) and torch.equal(c2[2], cur[2].flip(-1))
    a, d = SPEC.key_index("A"), SPEC.key_index("D")
    assert torch.equal(t2["keys"][flip][:, [a, d]], targets["keys"][flip][:, [d, a]])
    assert torch.equal(t2["keys"][~flip], targets["keys"][~flip])
    for name in ("mouse", "yaw_pitch", "translation"):
        assert torch.equal(t2[name][flip, 0], -targets[name][flip, 0]) and torch.equal(t2[name][:, 1:], targets[name][:, 1:])
    back = mirror(p2, c2, t2, flip, SPEC.keys)
    assert torch.equal(back[0], prev) and all(torch.equal(back[2][k], targets[k]) for k in targets)
    # the toy world pans by the mouse: a mirrored pair is the pair of the mirrored start under -dx
    start = toy_starts([7])
    pair = toy_world(start, torch.tensor([[[0.0] * 7, [0, 0, 0, 0, 0, 8.0, 0]]]))
    mirrored = toy_world(start.flip(2), torch.tensor([[[0.0] * 7, [0, 0, 0, 0, 0, -8.0, 0]]]))
    assert torch.equal(pair.flip(3), mirrored)


def test_constant_guess_is_the_majority_and_the_mean():
    from train.idm import prior_predictions

    idm = tiny_idm()
    ep = toy_episodes(batch=4, length=6)
    data = training_pairs(idm, ep)
    guess = prior_predictions(idm, data, 2, 3)
    assert guess["keys"].shape == (2, 3, len(SPEC.keys))
    majority = ep["actions"][:, 1:, : len(SPEC.keys)].flatten(0, 1).mean(0) > 0.5
    assert torch.equal(guess["keys"][1, 2] > 0, majority)
    torch.testing.assert_close(guess["mouse"][0, 0], ep["actions"][:, 1:, -2:].flatten(0, 1).mean(0))


def brightness_episodes(batch, length, seed):
    """Toy frames whose left half brightens and right half darkens with the mouse dx of the action that led
    to them (mirror-consistent: a mirrored frame shows the negated dx)."""
    gen = torch.Generator().manual_seed(seed)
    actions = random_actions(batch, length, seed)
    texture = torch.randint(0, 40, (batch, 1, 16, 16, 3), generator=gen)
    side = torch.cat([torch.ones(8), -torch.ones(8)]).view(1, 1, 1, 16, 1)
    frames = (texture + 108 + 8 * side * actions[..., -2, None, None, None]).clamp(0, 255).to(torch.uint8)
    return {"frames": frames, "actions": actions, "poses": integrate(actions, SPEC, CTRL)[0]}


def test_idm_training_learns_a_visible_action():
    from train.idm import train

    idm = tiny_idm(seed=1)
    data = training_pairs(idm, brightness_episodes(24, 8, seed=2))
    losses = train(idm, data, steps=120, batch=64, lr=3e-3, seed=0, device="cpu")
    idm.eval()
    held = brightness_episodes(8, 8, seed=3)
    dx_error = (idm.predict(held["frames"])["mouse"][..., 0] - held["actions"][:, 1:, -2]).abs().mean()
    predicting_zero = held["actions"][:, 1:, -2].abs().mean()
    assert sum(losses[-10:]) < sum(losses[:10])
    assert dx_error < 0.5 * predicting_zero


# ---------------------------------------------------------------- end to end


def test_cli_evaluates_a_tiny_checkpoint_on_the_procedural_world(tmp_path):
    from worldmodel.checkpoint import load, save
    from worldmodel.model import build_model

    ckpt, idm_path = tmp_path / "tiny.safetensors", tmp_path / "idm.safetensors"
    save(ckpt, build_model("tiny", world="procedural"))
    save_idm(idm_path, tiny_idm(size=32))
    common = [str(ckpt), "--world", "procedural", "--clips", "2", "--horizon", "3", "--horizons", "1,2",
              "--long-frames", "6", "--long-clips", "1", "--window", "3", "--speed-frames", "2", "--idm", str(idm_path)]
    assert ev.main(common + ["--out", str(tmp_path / "a")]) == 0
    assert ev.main(common + ["--out", str(tmp_path / "b")]) == 0
    first, second = (json.loads((tmp_path / d / "report.json").read_text()) for d in "ab")
    for report in (first, second):
        report.pop("speed")
    assert first == second  # reproducible for a seed
    assert first["fidelity"]["horizons"] == [1, 2, 3]
    assert first["fidelity"]["rows"]["ground truth"]["psnr"]["3"] == "inf"
    assert first["protocol"]["clip_seeds"][0] >= 1_000_000  # held-out worlds
    text = (tmp_path / "a" / "report.md").read_text()
    assert "## Swap test" in text and "## Speed" in text and "## Autoencoder" in text
    assert first["autoencoder"]["frames"] == 2 * 4  # the clips' frames, start frames included
    assert (tmp_path / "a" / "stability.png").is_file()
    assert ev.main(common + ["--out", str(tmp_path / "c"), "--autoencoder-only"]) == 0
    assert json.loads((tmp_path / "c" / "autoencoder.json").read_text()) == first["autoencoder"]
    assert not (tmp_path / "c" / "report.json").exists()
    save(tmp_path / "ae.safetensors", load(ckpt), part="autoencoder")  # the autoencoder alone measures the same
    assert ev.main([str(tmp_path / "ae.safetensors"), *common[1:], "--out", str(tmp_path / "c2"), "--autoencoder-only"]) == 0
    assert json.loads((tmp_path / "c2" / "autoencoder.json").read_text()) == first["autoencoder"]
    assert ev.main([str(tmp_path / "ae.safetensors"), *common[1:], "--out", str(tmp_path / "c3")]) == 2  # no DiT to roll out
    sheets = [np.asarray(Image.open(tmp_path / d / "autoencoder.png")) for d in "ac"]
    assert first["autoencoder"]["sheet"] == "autoencoder.png" and "![autoencoder](autoencoder.png)" in text
    assert sheets[0].shape == (4 * 32 + 3 * 4, 2 * 32 + 4, 3) and np.array_equal(*sheets)  # 2 clips' start frames
    assert ev.main(common + ["--out", str(tmp_path / "d"), "--guidance", "2.5", "--steps", "1.0"]) == 0
    assert json.loads((tmp_path / "d" / "report.json").read_text())["checkpoint"]["sampler"]["guidance"] == 2.5
    assert ev.main(common + ["--out", str(tmp_path / "e"), "--guidance", "nan"]) == 2
    assert ev.main(common + ["--out", str(tmp_path / "f"), "--kv-cache", "0,7"]) == 0  # the same 7 frames kept
    unsunk = json.loads((tmp_path / "f" / "report.json").read_text())
    assert unsunk["checkpoint"]["kv_cache"] == {"sink_frames": 0, "window_frames": 7}
    assert first["checkpoint"]["kv_cache"] == {"sink_frames": 1, "window_frames": 6}
    assert unsunk["fidelity"] == first["fidelity"] and unsunk["swap_test"] == first["swap_test"]
    for bad in ("1", "0,0", "a,b", "-1,6"):
        assert ev.main(common + ["--out", str(tmp_path / "g"), "--kv-cache", bad]) == 2


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert ev.main([str(tmp_path / "missing.safetensors"), "--world", "procedural", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.safetensors" in err and "\n" not in err


# ---------------------------------------------------------------- the method comparison table


def test_comparison_table_of_an_oracle_and_a_copying_model(toy_ground_truth, tmp_path, capsys):
    from train import compare

    for folder, session in (("cf_pp_2step", ToyOracleSession), ("ar_teacher", CopySession)):
        settings = dataclasses.replace(toy_settings(), horizon=8, horizons=(8,))
        report = ev.evaluate(lambda b, s: session(b, s), tiny_idm(), settings)
        report["checkpoint"] = {"stage": folder, "sampler": {"steps": [1.0, 0.83] if folder == "cf_pp_2step" else [1.0] * 16}}
        report["speed"] = {"first_frame_ms": 7.0, "latency_ms": 3.0, "fps": 300.0, "dtype": "float32"}
        ev.write_report(report, tmp_path / "eval" / folder, folder)
    (tmp_path / "runs" / "causal_cd").mkdir(parents=True)
    (tmp_path / "runs" / "causal_cd" / "log.jsonl").write_text(
        '{"step": 0, "prepare_seconds": 0.1}\n{"step": 300, "loss": 0.5}\n{"step": 300, "wall_seconds": 100.0}\n'
        '{"step": 300, "wall_seconds": 20.5}\n')
    assert compare.main([str(tmp_path / "eval"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in (tmp_path / "t.md").read_text().splitlines()[2:]}
    assert list(rows) == ["AR teacher", "CF++ (ours, default)", "repeat last frame", "ground truth"]
    cfpp, teacher, repeat = rows["CF++ (ours, default)"], rows["AR teacher"], rows["repeat last frame"]
    assert cfpp[4] == "2" and teacher[4] == "16"
    assert cfpp[5] == "inf" and cfpp[10] == "1.000" and cfpp[-1].strip(" |") == "120 (300)"
    assert teacher[5:11] == repeat[5:11] and teacher[-1].strip(" |") == "-"  # the copying model is the baseline
    assert compare.main([str(tmp_path / "runs")]) == 2
    assert "holds no report" in capsys.readouterr().err


def test_autoencoder_report_scores_reconstructions_against_the_frames():
    class Shift(torch.nn.Module):
        """An 'autoencoder' whose decode adds ``offset`` (in [-1, 1] units) to every pixel."""

        def __init__(self, offset):
            super().__init__()
            self.offset = offset

        def encode(self, frames):
            assert frames.dim() == 5  # [B, T, 3, H, W], as the real one wants
            return frames

        def decode(self, latents):
            return latents + self.offset

    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(20, 230, (2, 5, 16, 16, 3), dtype=torch.uint8, generator=gen)
    exact = ev.autoencoder_report(Shift(0.0), frames, chunk=3)
    assert exact["frames"] == 10 and math.isinf(exact["psnr"]) and exact["ssim"] == pytest.approx(1.0)
    assert exact["sharpness_ratio"] == pytest.approx(1.0)
    shifted = ev.autoencoder_report(Shift(10 / 127.5), frames, chunk=4)  # every pixel 10 levels up: MSE (10/127.5)^2
    assert shifted["psnr"] == pytest.approx(10 * math.log10(4 / (10 / 127.5) ** 2), abs=1e-3)
    assert shifted["sharpness_ratio"] == pytest.approx(1.0)  # a constant shift keeps the edges


def test_saved_figures_keep_the_rendering_in_a_palette_of_256_colours(tmp_path):
    from train.evaluate.plots import PALETTE_COLOURS, render_figure, save_figure

    rng = np.random.default_rng(2)
    xs = np.arange(60)
    panels = [(f"panel {i}", "y", {f"run {j}": (xs, rng.normal(size=60).cumsum()) for j in range(4)}) for i in range(3)]
    save_figure(tmp_path / "plot.png", panels)
    with Image.open(tmp_path / "plot.png") as image:
        assert image.mode == "P" and len(image.getcolors(1 << 16)) <= PALETTE_COLOURS
        saved = np.asarray(image.convert("RGB")).astype(int)
    rendered = render_figure(panels).astype(int)
    assert saved.shape == rendered.shape == (2 * 360, 2 * 560, 3)  # 2 rows, 2 columns at 100 dpi
    error = np.abs(saved - rendered)
    assert error.mean() < 0.2 and np.quantile(error.max(-1), 0.999) <= 16  # 16 colours: 1.6 and 116


def test_zoomed_centre_blows_up_the_centre_by_nearest_neighbour():
    from train.evaluate.plots import zoomed_centre

    frame = np.random.default_rng(0).integers(0, 256, (7, 10, 3), dtype=np.uint8)
    out = zoomed_centre(frame, 2)
    assert out.shape == frame.shape
    for y in range(7):
        for x in range(10):  # crop of ceil(7/2) x ceil(10/2) = 4 x 5 from row 1, column 2
            assert (out[y, x] == frame[1 + y // 2, 2 + x // 2]).all()
    assert np.array_equal(zoomed_centre(frame, 1), frame)


def test_reconstruction_sheet_puts_truth_reconstruction_and_their_zooms_in_rows(tmp_path):
    from train.evaluate.plots import SHEET_GAP, reconstruction_sheet, zoomed_centre

    rng = np.random.default_rng(1)
    truth, recon = (rng.integers(0, 256, (3, 6, 8, 3), dtype=np.uint8) for _ in range(2))
    reconstruction_sheet(truth, recon, tmp_path / "autoencoder.png")
    sheet = np.asarray(Image.open(tmp_path / "autoencoder.png"))
    assert sheet.shape == (4 * 6 + 3 * SHEET_GAP, 3 * 8 + 2 * SHEET_GAP, 3)
    rows = [truth, recon, [zoomed_centre(f, 2) for f in truth], [zoomed_centre(f, 2) for f in recon]]
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y, x = r * (6 + SHEET_GAP), c * (8 + SHEET_GAP)
            assert np.array_equal(sheet[y : y + 6, x : x + 8], tile)
    assert not list(tmp_path.glob("*.tmp*"))


def test_rollout_sheet_puts_each_clip_truth_above_model_at_the_picks(tmp_path):
    from train.evaluate.plots import SHEET_GAP, rollout_sheet

    rng = np.random.default_rng(2)  # flat frames of random colours: a JPEG keeps each tile's mean colour
    truth, model = (np.broadcast_to(rng.integers(0, 256, (2, 9, 1, 1, 3), dtype=np.uint8), (2, 9, 16, 24, 3))
                    for _ in range(2))
    picks = [0, 3, 8]
    rollout_sheet(truth, model, picks, tmp_path / "long.jpg")
    with Image.open(tmp_path / "long.jpg") as image:
        assert image.format == "JPEG"
        sheet = np.asarray(image).astype(np.float64)
    assert sheet.shape == (4 * 16 + 3 * SHEET_GAP, 3 * 24 + 2 * SHEET_GAP, 3)
    for r, video in enumerate([truth[0], model[0], truth[1], model[1]]):
        for c, t in enumerate(picks):
            y, x = r * (16 + SHEET_GAP), c * (24 + SHEET_GAP)
            inner = sheet[y + 3 : y + 13, x + 3 : x + 21]  # away from the edges, where JPEG rings
            assert np.abs(inner.mean((0, 1)) - video[t, 0, 0]).max() < 6, (r, c)
    assert not list(tmp_path.glob("*.tmp*"))


def test_the_motion_alone_reference_replays_the_actions_in_other_worlds():
    """The swap test's "ground truth in another world" row: the clips' own and swapped actions replayed in the same
    worlds, none of them a clip's (so its start frames are not the clips')."""
    settings = ev.EvalSettings(world="procedural", clips=2, horizon=3, horizons=(1,), long_frames=4, long_clips=1,
                               window=2, world_options={"height": 32, "width": 32})
    clips = evaluation.heldout_episodes(settings, "clips", 2, 4)
    swapped = torch.roll(clips["actions"], 1, 0)
    own, under_swapped = evaluation.other_world_swap(settings, clips["actions"], swapped)
    assert own.shape == under_swapped.shape == clips["frames"].shape
    assert torch.equal(own[:, 0], under_swapped[:, 0]) and not torch.equal(own, under_swapped)
    assert not any(torch.equal(own[i, 0], clips["frames"][j, 0]) for i in range(2) for j in range(2))
    assert torch.equal(evaluation.replay(settings, clips["seeds"], clips["actions"]), clips["frames"])  # replay is exact


def test_the_gaze_episodes_replay_the_long_worlds_looking_up_and_down():
    """The gaze stability's ground truth: the long rollouts' worlds (same start frames), played by the gazer, who looks
    more than 15 degrees away from level far more often than the mix."""
    settings = ev.EvalSettings(world="procedural", clips=2, horizon=3, horizons=(1,), long_frames=120, long_clips=4,
                               window=60, world_options={"height": 32, "width": 32})
    long = evaluation.heldout_episodes(settings, "long", 4, 121)
    gaze = evaluation.heldout_episodes(settings, "long", 4, 121, policy=evaluation.GAZE_POLICY)
    assert gaze["seeds"] == long["seeds"] and torch.equal(gaze["frames"][:, 0], long["frames"][:, 0])
    away = [(e["poses"][:, :, 1, 2].abs().asin().rad2deg() > 15).float().mean() for e in (long, gaze)]
    assert away[1] > 0.15 and away[1] > 2 * away[0], away
