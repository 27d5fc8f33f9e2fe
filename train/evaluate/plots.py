"""The report's figures: fidelity.png (PSNR / SSIM over frames) and stability.png (per-window
measures), by matplotlib's Agg backend, stored with a palette of 256 colours (a third of the bytes of an RGB PNG,
and what travels to and from the GPU machine is capped); autoencoder.png (held-out frames beside their
reconstructions)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from worldmodel.files import atomic_output
from worldmodel.frames import tile_grid

SHEET_GAP = 4  # pixels of white between the tiles of autoencoder.png
PALETTE_COLOURS = 256


def render_figure(panels: list[tuple[str, str, dict]], columns: int = 2, xlabel: str = "frame") -> np.ndarray:
    """Line charts in a grid, uint8 RGB ``[H, W, 3]``: ``panels`` of (title, y label, {name: (xs, ys)}) over
    ``xlabel``; non-finite points are left out (matplotlib breaks the line there)."""
    rows = (len(panels) + columns - 1) // columns
    fig = Figure(figsize=(5.6 * columns, 3.6 * rows), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, (title, ylabel, series) in zip(axes.flat, panels):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3, label=name)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_figure(path: Path, panels: list[tuple[str, str, dict]], columns: int = 2, xlabel: str = "frame") -> None:
    """:func:`render_figure` into a PNG of :data:`PALETTE_COLOURS` colours at ``path``."""
    image = Image.fromarray(render_figure(panels, columns, xlabel))
    image.quantize(PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def plots(report: dict, out_dir: Path) -> list[str]:
    """fidelity.png (PSNR / SSIM over frames) and stability.png (per-window measures)."""
    curves = report["fidelity"]["curves"]
    shown = [n for n in curves if n != "ground truth"]
    save_figure(out_dir / "fidelity.png", [
        (f"{m.upper()} vs ground truth", m.upper(), {n: (range(1, len(curves[n][m])), curves[n][m][1:]) for n in shown})
        for m in ("psnr", "ssim")
    ])
    windows = report["stability"]["windows"]
    mid = [sum(w["frames"]) / 2 for w in windows]
    series = lambda get, names: {n: (mid, [get(w, n) for w in windows]) for n in names}  # noqa: E731
    runs = ("model", "ground_truth", "repeat_last_frame")
    save_figure(out_dir / "stability.png", [
        ("Frechet distance of IDM features", "FD",
         series(lambda w, n: w.get("frechet", {}).get(n, math.nan), ("model", "repeat_last_frame", "ground_truth_reference"))),
        ("sharpness (Laplacian variance)", "variance", series(lambda w, n: w["frames_stats"][n]["sharpness"], runs)),
        ("mean brightness", "0..255", series(lambda w, n: sum(w["frames_stats"][n]["colour_mean"]) / 3, runs)),
        ("colour std (mean of channels)", "0..255", series(lambda w, n: sum(w["frames_stats"][n]["colour_std"]) / 3, runs)),
        ("key accuracy (IDM)", "fraction", series(lambda w, n: w["controllability"][n]["key_accuracy"], runs[:2])),
        ("yaw error (IDM)", "degrees", series(lambda w, n: w["controllability"][n]["yaw_error_deg"], runs[:2])),
    ])
    return ["fidelity.png", "stability.png"]


def zoomed_centre(frame: np.ndarray, zoom: int) -> np.ndarray:
    """The centre of uint8 ``frame [H, W, 3]`` blown up ``zoom`` times (nearest neighbour), ``[H, W, 3]``."""
    height, width = frame.shape[:2]
    h, w = -(-height // zoom), -(-width // zoom)
    top, left = (height - h) // 2, (width - w) // 2
    return frame[top : top + h, left : left + w].repeat(zoom, 0).repeat(zoom, 1)[:height, :width]


def rollout_sheet(truth: np.ndarray, model: np.ndarray, picks: list[int], path: Path) -> None:
    """A long rollout's contact sheet, a JPEG (a sixth of a PNG's bytes for such frames): per clip of uint8
    ``truth [B, T, H, W, 3]`` and ``model`` (alike), a row of the true frames at the indices ``picks`` above a
    row of the model's."""
    rows = [row for clip in range(truth.shape[0]) for row in (list(truth[clip, picks]), list(model[clip, picks]))]
    with atomic_output(path) as tmp:
        tile_grid(rows, SHEET_GAP).save(tmp, format="JPEG", quality=75)


def reconstruction_sheet(truth: np.ndarray, recon: np.ndarray, path: Path, zoom: int = 2) -> None:
    """autoencoder.png: one column per frame of uint8 ``truth [N, H, W, 3]`` and its reconstruction
    ``recon`` (alike); rows: the truth, the reconstruction, then their centres blown up ``zoom`` times."""
    rows = [list(truth), list(recon), [zoomed_centre(f, zoom) for f in truth], [zoomed_centre(f, zoom) for f in recon]]
    with atomic_output(path) as tmp:
        tile_grid(rows, SHEET_GAP).save(tmp, format="PNG")
