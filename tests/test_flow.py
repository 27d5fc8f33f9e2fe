import math

import pytest
import torch

from worldmodel.flow import (add_noise, apply_cfg, sample_euler, sample_renoise, shift_sigma,
                             sigma_grid, step_list, velocity_target, x0_denoiser, x0_from_v)
from worldmodel.model import DEFAULT_SAMPLER


def test_parameterisation_round_trip():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    x0, eps = torch.randn(2, 3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 5, 5, generator=g, dtype=torch.float64)
    sigma = torch.rand(2, 3, generator=g, dtype=torch.float64)
    xt = add_noise(x0, eps, sigma)
    v = velocity_target(x0, eps)
    assert torch.allclose(x0_from_v(xt, v, sigma), x0, atol=1e-12)
    assert torch.allclose(add_noise(x0, eps, 1.0), eps) and torch.allclose(add_noise(x0, eps, 0.0), x0)


def test_shift_and_grid():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    k = 3.0
    shifted = shift_sigma(s, k)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert torch.allclose(shifted, k * s / (1 + (k - 1) * s))
    assert (shifted[1:-1] > s[1:-1]).all()
    grid = sigma_grid(4, 1.0)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_step_list_keeps_a_default_and_its_grid():
    default = [1.0, 0.83]
    assert step_list(2, default) == default
    assert step_list(1, default) == [1.0]
    four = step_list(4, default)
    k = 0.83 * 0.5 / (0.5 * 0.17)  # the shift that maps the unshifted midpoint 0.5 to 0.83
    assert four == pytest.approx([float(shift_sigma(u, k)) for u in (1.0, 0.75, 0.5, 0.25)], abs=1e-6)
    assert four[2] == pytest.approx(0.83, abs=1e-6)
    assert step_list(4, DEFAULT_SAMPLER["steps"]) == [1.0, 0.75, 0.5, 0.25]  # the students' [1.0, 0.5]: shift 1
    assert step_list(4, shift=5.0) == pytest.approx([1.0, 0.9375, 0.8333, 0.625], abs=1e-4)  # Self Forcing's
    with pytest.raises(ValueError):
        step_list(0, default)


def test_euler_is_exact_on_the_straight_path_of_a_point_mass():
    """Data = a single point x*: the PF-ODE velocity is (x - x*)/s; Euler from noise lands on x*."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    target = torch.randn(2, 1, 3, 4, 4, generator=g, dtype=torch.float64)
    velocity = lambda x, s: (x - target) / s[:, :, None, None, None]  # noqa: E731
    seen = []
    out = sample_euler(velocity, torch.randn_like(target), sigma_grid(5, 2.0).double().tolist(), callback=seen.append)
    assert torch.allclose(out, target, atol=1e-10)
    assert [step["i"] for step in seen] == list(range(5)) and seen[0]["sigma"] == 1.0
    assert torch.equal(seen[1]["x"], seen[0]["x"] + (seen[1]["sigma"] - 1.0) * seen[0]["v"])  # the state before each step


def test_cfg_combines_conditional_and_unconditional():
    x = torch.randn(3)
    assert torch.allclose(apply_cfg(2.0 * x, 0.5 * x, 3.0), 0.5 * x + 3.0 * (2.0 * x - 0.5 * x))
    assert torch.equal(apply_cfg(2.0 * x, 0.5 * x, 1.0), 2.0 * x)
    guided = lambda x, s: apply_cfg(2.0 * x, 0.5 * x, 3.0)  # noqa: E731
    assert torch.allclose(sample_euler(guided, x[None, None], [1.0, 0.5, 0.0]), x * (1 - 0.5 * 5.0) ** 2)


def test_few_step_sampler_renoises_with_fresh_noise():
    seen = []
    target = torch.randn(1, 1, 2, 2, 2)

    def velocity(x, s):  # the velocity whose x0 is ``target``
        seen.append((x.clone(), float(s[0, 0])))
        return (x - target) / s[:, :, None, None, None]

    noise = torch.randn_like(target)
    out = sample_renoise(velocity, noise, [1.0, 0.6, 0.2, 0.0], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target, atol=1e-6) and [s for _, s in seen] == pytest.approx([1.0, 0.6, 0.2])
    assert torch.equal(seen[0][0], noise)
    g = torch.Generator().manual_seed(0)
    eps1 = torch.randn(target.shape, generator=g)
    assert torch.allclose(seen[1][0], 0.4 * target + 0.6 * eps1, atol=1e-6)
    eps2 = torch.randn(target.shape, generator=g)
    assert torch.allclose(seen[2][0], 0.8 * target + 0.2 * eps2, atol=1e-6)
    assert not math.isclose(float((eps1 - eps2).abs().sum()), 0.0)
    drawn = torch.stack([eps1, eps2])  # noise drawn in advance replaces the generator
    again = sample_renoise(velocity, noise, [1.0, 0.6, 0.2, 0.0], noise=drawn)
    assert torch.equal(again, out) and torch.equal(seen[-1][0], seen[2][0])
    assert torch.allclose(x0_denoiser(velocity)(noise, torch.ones(1, 1)), target, atol=1e-6)
