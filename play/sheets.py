"""Contact sheets of a model beside its world, for a person to look at (the model cards show them).

    python -m play.sheets [--world procedural] [--checkpoint PATH] --out DIR [--seed 0]

Writes ``DIR/demo.png`` (real | model under ``assets/scripts/demo.txt`` at frames 0, 10, 50, 200 and
1000) and ``DIR/actions.png`` (one row per input held from the same start frame: idle, W, mouse left,
mouse right, strafe D; real | model at frames 0, 10, 20 and 40). Both run the world and the model
side by side from the world's start frame, as ``python -m play --side-by-side`` does.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from play.generator import FrameGenerator
from play.headless import side_by_side
from play.script import load_script, script_cycle
from worldmodel.actions import make_action
from worldmodel.cli_args import ArgumentParser, run_cli
from worldmodel.frames import tile_grid

REPO = Path(__file__).resolve().parents[1]
DEMO_SCRIPT = REPO / "assets" / "scripts" / "demo.txt"
DEMO_FRAMES = (0, 10, 50, 200, 1000)
ACTION_FRAMES = (0, 10, 20, 40)
MOUSE_COUNTS = 12  # counts a frame for the mouse rows (12 x 0.004 rad = 2.75 degrees)
ACTION_ROWS = {"idle": ((), 0), "W": (("W",), 0), "mouse left": ((), -MOUSE_COUNTS), "mouse right": ((), MOUSE_COUNTS),
               "strafe D": (("D",), 0)}
GAP = 4  # pixels between tiles


def frames_at(generator: FrameGenerator, actions, picks: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """real | model images ``[H, 2W + gap, 3]`` at the frame indices ``picks`` (0: the start frame)."""
    shown, generated = [], generator.reset(seed)
    for index in range(max(picks) + 1):
        if index:
            generated = generator.step(next(actions))
        if index in picks:
            shown.append(side_by_side(generated.panels, GAP))
    return shown


def make_sheets(generator: FrameGenerator, out: Path, seed: int = 0) -> list[Path]:
    """Write demo.png and actions.png into ``out``; returns their paths."""
    spec = generator.spec
    demo = frames_at(generator, script_cycle(load_script(DEMO_SCRIPT, spec), spec), DEMO_FRAMES, seed)
    rows = [frames_at(generator, itertools.repeat(make_action(spec, keys, dx, 0)), ACTION_FRAMES, seed)
            for keys, dx in ACTION_ROWS.values()]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "demo.png", out / "actions.png"]
    tile_grid([demo], GAP).save(paths[0])
    tile_grid(rows, GAP).save(paths[1])
    return paths


def main(argv: list[str] | None = None) -> int:
    from worldmodel import checkpoint
    from worldmodel.envs import WORLDS, make_world
    from worldmodel.session import Session

    parser = ArgumentParser(prog="python -m play.sheets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="procedural", choices=sorted(WORLDS))
    parser.add_argument("--checkpoint", type=Path, help="default: the shipped assets/models/<world>.safetensors")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def run() -> int:
        path = args.checkpoint or REPO / "assets" / "models" / f"{args.world}.safetensors"
        model = checkpoint.load(path)
        height, width = model.frame_size
        world = make_world(args.world, batch=1, height=height, width=width)
        with torch.inference_mode():
            for p in make_sheets(FrameGenerator(Session(model, batch=1), world), args.out, args.seed):
                print("wrote", p)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
