"""Training speed: ``python -m train.bench [--stages teacher,ar_teacher,causal_cd,causal_scm,dmd] [--preset default]
[--batches 32,128,512] [--variants before,after] [--window 10] [--device cuda] [--data DIR] [--out results.json]``.

Every configuration (stage, preset, batch, variant) runs the real training step: ``python -m train
STAGE ...`` in its own process (so compiled state and memory do not leak from one to the next, and a
failing one becomes a table row), ``2 * window`` steps with ``run.log_every=window``. The second
window's record of ``log.jsonl`` gives the step time and frames/s (the first holds compilation and
warm-up); ``peak_memory_gb`` (``torch.cuda.max_memory_allocated``) is logged on CUDA only.
Variants: ``before`` is the old path (``run.compile=false data.latents=false``: eager attention
with dense masks, frames encoded every step), ``after`` the default one (``auto`` for both:
latents encoded once; on CUDA, compiled forwards with FlexAttention block masks).

Inputs are made without training: a fresh model of the preset for the data's actions, controller
and frame size, saved once per input stage it must come from (the same weights each time, so DMD's
student and teacher share their autoencoder). Speed does not depend on the weights. The recordings
are collected from the procedural world first (``--source synthetic`` writes camera-dependent
gradient frames instead, as the tests do: fast on a CPU), or reused from ``--data``.

TFLOP/s counts model FLOPs analytically from the DiT config and the stage (:func:`step_flops`):
the matmuls of the linear layers and of attention at the mask's true density (what a block-sparse
kernel must compute; dense attention over a masked sequence is not counted as useful work). A
trained forward with its backward is 3 forwards, a forward without gradient 1, a forward with its JVP 2. Autoencoder encodes
are not model FLOPs and are not counted, although the ``before`` variant pays for them in time;
the autoencoder stage itself is timed without FLOPs. Neither are the camera rays (a few 4x4
matmuls per frame), norms, rotary embeddings, losses and optimiser updates. The ``tile work`` column
(:func:`tile_work`) is what FlexAttention computes of a masked stage's attention over that true work:
a frame whose tokens straddle its 128-token tiles makes it compute partly masked tiles whole
(teacher forcing, 13 frames: 1.21 at the procedural 64 tokens a frame, 1.62 at Doom's 80).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from worldmodel.rollout import block_ranges
from train.config import compose, fresh_model_config
from train.data import StepBatches
from train.dmd import scored_from
from train.trainer import stage_class
from worldmodel import checkpoint
from worldmodel.actions import ActionSpec
from worldmodel.camera import ControllerSpec, integrate
from worldmodel.data.episode import EpisodeMeta, EpisodeWriter
from worldmodel.model import WorldModel, dit_config, model_config
from worldmodel.transformer import DiTConfig, rope_splits, sequence_frames

REPO = Path(__file__).resolve().parents[1]
STAGES = ("autoencoder", "teacher", "ar_teacher", "causal_cd", "causal_scm", "dmd")
VARIANTS = {"before": ("run.compile=false", "data.latents=false"), "after": ("run.compile=auto", "data.latents=auto")}
DEFAULT_PEAK_TFLOPS = 790.0  # H200 bf16 dense
TRAINED, FROZEN, TANGENT = 3, 1, 2  # forwards per network call: forward + backward (input and weight gradients),
# forward only, forward with its JVP (every matmul once on the primal, once on the tangent)
NOT_COUNTED = ("FLOPs: DiT matmuls at the true mask density; autoencoder encodes, the autoencoder stage and losses not counted; "
               "tile work: FlexAttention's 128x128 tiles computed over the mask's true work (1 = none wasted)")


# ----------------------------------------------------------------------------- FLOPs


def linear_flops(cfg: DiTConfig, batch: int, frames: int, out_frames: int) -> float:
    """Matmul FLOPs of the linear layers of one DiT forward over ``frames`` frames of tokens
    (``frames * N``), of which the last ``out_frames`` are unpatchified.

    Per block: qkv, proj and the MLP per token, ``2 L (4 D^2 + 2 hidden D)``, and the adaLN
    modulation per frame, ``2 F D 6D``; once: patch and camera embeddings per token, timestep and
    action MLPs per frame, the final adaLN and projection on the output frames.
    """
    n, d, a = cfg.tokens_per_frame, cfg.dim, cfg.action_dim
    patch, hidden = cfg.latent_channels * cfg.patch_size**2, int(cfg.dim * cfg.mlp_ratio)
    tokens = frames * n
    block = 2 * tokens * (4 * d * d + 2 * hidden * d) + 2 * frames * d * 6 * d
    embed = 2 * tokens * (patch + 6) * d + 2 * frames * (256 * d + a * d + 2 * d * d)
    final = 2 * out_frames * d * 2 * d + 2 * out_frames * n * d * patch
    return float(batch * (cfg.depth * block + embed + final))


def attention_flops(cfg: DiTConfig, batch: int, query_tokens: int, key_tokens: int, density: float = 1.0) -> float:
    """FLOPs of ``q k^T`` and ``softmax(.) v`` over all blocks: ``4 Lq Lk D`` per block, times the
    share ``density`` of query-key pairs the mask allows."""
    return float(batch * cfg.depth * 4 * query_tokens * key_tokens * cfg.dim * density)


def mask_density(mode: str, frames: int, block_size: int) -> float:
    """Share of allowed query-key pairs of a full-sequence forward in ``mode`` (``bidirectional``,
    ``causal`` or ``teacher_forcing`` over ``[clean | noisy]``): that of the frame mask, which the
    token mask repeats ``N x N`` times."""
    mask = sequence_frames(mode, frames, block_size)[0]
    return 1.0 if mask is None else int(mask.sum()) / mask.numel()


def tile_work(mode: str, frames: int, block_size: int, tokens_per_frame: int, tile: int = 128) -> float | None:
    """Attention work a block-sparse kernel with square ``tile`` x ``tile`` tiles does on a full-sequence
    forward in ``mode``, over the work the mask allows: every tile holding an allowed query-key pair is
    computed whole (the last, padded one too). 1 when frames line up with tiles; None without a mask.

    A tile of query frames ``[qa, qb]`` and key frames ``[ka, kb]`` (the frames its tokens belong to) is
    computed when the frame mask allows any pair inside it.
    """
    mask = sequence_frames(mode, frames, block_size)[0]
    if mask is None:
        return None
    length = mask.shape[0] * tokens_per_frame
    spans = [(i * tile // tokens_per_frame, (min((i + 1) * tile, length) - 1) // tokens_per_frame)
             for i in range(-(-length // tile))]
    computed = sum(bool(mask[qa:qb + 1, ka:kb + 1].any()) for qa, qb in spans for ka, kb in spans)
    return computed * tile**2 / (int(mask.sum()) * tokens_per_frame**2)


def sequence_forward_flops(cfg: DiTConfig, batch: int, frames: int, mode: str, density: float | None = None) -> float:
    """FLOPs of one full-sequence forward on clips of ``frames`` frames (``teacher_forcing``: the clean
    context and the noisy frames, of which the noisy ones are unpatchified); attention at the mask's density
    unless ``density`` is given."""
    length = sequence_frames(mode, frames, cfg.block_size)[1].numel()
    tokens = length * cfg.tokens_per_frame
    if density is None:
        density = mask_density(mode, frames, cfg.block_size)
    return linear_flops(cfg, batch, length, frames) + attention_flops(cfg, batch, tokens, tokens, density)


def cached_forward_flops(cfg: DiTConfig, batch: int, block_frames: int, cached_frames: int) -> float:
    """FLOPs of one KV-cached forward of a block of ``block_frames`` frames attending to the
    ``cached_frames`` held frames and itself."""
    n = cfg.tokens_per_frame
    return (linear_flops(cfg, batch, block_frames, block_frames)
            + attention_flops(cfg, batch, block_frames * n, (cached_frames + block_frames) * n))


def rollout_flops(cfg: DiTConfig, batch: int, frames: int, num_steps: int, trained: bool, trained_from: int = 0) -> float:
    """Expected FLOPs of one self-forcing rollout (:func:`train.algorithms.self_forcing_rollout`)
    of a clip: per block after the start frame, the commit of the block before it, folded into its first
    forward (:func:`commit_flops`; a commit before a gradient step is a forward of its own, which also
    unpatchifies its output: not counted), then, with the exit step uniform in ``[0, num_steps)``,
    ``(num_steps - 1) / 2`` denoising forwards without gradient and the exit forward (trained on generator
    turns), each attending to the cache (sinks + window frames at most). Blocks that start before ``trained_from`` are played: ``num_steps`` forwards
    without gradient. The last block is not committed."""
    capacity = cfg.sink_frames + cfg.window_frames
    calls = (num_steps - 1) / 2 + (TRAINED if trained else FROZEN)
    blocks = block_ranges(frames, cfg.block_size)
    total = 0.0
    for (before_start, before_end), (start, end) in zip(blocks, blocks[1:]):
        total += FROZEN * commit_flops(cfg, batch, before_end - before_start, min(capacity, before_start))
        steps = num_steps * FROZEN if start < trained_from else calls
        total += steps * cached_forward_flops(cfg, batch, end - start, min(capacity, start))
    return total


def commit_flops(cfg: DiTConfig, batch: int, frames: int, held: int) -> float:
    """FLOPs of a folded commit of ``frames`` frames onto ``held`` cached ones: its tokens through the blocks,
    attending to the held frames and themselves (no unpatchify); when it overflows the window, the cache roll and
    the sinks' keys turned ahead for the block it is folded with."""
    n, capacity = cfg.tokens_per_frame, cfg.sink_frames + cfg.window_frames
    total = linear_flops(cfg, batch, frames, 0) + attention_flops(cfg, batch, frames * n, (held + frames) * n)
    if held + frames > capacity:
        sinks_turned = 2 * cfg.depth * batch * cfg.heads * cfg.sink_frames * n * (2 * rope_splits(cfg)[0]) ** 2
        total += roll_flops(cfg, batch) + sinks_turned
    return total


def roll_flops(cfg: DiTConfig, batch: int) -> float:
    """FLOPs of a KV-cache roll that drops frames: the window's keys, time pairs turned by one matmul."""
    time_dims = 2 * rope_splits(cfg)[0]
    return 2 * cfg.depth * batch * cfg.heads * cfg.window_frames * cfg.tokens_per_frame * time_dims**2


def guided_batch(batch: int, guidance: float) -> int:
    """Batch of a guided forward: conditional and unconditional halves in one (``train.networks.guided_velocity_fn``)."""
    return batch if float(guidance) == 1.0 else 2 * batch


def step_flops(cfg: DictConfig, step: int) -> float | None:
    """Model FLOPs of training step ``step`` of a run with the resolved config ``cfg`` (its
    ``config.yaml``; one process); None for the autoencoder stage.

    - teacher: one trained bidirectional forward;
    - ar_teacher: one trained forward on the teacher-forcing sequence;
    - causal_cd: the frozen teacher's guided forward, the EMA target's and the trained student's,
      all teacher-forced;
    - causal_scm: the frozen teacher's guided forward, the student's forward with its JVP and its
      trained forward, all teacher-forced;
    - dmd: the rollout; on generator turns (every ``dmd.critic_updates``-th step) its exit forwards
      are trained and the guided real score and the critic run once without gradient; every step
      the critic trains on the rollout (its last ``dmd.score_frames`` frames when set). The score
      networks are taken to have the student's architecture (the bench's inputs do).
    """
    dit = dit_config(cfg.model)
    b, t, stage = int(cfg.data.batch), int(cfg.data.clip_len), str(cfg.stage)
    if stage == "teacher":
        return TRAINED * sequence_forward_flops(dit, b, t, "bidirectional")
    if stage == "ar_teacher":
        return TRAINED * sequence_forward_flops(dit, b, t, "teacher_forcing")
    if stage == "causal_cd":
        per_clip = sequence_forward_flops(dit, 1, t, "teacher_forcing")
        return per_clip * (FROZEN * guided_batch(b, cfg.cd.guidance) + FROZEN * b + TRAINED * b)
    if stage == "causal_scm":
        per_clip = sequence_forward_flops(dit, 1, t, "teacher_forcing")
        return per_clip * (FROZEN * guided_batch(b, cfg.scm.guidance) + TANGENT * b + TRAINED * b)
    if stage == "dmd":
        generator_turn = step % int(cfg.dmd.critic_updates) == 0
        start = scored_from(t, int(cfg.dmd.score_frames), dit.block_size)
        bidirectional = sequence_forward_flops(dit, 1, t - start, "bidirectional")
        total = rollout_flops(dit, b, t, len(cfg.model.sampler.steps), generator_turn, start) + TRAINED * b * bidirectional
        if generator_turn:
            total += bidirectional * (FROZEN * guided_batch(b, cfg.dmd.guidance) + FROZEN * b)
        return total
    return None


def stage_tile_work(cfg: DictConfig) -> float | None:
    """:func:`tile_work` of the stage's masked full-sequence forwards (the teacher-forcing sequence of
    stages 2, 3a and 3c; sCM's JVP forward has its own kernel) when they run through FlexAttention:
    compiled (``run.compile`` true or auto) on CUDA (the trainer keeps SDPA on the CPU); None otherwise."""
    device = str(cfg.run.device)
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    compiled = cfg.run.compile is True or cfg.run.compile == "auto"
    if str(cfg.stage) not in ("ar_teacher", "causal_cd", "causal_scm") or not (compiled and on_cuda):
        return None
    dit = dit_config(cfg.model)
    return tile_work("teacher_forcing", int(cfg.data.clip_len), dit.block_size, dit.tokens_per_frame)


def window_flops(cfg: DictConfig, window: int) -> float | None:
    """Mean model FLOPs per step over the timed window, steps ``[window, 2 * window)``."""
    counts = [step_flops(cfg, s) for s in range(window, 2 * window)]
    return None if counts[0] is None else sum(counts) / window


# ----------------------------------------------------------------------------- inputs


def write_synthetic(root: Path, episodes: int, frames: int, size: tuple[int, int]) -> Path:
    """Recordings whose frames are gradients shifted by the camera yaw (as the tests write them)."""
    spec, ctrl, (h, w) = ActionSpec(), ControllerSpec(), size
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.linspace(0, 1, w), torch.linspace(0, 1, h)
    for e in range(episodes):
        keys = (torch.rand(1, frames, len(spec.keys), generator=g) < 0.3).float()
        actions = torch.cat([keys, torch.randint(-20, 21, (1, frames, 2), generator=g).float()], -1)
        actions[:, 0] = 0
        poses, _ = integrate(actions, spec, ctrl)
        meta = EpisodeMeta(action_spec=spec, controller=ctrl, fps=20.0, height=h, width=w, source="synthetic", seed=e)
        with EpisodeWriter(root / f"ep{e:04d}", meta) as writer:
            for t in range(frames):
                yaw = torch.atan2(poses[0, t, 0, 2], poses[0, t, 2, 2])
                red = ((xs[None, :] + yaw / math.pi) % 1.0).expand(h, w)
                image = torch.stack([red, ys[:, None].expand(h, w), torch.full((h, w), e / episodes)], -1)
                writer.append((image * 255).byte(), actions[0, t], poses[0, t])
    return root


def make_data(root: Path, source: str, preset: str, episodes: int, frames: int, device: str) -> Path:
    """Recordings at the preset's frame size in ``root``, unless it already holds some."""
    if root.is_dir() and any(root.iterdir()):
        return root
    ae = model_config(preset, "procedural").autoencoder  # the preset's frame size in the procedural world
    size = int(ae.frame_height), int(ae.frame_width)
    if source == "synthetic":
        return write_synthetic(root, episodes, frames, size)
    subprocess.run([sys.executable, "-m", "worldmodel.data", "collect", "--world", "procedural", "--episodes", str(episodes),
                    "--frames", str(frames), "--batch", str(episodes), "--device", device, "--size", f"{size[1]}x{size[0]}",
                    "--out", str(root)], check=True, cwd=REPO, env=child_env())
    return root


def make_inputs(root: Path, stages: list[str], preset: str, data: Path) -> dict[str, Path]:
    """Input checkpoint per stage name the ``stages`` need: one fresh model of the preset for the
    data, saved as made by each such stage."""
    needed = sorted({accepted[0] for s in stages for accepted in stage_class(s).inputs.values()})
    if not needed:
        return {}
    cfg, _ = compose("teacher", [f"preset={preset}", "data.source=recordings", f"data.recordings={data}"])
    torch.manual_seed(0)
    model = WorldModel(fresh_model_config(preset, StepBatches(cfg.data, 0).info))
    paths = {}
    for name in needed:
        model.config.stage = name
        paths[name] = root / f"{name}.safetensors"
        checkpoint.save(paths[name], model)
    return paths


# ----------------------------------------------------------------------------- runs


def child_env() -> dict:
    """The environment of the child processes: this repository first on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_overrides(stage: str, batch: int, variant: str, args, data: Path, inputs: dict[str, Path],
                  run_dir: Path) -> list[str]:
    """The ``python -m train STAGE`` overrides of one configuration of the bench's ``args`` (``--profile``:
    a third window under torch.profiler, after the timed one)."""
    init = [f"init.{key}={inputs[accepted[0]]}" for key, accepted in stage_class(stage).inputs.items()]
    window = args.window
    steps = [f"run.steps={3 * window}", "run.profile=true"] if args.profile else [f"run.steps={2 * window}"]
    return [f"preset={args.preset}", "data.source=recordings", f"data.recordings={data}", f"data.batch={batch}",
            f"run.device={args.device}", f"run.dir={run_dir}", *steps, f"run.log_every={window}",
            f"run.checkpoint_every={10**9}", "run.sample_every=0", *init, *VARIANTS[variant], *args.overrides]


def failure(returncode: int, stderr: str) -> str:
    """What a failed run's status says: out of memory, or its last line of error output."""
    if "out of memory" in stderr.lower():
        return "out of memory"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else f"exit status {returncode}")[:200]


def timed_record(run_dir: Path, window: int) -> dict:
    """The log record of the second timing window (step ``2 * window``)."""
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == 2 * window and "step_seconds" in record:
            return record
    raise ValueError(f"no timing record at step {2 * window} in {run_dir / 'log.jsonl'}")


def measure(record: dict, flops: float | None, peak_tflops: float) -> dict:
    """A result row's numbers from the timed record and the FLOPs per step."""
    seconds = float(record["step_seconds"])
    tflops = None if flops is None else flops / seconds / 1e12
    return {"step_ms": 1000 * seconds, "frames_per_second": float(record["frames_per_second"]),
            "gflop_per_step": None if flops is None else flops / 1e9, "tflops": tflops,
            "peak_share": None if tflops is None else tflops / peak_tflops, "peak_memory_gb": record.get("peak_memory_gb")}


def bench_one(stage: str, batch: int, variant: str, args, data: Path, inputs: dict[str, Path], runs: Path) -> dict:
    """Run one configuration in its own process; its result row (``status`` ok or what went wrong)."""
    row = {"stage": stage, "preset": args.preset, "batch": batch, "variant": variant}
    run_dir = runs / f"{stage}-{args.preset}-b{batch}-{variant}"
    command = [sys.executable, "-m", "train", stage, *run_overrides(stage, batch, variant, args, data, inputs, run_dir)]
    try:
        done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True,
                              timeout=args.timeout or None)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"timed out after {args.timeout:g} s"}
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return {**row, "status": failure(done.returncode, done.stderr)}
    try:
        record = timed_record(run_dir, args.window)
    except (OSError, ValueError) as e:
        return {**row, "status": f"no timing: {e}"}
    cfg = OmegaConf.load(run_dir / "config.yaml")
    profile = run_dir / "profile.txt"
    return {**row, "status": "ok", **measure(record, window_flops(cfg, args.window), args.peak_tflops),
            "tile_work": stage_tile_work(cfg),
            **({"profile": profile.read_text()} if profile.exists() else {})}


# ----------------------------------------------------------------------------- report


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table; a failed configuration shows its status."""
    lines = ["| stage | preset | batch | variant | step ms | frames/s | GFLOP/step | TFLOP/s | % of peak | tile work | peak GB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = None if r.get("peak_share") is None else 100 * r["peak_share"]
        lines.append(f"| {r['stage']} | {r['preset']} | {r['batch']} | {r['variant']} | {_fmt(r.get('step_ms'), '.1f')} | "
                     f"{_fmt(r.get('frames_per_second'), ',.0f')} | {_fmt(r.get('gflop_per_step'), '.4g')} | "
                     f"{_fmt(r.get('tflops'), '.3g')} | {_fmt(share, '.3g')} | {_fmt(r.get('tile_work'), '.2f')} | "
                     f"{_fmt(r.get('peak_memory_gb'), '.2f')} | "
                     f"{r['status']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run (e.g. data.workers=8)")
    parser.add_argument("--stages", default="teacher,ar_teacher,causal_cd,causal_scm,dmd", help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--batches", default="32,128,512", help="comma-separated global batches (data.batch)")
    parser.add_argument("--variants", default="before,after", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--window", type=int, default=10, help="steps per timing window; each run takes two")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="the GPU's bf16 peak, TFLOP/s")
    parser.add_argument("--data", type=Path, help="recordings to use; collected there first if the folder is empty or missing")
    parser.add_argument("--source", choices=("procedural", "synthetic"), default="procedural", help="what new recordings hold")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--frames", type=int, default=80, help="frames per episode")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per configuration (0: no limit)")
    parser.add_argument("--profile", action="store_true",
                        help="profile a third window per configuration (torch.profiler); print its top kernels")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.stages, args.variants = args.stages.split(","), args.variants.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    unknown = sorted(set(args.stages) - set(STAGES)) + sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown stages or variants {unknown}; stages: {list(STAGES)}, variants: {list(VARIANTS)}")
    if args.window < 1:
        parser.error("--window must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tmp = Path(tmp)
        data = make_data(args.data or tmp / "episodes", args.source, args.preset, args.episodes, args.frames, args.device)
        inputs = make_inputs(tmp, args.stages, args.preset, data)
        for stage in args.stages:
            for batch in args.batches:
                for variant in args.variants:
                    rows.append(bench_one(stage, batch, variant, args, data, inputs, tmp / "runs"))
                    r = rows[-1]
                    print(f"{stage} {args.preset} batch {batch} {variant}: "
                          + (f"{r['step_ms']:.1f} ms/step, {r['frames_per_second']:,.0f} frames/s, "
                             f"{_fmt(r['tflops'], '.3g')} TFLOP/s" if r["status"] == "ok" else r["status"]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": args.device, "peak_tflops": args.peak_tflops, "window": args.window,
                                        "note": NOT_COUNTED, "rows": rows}, indent=1) + "\n")
    print(f"\n{NOT_COUNTED}; peak {args.peak_tflops:g} TFLOP/s\n")
    print(table(rows))
    for r in rows:
        if "profile" in r:
            print(f"\n{r['stage']} {r['preset']} batch {r['batch']} {r['variant']}, top kernels by device time:\n{r['profile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
