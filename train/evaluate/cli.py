"""The command line of the evaluation (``python -m train.evaluate``: see the package docstring)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from train.evaluate.evaluation import evaluate, speed_report
from train.evaluate.measures import autoencoder_report, reconstruct
from train.evaluate.plots import reconstruction_sheet
from train.evaluate.protocol import HORIZONS, EvalError, EvalSettings, heldout_episodes
from train.evaluate.report import write_report
from worldmodel.cli_args import ArgumentParser, run_cli
from worldmodel.files import write_text_atomic
from worldmodel.idm import default_idm_path, load_idm


SHEET_FRAMES = 8  # held-out start frames in autoencoder.png


def parse_args(argv):
    p = ArgumentParser(prog="python -m train.evaluate", description="Evaluate a world-model checkpoint against "
                       "a ground-truth world: how faithful, how controllable, how stable over long sessions, how fast.")
    p.add_argument("checkpoint")
    p.add_argument("--world", required=True, choices=["procedural", "doom"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--horizon", type=int, default=128, help="longest fidelity horizon (frames)")
    p.add_argument("--horizons", default=",".join(map(str, HORIZONS)), help="comma-separated horizons to report")
    p.add_argument("--long-frames", type=int, default=2000)
    p.add_argument("--long-clips", type=int, default=4)
    p.add_argument("--window", type=int, default=200, help="stability window (frames)")
    p.add_argument("--speed-frames", type=int, default=100, help="timed frames of the speed measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--world-device", default=None, help="where the procedural world renders (default: --device)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model precision (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--idm", type=Path, default=None, help="IDM weights (default assets/idm/<world>.safetensors)")
    p.add_argument("--autoencoder-only", action="store_true",
                   help="measure only the autoencoder on the held-out clips (no rollouts); writes autoencoder.json "
                   "and autoencoder.png")
    p.add_argument("--steps", default=None,
                   help="comma-separated noise levels of the sampler, e.g. 1.0 for one step (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance of the sampler, 1 for none (default: the checkpoint's)")
    p.add_argument("--context-noise", type=float, default=None,
                   help="noise level of the history the model sees, 0 for clean (default: the checkpoint's)")
    p.add_argument("--kv-cache", default=None, metavar="SINKS,WINDOW",
                   help="the KV cache the model plays with: first frames kept, then a rolling window of the last "
                   "WINDOW frames, e.g. 0,12 (default: the checkpoint's)")
    return p.parse_args(argv)


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise EvalError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_kv_cache(text: str) -> tuple[int, int]:
    """``--kv-cache`` "SINKS,WINDOW" -> (sink frames, window frames)."""
    try:
        sinks, window = (int(v) for v in text.split(","))
    except ValueError:
        raise EvalError(f"--kv-cache must be two comma-separated integers SINKS,WINDOW, got {text!r}") from None
    if sinks < 0 or window < 1:
        raise EvalError(f"--kv-cache needs SINKS >= 0 and WINDOW >= 1, got {text!r}")
    return sinks, window


def write_sheet(autoencoder, frames: torch.Tensor, out: Path, device) -> str:
    """autoencoder.png in ``out``: uint8 ``frames [N, H, W, 3]`` beside their reconstructions; returns its name."""
    out.mkdir(parents=True, exist_ok=True)
    reconstruction_sheet(frames.numpy(), reconstruct(autoencoder, frames, device).numpy(), out / "autoencoder.png")
    return "autoencoder.png"


def main(argv=None) -> int:
    return run_cli(lambda: evaluate_cli(argv))


def evaluate_cli(argv) -> int:
    """The CLI body: parse, evaluate, write the report (errors propagate to :func:`run_cli`)."""
    args = parse_args(argv)
    from worldmodel.checkpoint import load
    from worldmodel.model import with_kv_cache
    from worldmodel.session import Session

    try:
        horizons = tuple(int(h) for h in args.horizons.split(","))
    except ValueError:
        raise EvalError(f"--horizons must be comma-separated integers, got {args.horizons!r}") from None
    steps = None if args.steps is None else parse_floats(args.steps, "--steps")
    model = load(args.checkpoint, device=args.device, untrained_dit=args.autoencoder_only)
    if args.guidance is not None:
        model.config.sampler.guidance = args.guidance  # checked by the Session below
    if args.context_noise is not None:
        model.config.sampler.context_noise = args.context_noise
    if args.kv_cache is not None:
        model = with_kv_cache(model, *parse_kv_cache(args.kv_cache))
    height, width = model.frame_size
    settings = EvalSettings(
        world=args.world, clips=args.clips, horizon=args.horizon, horizons=horizons, long_frames=args.long_frames,
        long_clips=args.long_clips, window=args.window, speed_frames=args.speed_frames, seed=args.seed,
        device=args.device, world_device=args.world_device, world_options={"height": height, "width": width},
    )
    if model.config.world not in (args.world, "custom"):
        raise EvalError(f"checkpoint was trained on world {model.config.world!r}, not {args.world!r}")
    if args.autoencoder_only:
        clips = heldout_episodes(settings, "clips", settings.clips, settings.horizon + 1)
        autoencoder = autoencoder_report(model.autoencoder, clips["frames"], args.device)
        autoencoder["sheet"] = write_sheet(model.autoencoder, clips["frames"][:SHEET_FRAMES, 0], args.out, args.device)
        write_text_atomic(args.out / "autoencoder.json", json.dumps(autoencoder, indent=1) + "\n")
        print(f"autoencoder on {autoencoder['frames']} held-out frames: PSNR {autoencoder['psnr']:.2f} dB, "
              f"SSIM {autoencoder['ssim']:.3f}, sharpness {autoencoder['sharpness']:.1f} against "
              f"{autoencoder['sharpness_truth']:.1f} ({autoencoder['sharpness_ratio']:.3f})")
        return 0
    idm = load_idm(args.idm or default_idm_path(args.world), device=args.device)
    if (model.action_spec, model.controller) != (idm.cfg.action_spec, idm.cfg.controller):
        raise EvalError(
            f"the checkpoint's actions/controller ({model.action_spec}, {model.controller}) differ from those of "
            f"the {args.world} world the IDM was trained in ({idm.cfg.action_spec}, {idm.cfg.controller})"
        )
    block_size = model.dit.cfg.block_size
    dtype = getattr(torch, args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32"))
    autoencoder = copy.deepcopy(model.autoencoder)  # float32: the sessions cast the model to their dtype
    Session(model, batch=1, device=args.device, steps=steps, dtype=dtype)  # a bad --steps or sampler fails here
    report = evaluate(lambda b, s: Session(model, batch=b, device=args.device, steps=steps, seed=s, dtype=dtype),
                      idm, settings, block_size, autoencoder, sheets=args.out)
    report["speed"] = speed_report(model, settings, dtype, steps)
    sampler = {**OmegaConf.to_container(model.config.sampler), **({"steps": steps} if steps else {})}
    report["checkpoint"] = {"path": str(args.checkpoint), "stage": str(model.config.stage),
                            "parameters": model.num_parameters(), "sampler": sampler,
                            "kv_cache": {"sink_frames": int(model.config.dit.sink_frames),
                                         "window_frames": int(model.config.dit.window_frames)}}
    sheet_frames = heldout_episodes(settings, "clips", min(SHEET_FRAMES, settings.clips), 1)["frames"][:, 0]
    report["autoencoder"]["sheet"] = write_sheet(autoencoder, sheet_frames, args.out, args.device)
    write_report(report, args.out, f"{Path(args.checkpoint).name} on {args.world}")
    print(f"wrote {args.out / 'report.md'}")
    return 0
