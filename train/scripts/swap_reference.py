"""The swap test's motion-alone reference over many clips, without a model (CPU is fine):

    python3 train/scripts/swap_reference.py [--clips 128] [--horizon 128] [--seed 1] [--world procedural]

the "ground truth in another world" row of every train.evaluate report (train.evaluate.evaluation.other_world_swap):
the true dynamics under the clips' own and swapped actions, replayed in other held-out worlds than the clips'.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from train.evaluate.evaluation import other_world_swap  # noqa: E402
from train.evaluate.measures import swap_report  # noqa: E402
from train.evaluate.protocol import EvalSettings, heldout_episodes  # noqa: E402
from worldmodel.model import WORLD_FRAME_SIZE  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--clips", type=int, default=128)
p.add_argument("--horizon", type=int, default=128)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--world", default="procedural", choices=sorted(WORLD_FRAME_SIZE))
args = p.parse_args()
height, width = WORLD_FRAME_SIZE[args.world]
settings = EvalSettings(world=args.world, clips=args.clips, horizon=args.horizon, horizons=(1, 8, 32, 64, args.horizon),
                        long_frames=2, long_clips=1, window=2, seed=args.seed,
                        world_options={"height": height, "width": width})
clips = heldout_episodes(settings, "clips", args.clips, args.horizon + 1)
videos = other_world_swap(settings, clips["actions"], torch.roll(clips["actions"], 1, 0))
print(json.dumps(swap_report(clips["frames"], {"ground truth in another world": videos}, settings.horizons), indent=1))
