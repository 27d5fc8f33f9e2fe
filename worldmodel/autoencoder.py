"""Frame autoencoder: frames ``[B, T, 3, H, W]`` in [-1, 1] <-> latents ``[B, T, C, h, w]``.

Each frame is coded on its own with 8x spatial compression (three stride-2 levels): a
128x128x3 frame becomes a 16x16x8 latent. Frames whose size is not a multiple of
``pad_multiple`` (e.g. 160x120 Doom frames) are padded inside :meth:`FrameAutoencoder.encode`
(split evenly between the two sides, replicate or reflect) and cropped back in
:meth:`FrameAutoencoder.decode`, so 160x120 becomes a 20x16 latent grid.

The encoder is a small VAE encoder (GroupNorm residual blocks, a mean and a log-variance per
latent element). The decoder runs once per displayed frame in play, so it has no normalisation
layers and puts its wide layers at low resolution; ``python -m worldmodel.bench`` prints its latency.

Latents seen by callers are normalised per channel: ``encode`` returns ``(mean - shift) / scale``
and ``decode`` undoes it. The buffers ``latent_shift`` and ``latent_scale`` are set from data
with :meth:`FrameAutoencoder.set_latent_stats` after training, so that diffusion sees zero-mean,
unit-variance latents; they are saved with the weights.

Loss (:func:`reconstruction_loss`): ``(1 - a) * L1 + a * (1 - SSIM) + kl_weight * KL + edge_weight * E``,
E the mean absolute difference of the frames' per-channel Laplacians (high frequencies that L1 and
SSIM let the decoder blur away; 0 by default).
No pretrained perceptual network is available, so the structural term is SSIM
(:func:`worldmodel.metrics.ssim_map`: Gaussian window 11, sigma 1.5, on frames mapped to [0, 1]);
``a = 0.84`` is the L1/SSIM mix found best for image restoration by Zhao et al., "Loss Functions for Image Restoration with Neural
Networks" (2017). The KL term is summed over latent elements and divided by the number of
pixel values, so ``kl_weight = 1e-6`` means what it means in Stable Diffusion's KL autoencoder:
a light pull that keeps latents bounded without costing reconstruction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from worldmodel.metrics import laplacian, ssim_map

PAD_MODES = ("replicate", "reflect")
LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in fp32


class AutoencoderError(ValueError):
    """An autoencoder config, frame tensor or latent tensor that cannot be used."""


@dataclass(frozen=True)
class AutoencoderConfig:
    """Sizes of the frame autoencoder. ``len(encoder_channels) - 1`` stride-2 levels give the downsample factor."""

    in_channels: int = 3
    latent_channels: int = 8
    frame_height: int = 128  # original frame size; decode crops back to it
    frame_width: int = 128
    pad_multiple: int = 16  # padded frame size is a multiple of this (16 = 8x AE * 2x2 DiT patches)
    pad_mode: str = "replicate"
    encoder_channels: tuple[int, ...] = (32, 64, 128, 256)  # per level, frame resolution first
    encoder_blocks: int = 2  # residual blocks per encoder level
    decoder_channels: tuple[int, ...] = (192, 96, 48)  # per level, latent resolution first, up to half frame resolution
    decoder_blocks: tuple[int, ...] = (2, 1, 1)  # residual blocks per decoder level

    def __post_init__(self):
        for name in _INT_FIELDS:
            object.__setattr__(self, name, _as_int(name, getattr(self, name)))
        for name in _INT_TUPLE_FIELDS:
            object.__setattr__(self, name, _as_int_tuple(name, getattr(self, name)))
        for name in ("in_channels", "latent_channels", "frame_height", "frame_width", "pad_multiple"):
            if getattr(self, name) < 1:
                raise AutoencoderError(f"autoencoder {name} must be a positive integer, got {getattr(self, name)}")
        if len(self.encoder_channels) < 2 or min(self.encoder_channels + self.decoder_channels) < 1:
            raise AutoencoderError(
                f"autoencoder channels must be lists of positive integers with at least 2 encoder levels, got "
                f"encoder {list(self.encoder_channels)} and decoder {list(self.decoder_channels)}"
            )
        if len(self.decoder_channels) != len(self.encoder_channels) - 1:
            raise AutoencoderError(
                f"decoder_channels needs one level fewer than encoder_channels (its last 2x goes straight to "
                f"pixels), got {len(self.decoder_channels)} and {len(self.encoder_channels)} levels"
            )
        if len(self.decoder_blocks) != len(self.decoder_channels) or min(self.decoder_blocks) < 0:
            raise AutoencoderError(
                f"decoder_blocks needs one non-negative count per decoder level ({len(self.decoder_channels)}), "
                f"got {list(self.decoder_blocks)}"
            )
        if self.encoder_blocks < 0:
            raise AutoencoderError(f"encoder_blocks must be >= 0, got {self.encoder_blocks}")
        if self.pad_multiple % self.downsample:
            raise AutoencoderError(
                f"pad_multiple {self.pad_multiple} must be a multiple of the downsample factor {self.downsample}"
            )
        if self.pad_mode not in PAD_MODES:
            raise AutoencoderError(f"pad_mode must be one of {list(PAD_MODES)}, got {self.pad_mode!r}")
        top, bottom, left, right = self.padding
        too_small = max(top, bottom) >= self.frame_height or max(left, right) >= self.frame_width
        if self.pad_mode == "reflect" and too_small:
            raise AutoencoderError(
                f"frames of {self.frame_width}x{self.frame_height} are too small to pad to a multiple of "
                f"{self.pad_multiple} with pad_mode {self.pad_mode!r}"
            )

    @property
    def downsample(self) -> int:
        """Spatial compression factor per side."""
        return 2 ** (len(self.encoder_channels) - 1)

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """Pixels added (top, bottom, left, right) to reach a multiple of ``pad_multiple``."""
        top, bottom = _split_padding(self.frame_height, self.pad_multiple)
        left, right = _split_padding(self.frame_width, self.pad_multiple)
        return top, bottom, left, right

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent frame."""
        top, bottom, left, right = self.padding
        return (
            self.latent_channels,
            (self.frame_height + top + bottom) // self.downsample,
            (self.frame_width + left + right) // self.downsample,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in _INT_TUPLE_FIELDS:
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise AutoencoderError(f"unknown autoencoder config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**dict(d))


_INT_FIELDS = ("in_channels", "latent_channels", "frame_height", "frame_width", "pad_multiple", "encoder_blocks")
_INT_TUPLE_FIELDS = ("encoder_channels", "decoder_channels", "decoder_blocks")


def _as_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise AutoencoderError(f"autoencoder {name} must be an integer, got {value!r}")
    return int(value)


def _as_int_tuple(name: str, values) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise AutoencoderError(f"autoencoder {name} must be a list of integers, got {values!r}")
    return tuple(_as_int(name, v) for v in values)


def _split_padding(size: int, multiple: int) -> tuple[int, int]:
    """Padding (before, after) that brings ``size`` to the next multiple, split evenly (extra pixel after)."""
    total = -size % multiple
    return total // 2, total - total // 2


def pad_frames(x: torch.Tensor, config: AutoencoderConfig) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, H + top + bottom, W + left + right]`` per ``config.padding``."""
    top, bottom, left, right = config.padding
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), mode=config.pad_mode)


def crop_frames(x: torch.Tensor, config: AutoencoderConfig) -> torch.Tensor:
    """Inverse of :func:`pad_frames`: ``[N, C, Hp, Wp]`` -> ``[N, C, H, W]``."""
    top, _, left, _ = config.padding
    return x[..., top : top + config.frame_height, left : left + config.frame_width]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResidualBlock(nn.Module):
    """Pre-activation ``x + conv(act(norm(conv(act(norm(x))))))``; the last conv starts at zero."""

    def __init__(self, channels: int, normalise: bool):
        super().__init__()
        self.norm1 = _group_norm(channels) if normalise else nn.Identity()
        self.conv1 = _conv3x3(channels, channels)
        self.norm2 = _group_norm(channels) if normalise else nn.Identity()
        self.conv2 = _conv3x3(channels, channels)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """``[N, in_channels, Hp, Wp]`` -> mean and log-variance ``[N, latent_channels, Hp/f, Wp/f]`` each."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        chans = config.encoder_channels
        layers: list[nn.Module] = [_conv3x3(config.in_channels, chans[0])]
        for level, ch in enumerate(chans):
            layers += [ResidualBlock(ch, normalise=True) for _ in range(config.encoder_blocks)]
            if level + 1 < len(chans):
                layers.append(_conv3x3(ch, chans[level + 1], stride=2))
        layers += [_group_norm(chans[-1]), nn.SiLU(), _conv3x3(chans[-1], 2 * config.latent_channels)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.layers(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv: ``[N, c_in, h, w]`` -> ``[N, c_out, 2h, 2w]``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = _conv3x3(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SubPixelOutput(nn.Module):
    """Last 2x step straight to pixels: a 3x3 conv to ``4 * c_out`` channels, then a pixel shuffle.

    ``[N, c_in, h, w]`` -> ``[N, c_out, 2h, 2w]``; it keeps every conv of the decoder below frame resolution.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = _conv3x3(c_in, 4 * c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(F.silu(x)), 2)


class Decoder(nn.Module):
    """``[N, latent_channels, h, w]`` -> ``[N, in_channels, h*f, w*f]`` (unclamped). No normalisation layers."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        chans = config.decoder_channels
        layers: list[nn.Module] = [_conv3x3(config.latent_channels, chans[0])]
        for level, (ch, blocks) in enumerate(zip(chans, config.decoder_blocks)):
            layers += [ResidualBlock(ch, normalise=False) for _ in range(blocks)]
            if level + 1 < len(chans):
                layers.append(Upsample(ch, chans[level + 1]))
        layers.append(SubPixelOutput(chans[-1], config.in_channels))
        self.layers = nn.Sequential(*layers)

    @property
    def output_weight(self) -> torch.Tensor:
        """The weight of the layer nearest the pixels (where an adversarial term's size is balanced)."""
        return self.layers[-1].conv.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class FrameAutoencoder(nn.Module):
    """Per-frame VAE with normalised latents. See the module docstring."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.register_buffer("latent_shift", torch.zeros(config.latent_channels))
        self.register_buffer("latent_scale", torch.ones(config.latent_channels))
        self.to(memory_format=torch.channels_last)  # faster convs on CPU (oneDNN) and CUDA (cuDNN)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent frame."""
        return self.config.latent_shape

    def encode_moments(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames ``[B, T, 3, H, W]`` -> un-normalised posterior mean and log-variance ``[B, T, C, h, w]``."""
        self._check_frames(frames)
        x = pad_frames(rearrange(frames, "b t c h w -> (b t) c h w"), self.config)
        mean, logvar = self.encoder(x.contiguous(memory_format=torch.channels_last))
        b = frames.shape[0]
        return rearrange(mean, "(b t) c h w -> b t c h w", b=b), rearrange(logvar, "(b t) c h w -> b t c h w", b=b)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents ``[B, T, C, h, w]`` -> unclamped frames ``[B, T, 3, H, W]``."""
        self._check_latents(z)
        x = self.decoder(rearrange(z, "b t c h w -> (b t) c h w").contiguous(memory_format=torch.channels_last))
        return rearrange(crop_frames(x, self.config), "(b t) c h w -> b t c h w", b=z.shape[0])

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, T, 3, H, W]`` in [-1, 1] -> normalised latents ``[B, T, C, h, w]`` (posterior mean)."""
        mean, _ = self.encode_moments(frames)
        return (mean - self._channel(self.latent_shift)) / self._channel(self.latent_scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, T, C, h, w]`` -> frames ``[B, T, 3, H, W]`` clamped to [-1, 1]."""
        self._check_latents(latents)  # before broadcasting with the per-channel stats
        raw = latents * self._channel(self.latent_scale) + self._channel(self.latent_shift)
        return self.decode_raw(raw).clamp(-1.0, 1.0)

    @torch.no_grad()
    def set_latent_stats(self, latents: torch.Tensor) -> None:
        """Set shift/scale so that these latents ``[B, T, C, h, w]`` (as returned by :meth:`encode` under
        the current stats) get zero mean and unit variance (population) per channel."""
        self._check_latents(latents)
        raw = latents.double() * self._channel(self.latent_scale).double() + self._channel(self.latent_shift).double()
        per_channel = rearrange(raw, "b t c h w -> c (b t h w)")
        mean = per_channel.mean(dim=1)
        std = per_channel.std(dim=1, correction=0)
        if not (torch.isfinite(std).all() and (std > 0).all()):
            raise AutoencoderError(f"latent statistics need finite, non-constant channels; got std {std.tolist()}")
        self.latent_shift.copy_(mean)
        self.latent_scale.copy_(std)

    def _channel(self, v: torch.Tensor) -> torch.Tensor:
        return rearrange(v, "c -> 1 1 c 1 1")

    def _check_frames(self, frames: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.frame_height, cfg.frame_width)
        if not isinstance(frames, torch.Tensor) or frames.ndim != 5 or tuple(frames.shape[2:]) != expected:
            got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise AutoencoderError(f"frames must be [B, T, {', '.join(map(str, expected))}], got {got}")
        if not frames.is_floating_point():
            raise AutoencoderError(f"frames must be float in [-1, 1], got dtype {frames.dtype}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        expected = self.latent_shape
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or tuple(latents.shape[2:]) != expected:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise AutoencoderError(f"latents must be [B, T, {', '.join(map(str, expected))}], got {got}")


@torch.no_grad()
def widen_latent(source: FrameAutoencoder, latent_channels: int) -> FrameAutoencoder:
    """A copy of ``source`` with ``latent_channels`` (more than its C) latent channels that codes and decodes
    exactly as ``source`` does: the first C channels' mean and log-variance are the source's, the new
    channels come from a fresh encoder head (the caller seeds it), and the decoder's weights on them start
    at zero, so they can only add information once trained. New channels get latent statistics 0 / 1."""
    old = source.config.latent_channels
    if latent_channels <= old:
        raise AutoencoderError(f"widening needs more latent channels than the autoencoder's {old}, got {latent_channels}")
    like = source.latent_shift
    wide = FrameAutoencoder(replace(source.config, latent_channels=latent_channels)).to(like.device, like.dtype)
    head_prefix = f"encoder.layers.{len(wide.encoder.layers) - 1}."
    wide.load_state_dict({k: v for k, v in source.state_dict().items()
                          if not k.startswith(("latent_", head_prefix, "decoder.layers.0."))}, strict=False)
    head, src_head = wide.encoder.layers[-1], source.encoder.layers[-1]  # [2C, c, 3, 3]: means, then log-variances
    for half in (0, 1):  # the source's rows; the fresh rows after them stay as initialised
        rows, src_rows = slice(half * latent_channels, half * latent_channels + old), slice(half * old, (half + 1) * old)
        head.weight[rows] = src_head.weight[src_rows]
        head.bias[rows] = src_head.bias[src_rows]
    first, src_first = wide.decoder.layers[0], source.decoder.layers[0]  # [c, C, 3, 3]
    first.weight.zero_()
    first.weight[:, :old] = src_first.weight
    first.bias.copy_(src_first.bias)
    wide.latent_shift[:old] = source.latent_shift
    wide.latent_scale[:old] = source.latent_scale
    return wide


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, 1) ) summed over all elements (a 0-d tensor)."""
    return 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).sum()


def reconstruction_loss(model: FrameAutoencoder, frames: torch.Tensor, *, ssim_mix: float = 0.84, kl_weight: float = 1e-6,
                        edge_weight: float = 0.0, sample_posterior: bool = True
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Training loss on frames ``[B, T, 3, H, W]`` in [-1, 1] (see the module docstring for the terms).

    With ``sample_posterior`` the decoder sees ``mean + std * noise`` (the VAE objective); without it,
    the mean. Returns the loss, detached 0-d tensors (loss, l1, ssim, kl per pixel value, edge, psnr in
    dB) and the unclamped reconstruction ``[B, T, 3, H, W]`` (in the graph, for an adversarial term).
    """
    mean, logvar = model.encode_moments(frames)
    z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample_posterior else mean
    recon = model.decode_raw(z)
    l1 = (recon - frames).abs().mean()
    as_images = lambda v: rearrange((v.float() + 1.0) / 2.0, "b t c h w -> (b t) c h w")  # noqa: E731
    with torch.autocast(frames.device.type, enabled=False):  # SSIM's local variances cancel badly in bf16
        ssim = ssim_map(as_images(recon), as_images(frames), data_range=1.0).mean()
    kl = gaussian_kl(mean.float(), logvar.float()) / frames.numel()
    edge = (laplacian(recon) - laplacian(frames)).abs().mean()
    loss = (1.0 - ssim_mix) * l1 + ssim_mix * (1.0 - ssim) + kl_weight * kl + edge_weight * edge
    mse = (recon.detach().clamp(-1.0, 1.0) - frames).pow(2).mean()
    psnr = 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))  # peak-to-peak range of [-1, 1] is 2
    stats = {"loss": loss, "l1": l1, "ssim": ssim, "kl": kl, "edge": edge, "psnr": psnr}
    return loss, {k: v.detach() for k, v in stats.items()}, recon
