"""The real client in a real X server (Xvfb, Mesa llvmpipe OpenGL): xdotool key and mouse events reach
the window and the session, and a screenshot of the screen shows the frames and the HUD."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {name: shutil.which(name) for name in ("Xvfb", "xdotool", "import")}
pytestmark = pytest.mark.skipif(
    not all(TOOLS.values()),
    reason=f"needs {', '.join(n for n, p in TOOLS.items() if not p)} on PATH "
           "(apt-get install -y xvfb xdotool imagemagick mesa-utils libgl1-mesa-dri)",
)
TINY = ["--untrained", "--preset", "tiny", "--fps", "20", "--threads", "1"]


@pytest.fixture(scope="module")
def display():
    """A fresh Xvfb server on a free display number."""
    for number in range(57, 120):
        if not Path(f"/tmp/.X{number}-lock").exists() and not Path(f"/tmp/.X11-unix/X{number}").exists():
            break
    server = subprocess.Popen([TOOLS["Xvfb"], f":{number}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = f":{number}"
    try:
        wait_for(lambda: server.poll() is not None or xdotool(name, "getdisplaygeometry", check=False), "Xvfb", 20)
        if server.poll() is not None:
            pytest.skip(f"Xvfb could not start on {name}")
        yield name
    finally:
        server.terminate()
        server.wait(10)


def x_env(display):
    env = {**os.environ, "DISPLAY": display, "PYTHONPATH": str(ROOT)}
    env.pop("SDL_VIDEODRIVER", None)
    return env


def xdotool(display, *args, check=True) -> str:
    return subprocess.run([TOOLS["xdotool"], *args], env=x_env(display), check=check, capture_output=True,
                          text=True, timeout=10).stdout


def log_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for(condition, what: str, timeout: float = 20.0):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def frames(log: Path) -> list[dict]:
    return [e for e in log_events(log) if e["event"] == "frame"]


def screenshot(display, path: Path) -> np.ndarray:
    subprocess.run([TOOLS["import"], "-window", "root", str(path)], env=x_env(display), check=True, timeout=20)
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def launch(display, tmp_path, *extra):
    log = tmp_path / "log.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "play", *TINY, "--frames", "100000", "--log-json", str(log), *extra],
                            cwd=ROOT, env=x_env(display), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: frames(log) or proc.poll() is not None, "the first frame", 60)
        assert proc.poll() is None, proc.communicate()[1]
        window = str(next(e for e in log_events(log) if e["event"] == "start")["window_id"])  # the client's X window
        xdotool(display, "windowfocus", window)
    except BaseException:
        proc.kill()
        raise
    return proc, log, window


def quit_client(display, proc, log):
    xdotool(display, "key", "q")
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert log_events(log)[-1]["event"] == "summary"


def drive_keys_and_mouse(display, log):
    """Hold W, then move the mouse; both must show up in the actions the session got."""
    xdotool(display, "keydown", "w")
    wait_for(lambda: any(f["action"][0] == 1 for f in frames(log)), "a frame made with W held")
    xdotool(display, "keyup", "w")
    wait_for(lambda: frames(log)[-1]["action"][0] == 0, "W released")
    for _ in range(3):
        xdotool(display, "mousemove_relative", "--", "15", "6")
        time.sleep(0.05)
    turned = wait_for(lambda: [f for f in frames(log) if f["action"][-2] != 0], "a frame made with mouse motion")
    assert all(f["action"][-2] > 0 and f["action"][-1] > 0 for f in turned)
    keys = [(e["name"], e["down"]) for e in log_events(log) if e["event"] == "key"]
    assert ("w", True) in keys and ("w", False) in keys


def test_pygame_window_gets_xdotool_input_and_shows_the_hud(display, tmp_path):
    proc, log, window = launch(display, tmp_path)
    try:
        start = next(e for e in log_events(log) if e["event"] == "start")
        assert start["backend"] == "pygame" and start["renderer"] == "gl", start  # a real OpenGL context
        drive_keys_and_mouse(display, log)

        xdotool(display, "key", "p")  # pause, so that only the HUD changes between the two shots
        wait_for(lambda: any(e["event"] == "key" and e["command"] == "pause" for e in log_events(log)), "pause")
        time.sleep(0.4)
        with_hud = screenshot(display, tmp_path / "hud.png")
        xdotool(display, "key", "h")
        wait_for(lambda: any(e["event"] == "key" and e["command"] == "hud" for e in log_events(log)), "the HUD toggle")
        time.sleep(0.4)
        without_hud = screenshot(display, tmp_path / "nohud.png")
        geometry = dict(line.split("=") for line in xdotool(display, "getwindowgeometry", "--shell", window).split())
        x, y, w, h = (int(geometry[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))

        xdotool(display, "windowsize", window, "640", "360")  # the window can be resized...
        wait_for(lambda: any(e["event"] == "resize" and e["size"] == [640, 360] for e in log_events(log)), "the resize")
        xdotool(display, "key", "F11")  # ...and go fullscreen
        wait_for(lambda: any(e["event"] == "resize" and e["size"] == [1024, 768] for e in log_events(log)),
                 "the window to fill the 1024x768 screen")
    finally:
        if proc.poll() is None:
            quit_client(display, proc, log)

    window_pixels = with_hud[y : y + h, x : x + w]
    assert window_pixels.std() > 5 and window_pixels.max() > 100  # frames are on the screen, not a blank window
    changed = np.abs(with_hud - without_hud).sum(-1) > 0
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 500, "hiding the HUD changed nothing on screen"
    assert ys.min() >= y + 8 and xs.min() >= x + 8 and ys.max() < y + h // 2 and xs.max() < x + w  # HUD corner only
    hud = with_hud[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert (hud.min(-1) > 200).sum() > 100  # light text on the HUD's dark panel


def test_pyglet_backend_gets_xdotool_input(display, tmp_path):
    proc, log, window = launch(display, tmp_path, "--backend", "pyglet")
    try:
        start = next(e for e in log_events(log) if e["event"] == "start")
        assert start["backend"] == "pyglet" and start["renderer"] == "gl"
        drive_keys_and_mouse(display, log)
        shot = screenshot(display, tmp_path / "pyglet.png")
        assert shot.std() > 5 and (shot.min(-1) > 200).sum() > 100  # frames and HUD text
    finally:
        if proc.poll() is None:
            quit_client(display, proc, log)


def test_bench_measures_fps_and_latency(display, monkeypatch, tmp_path, capsys):
    from play.bench import main as bench

    monkeypatch.setenv("DISPLAY", display)
    shot = tmp_path / "bench.png"
    assert bench(["--seconds", "2", "--warmup", "0.5", "--screenshot", str(shot), "--", *TINY]) == 0
    figures = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    figures = {k.strip(): v for k, v in figures.items()}
    assert figures["renderer"] == "gl" and int(figures["moving_frames"]) > 0
    assert 0 < float(figures["latency_ms_median"]) < 1000 and float(figures["model_fps_shown"]) > 1
    assert float(figures["load_before"]) >= 0 and float(figures["load_after"]) >= 0
    assert 0 <= float(figures["cpu_steal_percent"]) <= 100
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (512, 512, 3) and image.std() > 5


def test_controls_are_printed_and_f1_shows_them_over_the_frames(display, tmp_path):
    proc, log, window = launch(display, tmp_path)
    try:
        xdotool(display, "key", "p")  # paused: only the overlay changes between the shots
        wait_for(lambda: any(e["event"] == "key" and e["command"] == "pause" for e in log_events(log)), "pause")
        time.sleep(0.4)
        before = screenshot(display, tmp_path / "before.png")
        xdotool(display, "key", "F1")
        wait_for(lambda: any(e["event"] == "help" and e["on"] for e in log_events(log)), "the help overlay")
        time.sleep(0.4)
        shown = screenshot(display, tmp_path / "help.png")
        xdotool(display, "key", "shift+slash")  # "?" hides it again
        wait_for(lambda: any(e["event"] == "help" and not e["on"] for e in log_events(log)), "the overlay to go")
        geometry = dict(line.split("=") for line in xdotool(display, "getwindowgeometry", "--shell", window).split())
        x, y, w, h = (int(geometry[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
    finally:
        xdotool(display, "key", "q")
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "mouse: look around, turn left / right" in out and "a / left: strafe left" in out and "f1 or ?" in out
    changed = np.abs(shown - before).sum(-1) > 0
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 2000, "F1 changed nothing on screen"
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    assert abs(cx - (x + w / 2)) < 0.1 * w and abs(cy - (y + h / 2)) < 0.1 * h  # centred in the window


def test_steal_percent_reads_the_hypervisor_share(tmp_path):
    from play.bench import cpu_times, steal_percent

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3\n")
    before = cpu_times(stat)
    stat.write_text("cpu  160 0 70 880 10 0 5 75 0 0\n")
    assert steal_percent(before, cpu_times(stat)) == 20.0  # 40 of 200 ticks
    assert cpu_times(tmp_path / "missing") is None and steal_percent(None, before) is None
