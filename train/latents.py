"""Episodes encoded once: the latent cache every stage after the autoencoder trains on.

Encoding every training clip again with the frozen autoencoder at every step cost more GPU time
than the DiT's own step. :class:`LatentStore` holds every frame of a recording set as latents,
with its actions and poses, on the training device (1,024 episodes x 120 frames of 8x16x16
latents are about 0.5 GB in bf16): a batch is then one gather by index, with no worker processes
and no host-to-device copy per step.

The clips are those of :class:`worldmodel.data.dataset.ClipDataset` (every ``clip_len`` window of
every episode, in the same order), and batch k takes the clip indices :class:`train.data.StepBatches`
would load for step k, so a run on the cache sees the clips of a run on frames, step for step,
and stays a pure function of (seed, step, rank).

``data.latent_cache`` names a folder where the encoded episodes are kept as safetensors, keyed by
the fingerprint of the autoencoder (weights and config) and of the episodes (paths, lengths,
sizes), so later stages of a pipeline skip the encoding.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from worldmodel import checkpoint
from worldmodel.data.dataset import ClipDataset
from worldmodel.frames import to_model

Tensor = torch.Tensor
FIELDS = ("latents", "actions", "poses", "true_poses")
ENCODE_CHUNK = 512  # frames per autoencoder call while building


class _WholeEpisodes(Dataset):
    """Item i: every step of episode i (read in DataLoader workers)."""

    def __init__(self, episodes):
        self.episodes = episodes

    def __len__(self):
        return len(self.episodes)

    def __getitem__(self, i):
        ep = self.episodes[i].read()
        return ep.frames, ep.actions, ep.commanded_poses, ep.true_poses


def fingerprint(autoencoder: nn.Module, dataset: ClipDataset, dtype: torch.dtype) -> str:
    """A hash of the autoencoder's config and weights (:func:`worldmodel.checkpoint.weights_fingerprint`), the
    episodes (path, steps, bytes) and the storage dtype."""
    h = hashlib.blake2b(digest_size=12)
    config = getattr(autoencoder, "config", None)
    h.update(json.dumps(config.to_dict() if hasattr(config, "to_dict") else repr(config), sort_keys=True).encode())
    h.update(checkpoint.weights_fingerprint(autoencoder).encode())
    for ep in dataset.episodes:
        h.update(f"{ep.path.resolve()}:{len(ep)}:{(ep.path / 'steps.rec').stat().st_size}".encode())
    h.update(str(dtype).encode())
    return h.hexdigest()


class LatentStore:
    """Every frame of a recording set: ``latents [F, C, h, w]`` (``dtype``), ``actions [F, A]`` (raw),
    ``poses, true_poses [F, 4, 4]``, all on one device; ``clip_starts [M]`` is the first frame of
    each of the M clips of ``clip_len`` frames (ClipDataset's order)."""

    def __init__(self, tensors: dict[str, Tensor], episode_lengths: list[int], clip_len: int):
        self.tensors, self.clip_len = tensors, clip_len
        starts, offset = [], 0
        for n in episode_lengths:
            if n >= clip_len:
                starts.append(torch.arange(offset, offset + n - clip_len + 1))
            offset += n
        if offset != tensors["latents"].shape[0]:
            raise ValueError(f"latent store holds {tensors['latents'].shape[0]} frames, the episodes {offset}")
        device = tensors["latents"].device
        self.clip_starts = torch.cat(starts).to(device)
        self.offsets = torch.arange(clip_len, device=device)

    def __len__(self) -> int:
        return len(self.clip_starts)

    @classmethod
    @torch.no_grad()
    def build(cls, dataset: ClipDataset, autoencoder: nn.Module, device, dtype: torch.dtype,
              autocast=None, workers: int = 0, cache_dir=None, show_progress: bool = True) -> "LatentStore":
        """Encode every episode of ``dataset`` with ``autoencoder`` (frozen, on ``device``), or load
        them from ``cache_dir`` when an earlier run with the same fingerprint left them there."""
        lengths = [len(ep) for ep in dataset.episodes]
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"latents-{fingerprint(autoencoder, dataset, dtype)}.safetensors"
            if path.is_file():
                try:
                    tensors = load_file(str(path), device=str(device))
                    return cls(tensors, lengths, dataset.clip_len)
                except (SafetensorError, OSError, ValueError, KeyError) as e:
                    tqdm.write(f"warning: latent cache {path} unreadable ({e}); encoding again")
        parts = {k: [] for k in FIELDS}
        loader = DataLoader(_WholeEpisodes(dataset.episodes), batch_size=None, num_workers=workers)
        for frames, actions, poses, true_poses in tqdm(loader, desc="encoding episodes", total=len(lengths),
                                                        disable=not show_progress, dynamic_ncols=True):
            for chunk in frames.split(ENCODE_CHUNK):
                with autocast() if autocast else nullcontext():
                    z = autoencoder.encode(to_model(chunk.to(device, non_blocking=True))[None])[0]
                parts["latents"].append(z.to(dtype))
            for key, value in (("actions", actions), ("poses", poses), ("true_poses", true_poses)):
                parts[key].append(value.float().to(device))
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        if path is not None:
            checkpoint.atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, path, {"format": "latent-cache"})
        return cls(tensors, lengths, dataset.clip_len)

    def batch(self, clips: Tensor) -> dict[str, Tensor]:
        """Clips ``clips [b]`` (indices) -> ``latents [b, T, C, h, w]`` float32, ``actions [b, T, A]``,
        ``poses, true_poses [b, T, 4, 4]``, on the store's device."""
        frames = self.clip_starts[clips.to(self.clip_starts.device)][:, None] + self.offsets  # [b, T]
        out = {k: v[frames] for k, v in self.tensors.items()}
        out["latents"] = out["latents"].float()
        return out

    def batches(self, indices):
        """Batches for an iterable of per-step clip index lists."""
        for clips in indices:
            yield self.batch(torch.as_tensor(clips, dtype=torch.long))
