import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from worldmodel.autoencoder import (
    AutoencoderConfig,
    AutoencoderError,
    FrameAutoencoder,
    crop_frames,
    gaussian_kl,
    pad_frames,
    reconstruction_loss,
    widen_latent,
)
from worldmodel.metrics import gaussian_window, ssim_map

TINY = dict(
    latent_channels=4,
    encoder_channels=(8, 16),
    encoder_blocks=1,
    decoder_channels=(16,),
    decoder_blocks=(1,),
    pad_multiple=4,
)


def fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def random_frames(b, t, h, w, smooth=False):
    """Frames [b, t, 3, h, w] in [-1, 1]; ``smooth`` gives upsampled low-resolution noise (image-like)."""
    if not smooth:
        return torch.rand(b, t, 3, h, w) * 2 - 1
    low = torch.rand(b * t, 3, h // 4 + 1, w // 4 + 1) * 2 - 1
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return x.reshape(b, t, 3, h, w)


def test_shapes_default_config_128_and_160x120():
    fresh_seed()
    for (h, w), latent in [((128, 128), (8, 16, 16)), ((120, 160), (8, 16, 20))]:
        model = FrameAutoencoder(AutoencoderConfig(frame_height=h, frame_width=w)).eval()
        assert model.latent_shape == latent
        with torch.no_grad():
            z = model.encode(random_frames(1, 2, h, w))
            assert z.shape == (1, 2, *latent)
            x = model.decode(z)
        assert x.shape == (1, 2, 3, h, w)
        assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("h, w", [(16, 16), (13, 18), (11, 23)])
def test_tiny_shapes_and_exact_crop(h, w):
    fresh_seed()
    cfg = AutoencoderConfig(frame_height=h, frame_width=w, **TINY)
    model = FrameAutoencoder(cfg)
    z = model.encode(random_frames(2, 3, h, w))
    assert z.shape == (2, 3, 4, -(-h // 4) * 2, -(-w // 4) * 2)
    assert model.decode(z).shape == (2, 3, 3, h, w)


def reference_pad_index(i: int, before: int, size: int, mode: str) -> int:
    j = i - before
    if mode == "replicate":
        return min(max(j, 0), size - 1)
    if j < 0:
        return -j
    if j > size - 1:
        return 2 * (size - 1) - j
    return j


@pytest.mark.parametrize("mode", ["replicate", "reflect"])
@pytest.mark.parametrize("h, w, multiple", [(120, 160, 16), (13, 10, 8), (16, 16, 16), (7, 9, 4)])
def test_padding_matches_index_reference_and_crop_inverts(mode, h, w, multiple):
    fresh_seed()
    cfg = AutoencoderConfig(frame_height=h, frame_width=w, pad_multiple=multiple, pad_mode=mode,
                            **{k: v for k, v in TINY.items() if k != "pad_multiple"})
    x = torch.randn(2, 3, h, w)
    padded = pad_frames(x, cfg)
    top, bottom, left, right = cfg.padding
    hp, wp = h + top + bottom, w + left + right
    assert hp % multiple == 0 and wp % multiple == 0 and hp - h < multiple and wp - w < multiple
    assert abs(top - bottom) <= 1 and abs(left - right) <= 1
    rows = [reference_pad_index(i, top, h, mode) for i in range(hp)]
    cols = [reference_pad_index(j, left, w, mode) for j in range(wp)]
    assert torch.equal(padded, x[:, :, rows][:, :, :, cols])
    assert torch.equal(crop_frames(padded, cfg), x)


def test_encode_pads_like_manual_reference():
    fresh_seed()
    cfg = AutoencoderConfig(frame_height=13, frame_width=18, pad_mode="reflect", **TINY)
    model = FrameAutoencoder(cfg)
    frames = random_frames(2, 2, 13, 18)
    top, bottom, left, right = cfg.padding  # 13 -> 16: (1, 2); 18 -> 20: (1, 1)
    assert (top, bottom, left, right) == (1, 2, 1, 1)
    flat = frames.reshape(4, 3, 13, 18)
    manual = torch.cat([flat[:, :, 1:2], flat, flat[:, :, 11:12], flat[:, :, 10:11]], dim=2)
    manual = torch.cat([manual[:, :, :, 1:2], manual, manual[:, :, :, 16:17]], dim=3)
    mean, _ = model.encoder(manual)
    torch.testing.assert_close(model.encode(frames), mean.reshape(2, 2, *cfg.latent_shape), rtol=1e-5, atol=1e-6)


def test_encode_decode_deterministic():
    fresh_seed()
    cfg = AutoencoderConfig(frame_height=16, frame_width=20, **TINY)
    model = FrameAutoencoder(cfg)
    frames = random_frames(2, 2, 16, 20)
    z1, z2 = model.encode(frames), model.encode(frames)
    assert torch.equal(z1, z2)
    assert torch.equal(model.decode(z1), model.decode(z2))


def test_config_round_trip_and_errors():
    cfg = AutoencoderConfig(frame_height=120, frame_width=160, latent_channels=6, decoder_blocks=(1, 2, 0))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert AutoencoderConfig.from_dict(d) == cfg
    with pytest.raises(AutoencoderError, match="unknown autoencoder config keys \\['latent_chanels'\\]"):
        AutoencoderConfig.from_dict({**d, "latent_chanels": 4})
    with pytest.raises(AutoencoderError, match="pad_multiple 12 must be a multiple of the downsample factor 8"):
        AutoencoderConfig(pad_multiple=12)
    with pytest.raises(AutoencoderError, match="pad_mode"):
        AutoencoderConfig(pad_mode="zeros")
    with pytest.raises(AutoencoderError, match="decoder_channels needs one level fewer"):
        AutoencoderConfig(decoder_channels=(64, 32, 16, 8), decoder_blocks=(1, 1, 1, 1))
    with pytest.raises(AutoencoderError, match="too small"):
        AutoencoderConfig(frame_height=5, frame_width=16, pad_mode="reflect")
    assert issubclass(AutoencoderError, ValueError)


def test_bad_inputs_give_clear_errors():
    model = FrameAutoencoder(AutoencoderConfig(frame_height=16, frame_width=16, **TINY))
    with pytest.raises(AutoencoderError, match=r"frames must be \[B, T, 3, 16, 16\], got \(1, 2, 3, 16, 20\)"):
        model.encode(torch.zeros(1, 2, 3, 16, 20))
    with pytest.raises(AutoencoderError, match="dtype torch.uint8"):
        model.encode(torch.zeros(1, 2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(AutoencoderError, match=r"latents must be \[B, T, 4, 8, 8\]"):
        model.decode(torch.zeros(2, 4, 8, 8))


def test_set_latent_stats_gives_unit_variance_per_channel():
    fresh_seed()
    cfg = AutoencoderConfig(frame_height=16, frame_width=20, **TINY)
    model = FrameAutoencoder(cfg)
    with torch.no_grad():  # give the channels clearly different offsets and spreads
        model.encoder.layers[-1].bias[:4] = torch.tensor([3.0, -2.0, 0.5, 10.0])
        model.encoder.layers[-1].weight[:4] *= torch.tensor([0.1, 5.0, 1.0, 30.0]).view(4, 1, 1, 1)
    frames = random_frames(3, 4, 16, 20, smooth=True)
    with torch.no_grad():
        before = model.encode(frames)
        recon_before = model.decode(before)
        model.set_latent_stats(before)
        after = model.encode(frames)
        recon_after = model.decode(after)
    per_channel = after.transpose(0, 2).reshape(4, -1).double()
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(4, dtype=torch.double), rtol=0, atol=1e-5)
    torch.testing.assert_close(per_channel.var(1, correction=0), torch.ones(4, dtype=torch.double), rtol=0, atol=1e-5)
    torch.testing.assert_close(recon_after, recon_before, rtol=0, atol=1e-5)
    with torch.no_grad():  # stats are set from latents in the current normalisation: idempotent
        shift, scale = model.latent_shift.clone(), model.latent_scale.clone()
        model.set_latent_stats(after)
    torch.testing.assert_close(model.latent_shift, shift, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.latent_scale, scale, rtol=1e-5, atol=1e-5)
    assert "latent_scale" in model.state_dict() and "latent_shift" in model.state_dict()
    with pytest.raises(AutoencoderError, match="non-constant"):
        model.set_latent_stats(torch.zeros_like(after))


def slow_ssim(x, y, n, c, i, j):
    """SSIM of the 11x11 window whose top-left corner is (i, j), from its definition."""
    offsets = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(offsets**2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    px, py = x[n, c, i : i + 11, j : j + 11].double(), y[n, c, i : i + 11, j : j + 11].double()
    mx, my = (w * px).sum(), (w * py).sum()
    vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
    cov = (w * (px - mx) * (py - my)).sum()
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_ssim_matches_definition():
    fresh_seed()
    x = torch.rand(2, 3, 14, 13, dtype=torch.float64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    fast = ssim_map(x, y, data_range=1.0)
    assert fast.shape == (2, 3, 4, 3)
    for n in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(3):
                    torch.testing.assert_close(fast[n, c, i, j], slow_ssim(x, y, n, c, i, j), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ssim_map(x, x, data_range=1.0), torch.ones_like(fast))
    g = gaussian_window()
    assert g.shape == (11,) and abs(float(g.sum()) - 1) < 1e-6 and int(g.argmax()) == 5


def test_gaussian_kl_matches_torch_distributions():
    fresh_seed()
    mean, logvar = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum()
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected, rtol=1e-10, atol=1e-10)


def test_loss_terms_combine_as_documented():
    fresh_seed()
    model = FrameAutoencoder(AutoencoderConfig(frame_height=16, frame_width=16, **TINY))
    frames = random_frames(2, 2, 16, 16, smooth=True)
    loss, stats, _ = reconstruction_loss(model, frames, ssim_mix=0.3, kl_weight=0.01, edge_weight=0.2, sample_posterior=False)
    assert set(stats) == {"loss", "l1", "ssim", "kl", "edge", "psnr"}
    expected = 0.7 * stats["l1"] + 0.3 * (1 - stats["ssim"]) + 0.01 * stats["kl"] + 0.2 * stats["edge"]
    torch.testing.assert_close(loss.detach(), expected)
    mean, logvar = model.encode_moments(frames)
    torch.testing.assert_close(stats["kl"], gaussian_kl(mean, logvar).detach() / frames.numel())
    recon = model.decode_raw(mean)
    torch.testing.assert_close(stats["l1"], (recon - frames).abs().mean().detach())
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(3, 1, 3, 3)  # the Laplacian as a depthwise conv
    lap = lambda v: F.conv2d(v.flatten(0, 1), kernel, groups=3)  # noqa: E731
    torch.testing.assert_close(stats["edge"], (lap(recon) - lap(frames)).abs().mean().detach())
    to_images = lambda v: ((v + 1) / 2).flatten(0, 1)  # noqa: E731
    assert torch.equal(stats["ssim"], ssim_map(to_images(recon), to_images(frames), data_range=1.0).mean().detach())


def test_ssim_term_is_float32_under_bf16_autocast():
    """Training runs under bf16 autocast; the SSIM term must still be computed in float32 (its local
    variances are differences of nearly equal means, which bf16 destroys)."""
    fresh_seed()
    model = FrameAutoencoder(AutoencoderConfig(frame_height=32, frame_width=32, **TINY))
    frames = random_frames(2, 2, 32, 32, smooth=True)
    mean, _ = model.encode_moments(frames)
    recon = model.decode_raw(mean).detach()
    to_images = lambda v: ((v + 1) / 2).flatten(0, 1)  # noqa: E731
    ssim = lambda a, b: ssim_map(a, b, data_range=1.0).mean()  # noqa: E731  the loss's SSIM
    expected = ssim(to_images(recon.double()), to_images(frames.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim(to_images(recon), to_images(frames))  # what the loss must avoid
        _, stats, _ = reconstruction_loss(model, frames, sample_posterior=False)
    assert abs(float(got) - float(expected)) > 1e-4  # bf16 SSIM is visibly off
    assert stats["ssim"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon_bf16 = model.decode_raw(model.encode_moments(frames)[0]).float().detach()
    exact = ssim(to_images(recon_bf16.double()), to_images(frames.double()))
    assert abs(float(stats["ssim"]) - float(exact)) < 1e-5


def test_loss_decreases_when_overfitting_one_batch():
    seed = fresh_seed()
    model = FrameAutoencoder(AutoencoderConfig(frame_height=16, frame_width=16, **TINY))
    frames = random_frames(2, 2, 16, 16, smooth=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _, _ = reconstruction_loss(model, frames)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], f"seed {seed}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_widened_latent_codes_and_decodes_as_the_source():
    fresh_seed()
    source = FrameAutoencoder(AutoencoderConfig(frame_height=12, frame_width=16, **TINY)).double()
    with torch.no_grad():
        source.latent_shift.normal_()
        source.latent_scale.uniform_(0.5, 2.0)
    wide = widen_latent(source, 7).double()
    frames = random_frames(2, 3, 12, 16).double()
    mean, logvar = source.encode_moments(frames)
    wide_mean, wide_logvar = wide.encode_moments(frames)
    torch.testing.assert_close(wide_mean[:, :, :4], mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(wide_logvar[:, :, :4], logvar, rtol=0, atol=1e-12)
    assert wide_mean[:, :, 4:].abs().amax() > 0  # the new channels carry a (fresh) code
    latents = wide.encode(frames)
    torch.testing.assert_close(latents[:, :, :4], source.encode(frames), rtol=0, atol=1e-12)
    anything = latents.clone()
    anything[:, :, 4:] = torch.randn_like(anything[:, :, 4:])  # the decoder ignores the new channels until trained
    torch.testing.assert_close(wide.decode(anything), source.decode(latents[:, :, :4]), rtol=0, atol=1e-12)
    assert wide.latent_shift[4:].eq(0).all() and wide.latent_scale[4:].eq(1).all()
    loss, _, _ = reconstruction_loss(wide, frames, sample_posterior=False)
    loss.backward()
    assert wide.decoder.layers[0].weight.grad[:, 4:].abs().amax() > 0  # and they start to learn
    with pytest.raises(AutoencoderError, match="more latent channels"):
        widen_latent(source, 4)
