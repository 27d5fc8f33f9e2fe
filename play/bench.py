"""Benchmark of the client as a player sees it: FPS and input-to-photon latency in a real X window.

    python -m play.bench [--preset default] [--seconds 20] [--backend pygame] [--screenshot shot.png] [-- CLIENT OPTIONS]

Starts Xvfb when there is no display, launches ``python -m play`` on an untrained model of the preset
(or the options after ``--``), plays it with xdotool (hold W, turn with the mouse, strafe), takes a
screenshot of the window with ImageMagick's ``import``, and prints the client's own measurements:
model FPS, frames presented per second, generation time, and latency from input sampling to the
presented frame (mean, median, 90th percentile), with the machine's 1-minute load average before and
after (other processes slow a 2-core machine down: measure at a load below ~1.5) and, on Linux, the
share of CPU time a hypervisor stole during the measured seconds (a VM's other tenants do too). Needs Xvfb, xdotool
and ImageMagick on PATH (apt-get install -y xvfb xdotool imagemagick libgl1-mesa-dri).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class BenchError(ValueError):
    """The benchmark cannot run here."""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BenchError(f"{tool} is not on PATH (apt-get install -y xvfb xdotool imagemagick libgl1-mesa-dri)")
    return path


def start_xvfb() -> tuple[subprocess.Popen, str]:
    """An Xvfb server on a free display number, ready for clients."""
    number = next(n for n in range(57, 200) if not Path(f"/tmp/.X{n}-lock").exists())
    server = subprocess.Popen([need("Xvfb"), f":{number}", "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.perf_counter() + 20
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        if server.poll() is not None or time.perf_counter() > deadline:
            raise BenchError(f"Xvfb did not start on :{number}")
        time.sleep(0.05)
    return server, f":{number}"


def cpu_times(stat: Path = Path("/proc/stat")) -> list[int] | None:
    """The machine's CPU time counters (user nice system idle iowait irq softirq steal ...), or None off Linux."""
    try:
        return [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None


def steal_percent(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of CPU time the hypervisor took between two :func:`cpu_times` readings (a VM's other tenants)."""
    if before is None or after is None or len(before) < 8:
        return None
    spent = [b - a for a, b in zip(before, after)]
    return round(100 * spent[7] / max(sum(spent), 1), 1)


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def xdotool(env: dict, *args: str) -> str:
    return subprocess.run([need("xdotool"), *args], env=env, check=True, capture_output=True, text=True, timeout=10).stdout


def play_input(env: dict, seconds: float) -> None:
    """Walk, turn and strafe for ``seconds``, like a player exploring."""
    end = time.perf_counter() + seconds
    pattern = [("w", 8, 0), ("w", 8, 0), (None, 15, 2), ("d", 0, 0), ("w", -6, -1), ("a", 4, 0)]
    i = 0
    while time.perf_counter() < end:
        key, dx, dy = pattern[i % len(pattern)]
        if key:
            xdotool(env, "keydown", key)
        for _ in range(10):
            if dx or dy:
                xdotool(env, "mousemove_relative", "--", str(dx), str(dy))
            time.sleep(0.1)
        if key:
            xdotool(env, "keyup", key)
        i += 1


def run(args, client_options: list[str]) -> dict:
    server, env = None, {k: v for k, v in os.environ.items() if k != "SDL_VIDEODRIVER"}
    if not env.get("DISPLAY"):
        server, env["DISPLAY"] = start_xvfb()
    work = Path(tempfile.mkdtemp(prefix="play-bench-"))
    log = work / "log.jsonl"
    options = client_options or ["--untrained", "--preset", args.preset]
    command = [sys.executable, "-m", "play", *options, "--backend", args.backend, "--frames", "1000000",
               "--log-json", str(log)]
    load_before = os.getloadavg()[0]
    client = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.perf_counter() + 120
        while not any(e["event"] == "frame" for e in read_log(log)):
            if client.poll() is not None or time.perf_counter() > deadline:
                raise BenchError(f"the client did not show a frame: {client.communicate()[1].strip()[-500:]}")
            time.sleep(0.1)
        window = str(next(e for e in read_log(log) if e["event"] == "start")["window_id"])
        xdotool(env, "windowfocus", window)
        time.sleep(args.warmup)
        first = len(read_log(log))  # events before the measured window
        times_before = cpu_times()
        play_input(env, args.seconds)
        steal = steal_percent(times_before, cpu_times())
        if args.screenshot:
            geometry = dict(line.split("=") for line in xdotool(env, "getwindowgeometry", "--shell", window).split())
            crop = f"{geometry['WIDTH']}x{geometry['HEIGHT']}+{geometry['X']}+{geometry['Y']}"
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([need("import"), "-window", "root", "-crop", crop, "+repage", str(args.screenshot)],
                           env=env, check=True, timeout=30)
        xdotool(env, "key", "q")
        client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
        if server is not None:
            server.terminate()
    return {**summarise(read_log(log)[first:], read_log(log)), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2), "cpu_steal_percent": steal}


def summarise(measured: list[dict], everything: list[dict]) -> dict:
    """Figures over the frames of the measured window (after warm-up)."""
    import statistics

    frames = [e for e in measured if e["event"] == "frame"]
    if len(frames) < 2:
        raise BenchError("too few frames were measured; run longer (--seconds)")
    span = frames[-1]["t"] - frames[0]["t"]
    latency = sorted(f["latency_ms"] for f in frames if f["latency_ms"] is not None)
    start = next(e for e in everything if e["event"] == "start")
    summary = next(e for e in everything if e["event"] == "summary")
    return {
        "backend": start["backend"],
        "renderer": start["renderer"],
        "steps": start["steps"],
        "target_fps": start["target_fps"],
        "frames_measured": len(frames),
        "model_fps_shown": round((len(frames) - 1) / span, 2),
        "display_fps": summary["display_fps"],
        "generate_ms_mean": round(statistics.fmean(f["generate_ms"] for f in frames), 2),
        "latency_ms_mean": round(statistics.fmean(latency), 2),
        "latency_ms_median": round(statistics.median(latency), 2),
        "latency_ms_p90": round(latency[int(0.9 * (len(latency) - 1))], 2),
        "moving_frames": sum(1 for f in frames if any(f["action"])),
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    client_options = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m play.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help="untrained model size to play (default: default)")
    p.add_argument("--backend", default="pygame", choices=("pygame", "pyglet"))
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of measured play (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring (default 3)")
    p.add_argument("--screenshot", type=Path, help="save a PNG of the window (taken from the X server)")
    args = p.parse_args(argv)
    try:
        result = run(args, client_options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, value in result.items():
        print(f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
