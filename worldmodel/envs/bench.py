"""World rendering speed: ``python -m worldmodel.envs.bench --world procedural --batch 256 --device cuda``.

Prints frames per second of ``step`` (render + copy to the CPU), warm-up excluded.
"""

from __future__ import annotations

import argparse
import time

import torch

from worldmodel.envs import make_world
from worldmodel.envs.policies import make_policy


def measure(world, steps: int, warmup: int = 3) -> float:
    policy = make_policy("mix", world.action_spec, world.batch, seed=0)
    step = world.reset(list(range(world.batch)))
    actions = [policy(i, step) for i in range(steps + warmup)]
    for a in actions[:warmup]:
        world.step(a)
    start = time.perf_counter()
    for a in actions[warmup:]:
        world.step(a)  # frames come back on the CPU: the step is synchronous
    return world.batch * steps / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", default="procedural")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the procedural renderer")
    p.add_argument("--chunk", type=int, default=64, help="procedural: batch items rendered at once")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {} if args.size is None else {"height": args.size[0], "width": args.size[1]}
    if args.world == "procedural":
        options.update(device=args.device, compile=args.compile, chunk=args.chunk)
    world = make_world(args.world, batch=args.batch, **options)
    fps = measure(world, args.steps)
    where = torch.cuda.get_device_name() if args.device == "cuda" and args.world == "procedural" else f"CPU ({torch.get_num_threads()} threads)"
    extra = f", compiled, chunk {args.chunk}" if args.compile else f", chunk {args.chunk}"
    print(f"{args.world} {world.width}x{world.height} batch {args.batch} on {where}{extra if args.world == 'procedural' else ''}: {fps:,.0f} frames/s")
    world.close()


if __name__ == "__main__":
    main()
