"""How far the frames of a world's evaluation clips show which keys were held:

    python3 train/scripts/key_observability.py [--world doom] [--clips 32] [--seed 0]

plays the held-out clips that ``train.evaluate`` scores (same clips, seed and length) and prints, per key, the IDM's
accuracy on the real frames, and, for W, how often the camera's forward motion disagrees with the key: frames
where W is released but the camera still moves forward (momentum: Doom glides after a key is let go) and frames
where W is held but the camera hardly moves (it accelerates from rest, or walks into a wall). In those frames the
key does not show in the pair of frames the IDM reads, even when the frames are real.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from train.evaluate.protocol import HORIZONS, EvalSettings, heldout_episodes  # noqa: E402
from worldmodel.cli_args import ArgumentParser, positive_int, run_cli  # noqa: E402
from worldmodel.envs import WORLDS  # noqa: E402
from worldmodel.idm import default_idm_path, load_idm  # noqa: E402
from worldmodel.metrics import key_accuracy, motion_targets  # noqa: E402

MOVE_SHARES = (0.1, 0.2, 0.4)  # forward motion per frame, as shares of the walking speed


def forward_motion(poses: torch.Tensor) -> torch.Tensor:
    """Forward translation ``[B, T-1]`` between consecutive ``poses [B, T, 4, 4]``, in the camera frame of t-1
    (OpenCV axes: +z forward)."""
    return motion_targets(poses.double())["translation"][..., 2]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="train/scripts/key_observability.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="doom", choices=sorted(WORLDS))
    parser.add_argument("--clips", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_cli(lambda: report(args))


def report(args) -> int:
    settings = EvalSettings(world=args.world, clips=args.clips, seed=args.seed)
    episodes = heldout_episodes(settings, "clips", args.clips, max(HORIZONS) + 1)
    idm = load_idm(default_idm_path(args.world))
    names = idm.cfg.action_spec.keys
    held = episodes["actions"][:, 1:, : len(names)] > 0.5
    accuracy = key_accuracy(idm.predict(episodes["frames"])["keys"], held.float())
    print(f"{args.world}: {args.clips} held-out clips of {held.shape[1] + 1} frames, seed {args.seed}")
    print(f"IDM key accuracy on the real frames: {accuracy['per_key']:.3f}; by key: "
          + ", ".join(f"{n} {a:.3f}" for n, a in zip(names, accuracy["by_key"])))
    if "W" in names:
        w, forward = held[..., names.index("W")], forward_motion(episodes["poses"])
        print(f"W held in {w.double().mean():.3f} of the frames")
        walk = idm.cfg.controller.walk_speed
        for share in MOVE_SHARES:
            threshold = share * walk
            print(f"forward motion {share:.0%} of a walking step ({threshold:.3f} units): W released but moving more "
                  f"{(~w & (forward > threshold)).double().mean():.3f}, W held but moving less "
                  f"{(w & (forward < threshold)).double().mean():.3f} of the frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
