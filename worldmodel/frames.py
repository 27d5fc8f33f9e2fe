"""Conversions between frames on disk/screen (uint8 [..., H, W, 3]) and inside models (float [..., 3, H, W] in [-1, 1])."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange


class FrameError(ValueError):
    """A frame or image that cannot be used."""


def to_model(frames: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float ``[..., 3, H, W]`` in [-1, 1]."""
    return rearrange(frames, "... h w c -> ... c h w").to(dtype) / 127.5 - 1.0


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """float ``[..., 3, H, W]`` in [-1, 1] -> uint8 ``[..., H, W, 3]`` (rounded, clamped)."""
    return rearrange(((frames.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8), "... c h w -> ... h w c")


def tile_grid(rows: list[list[np.ndarray]], gap: int):
    """A PIL image of uint8 tiles ``[H, W, 3]`` in rows (rows of equal length, tiles of one size),
    with ``gap`` pixels of white between them."""
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    sheet = Image.new("RGB", (len(rows[0]) * (w + gap) - gap, len(rows) * (h + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(Image.fromarray(tile), (c * (w + gap), r * (h + gap)))
    return sheet


def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file as uint8 ``[height, width, 3]`` (resized with bilinear filtering if needed)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.BILINEAR)
            return torch.from_numpy(np.asarray(im).copy())
    except FileNotFoundError:
        raise FrameError(f"start image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise FrameError(f"cannot read start image {path}: {e}") from None


def as_start_frames(start, batch: int, height: int, width: int) -> torch.Tensor:
    """A start given as a path, ``[H, W, 3]`` or ``[B, H, W, 3]`` uint8 -> uint8 ``[B, H, W, 3]``."""
    if isinstance(start, (str, Path)):
        start = load_image(start, height, width)
    start = torch.as_tensor(start)
    if start.dtype != torch.uint8:
        raise FrameError(f"start frames must be uint8, got {start.dtype}")
    if start.ndim == 3:
        start = start.expand(batch, *start.shape)
    if tuple(start.shape) != (batch, height, width, 3):
        raise FrameError(f"start frames must be [{batch}, {height}, {width}, 3] uint8, got {tuple(start.shape)}")
    return start
