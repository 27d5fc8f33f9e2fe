"""Quality against GPU-seconds: students of one AR teacher, each evaluated at its timed exports.

    python -m train.curve EVAL_DIR --runs RUNS_DIR [--out DIR]

``EVAL_DIR`` holds the reports that ``train/scripts/gpu_session.sh`` writes with the short curve
protocol: ``curve_<run>_<seconds>s/`` for the export ``<run>/exports/model_<seconds>s.safetensors``
(``run.export_every_s``), ``curve_<run>_final/`` for the run's last model, and references such as
``curve_ar_teacher/``. ``RUNS_DIR`` holds the run folders, whose ``log.jsonl`` give each export's step and
run-clock seconds (compile and warm-up included) and the final model's. Writes ``curve.md`` (one row per
point, and how soon each run first matched the first run's final PSNR@8) and ``curve.png``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from train.evaluate import table
from train.evaluate.plots import save_figure
from worldmodel.cli_args import ArgumentParser, run_cli
from worldmodel.files import atomic_output, write_text_atomic

POINT = re.compile(r"curve_(?P<run>.+?)_(?:(?P<seconds>\d+)s|final)$")


@dataclass(frozen=True)
class Point:
    run: str
    seconds: float  # run clock when the model was exported
    step: int
    psnr8: float
    psnr32: float
    swap: float
    key_accuracy: float


def run_log(run_dir: Path) -> tuple[dict[int, tuple[float, int]], tuple[float, int]]:
    """({export label seconds: (run seconds, step)}, (final run seconds, final step)) from log.jsonl."""
    path = run_dir / "log.jsonl"
    if not path.exists():
        raise ValueError(f"{path} is missing: the curve needs each run's log")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        exports = {}
        for r in records:
            label = re.search(r"model_(\d+)s\.safetensors$", str(r.get("export", "")))
            if label:
                exports[int(label.group(1))] = (float(r["run_seconds"]), int(r["step"]))
        walls = [r for r in records if "wall_seconds" in r]
        final = (sum(float(r["wall_seconds"]) for r in walls), int(walls[-1]["step"])) if walls else None
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a training log (no {e})") from None
    if final is None:
        raise ValueError(f"{path} has no wall_seconds record: the run did not finish")
    return exports, final


def measures(report: dict, row: str = "model") -> tuple[float, float, float, float]:
    """(PSNR@8, PSNR@32, swap pass fraction, IDM key accuracy) of a report's autoregressive rollouts
    (``row`` "model", or "repeat last frame" for the baseline)."""
    psnr = report["fidelity"]["rows"][f"{row} (autoregressive)"]["psnr"]
    control = report["controllability"]["model (autoregressive)" if row == "model" else row]
    return (float(psnr.get("8", math.nan)), float(psnr.get("32", math.nan)),
            float(report["swap_test"][row]["pass_fraction"]), float(control["key_accuracy"]))


def points(eval_dir: Path, runs_dir: Path) -> tuple[dict[str, list[Point]], dict[str, tuple]]:
    """The runs' points sorted by seconds, and the references' measures (folders without seconds)."""
    runs: dict[str, list[Point]] = {}
    references = {}
    logs = {}
    for report_path in sorted(eval_dir.glob("curve_*/report.json")):
        name = report_path.parent.name
        try:
            report = json.loads(report_path.read_text())
            values, repeat = measures(report), measures(report, "repeat last frame")
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{report_path} is not a train.evaluate report (no {e})") from None
        references.setdefault("repeat last frame", repeat)
        match = POINT.match(name)
        if match is None or not (runs_dir / match["run"]).is_dir():
            references[name.removeprefix("curve_")] = values
            continue
        run = match["run"]
        exports, final = logs.setdefault(run, run_log(runs_dir / run))
        if match["seconds"] is None:
            seconds, step = final
        elif int(match["seconds"]) in exports:
            seconds, step = exports[int(match["seconds"])]
        else:
            raise ValueError(f"{name}: {run}'s log has no export of {match['seconds']} s")
        runs.setdefault(run, []).append(Point(run, seconds, step, *values))
    if not runs:
        raise ValueError(f"{eval_dir} holds no curve_<run>_<seconds>s report of a run in {runs_dir}")
    return {run: sorted(p, key=lambda q: q.seconds) for run, p in runs.items()}, references


def first_reach(curve: list[Point], target: float) -> float | None:
    """Run seconds of the first point whose PSNR@8 is at least ``target``."""
    return next((p.seconds for p in curve if p.psnr8 >= target), None)


def markdown(runs: dict[str, list[Point]], references: dict[str, tuple]) -> str:
    header = ["run", "run s", "step", "PSNR@8", "PSNR@32", "swap pass", "key acc."]
    rows = [[p.run, f"{p.seconds:.0f}", str(p.step), p.psnr8, p.psnr32, p.swap, p.key_accuracy]
            for curve in runs.values() for p in curve]
    rows += [[name, "-", "-", *values] for name, values in references.items()]
    text = table(header, rows) + "\n"
    first, *others = runs
    target = runs[first][-1]
    for run in others:
        reached = first_reach(runs[run], target.psnr8)
        when = "never" if reached is None else f"at {reached:.0f} s ({target.seconds / reached:.1f}x sooner)"
        text += (f"\n{run} first reached {first}'s final PSNR@8 ({target.psnr8:.2f} dB at {target.seconds:.0f} s) "
                 f"{when}.\n")
    return text


def plot(runs: dict[str, list[Point]], references: dict[str, tuple], path: Path) -> None:
    def panel(title: str, index: int, field: str) -> tuple[str, str, dict]:
        series = {run: ([p.seconds for p in c], [getattr(p, field) for p in c]) for run, c in runs.items()}
        end = max(p.seconds for c in runs.values() for p in c)
        series.update({name: ([0, end], [values[index]] * 2) for name, values in references.items()})
        return title, title, series
    save_figure(path, [panel("held-out PSNR@8", 0, "psnr8"), panel("swap test pass fraction", 2, "swap")],
                xlabel="run seconds (GPU)")


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m train.curve", description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dir", type=Path)
    p.add_argument("--runs", type=Path, required=True, help="the run folders (their log.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="folder for curve.md and curve.png (default: EVAL_DIR)")

    def run() -> int:
        args = p.parse_args(argv)
        out = args.out or args.eval_dir
        runs, references = points(args.eval_dir, args.runs)
        out.mkdir(parents=True, exist_ok=True)
        text = markdown(runs, references)
        write_text_atomic(out / "curve.md", text)
        with atomic_output(out / "curve.png") as tmp:
            plot(runs, references, tmp)
        print(text, end="")
        return 0
    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
