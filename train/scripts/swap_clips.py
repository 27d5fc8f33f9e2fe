"""Which clips a checkpoint loses on the swap test, beside how far each clip's camera moves:

    python3 train/scripts/swap_clips.py CHECKPOINT [--clips 64] [--horizon 128] [--seed 1] [--device cpu]

the held-out clips of ``train.evaluate`` (same seeds), played under their own and under the next clip's actions;
per clip the pass, the MSE ratio own / swapped, and the camera's total turn (degrees of yaw travelled), net turn
and walked distance over the horizon, then those motion figures averaged over the passed and the lost clips.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from train.evaluate.measures import frame_distances  # noqa: E402
from train.evaluate.protocol import EvalSettings, Run, heldout_episodes, rollouts  # noqa: E402
from worldmodel.checkpoint import load  # noqa: E402
from worldmodel.metrics import wrap_angle, yaw_pitch_from_pose  # noqa: E402
from worldmodel.session import Session  # noqa: E402


def camera_motion(poses: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per clip of poses ``[B, T, 4, 4]``: degrees of yaw travelled, net yaw (degrees) and walked distance."""
    yaw, _ = yaw_pitch_from_pose(poses.double())
    step = wrap_angle(yaw.diff(dim=1))
    walked = poses[:, 1:, :3, 3].double().sub(poses[:, :-1, :3, 3].double()).norm(dim=-1).sum(1)
    return {"turned": step.abs().sum(1).rad2deg(), "net_turn": step.sum(1).rad2deg().abs(), "walked": walked}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--horizon", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = p.parse_args()
    model = load(args.checkpoint, device=args.device)
    height, width = model.frame_size
    settings = EvalSettings(world=str(model.config.world), clips=args.clips, horizon=args.horizon, long_frames=2,
                            long_clips=1, window=2, seed=args.seed, device=args.device,
                            world_options={"height": height, "width": width})
    clips = heldout_episodes(settings, "clips", args.clips, args.horizon + 1)
    truth, actions, start = clips["frames"], clips["actions"], clips["frames"][:, 0]
    dtype = getattr(torch, args.dtype)
    played = rollouts(lambda b, s: Session(model, batch=b, device=args.device, seed=s, dtype=dtype),
                      {"own": Run(start, actions), "swapped": Run(start, torch.roll(actions, 1, 0))}, args.seed,
                      model.dit.cfg.block_size)
    own, swapped = (frame_distances(played[k], truth).mean(1) for k in ("own", "swapped"))
    passed = own < swapped
    motion = camera_motion(clips["poses"])
    print(f"{args.checkpoint}: {int(passed.sum())} of {args.clips} clips passed ({float(passed.double().mean()):.3f})")
    print("clip  pass  own/swapped  turned deg  net turn deg  walked")
    for i in range(args.clips):
        print(f"{i:4d}  {'yes' if passed[i] else 'no ':4s}  {float(own[i] / swapped[i]):11.3f}  "
              f"{float(motion['turned'][i]):10.1f}  {float(motion['net_turn'][i]):12.1f}  {float(motion['walked'][i]):6.2f}")
    for name, rows in (("passed", passed), ("lost", ~passed)):
        if rows.any():
            print(f"mean over the {name} clips: " + ", ".join(f"{k} {float(v[rows].mean()):.1f}" for k, v in motion.items()))


if __name__ == "__main__":
    main()
