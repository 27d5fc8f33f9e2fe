"""Train the inverse-dynamics model (worldmodel.idm) on ground-truth world data, then score it on
held-out worlds and store it with its config and held-out accuracy in the safetensors metadata.

    python -m train.idm --world procedural --out assets/idm/procedural.safetensors
        [--steps 2000 --batch 64 --episodes 256 --episode-len 40 --heldout-episodes 32 --seed 0 --device cpu]

Episodes come from training seeds (procedural) or training maps (Doom), played by the "mix"
exploration policy from a reset; held-out accuracy uses held-out seeds / maps (next to the accuracy
of the best constant guess). Frames are downsampled to the IDM's internal size once, when collected
(the model would do the same); half of each batch is mirrored left-right (:func:`mirror`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from worldmodel.idm import IDMConfig, InverseDynamics, controllability, observed_poses, save_idm

DOOM_SIZE = (48, 64)
"""Internal size for Doom's 4:3 frames; the procedural world's square frames use the default 64x64."""


def idm_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Binary cross-entropy on keys plus Huber losses on mouse, yaw/pitch and translation (normalised units).

    ``outputs`` from :meth:`InverseDynamics.forward` ``[N, ...]``; ``targets`` the same keys ``[N, ...]``.
    """
    parts = {"keys": F.binary_cross_entropy_with_logits(outputs["keys"], targets["keys"])}
    for name in ("mouse", "yaw_pitch", "translation"):
        parts[name] = F.smooth_l1_loss(outputs[name], targets[name], beta=0.1)
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def world_episodes(world_name: str, split: str, count: int, length: int, batch: int, seed: int,
                   device="cpu", world_options: dict | None = None) -> dict[str, torch.Tensor]:
    """``count`` episodes of ``length`` frames in the first ``count`` worlds of ``split`` ("train" or
    "heldout"), the policy seeded by ``seed``, played ``batch`` at a time: frames uint8 ``[E, T, H, W, 3]``,
    actions ``[E, T, A]``, poses ``[E, T, 4, 4]`` (observed)."""
    from worldmodel.data.dataset import play_clip
    from worldmodel.data.splits import split_options, split_seeds
    from worldmodel.envs import make_world
    from worldmodel.envs.policies import make_policy

    options = split_options(world_name, split, world_options)
    seeds = split_seeds(split, count)
    parts = []
    with make_world(world_name, batch=batch, device=device, **options) as world:
        for i in tqdm(range(0, count, batch), desc=f"{split} episodes", leave=False):
            chunk = seeds[i : i + batch]
            chunk = chunk + chunk[: batch - len(chunk)]  # the world's batch is fixed; extra items are dropped
            policy = make_policy("mix", world.action_spec, batch=batch, seed=seed * 7919 + i)
            clip = play_clip(world, policy, chunk, 0, length)
            parts.append({k: v[: min(batch, count - i)] for k, v in clip.items()})
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return {"frames": joined["frames"], "actions": joined["actions"],
            "poses": observed_poses(joined["true_poses"], joined["poses"])}


def training_pairs(idm: InverseDynamics, episodes: dict) -> dict[str, torch.Tensor]:
    """Prepared frames ``[E, T, 3, h, w]`` (float16) and normalised targets ``[E, T-1, ...]``."""
    frames = torch.stack([idm.prepare(episode) for episode in episodes["frames"]]).half()
    return {"frames": frames, **idm.targets(episodes["actions"], episodes["poses"])}


def sample_batch(data: dict, batch: int, generator: torch.Generator, device) -> tuple:
    """Random pairs: prepared ``prev, cur [N, 3, h, w]`` and targets ``[N, ...]``."""
    e, t = data["frames"].shape[:2]
    episode = torch.randint(0, e, (batch,), generator=generator)
    pair = torch.randint(0, t - 1, (batch,), generator=generator)
    prev = data["frames"][episode, pair].float().to(device)
    cur = data["frames"][episode, pair + 1].float().to(device)
    targets = {k: data[k][episode, pair].to(device) for k in ("keys", "mouse", "yaw_pitch", "translation")}
    return prev, cur, targets


def mirror(prev: torch.Tensor, cur: torch.Tensor, targets: dict, flip: torch.Tensor, keys: tuple[str, ...]) -> tuple:
    """Left-right mirror the pairs where ``flip [N]`` (bool): images flipped, strafe keys A and D swapped,
    horizontal mouse motion, yaw change and sideways translation negated. A mirrored world is as
    plausible as the original, so this doubles the variety of training pairs."""
    sign = torch.where(flip, -1.0, 1.0).to(prev.device)[:, None]
    f = flip.to(prev.device)[:, None, None, None]
    prev, cur = torch.where(f, prev.flip(-1), prev), torch.where(f, cur.flip(-1), cur)
    out = {name: value.clone() for name, value in targets.items()}
    if "A" in keys and "D" in keys:
        a, d = keys.index("A"), keys.index("D")
        swapped = out["keys"].clone()
        swapped[:, [a, d]] = out["keys"][:, [d, a]]
        out["keys"] = torch.where(flip.to(prev.device)[:, None], swapped, out["keys"])
    for name, column in (("mouse", 0), ("yaw_pitch", 0), ("translation", 0)):
        out[name][:, column] = out[name][:, column] * sign[:, 0]
    return prev, cur, out


def train(idm: InverseDynamics, data: dict, steps: int, batch: int, lr: float, seed: int, device) -> list[float]:
    """AdamW with a cosine learning-rate decay; returns the loss every step."""
    idm.to(device).train()
    optimizer = torch.optim.AdamW(idm.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="train IDM")
    keys = idm.cfg.action_spec.keys
    for _ in bar:
        prev, cur, targets = sample_batch(data, batch, generator, device)
        prev, cur, targets = mirror(prev, cur, targets, torch.rand(batch, generator=generator) < 0.5, keys)
        loss, parts = idm_loss(idm(prev, cur), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", keys=f"{parts['keys']:.3f}")
    return losses


def prior_predictions(idm: InverseDynamics, data: dict, batch: int, pairs: int) -> dict[str, torch.Tensor]:
    """The best constant guess ``[batch, pairs, ...]`` in physical units (as :meth:`InverseDynamics.predict`):
    the majority of each key, the mean mouse motion, turn and translation of the training pairs."""
    scales = idm.scales()
    guess = {"keys": (data["keys"].flatten(0, 1).mean(0) > 0.5).float() * 20 - 10}
    for name in ("mouse", "yaw_pitch", "translation"):
        guess[name] = data[name].flatten(0, 1).mean(0) * scales[name]
    return {k: v.expand(batch, pairs, -1) for k, v in guess.items()}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m train.idm", description="Train the inverse-dynamics model for evaluation.")
    p.add_argument("--world", required=True, choices=["procedural", "doom"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--episodes", type=int, default=256, help="training episodes")
    p.add_argument("--episode-len", type=int, default=40)
    p.add_argument("--heldout-episodes", type=int, default=32)
    p.add_argument("--world-batch", type=int, default=16, help="episodes played at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if min(args.steps, args.batch, args.episodes, args.heldout_episodes, args.world_batch) < 1 or args.episode_len < 2:
            raise ValueError("steps, batch, episodes, held-out episodes and world batch must be >= 1, episode length >= 2")
        from worldmodel.envs import make_world

        with make_world(args.world, batch=1) as probe:
            spec, controller, frame_size = probe.action_spec, probe.controller, (probe.height, probe.width)
        torch.manual_seed(args.seed)
        cfg = IDMConfig(world=args.world, action_spec=spec, controller=controller, frame_size=frame_size,
                        size=DOOM_SIZE if args.world == "doom" else (64, 64))
        idm = InverseDynamics(cfg)
        started = time.perf_counter()
        episodes = world_episodes(args.world, "train", args.episodes, args.episode_len, args.world_batch, args.seed,
                                  args.device)
        data = training_pairs(idm, episodes)
        del episodes
        collected = time.perf_counter()
        losses = train(idm, data, args.steps, args.batch, args.lr, args.seed, args.device)
        trained = time.perf_counter()
        idm.eval()
        scores = {}
        for split in ("heldout", "train"):
            episodes = world_episodes(args.world, split, args.heldout_episodes, args.episode_len, args.world_batch,
                                      args.seed + 1, args.device)
            scores[split] = controllability(idm.predict(episodes["frames"]), episodes["actions"], episodes["poses"],
                                            len(spec.keys))
            if split == "heldout":
                prior = prior_predictions(idm, data, *episodes["actions"][:, 1:].shape[:2])
                scores["heldout_constant_guess"] = controllability(prior, episodes["actions"], episodes["poses"], len(spec.keys))
        idm.cfg = replace(cfg, extra={
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "train_pairs": args.episodes * (args.episode_len - 1),
            "eval_pairs": args.heldout_episodes * (args.episode_len - 1),
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "collect_s": round(collected - started, 1), "train_s": round(trained - collected, 1),
            "accuracy": scores,
        })
        save_idm(args.out, idm)
        size_mb = args.out.stat().st_size / 2**20
        print(json.dumps({"out": str(args.out), "size_mb": round(size_mb, 2), **idm.cfg.extra}, indent=1))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
