"""Unit tests of the client's pure parts: controls file, input mapping, scripts, mailbox, layout, filters, HUD."""

import itertools
import threading

import numpy as np
import pytest
import torch

from worldmodel.actions import ActionSpec, make_action

from play.controls import COMMANDS, ControlsError, load_controls
from play.hud import HudState, MeanMeter, RateMeter, hud_lines, model_too_slow
from play.input import InputMapper, InputSample, action_sample, merge_samples
from play.keys import KEY_CONSTANTS, KeyNameError, canonical_key, key_table
from play.renderer import panel_rects, sharpen
from play.script import ScriptError, load_script, parse_script, script_cycle
from play.worker import Mailbox, ResetJob, StepJob, StopJob

SPEC = ActionSpec()


def write(tmp_path, text, name="controls.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- keys and controls


def test_key_names_are_canonical_and_map_to_both_backends():
    assert canonical_key("W") == "w" and canonical_key("Left  Shift") == "left shift"
    with pytest.raises(KeyNameError, match="unknown key name 'lshift'"):
        canonical_key("lshift")
    pygame_keys, pyglet_keys = key_table("pygame"), key_table("pyglet")
    assert sorted(pygame_keys.values()) == sorted(KEY_CONSTANTS)  # every name has its own pygame code
    assert sorted(pyglet_keys.values()) == sorted(KEY_CONSTANTS)  # ... and its own pyglet code


def test_default_controls_bind_every_action_and_command():
    controls = load_controls(SPEC)
    assert set(controls.actions) == set(SPEC.keys)
    assert set(controls.commands) == set(COMMANDS)
    assert controls.bindings()["w"] == ("action", "W") and controls.bindings()["escape"] == ("command", "release_mouse")


def test_user_controls_override_entries(tmp_path):
    path = write(tmp_path, '[keys]\nW = "i"\n[mouse]\nsensitivity = 2.5\ninvert_y = true\n[commands]\npause = "space"\n')
    controls = load_controls(SPEC, path)
    assert controls.actions["W"] == ("i",) and controls.actions["A"] == ("a", "left")
    assert controls.commands["pause"] == "space" and controls.commands["quit"] == "q"
    assert controls.sensitivity == 2.5 and controls.invert_y


def test_default_actions_the_model_lacks_are_dropped():
    controls = load_controls(ActionSpec(keys=("W", "S")))
    assert set(controls.actions) == {"W", "S"}


@pytest.mark.parametrize("text, message", [
    ('[keys]\nW = "ww"\n', r"\[keys\] W: unknown key name 'ww'"),
    ('[keys]\nJUMP = "space"\n', r"unknown action 'JUMP' in \[keys\]; this model's keys are W, A, S, D, SHIFT"),
    ('[commands]\nfly = "g"\n', r"unknown command 'fly'"),
    ('[mouse]\nspeed = 2\n', r"unknown setting 'speed' in \[mouse\]"),
    ('[gamepad]\na = 1\n', r"unknown section \[gamepad\]"),
    ('[mouse]\nsensitivity = -1\n', r"sensitivity must be a positive number"),
    ('[mouse]\ninvert_y = "yes"\n', r"invert_y must be true or false"),
    ('[commands]\npause = "w"\n', r"key 'w' is bound to both action W and command pause"),
    ('[keys]\nW = []\n', r"must be a key name or a non-empty list"),
    ('[keys\nW = "w"\n', r"is not valid TOML"),
])
def test_bad_controls_give_one_line_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ControlsError, match=message) as info:
        load_controls(SPEC, path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_controls_file(tmp_path):
    with pytest.raises(ControlsError, match="does not exist"):
        load_controls(SPEC, tmp_path / "nope.toml")


# -- input


def test_mapper_turns_held_keys_and_motion_into_actions(tmp_path):
    controls = load_controls(SPEC, write(tmp_path, "[mouse]\nsensitivity = 0.5\ninvert_y = true\n"))
    mapper = InputMapper(controls, SPEC)
    assert mapper.key("w", True) is None
    assert mapper.key("right shift", True) is None
    assert mapper.key("up", True) is None  # a second key of W
    mapper.motion(10, 4)
    mapper.motion(-2, 2)
    sample = mapper.sample(1.0)
    assert torch.equal(sample.action, make_action(SPEC, ("W", "SHIFT"), 4.0, -3.0))
    assert sample.keys == ("W", "SHIFT") and sample.sampled_at == 1.0
    mapper.key("w", False)
    assert mapper.pressed_actions() == ("W", "SHIFT")  # "up" still holds W
    assert torch.equal(mapper.sample(2.0).action, make_action(SPEC, ("W", "SHIFT")))  # motion was consumed
    assert mapper.key("p", True) == "pause" and mapper.key("p", False) is None
    mapper.release_all()
    assert mapper.pressed_actions() == ()


def test_merge_keeps_newest_keys_and_sums_motion():
    old = InputSample(SPEC, ("W",), 3.0, -1.0, 1.0, 1.0)
    new = InputSample(SPEC, ("A",), 2.0, 5.0, 2.0, 2.0)
    merged = merge_samples(old, new)
    assert torch.equal(merged.action, make_action(SPEC, ("A",), 5, 4))
    assert (merged.keys, merged.dx, merged.dy, merged.first_sampled_at, merged.sampled_at) == (("A",), 5.0, 4.0, 1.0, 2.0)
    scripted = make_action(SPEC, ("D", "W"), 1.5, -2)
    assert SPEC.pressed(scripted) == ("W", "D") and SPEC.mouse(scripted) == (1.5, -2.0)
    assert torch.equal(action_sample(scripted, SPEC, 3.0).action, scripted)


def sample(t, dx=0.0, keys=()):
    return InputSample(SPEC, keys, dx, 0.0, t, t)


def test_mailbox_holds_one_job_and_never_queues():
    box = Mailbox()
    assert box.put(StepJob(sample(1, 1))) == "placed"
    assert box.put(StepJob(sample(2, 2, ("W",)))) == "merged"  # not queued
    assert box.put(StepJob(sample(3, 4)), merge=False) is None  # scripted input waits instead
    job = box.take(0)
    assert box.take(0) is None and box.merged == 1
    assert job.sample.dx == 3.0 and job.sample.keys == ("W",) and job.sample.first_sampled_at == 1
    assert box.put(StepJob(sample(4))) == "placed"
    assert box.put(ResetJob(7)) == "replaced"  # a reset replaces a waiting step
    assert box.put(StepJob(sample(5))) is None  # ... and a step waits until the reset was taken
    assert box.take(0) == ResetJob(7)
    box.put(StopJob())
    assert box.put(ResetJob(8)) is None and isinstance(box.take(0), StopJob)


def test_mailbox_wakes_a_waiting_taker():
    box, got = Mailbox(), []
    taker = threading.Thread(target=lambda: got.append(box.take(5.0)))
    taker.start()
    box.put(ResetJob(3))
    taker.join(5.0)
    assert got == [ResetJob(3)]


# -- scripts


def test_script_parses_and_repeats(tmp_path):
    text = "# comment\n2 W+shift 1.5 -2  # walk\n\n1 - 0 0\n"
    segments = parse_script(text, SPEC)
    actions = torch.stack(list(itertools.islice(script_cycle(segments, SPEC), 7)))
    one = [make_action(SPEC, ("W", "SHIFT"), 1.5, -2)] * 2 + [make_action(SPEC)]
    assert torch.equal(actions, torch.stack(one + one + one[:1]))


@pytest.mark.parametrize("text, message", [
    ("2 W 0\n", "x.txt:1: expected 'FRAMES KEYS DX DY', got 3 fields"),
    ("# c\n0 W 0 0\n", "x.txt:2: frame count '0' must be a positive integer"),
    ("3 J 0 0\n", "x.txt:1: unknown key 'J'"),
    ("3 W a 0\n", "x.txt:1: 'a' is not a number"),
    ("3 W nan 0\n", "x.txt:1: 'nan' is not a finite number"),
    ("# nothing\n", "holds no segments"),
])
def test_bad_scripts_name_the_line(tmp_path, text, message):
    path = write(tmp_path, text, "x.txt")
    with pytest.raises(ScriptError, match=message.replace("x.txt", ".*x.txt")):
        load_script(path, SPEC)


def test_shipped_demo_script_is_valid():
    from pathlib import Path

    segments = load_script(Path(__file__).resolve().parent.parent / "assets" / "scripts" / "demo.txt", SPEC)
    assert sum(s.frames for s in segments) >= 100


# -- rendering


@pytest.mark.parametrize("window, frame, panels", [((800, 600), (128, 128), 1), ((1000, 300), (160, 120), 2),
                                                   ((333, 777), (160, 120), 2), ((1, 1), (128, 128), 1)])
def test_panel_rects_fit_keep_aspect_and_centre(window, frame, panels):
    rects = panel_rects(window, frame, panels, gap=4)
    assert len(rects) == panels
    for x, y, w, h in rects:
        assert w / h == pytest.approx(frame[0] / frame[1])
    x0, y0 = rects[0][:2]
    x1 = rects[-1][0] + rects[-1][2]
    assert x1 <= window[0] + 1e-6 and y0 + rects[0][3] <= window[1] + 1e-6
    fills_width = x1 - x0 == pytest.approx(window[0])
    fills_height = rects[0][3] == pytest.approx(window[1])
    assert fills_width or fills_height
    assert x0 == pytest.approx(window[0] - x1) and y0 == pytest.approx(window[1] - (y0 + rects[0][3]))


def test_sharpen_matches_a_slow_reference():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = sharpen(frame, 0.8)
    h, w = frame.shape[:2]
    ref = np.zeros_like(frame)
    for y in range(h):
        for x in range(w):
            at = lambda yy, xx: frame[min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)].astype(np.float64)  # noqa: E731
            blur = (at(y - 1, x) + at(y + 1, x) + at(y, x - 1) + at(y, x + 1)) / 4
            ref[y, x] = np.clip(np.rint(at(y, x) + 0.8 * (at(y, x) - blur)), 0, 255)
    assert np.array_equal(out, ref)
    flat = np.full((5, 5, 3), 77, np.uint8)
    assert np.array_equal(sharpen(flat), flat)


# -- HUD


def test_meters():
    rate = RateMeter(window=1.0)
    for i in range(11):
        rate.add(10.0 + i * 0.05)  # 20 per second
    assert rate.rate(10.5) == pytest.approx(20.0)
    assert rate.rate(20.0) == 0.0  # all events aged out
    mean = MeanMeter(size=3)
    assert mean.mean() is None
    for v in (1, 2, 3, 10):
        mean.add(v)
    assert mean.mean() == pytest.approx(5.0)


def test_hud_lines_say_what_matters():
    state = HudState(display_fps=13, loop_hz=60, model_fps=12, target_fps=20, latency_ms=41.6, generate_ms=30.2, steps=2,
                     keys=("W", "SHIFT"), dx=12, dy=-3, session_frames=50, session_seconds=75, recording="ep1",
                     recording_frames=10, recording_seconds=0.5, paused=False, mouse_captured=False)
    text = "\n".join(t for t, _ in hud_lines(state))
    for part in ("display 13 FPS", "input 60 Hz", "model 12.0 FPS", "latency 42 ms input->photon", "steps 2", "keys W SHIFT",
                 "mouse +12 -3", "session 50 frames 1:15", "REC ep1 10 frames", "model 12 FPS < target 20 FPS",
                 "click in the window"):
        assert part in text
    assert model_too_slow(state)
    fast = HudState(model_fps=20, target_fps=20, session_frames=50)
    assert not model_too_slow(fast) and "not recording" in "\n".join(t for t, _ in hud_lines(fast))


# -- the OpenGL renderer's shaders, in an offscreen (EGL) context


@pytest.fixture(scope="module")
def gl_context():
    moderngl = pytest.importorskip("moderngl")
    try:
        ctx = moderngl.create_standalone_context(backend="egl")
    except Exception as e:  # no EGL / no GL driver on this machine
        pytest.skip(f"no offscreen OpenGL context (EGL): {e}")
    yield ctx
    ctx.release()


def bilinear(frame: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Reference GL_LINEAR sampling with clamp-to-edge at texture coordinates u, v in [0, 1]."""
    h, w = frame.shape[:2]
    x, y = u * w - 0.5, v * h - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    at = lambda yy, xx: frame[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)].astype(np.float64)  # noqa: E731
    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("filter", ["nearest", "smooth", "sharp"])
def test_gl_filters_match_references(gl_context, filter):
    from play.renderer import SHARPEN_STRENGTH, GLRenderer

    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # H=6, W=8, drawn 4x into a 32x24 window
    fbo = gl_context.simple_framebuffer((32, 24))
    fbo.use()
    renderer = GLRenderer(gl_context, (32, 24))
    renderer.draw([frame], None, filter)
    out = renderer.screenshot().astype(np.float64)
    ys, xs = np.mgrid[0:24, 0:32]
    u, v = (xs + 0.5) / 32, (ys + 0.5) / 24
    if filter == "nearest":
        assert np.array_equal(out, frame.repeat(4, 0).repeat(4, 1))
        return
    c = bilinear(frame, u, v)
    if filter == "sharp":
        blur = 0.25 * sum(bilinear(frame, u + du, v + dv) for du, dv in ((1 / 8, 0), (-1 / 8, 0), (0, 1 / 6), (0, -1 / 6)))
        c = np.clip(c + SHARPEN_STRENGTH * (c - blur), 0, 255)
    assert np.abs(out - c).max() <= 3  # GPU filtering works in 8-bit fixed point
    fbo.release()


def test_gl_overlay_blends_the_hud(gl_context):
    import pygame

    from play.renderer import HUD_MARGIN, GLRenderer

    fbo = gl_context.simple_framebuffer((40, 30))
    fbo.use()
    hud = pygame.Surface((10, 6), pygame.SRCALPHA)
    hud.fill((255, 0, 0, 128))
    renderer = GLRenderer(gl_context, (40, 30))
    renderer.draw([np.full((30, 40, 3), 100, np.uint8)], hud, "nearest")
    out = renderer.screenshot().astype(int)
    m = HUD_MARGIN
    expected = np.array([255, 0, 0]) * 128 / 255 + 100 * (1 - 128 / 255)
    assert np.abs(out[m : m + 6, m : m + 10] - expected).max() <= 2
    assert (out[m + 6 :, :] == 100).all() and (out[:m] == 100).all()
    fbo.release()


def test_the_default_window_fits_a_1280_pixel_screen_side_by_side():
    from play.cli import MAX_WINDOW_WIDTH, WINDOW_HEIGHT, default_window_size
    from play.renderer import PANEL_GAP

    assert default_window_size(1, 128, 128) == (WINDOW_HEIGHT, WINDOW_HEIGHT)
    assert default_window_size(2, 128, 128) == (2 * WINDOW_HEIGHT + PANEL_GAP, WINDOW_HEIGHT)
    for panels, w, h in ((2, 160, 120), (3, 160, 120), (2, 640, 120)):
        width, height = default_window_size(panels, w, h)
        assert width <= MAX_WINDOW_WIDTH and height < WINDOW_HEIGHT
        assert abs((width - (panels - 1) * PANEL_GAP) / panels / height - w / h) < 0.02  # the frames keep their aspect
