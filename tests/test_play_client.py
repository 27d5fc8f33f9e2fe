"""The real client (real Session, tiny untrained model) under SDL's dummy video driver and headless:
injected input reaches the session, recordings round-trip and survive SIGKILL, replays reproduce
their frames, bad files and options give one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pygame
import pytest
import torch

from worldmodel.actions import make_action
from worldmodel.camera import integrate, rigid_inverse
from worldmodel.data.episode import read_episode

from play.cli import build_app, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "scripts" / "demo.txt"
TINY = ["--untrained", "--preset", "tiny", "--fps", "50", "--threads", "1"]


@pytest.fixture
def dummy_video(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)


def app_for(argv):
    return build_app(build_parser().parse_args(TINY + argv))


def tick_until(app, condition, timeout=20.0):
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "the client did not get there in time"
        assert app.tick(), "the client quit early"


def spy_steps(app):
    """Record every action [A] and the step count the real session receives."""
    session, seen = app.worker.generator.session, []
    original = session.step

    def step(actions, *args, **kwargs):
        seen.append((actions[0].clone(), len(session.steps)))
        return original(actions, *args, **kwargs)

    session.step = step
    return seen


def post_key(key, down):
    pygame.event.post(pygame.event.Event(pygame.KEYDOWN if down else pygame.KEYUP, key=key, mod=0, unicode="", scancode=0))


def test_injected_events_reach_the_session(dummy_video, tmp_path):
    app = app_for(["--display-fps", "200", "--log-json", str(tmp_path / "log.jsonl")])
    seen = spy_steps(app)
    try:
        assert app.renderer.name == "software"  # no OpenGL under the dummy driver: the blit path runs
        tick_until(app, lambda: len(seen) >= 2)
        post_key(pygame.K_w, True)
        post_key(pygame.K_LSHIFT, True)
        tick_until(app, lambda: seen[-1][0][0] == 1)
        assert torch.equal(seen[-1][0], make_action(app.mapper.spec, ("W", "SHIFT")))
        post_key(pygame.K_w, False)
        post_key(pygame.K_LSHIFT, False)
        pygame.event.post(pygame.event.Event(pygame.MOUSEMOTION, rel=(7, -3), pos=(5, 5), buttons=(0, 0, 0)))
        tick_until(app, lambda: seen[-1][0][-2] != 0)
        assert torch.equal(seen[-1][0], make_action(app.mapper.spec, (), 7, -3))
        tick_until(app, lambda: seen[-1][0][-2] == 0)  # motion is used once

        post_key(pygame.K_1, True)  # one denoising step per frame
        tick_until(app, lambda: seen[-1][1] == 1)
        post_key(pygame.K_p, True)  # pause: no more steps...
        tick_until(app, lambda: app.paused and app.worker.idle)
        count = len(seen)
        for _ in range(10):
            app.tick()
        assert len(seen) == count
        post_key(pygame.K_n, True)  # ...but single steps
        tick_until(app, lambda: len(seen) == count + 1)
        for _ in range(5):
            app.tick()
        assert len(seen) == count + 1
        post_key(pygame.K_r, True)  # a new world
        tick_until(app, lambda: app.last.generated.seed == 1 and app.last.generated.index == 0)
        post_key(pygame.K_ESCAPE, True)  # releases the mouse: motion no longer counts
        post_key(pygame.K_p, True)
        pygame.event.post(pygame.event.Event(pygame.MOUSEMOTION, rel=(9, 9), pos=(5, 5), buttons=(0, 0, 0)))
        start = len(seen)
        tick_until(app, lambda: len(seen) >= start + 2)
        assert all(a[-2] == 0 for a, _ in seen[start:])
        assert not app.captured
    finally:
        summary = app.close()
    assert summary["frames"] >= len(seen)
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"name": "w", "down": True, "command": None}.items() <= next(e for e in events if e["event"] == "key").items()
    assert events[-1]["event"] == "summary"


def test_recording_round_trip_and_windowed_replay(dummy_video, tmp_path):
    app = app_for(["--display-fps", "200", "--record", str(tmp_path / "rec"), "--frames", "25"])
    post_key(pygame.K_d, True)
    shown, turned, deadline = [], False, time.perf_counter() + 30
    while app.tick():
        assert time.perf_counter() < deadline, "the recording run did not finish"
        if app.last is not None and (not shown or shown[-1][0] != app.last.generated.index):
            shown.append((app.last.generated.index, app.last.generated.frame))
        if len(shown) == 10 and not turned:
            turned = True
            pygame.event.post(pygame.event.Event(pygame.MOUSEMOTION, rel=(40, 0), pos=(5, 5), buttons=(0, 0, 0)))
    app.close()
    (path,) = (tmp_path / "rec").iterdir()
    ep = read_episode(path)
    assert len(ep) == 25 and ep.meta.source == "play" and ep.meta.length == 25
    assert ep.meta.extra["start"] == "generated" and ep.meta.extra["model"] == "untrained:tiny"
    assert torch.equal(ep.actions[0], torch.zeros(7))
    assert (ep.actions[1:, 3] == 1).all() and ep.actions[:, -2].sum() == 40  # D held throughout; the turn
    for index, frame in shown:  # the frames shown are the frames recorded
        assert np.array_equal(ep.frames[index].numpy(), frame)
    assert (ep.timestamps.diff() >= 0).all() and ep.timestamps[-1] > 0
    poses, _ = integrate(ep.actions[None, 1:], ep.meta.action_spec, ep.meta.controller)
    to_start = rigid_inverse(ep.commanded_poses[0])  # both relative to the first commanded pose
    assert torch.allclose(to_start @ ep.commanded_poses[1:], to_start @ poses[0], atol=1e-5)
    assert torch.isnan(ep.true_poses).all()

    replay = app_for(["--display-fps", "200", "--replay", str(path), "--record", str(tmp_path / "again")])
    replay.run()
    (again,) = (tmp_path / "again").iterdir()
    ep2 = read_episode(again)
    assert torch.equal(ep2.actions, ep.actions) and torch.equal(ep2.frames, ep.frames)

    video = tmp_path / "ep.mp4"
    assert main(["export", str(path), "--out", str(video)]) == 0
    import imageio.v3 as iio

    assert iio.imread(video).shape == (25, 32, 32, 3)


def test_headless_script_video_and_replay_reproduce_frames(tmp_path):
    out = tmp_path / "demo.mp4"
    argv = TINY + ["--headless", "--frames", "30", "--script", str(DEMO), "--seed", "5"]
    assert main(argv + ["--out", str(out), "--record", str(tmp_path / "a")]) == 0
    import imageio.v3 as iio

    assert iio.imread(out).shape == (30, 32, 32, 3)
    (first,) = (tmp_path / "a").iterdir()
    ep = read_episode(first)
    assert len(ep) == 30 and ep.meta.seed == 5
    assert torch.equal(ep.actions[11:16, 0], torch.ones(5))  # the demo walks forward after 10 frames
    assert main(TINY + ["--headless", "--replay", str(first), "--record", str(tmp_path / "b")]) == 0
    (second,) = (tmp_path / "b").iterdir()
    ep2 = read_episode(second)
    assert torch.equal(ep2.frames, ep.frames) and torch.equal(ep2.commanded_poses, ep.commanded_poses)
    assert main(TINY + ["--headless", "--replay", str(first), "--record", str(tmp_path / "c"), "--seed", "6",
                        "--model-seed", "1"]) == 0
    (other,) = (tmp_path / "c").iterdir()
    assert not torch.equal(read_episode(other).frames, ep.frames)  # another model gives other frames


def test_killed_recording_is_readable(tmp_path):
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy", "PYTHONPATH": str(ROOT)}
    env.pop("DISPLAY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "play", *TINY, "--script", str(DEMO), "--record", str(tmp_path / "rec"),
         "--frames", "100000"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.perf_counter() + 30
        steps = None
        while time.perf_counter() < deadline:
            found = list((tmp_path / "rec").glob("*/steps.rec"))
            if found and found[0].stat().st_size > 20_000:
                steps = found[0]
                break
            time.sleep(0.1)
        assert steps is not None, proc.stderr.read1() if proc.poll() is not None else "no recording appeared"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ep = read_episode(steps.parent)
    assert len(ep) >= 5 and ep.meta.length is None
    assert torch.equal(ep.actions[1:6], torch.stack([make_action(ep.meta.action_spec)] * 5))  # the demo's first segment


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("write, argv, message", [
    (lambda d: (d / "c.toml").write_text('[keys]\nW = "wasd"\n'), ["--controls", "{d}/c.toml"], "unknown key name 'wasd'"),
    (lambda d: (d / "c.toml").write_text('[keys]\nFLY = "g"\n'), ["--controls", "{d}/c.toml"], "unknown action 'FLY'"),
    (lambda d: (d / "m.safetensors").write_bytes(b"not a checkpoint at all"), ["--checkpoint", "{d}/m.safetensors"],
     "not a valid safetensors checkpoint"),
    (lambda d: (d / "ep").mkdir(), ["--replay", "{d}/ep"], "meta.json is missing"),
    (lambda d: ((d / "ep").mkdir(), (d / "ep" / "meta.json").write_text("{oops")), ["--replay", "{d}/ep"], "is not valid JSON"),
    (lambda d: (d / "s.txt").write_text("5 W 0\n"), ["--script", "{d}/s.txt"], "s.txt:1: expected 'FRAMES KEYS DX DY'"),
    (lambda d: None, ["--start", "{d}/none.png"], "start image"),
    (lambda d: None, ["--headless", "--frames", "3"], "needs --out VIDEO and/or --record DIR"),
    (lambda d: None, ["--headless", "--frames", "3", "--out", "{d}/v.gif"], "must end in one of .mp4"),
    (lambda d: None, ["--world-only", "--world", "procedural", "--compile"], "drop --untrained / --checkpoint / --steps / --compile"),
])
def test_bad_files_and_options_give_one_line_errors(dummy_video, tmp_path, capsys, write, argv, message):
    write(tmp_path)
    args = [a.replace("{d}", str(tmp_path)) for a in argv]
    if "--checkpoint" in args:
        args = [a for a in TINY if a != "--untrained"] + args
    else:
        args = TINY + args
    assert main(args + ["--frames", "2"] if "--frames" not in args else args) == 2
    assert message in error_line(capsys)


def test_missing_shipped_model_explains_untrained(dummy_video, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in error_line(capsys)
    assert main(["--world", "nowhere"]) == 2
    assert "--untrained" in error_line(capsys)


def test_no_display_says_use_headless(monkeypatch, capsys):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
        monkeypatch.delenv(name, raising=False)
    assert main(TINY) == 2
    line = error_line(capsys)
    assert "no display" in line and "--headless" in line


def test_side_by_side_records_true_poses_and_replays_through_the_world(dummy_video, tmp_path):
    from worldmodel.envs import make_world

    argv = TINY + ["--side-by-side", "--script", str(DEMO), "--seed", "3"]
    app = app_for(argv[len(TINY):] + ["--display-fps", "200", "--frames", "6", "--record", str(tmp_path / "w")])
    app.run()
    assert len(app.panels) == 2 and app.worker.generator.mode == "world | model"
    assert main(argv + ["--headless", "--frames", "30", "--out", str(tmp_path / "v.mp4"), "--record", str(tmp_path / "a")]) == 0
    import imageio.v3 as iio

    assert iio.imread(tmp_path / "v.mp4").shape == (30, 32, 32 + 4 + 32, 3)  # world | gap | model
    (path,) = (tmp_path / "a").iterdir()
    ep = read_episode(path)
    assert ep.meta.extra["start"] == "world" and torch.isfinite(ep.true_poses).all()

    world = make_world("procedural", batch=1, height=32, width=32)
    truth = [world.reset([3])] + [world.step(a[None]) for a in ep.actions[1:]]
    assert torch.equal(ep.frames[0], truth[0].frames[0])  # the model starts from the world's first frame
    assert torch.equal(ep.true_poses, torch.stack([t.true_pose[0] for t in truth]))
    assert torch.equal(ep.commanded_poses, torch.stack([t.commanded_pose[0] for t in truth]))

    assert main(["--world-only", "--fps", "50", "--headless", "--replay", str(path),
                 "--record", str(tmp_path / "b")]) == 0
    (again,) = (tmp_path / "b").iterdir()
    replayed = read_episode(again)
    assert replayed.frames.shape == (30, 128, 128, 3)  # the world at its own resolution
    assert torch.equal(replayed.actions, ep.actions)
    assert torch.allclose(replayed.true_poses, ep.true_poses, atol=1e-5)  # same seed, same actions, same walk


def test_record_key_starts_and_stops_mid_session(dummy_video, tmp_path):
    app = app_for(["--display-fps", "200", "--record-dir", str(tmp_path / "recs")])
    try:
        tick_until(app, lambda: app.generated >= 5)
        on_screen = app.last.generated
        post_key(pygame.K_F5, True)
        tick_until(app, lambda: app.recorder.active and app.recorder.frames >= 6)
        post_key(pygame.K_F5, False)
        post_key(pygame.K_F5, True)
        tick_until(app, lambda: not app.recorder.active)
    finally:
        app.close()
    (path,) = (tmp_path / "recs").iterdir()
    ep = read_episode(path)
    assert len(ep) >= 6 and ep.meta.extra["start"] == "frame"
    assert torch.equal(ep.actions[0], torch.zeros(7))  # an episode's first step has the zero action
    assert np.array_equal(ep.frames[0].numpy(), on_screen.frame)  # it starts at the frame on screen
    from play.cli import run_headless_cli

    run_headless_cli(build_parser().parse_args(TINY + ["--headless", "--replay", str(path), "--record", str(tmp_path / "r")]))
    (replayed,) = (tmp_path / "r").iterdir()
    assert torch.equal(read_episode(replayed).frames[0], ep.frames[0])  # the replay starts from the recorded frame


def test_reset_uses_shipped_start_frames(tmp_path):
    from PIL import Image

    from play.cli import build_parser, load_model, make_generator

    images = []
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10)]):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (64, 48), colour).save(images[-1])  # another size: the session resizes it
    args = build_parser().parse_args(TINY)
    generator, _ = make_generator(args, load_model(args)[0])
    generator.start_frames = images
    for seed in (4, 5):
        first = generator.reset(seed, generator.start_for(seed))
        expected = np.array(Image.open(images[seed % 2]).convert("RGB").resize((32, 32), Image.BILINEAR))
        assert np.array_equal(first.frame, expected) and first.start == f"image:{images[seed % 2]}"
        assert generator.step(make_action(generator.spec, ("W",))).frame.shape == (32, 32, 3)


def test_plays_a_saved_checkpoint(tmp_path):
    from worldmodel.checkpoint import save
    from worldmodel.model import build_model

    path = tmp_path / "tiny.safetensors"
    save(path, build_model(preset="tiny", seed=0))
    assert main(["--checkpoint", str(path), "--fps", "50", "--threads", "1", "--headless", "--frames", "8",
                 "--script", str(DEMO), "--record", str(tmp_path / "a")]) == 0
    assert main(TINY + ["--headless", "--frames", "8", "--script", str(DEMO), "--record", str(tmp_path / "b")]) == 0
    (saved,), (untrained,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    ep = read_episode(saved)
    assert ep.meta.extra["model"] == str(path)
    assert torch.equal(ep.frames, read_episode(untrained).frames)  # the same weights play the same


def test_plays_a_chunkwise_checkpoint(tmp_path):
    """A model of blocks of 2 frames plays one action a step: each block's frames show one step late,
    exactly the frames the session makes from whole blocks of the same actions; replays reproduce them."""
    from play.generator import play_dtype
    from worldmodel.checkpoint import load, save
    from worldmodel.model import build_model
    from worldmodel.session import Session

    model = build_model(preset="tiny", seed=0, block_size=2)
    with torch.no_grad():  # open the zero-initialised paths: actions and history change the frames
        for p in model.dit.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    path = tmp_path / "chunk.safetensors"
    save(path, model)
    argv = ["--checkpoint", str(path), "--fps", "50", "--threads", "1", "--headless"]
    assert main(argv + ["--script", str(DEMO), "--frames", "9", "--seed", "2", "--record", str(tmp_path / "a")]) == 0
    (first,) = (tmp_path / "a").iterdir()
    ep = read_episode(first)
    assert len(ep) == 9 and torch.equal(ep.frames[1], ep.frames[0])  # the start shows until a block is full
    assert main(argv + ["--replay", str(first), "--record", str(tmp_path / "b")]) == 0
    (second,) = (tmp_path / "b").iterdir()
    assert torch.equal(read_episode(second).frames, ep.frames)

    session = Session(load(path), seed=2, dtype=play_dtype(torch.device("cpu")))
    start = ep.meta.extra["start"]
    assert torch.equal(session.reset(start[len("image:"):] if start.startswith("image:") else None).frames[0], ep.frames[0])
    blocks = [session.step(ep.actions[None, t : t + 2]).frames[0] for t in (1, 3, 5, 7)]
    assert torch.equal(ep.frames[2:], torch.cat(blocks)[:7])
    assert not torch.equal(ep.frames[2], ep.frames[3])
    poses, _ = integrate(ep.actions[None, 1:], ep.meta.action_spec, ep.meta.controller)
    to_start = rigid_inverse(ep.commanded_poses[0])
    assert torch.allclose(to_start @ ep.commanded_poses[1:], to_start @ poses[0], atol=1e-5)  # the camera of each step


def test_controls_print_at_start_and_f1_toggles_the_help_overlay(dummy_video, capsys):
    app = app_for(["--no-hud"])
    try:
        out = capsys.readouterr().out
        assert "mouse: look around, turn left / right" in out and "a / left: strafe left" in out
        assert "d / right: strafe right" in out and "f1 or ?" in out
        tick_until(app, lambda: app.last is not None)
        post_key(pygame.K_p, True)  # paused: the overlay is the only change
        tick_until(app, lambda: app.paused and app.worker.idle)
        app.tick()
        before = app.renderer.screenshot()
        post_key(pygame.K_F1, True)
        tick_until(app, lambda: app.help_on)
        app.tick()
        shown = app.renderer.screenshot()
        post_key(pygame.K_SLASH, True)  # "?" (shift + slash) hides it
        tick_until(app, lambda: not app.help_on)
    finally:
        app.close()
    changed = np.abs(shown.astype(int) - before).sum(-1) > 0
    ys, xs = np.nonzero(changed)
    h, w = before.shape[:2]
    assert changed.sum() > 2000 and abs((xs.min() + xs.max()) / 2 - w / 2) < 0.1 * w
    assert (shown[changed].min(-1) > 200).sum() > 100  # light text on the dark panel
