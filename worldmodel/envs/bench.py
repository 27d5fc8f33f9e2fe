"""World speed: ``python -m worldmodel.envs.bench --world procedural --batch 256 --frames 2000 --device cuda``.

Prints frames per second of ``world.step`` (render + frames back on the CPU, which synchronises),
warm-up excluded, for actions of the "mix" policy drawn beforehand (the policy's own speed is
printed on a second line). Doom: ``--world doom --batch 8 --workers 2`` spreads the games over
worker processes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from worldmodel.actions import ActionError
from worldmodel.envs import WORLDS, WorldError, make_world
from worldmodel.envs.policies import PolicyError, make_policy


def measure(world, frames: int, warmup: int = 5) -> tuple[float, float]:
    """(world frames/s, policy actions/s) over about ``frames`` frames after ``warmup`` steps."""
    steps = max(1, math.ceil(frames / world.batch))
    policy = make_policy("mix", world.action_spec, world.batch, seed=0)
    world.reset(list(range(world.batch)))
    start = time.perf_counter()
    actions = [policy(i + 1, None) for i in range(warmup + steps)]
    policy_rate = world.batch * len(actions) / (time.perf_counter() - start)
    for a in actions[:warmup]:
        world.step(a)
    start = time.perf_counter()
    for a in actions[warmup:]:
        world.step(a)  # frames come back on the CPU: each step is synchronous
    return world.batch * steps / (time.perf_counter() - start), policy_rate


def describe(world, args) -> str:
    if args.world == "doom":
        return f"CPU, {args.workers or 'no'} worker processes"
    if world.device.type == "cuda":
        where = torch.cuda.get_device_name(world.device)
    else:
        where = f"CPU ({torch.get_num_threads()} threads)"
    return f"{where}, chunk {world.chunk}, {'compiled' if args.compile else 'eager'}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="procedural", choices=WORLDS)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--frames", type=int, default=2000, help="frames to time (rounded up to whole steps)")
    p.add_argument("--steps", type=int, default=None, help="steps to time instead of --frames")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, caches)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="procedural only")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="procedural: torch.compile the per-ray kernels")
    p.add_argument("--chunk", type=int, default=None, help="procedural: batch items rendered at once")
    p.add_argument("--workers", type=int, default=0, help="doom: worker processes (0: games in this process)")
    args = p.parse_args(argv)
    try:
        if min(args.batch, args.frames, args.steps or 1) < 1 or args.warmup < 0:
            raise WorldError("batch, frames and steps must be >= 1, warmup >= 0")
        if args.threads:
            torch.set_num_threads(args.threads)
        options = {} if args.size is None else {"height": args.size[0], "width": args.size[1]}
        if args.world == "procedural":
            options.update(compile=args.compile, chunk=args.chunk)
        else:
            options.update(workers=args.workers)
        with make_world(args.world, batch=args.batch, device=args.device, **options) as world:
            fps, policy_rate = measure(world, args.steps * args.batch if args.steps else args.frames, args.warmup)
            print(f"policy mix: {policy_rate:,.0f} actions/s")
            print(f"{args.world} {world.width}x{world.height} batch {args.batch} on {describe(world, args)}: "
                  f"{fps:,.0f} frames/s")
    except (WorldError, ActionError, PolicyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
