"""How a model's latents drift in a long rollout, beside the world's own frames encoded by its autoencoder:

    python3 train/scripts/rollout_latents.py CHECKPOINT [--world doom] [--frames 300] [--script FILE] [--steps 1.0,0.5]
        [--std-cap 1.25] [--kv-cache SINKS,WINDOW] [--sheet DIR]

plays the demo script (``assets/scripts/demo.txt``; ``--script``: another, e.g. ``assets/scripts/demo-level.txt``, the
demo without its look up and down) from the world's start frame as ``play.sheets`` does and prints, at
some frames, the generated latent's standard deviation and largest magnitude next to those of the real frame's
latent. ``--steps`` samples with these noise levels; ``--std-cap`` scales every generated block about its mean so that
its standard deviation is at most that (a probe, not a feature); ``--kv-cache`` plays with another KV cache, as in
``train.evaluate``; ``--sheet`` also writes ``play.sheets``' contact sheets under these settings.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from play.generator import FrameGenerator  # noqa: E402
from play.script import load_script, script_cycle  # noqa: E402
from play.sheets import DEMO_SCRIPT, make_sheets  # noqa: E402
from train.evaluate.cli import parse_kv_cache  # noqa: E402
from worldmodel.checkpoint import load  # noqa: E402
from worldmodel.cli_args import ArgumentParser, run_cli  # noqa: E402
from worldmodel.envs import WORLDS, make_world  # noqa: E402
from worldmodel.frames import to_model  # noqa: E402
from worldmodel.model import with_kv_cache  # noqa: E402
from worldmodel.session import Session  # noqa: E402

SHOWN = (1, 5, 10, 20, *range(50, 501, 50), 1000)


def capped(sample, cap: float):
    """``sample`` whose latents ``[B, T, C, h, w]`` are scaled about each frame's mean to a std of at most ``cap``."""
    def run(*args, **kwargs):
        x = sample(*args, **kwargs)
        flat = x.to(torch.promote_types(x.dtype, torch.float32)).flatten(2)
        mean, std = flat.mean(2, keepdim=True), flat.std(2, keepdim=True)
        return ((flat - mean) * (cap / std).clamp(max=1.0) + mean).view_as(x).to(x.dtype)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="train/scripts/rollout_latents.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--world", default="doom", choices=sorted(WORLDS))
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--script", type=Path, default=DEMO_SCRIPT, help="actions to play (play.script's format)")
    parser.add_argument("--steps", help="noise levels, comma-separated (default: the checkpoint's)")
    parser.add_argument("--std-cap", type=float, default=0.0, help="0: none")
    parser.add_argument("--kv-cache", metavar="SINKS,WINDOW", help="default: the checkpoint's")
    parser.add_argument("--sheet", type=Path)
    args = parser.parse_args(argv)
    return run_cli(lambda: probe(args))


def probe(args) -> int:
    """Play, print the latent figures (and write the sheets); bad arguments or files raise ValueError / OSError."""
    if args.frames < 1 or not args.std_cap >= 0:
        raise ValueError(f"--frames must be >= 1 and --std-cap >= 0, got {args.frames} and {args.std_cap}")
    steps = [float(s) for s in args.steps.split(",")] if args.steps else None
    model = load(args.checkpoint)
    segments = load_script(args.script, model.action_spec)
    if args.kv_cache:
        model = with_kv_cache(model, *parse_kv_cache(args.kv_cache))
    height, width = model.frame_size
    session = Session(model, batch=1)
    generator = FrameGenerator(session, make_world(args.world, batch=1, height=height, width=width))
    if steps:
        generator.use_steps(steps)
    if args.std_cap > 0:  # after FrameGenerator, whose cast builds the session's rollout anew
        session.rollout.sample = capped(session.rollout.sample, args.std_cap)
    dtype = next(model.autoencoder.parameters()).dtype
    actions = script_cycle(segments, generator.spec)
    with torch.inference_mode():
        generator.reset(0)
        for t in range(1, args.frames + 1):
            shown = generator.step(next(actions))
            if t in SHOWN or t == args.frames:
                z = session._pending[0].float()
                real = model.autoencoder.encode(to_model(torch.as_tensor(shown.panels[0])[None, None], dtype)).float()
                print(f"frame {t:5d}  model latent std {z.std():.3f} max |z| {z.abs().max():.2f}  "
                      f"real std {real.std():.3f} max |z| {real.abs().max():.2f}")
        if args.sheet:
            for path in make_sheets(generator, args.sheet):
                print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
