"""Evaluate a world-model checkpoint against a ground-truth world: how faithful, how controllable,
how stable over long sessions, how fast. Writes ``report.json``, ``report.md``, PNG plots and JPEG
contact sheets of the long rollouts.

    python -m train.evaluate CHECKPOINT --world procedural|doom --out DIR
        [--clips 16 --horizon 128 --long-frames 2000 --long-clips 4 --window 200
         --speed-frames 100 --seed 0 --device cpu|cuda --world-device DEV --dtype float32|bfloat16 --idm PATH
         --steps 1.0]

Protocol. Ground truth is played in held-out worlds of the fixed split (:mod:`worldmodel.data.splits`:
procedural seeds >= HELDOUT_SEED_START, Doom's held-out maps) by the "mix" exploration policy; every
episode starts at a world reset (all-zero first action). The model starts from the episode's first
frame and is driven by the episode's recorded actions. Seeds of worlds, policies and sampler all
derive from ``--seed``, so a report is reproducible (except its speed figures). All rollouts (the
clips autoregressive, teacher-forced and under swapped actions, and the long ones of both policies) play side by side
in one batched session, each run drawing the noise a session of its own would (``rollouts``).

Measures (each also for the baselines "repeat the last frame" and, where it has a meaning, ground truth):
- fidelity: PSNR / SSIM at the horizons, autoregressive (the model's own history) and teacher-forced
  (ground-truth history written into the cache, one step predicted);
- controllability: the inverse-dynamics model (assets/idm/<world>.safetensors) on ground truth
  (its ceiling), on rollouts and on the baseline; and the swap test (a rollout under its own actions
  must be closer to ground truth than one under another clip's actions), with the reference of motion alone:
  the true world's dynamics replayed in other worlds than the clips';
- stability: a ``--long-frames`` rollout scored per window (Fréchet distance of IDM features,
  sharpness, colour statistics, controllability); and the same in the same worlds played by the "gazer"
  policy, who holds the view up or down (where Doom's students break up);
- speed: first-frame latency, per-frame latency and FPS at batch 1 (worldmodel.bench.measure).

Modules: :mod:`.protocol` (settings, ground truth, rollouts), :mod:`.measures`, :mod:`.evaluation` (every
measure of one checkpoint, speed), :mod:`.report` (report.json, report.md), :mod:`.plots`, :mod:`.cli`.
"""

from train.evaluate.cli import main
from train.evaluate.evaluation import evaluate, speed_report
from train.evaluate.measures import (PIXEL, autoencoder_report, clip_distance, control_report, fidelity_report,
                                     per_frame, stability_report, swap_report, window_stats)
from train.evaluate.protocol import EvalError, EvalSettings, Run, play_runs, repeat_first, repeat_previous, rollout, rollouts
from train.evaluate.report import fmt, markdown, plain, table, write_report

__all__ = ["EvalError", "EvalSettings", "PIXEL", "Run", "autoencoder_report", "clip_distance", "control_report",
           "evaluate", "fidelity_report", "fmt", "main", "markdown", "per_frame", "plain", "play_runs", "repeat_first",
           "repeat_previous", "rollout", "rollouts", "speed_report", "stability_report", "swap_report", "table",
           "window_stats", "write_report"]
