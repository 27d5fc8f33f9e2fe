"""The inverse-dynamics model (IDM): from two consecutive frames, what action and camera motion led
from one to the other. Evaluation uses it to measure controllability (does a generated video follow
its actions?) and its penultimate features for Fréchet distances.

The network is small (< 4 MB) and works at a low internal resolution: frames are area-resized to
``cfg.size`` first. Its heads predict, for the pair (t-1, t): key logits ``[K]``, mouse dx/dy, the
change of yaw/pitch, and the translation of pose_{t-1}^-1 @ pose_t (camera frame of t-1). Outputs
are normalised (mouse and turns in units of ``TURN_NORM`` radians, translation in walking steps);
:meth:`InverseDynamics.predict` turns them back into counts, radians and world units.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from worldmodel.actions import TURN_NORM, ActionSpec
from worldmodel.camera import ControllerSpec
from worldmodel.checkpoint import atomic_save_file
from worldmodel.metrics import key_accuracy, motion_targets, rotation_error_degrees, uint8_to_frames, wrap_angle

FORMAT = "worldmodel-idm-v1"


class IDMError(ValueError):
    """An IDM file or input that cannot be used."""


@dataclass(frozen=True)
class IDMConfig:
    """Everything needed to rebuild an IDM; stored as JSON in the weights' metadata."""

    world: str
    action_spec: ActionSpec
    controller: ControllerSpec
    frame_size: tuple[int, int]  # (H, W) of the world's frames
    size: tuple[int, int] = (64, 64)  # internal (h, w), divisible by 16
    channels: tuple[int, ...] = (32, 48, 64, 96)
    feature_dim: int = 128
    extra: dict = field(default_factory=dict)  # training facts (steps, held-out accuracy, ...)

    def __post_init__(self):
        object.__setattr__(self, "frame_size", tuple(int(v) for v in self.frame_size))
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "channels", tuple(int(v) for v in self.channels))
        stride = 2 ** len(self.channels)
        if any(s % stride or s <= 0 for s in self.size):
            raise IDMError(f"IDM internal size {self.size} must be positive multiples of {stride}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))  # the specs as their to_dict(), tuples as lists

    @classmethod
    def from_json(cls, text: str) -> "IDMConfig":
        d = json.loads(text)
        return cls(**{**d, "action_spec": ActionSpec.from_dict(d["action_spec"]),
                      "controller": ControllerSpec.from_dict(d["controller"]), "feature_dim": int(d["feature_dim"])})


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the resolution, then one more 3x3 convolution."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class InverseDynamics(nn.Module):
    def __init__(self, cfg: IDMConfig):
        super().__init__()
        self.cfg = cfg
        widths = (9,) + cfg.channels  # previous frame, current frame, their difference
        self.stages = nn.Sequential(*[_stage(a, b) for a, b in zip(widths[:-1], widths[1:])])
        stride = 2 ** len(cfg.channels)
        flat = cfg.channels[-1] * (cfg.size[0] // stride) * (cfg.size[1] // stride)
        self.features = nn.Sequential(nn.Linear(flat, cfg.feature_dim), nn.SiLU())
        self.num_keys = len(cfg.action_spec.keys)
        self.head = nn.Linear(cfg.feature_dim, self.num_keys + 2 + 2 + 3)

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., H, W, 3]`` -> float ``[..., 3, h, w]`` in [-1, 1] at the internal size.

        Larger frames are area-averaged, smaller ones bilinearly enlarged; accuracy is only known for
        frames of ``cfg.frame_size`` (or already at the internal size).
        """
        x = uint8_to_frames(frames)
        lead = x.shape[:-3]
        x = rearrange(x, "... c h w -> (...) c h w")
        if tuple(x.shape[-2:]) != self.cfg.size:
            if x.shape[-2] >= self.cfg.size[0] and x.shape[-1] >= self.cfg.size[1]:
                x = F.adaptive_avg_pool2d(x, self.cfg.size)
            else:
                x = F.interpolate(x, size=self.cfg.size, mode="bilinear", align_corners=False)
        return x.reshape(*lead, *x.shape[1:])

    def forward(self, prev: torch.Tensor, cur: torch.Tensor) -> dict[str, torch.Tensor]:
        """Prepared frames ``prev, cur [N, 3, h, w]`` -> normalised predictions and features.

        Returns ``keys [N, K]`` (logits), ``mouse [N, 2]``, ``yaw_pitch [N, 2]``, ``translation [N, 3]``
        (normalised units) and ``features [N, F]`` (penultimate layer).
        """
        feats = self.features(self.stages(torch.cat([prev, cur, cur - prev], 1)).flatten(1))
        out = self.head(feats)
        k = self.num_keys
        return {
            "keys": out[:, :k],
            "mouse": out[:, k : k + 2],
            "yaw_pitch": out[:, k + 2 : k + 4],
            "translation": out[:, k + 4 :],
            "features": feats,
        }

    def scales(self) -> dict[str, float]:
        """Normalised unit -> physical unit (mouse counts, radians, world units)."""
        return {"mouse": TURN_NORM / self.cfg.action_spec.mouse_scale, "yaw_pitch": TURN_NORM,
                "translation": self.cfg.controller.walk_speed}

    def targets(self, actions: torch.Tensor, poses: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised targets ``[B, T-1, ...]`` for the pairs of a clip: ``actions [B, T, A]``, ``poses [B, T, 4, 4]``."""
        k, s = self.num_keys, self.scales()
        motion = motion_targets(poses)
        return {
            "keys": actions[:, 1:, :k].float(),
            "mouse": actions[:, 1:, k:].float() / s["mouse"],
            "yaw_pitch": motion["yaw_pitch"].float() / s["yaw_pitch"],
            "translation": motion["translation"].float() / s["translation"],
        }

    @torch.no_grad()
    def predict(self, frames: torch.Tensor, chunk: int = 512) -> dict[str, torch.Tensor]:
        """Physical predictions for every consecutive pair of ``frames uint8 [B, T, H, W, 3]`` -> ``[B, T-1, ...]``."""
        if frames.ndim != 5 or frames.shape[1] < 2:
            raise IDMError(f"IDM frames must be uint8 [B, T, H, W, 3] with T >= 2, got {tuple(frames.shape)}")
        return self.predict_pairs(frames[:, :-1], frames[:, 1:], chunk)

    @torch.no_grad()
    def predict_pairs(self, prev: torch.Tensor, cur: torch.Tensor, chunk: int = 512) -> dict[str, torch.Tensor]:
        """Physical predictions for the pairs ``prev, cur uint8 [B, P, H, W, 3]`` -> ``[B, P, ...]``.

        ``keys`` stay logits; ``mouse`` in counts, ``yaw_pitch`` in radians, ``translation`` in world
        units; ``features [B, P, F]``. Runs on the IDM's device, ``chunk`` pairs at a time.
        """
        if prev.shape != cur.shape or prev.ndim != 5 or prev.shape[1] < 1:
            raise IDMError(f"IDM pairs must be two uint8 [B, P, H, W, 3], got {tuple(prev.shape)} and {tuple(cur.shape)}")
        device = next(self.parameters()).device
        b = prev.shape[0]
        prev = rearrange(prev, "b p h w c -> (b p) h w c")
        cur = rearrange(cur, "b p h w c -> (b p) h w c")
        parts = []
        for i in range(0, prev.shape[0], chunk):
            p, c = (self.prepare(x[i : i + chunk].to(device)) for x in (prev, cur))
            parts.append(self(p, c))
        scales = self.scales()
        return {
            name: rearrange(torch.cat([p[name] for p in parts]) * scales.get(name, 1.0), "(b p) ... -> b p ...", b=b)
            for name in parts[0]
        }


def controllability(predictions: dict[str, torch.Tensor], actions: torch.Tensor, poses: torch.Tensor, num_keys: int) -> dict:
    """How well :meth:`InverseDynamics.predict` output ``[B, T-1, ...]`` recovers a clip's ``actions [B, T, A]``
    and ``poses [B, T, 4, 4]`` (those the frames should show).

    Returns plain floats: ``key_accuracy`` (per key entry), ``key_exact`` (all keys right),
    ``mouse_error`` (mean |dx|, |dy| error, counts), ``yaw_error_deg``, ``pitch_error_deg`` (mean absolute),
    ``rotation_error_deg`` (mean relative rotation error) and ``translation_error`` (mean L2, world units).
    """
    poses = poses.to(predictions["yaw_pitch"].device).double()
    actions = actions.to(poses.device)
    motion = motion_targets(poses)
    keys = key_accuracy(predictions["keys"], actions[:, 1:, :num_keys])
    yaw_pitch = predictions["yaw_pitch"].double()
    angle_error = torch.rad2deg(wrap_angle(yaw_pitch - motion["yaw_pitch"]).abs())
    rotation = rotation_error_degrees(poses[:, :-1], yaw_pitch, poses[:, 1:])
    return {
        "key_accuracy": keys["per_key"],
        "key_exact": keys["exact"],
        "mouse_error": float((predictions["mouse"].double() - actions[:, 1:, num_keys:].double()).abs().mean()),
        "yaw_error_deg": float(angle_error[..., 0].mean()),
        "pitch_error_deg": float(angle_error[..., 1].mean()),
        "rotation_error_deg": float(rotation.mean()),
        "translation_error": float((predictions["translation"].double() - motion["translation"]).norm(dim=-1).mean()),
    }


def observed_poses(true_poses: torch.Tensor, commanded_poses: torch.Tensor) -> torch.Tensor:
    """The poses the frames show: true poses ``[..., 4, 4]``, commanded ones where a true pose is unknown (NaN)."""
    known = torch.isfinite(true_poses).flatten(-2).all(-1)
    return torch.where(known[..., None, None], true_poses, commanded_poses)


def save_idm(path, model: InverseDynamics) -> None:
    """Atomic safetensors write (:func:`worldmodel.checkpoint.atomic_save_file`) with the config in the metadata."""
    tensors = {k: v.float() for k, v in model.state_dict().items()}
    atomic_save_file(tensors, path, {"format": FORMAT, "config": model.cfg.to_json()})


def load_idm(path, device="cpu") -> InverseDynamics:
    """Rebuild an IDM from its safetensors file; clear errors for missing, foreign or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise IDMError(f"IDM weights {path} do not exist (train them with `python -m train.idm`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise IDMError(f"{path} is not a readable safetensors file: {e}") from None
    if metadata.get("format") != FORMAT:
        raise IDMError(f"{path} is not an IDM file (format {metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        cfg = IDMConfig.from_json(metadata["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise IDMError(f"{path} has a broken IDM config: {e}") from None
    model = InverseDynamics(cfg)
    expected = model.state_dict()
    problems = [k for k in expected if k not in tensors or tensors[k].shape != expected[k].shape]
    problems += [k for k in tensors if k not in expected]
    if problems:
        raise IDMError(f"{path} does not match its config; mismatched tensors: {sorted(problems)[:5]}")
    model.load_state_dict(tensors)
    return model.to(device).eval()


def default_idm_path(world: str) -> Path:
    """Where the shipped IDM for ``world`` lives: ``assets/idm/<world>.safetensors`` in the repository."""
    return Path(__file__).resolve().parent.parent / "assets" / "idm" / f"{world}.safetensors"
