"""The method comparison: one Markdown table from the evaluation reports of several models.

    python -m train.compare EVAL_DIR [--runs RUNS_DIR] [--out table.md]

``EVAL_DIR`` holds one folder per row (``report.json`` from :mod:`train.evaluate`), named as in
:data:`ROWS` (``train/scripts/pipeline.sh`` writes them so); ``RUNS_DIR`` holds the stage run folders,
whose ``log.jsonl`` give the stage-3 cost (wall-clock seconds of the stage, trajectory generation
included). Rows without a report are left out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from train.evaluate import table


@dataclass(frozen=True)
class Row:
    folder: str  # report folder in EVAL_DIR
    label: str
    initialisation: str
    stage4: str
    granularity: str
    stage3_run: str | None  # run folder in RUNS_DIR whose cost is the row's stage 3


ROWS = (
    Row("ar_teacher", "AR teacher", "-", "-", "frame", None),
    Row("self_forcing_4step", "Self-Forcing-style", "ODE from the bidirectional teacher", "DMD", "chunk",
        "ode_bidirectional_chunk"),
    Row("causal_forcing_4step", "Causal Forcing", "causal ODE from the AR teacher", "DMD", "chunk", "causal_ode_chunk"),
    Row("causal_cd_2step", "CF++ before DMD", "causal CD", "-", "frame", "causal_cd"),
    Row("cf_pp_2step", "CF++ (ours, default)", "causal CD", "DMD", "frame", "causal_cd"),
    Row("cf_pp_1step", "CF++ (ours), sampled with 1 step", "causal CD", "DMD", "frame", "causal_cd"),
)

HEADER = ["row", "init", "stage 4", "gran.", "steps", "PSNR@8", "PSNR@32", "SSIM@32", "key acc.", "yaw err. deg",
          "swap pass", "FD last/first", "first frame ms", "frame latency ms", "FPS", "stage 3 GPU s (steps)"]


class CompareError(ValueError):
    """Inputs the comparison cannot use."""


def stage_cost(run_dir: Path) -> tuple[float, int] | None:
    """(wall-clock seconds over all sessions of the run, prepare included; steps) from its log.jsonl."""
    log = run_dir / "log.jsonl"
    if not log.exists():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    seconds = sum(r["wall_seconds"] for r in records if "wall_seconds" in r)
    steps = max((r["step"] for r in records if "step" in r), default=0)
    return seconds, steps


def frechet_ratio(report: dict) -> float:
    """Late-window over first-window Fréchet distance of the long rollouts (model)."""
    distances = [w["frechet"]["model"] for w in report["stability"]["windows"] if "frechet" in w]
    return distances[-1] / distances[0] if len(distances) >= 2 and distances[0] > 0 else math.nan


def measures(report: dict) -> list:
    fid = report["fidelity"]["rows"]["model (autoregressive)"]
    control = report["controllability"]["model (autoregressive)"]
    speed = report.get("speed", {})
    return [fid["psnr"].get("8", math.nan), fid["psnr"].get("32", math.nan), fid["ssim"].get("32", math.nan),
            control["key_accuracy"], control["yaw_error_deg"], report["swap_test"]["model"]["pass_fraction"],
            frechet_ratio(report), speed.get("first_frame_ms", math.nan), speed.get("latency_ms", math.nan),
            speed.get("fps", math.nan)]


def baseline_rows(report: dict) -> list[list]:
    """"Repeat the last frame" and ground truth (the IDM's ceiling), from one report."""
    fid, control = report["fidelity"]["rows"], report["controllability"]
    rows = []
    for label, fid_key, control_key in (("repeat last frame", "repeat last frame (autoregressive)", "repeat last frame"),
                                         ("ground truth", "ground truth", "ground truth")):
        f, c = fid[fid_key], control[control_key]
        swap = report["swap_test"][control_key]["pass_fraction"]
        rows.append([label, "-", "-", "-", "-", f["psnr"].get("8", math.nan), f["psnr"].get("32", math.nan),
                     f["ssim"].get("32", math.nan), c["key_accuracy"], c["yaw_error_deg"], swap, "-", "-", "-", "-", "-"])
    return rows


def comparison(eval_dir: Path, runs_dir: Path | None) -> str:
    """The Markdown table (model rows, then the baselines of the first report)."""
    rows, first = [], None
    for row in ROWS:
        path = eval_dir / row.folder / "report.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        first = first or report
        steps = len(report["checkpoint"]["sampler"]["steps"])
        cost = stage_cost(runs_dir / row.stage3_run) if runs_dir and row.stage3_run else None
        cost_text = "-" if cost is None else f"{cost[0]:.0f} ({cost[1]})"
        rows.append([row.label, row.initialisation, row.stage4, row.granularity, str(steps), *measures(report), cost_text])
    if first is None:
        raise CompareError(f"{eval_dir} holds no report of the rows {[r.folder for r in ROWS]}")
    return table(HEADER, rows + baseline_rows(first)) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dir", type=Path)
    p.add_argument("--runs", type=Path, default=None, help="stage run folders (for the stage-3 cost column)")
    p.add_argument("--out", type=Path, default=None, help="write the table here (default: print it)")
    args = p.parse_args(argv)
    try:
        text = comparison(args.eval_dir, args.runs)
    except (CompareError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
