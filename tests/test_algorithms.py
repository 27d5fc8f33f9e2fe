"""The training algorithms against independent references: hand-written formulas, closed-form
Gaussian flows and scores (via autograd of log-densities), and slow loops."""

import math
from types import SimpleNamespace

import pytest
import torch

from train import algorithms as alg



@pytest.fixture(autouse=True)
def float64_by_default():
    """Exact references need float64; restore the default afterwards (other test files share the process)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed))


def blocks(frames, size):
    """Block ids of equal blocks of ``size`` frames."""
    return torch.arange(frames) // size


# ----------------------------------------------------------------------------- Gaussian references
# Data x0 ~ N(mu, a^2) per element, x_s = (1 - s) x0 + s eps: x_s ~ N((1 - s) mu, (1 - s)^2 a^2 + s^2).


def gaussian_log_density(x, s, mu, a):
    var = (1 - s) ** 2 * a**2 + s**2
    return -0.5 * (x - (1 - s) * mu) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)


def gaussian_score(x, s, mu, a):
    """d/dx log p_s(x) by autograd (independent of any posterior-mean algebra)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(gaussian_log_density(x, s, mu, a).sum(), x)
    return g


def gaussian_x0(x, s, mu, a):
    """E[x0 | x_s] by Tweedie: (1 - s) E[x0 | x] = x + s^2 score(x)."""
    return (x + s**2 * gaussian_score(x, s, mu, a)) / (1 - s)


def gaussian_posterior_x0(x, s, mu, a):
    """E[x0 | x_s] written out (conjugate Gaussian), valid up to s = 1."""
    return mu + (1 - s) * a**2 * (x - (1 - s) * mu) / ((1 - s) ** 2 * a**2 + s**2)


def gaussian_velocity(x, s, mu, a):
    """E[eps - x0 | x_s] = (x - E[x0 | x]) / s  (from x = (1 - s) x0 + s eps)."""
    return (x - gaussian_posterior_x0(x, s, mu, a)) / s


# ----------------------------------------------------------------------------- flow matching


def test_sample_sigmas_constant_per_block_and_shifted():
    s = alg.sample_sigmas(3, blocks(8, 2), gen(1), distribution="uniform", shift=3.0)
    assert s.shape == (3, 8)
    assert torch.equal(s[:, 0::2], s[:, 1::2])
    u = torch.rand(3, 4, generator=gen(1))  # the same draws, unshifted
    torch.testing.assert_close(s[:, 0::2], 3.0 * u / (1 + 2.0 * u))


def test_sample_sigmas_distributions():
    n = 200_000
    ln = alg.sample_sigmas(n, blocks(1, 1), gen(2), distribution="logit_normal", loc=0.5, scale=0.8)[:, 0]
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 0.8) < 0.01
    un = alg.sample_sigmas(n, blocks(1, 1), gen(3), distribution="uniform", low=0.2, high=0.6)[:, 0]
    assert un.min() >= 0.2 and un.max() <= 0.6 and abs(un.mean() - 0.4) < 0.002
    with pytest.raises(alg.AlgorithmError, match="unknown sigma distribution"):
        alg.sample_sigmas(1, blocks(1, 1), gen(), distribution="cosine")
    with pytest.raises(alg.AlgorithmError, match="block ids must be"):
        alg.sample_sigmas(1, torch.tensor([0, 2, 2]), gen())


def test_sample_sigmas_follow_uneven_blocks():
    """The DiT's blocks: the first frame alone, then blocks of 2."""
    ids = torch.tensor([0, 1, 1, 2, 2])
    s = alg.sample_sigmas(4, ids, gen(6), distribution="uniform")
    assert torch.equal(s[:, 1], s[:, 2]) and torch.equal(s[:, 3], s[:, 4])
    assert not torch.equal(s[:, 0], s[:, 1]) and not torch.equal(s[:, 2], s[:, 3])


def test_keep_conditions_rate():
    keep = alg.keep_conditions(100_000, 0.1, gen(4))
    assert keep.dtype == torch.bool and abs(keep.double().mean() - 0.9) < 0.005


def test_flow_matching_loss_matches_hand_formula():
    x0, eps = randn(2, 4, 3, 2, 2, seed=1), randn(2, 4, 3, 2, 2, seed=2)
    sigma = torch.rand(2, 4, generator=gen(3))
    a, c = 0.7, -0.3
    fn = lambda x, s: a * x + c * s[:, :, None, None, None]  # noqa: E731
    loss = alg.flow_matching_loss(fn, x0, eps, sigma)
    s = sigma.view(2, 4, 1, 1, 1)
    x_t = x0 + s * (eps - x0)
    expected = ((a * x_t + c * s - eps + x0) ** 2).mean()
    torch.testing.assert_close(loss, expected.float())


def test_flow_matching_loss_is_minimised_by_the_true_velocity():
    """For Gaussian data the exact velocity field has a lower loss than a perturbed one."""
    mu, a = 0.5, 0.3
    x0 = mu + a * randn(4000, 1, 1, 1, 1, seed=5)
    eps = randn(4000, 1, 1, 1, 1, seed=6)
    sigma = 0.05 + 0.9 * torch.rand(4000, 1, generator=gen(7))
    exact = lambda x, s: gaussian_velocity(x, s[:, :, None, None, None], mu, a)  # noqa: E731
    off = lambda x, s: 1.1 * exact(x, s)  # noqa: E731
    assert alg.flow_matching_loss(exact, x0, eps, sigma) < alg.flow_matching_loss(off, x0, eps, sigma)


def test_critic_loss_sends_no_gradient_to_the_generator():
    g = torch.tensor(1.5, requires_grad=True)
    w = torch.tensor(0.2, requires_grad=True)
    x0 = g * randn(2, 2, 1, 2, 2, seed=8)
    loss = alg.critic_loss(lambda x, s: w * x, x0, randn(2, 2, 1, 2, 2, seed=9), torch.full((2, 2), 0.5))
    loss.backward()
    assert g.grad is None and w.grad is not None and w.grad != 0


# ----------------------------------------------------------------------------- causal CD


def test_distillation_grid_merges_student_sigmas():
    grid = alg.distillation_grid(4, 1.0, include=(0.83, 0.5))
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.83, 0.75, 0.5, 0.25, 0.0], dtype=torch.float32))
    with pytest.raises(alg.AlgorithmError, match="student sigmas"):
        alg.distillation_grid(4, 1.0, include=(0.0,))


def test_sample_grid_pairs_are_adjacent_grid_points_per_block():
    grid = alg.distillation_grid(10, 3.0)
    s, s_next = alg.sample_grid_pairs(grid, 64, blocks(6, 3), gen(5))
    assert torch.equal(s[:, :3], s[:, :1].expand(-1, 3)) and torch.equal(s_next[:, 3:], s_next[:, 3:4].expand(-1, 3))
    i = (s.float()[..., None] == grid).float().argmax(-1)
    assert torch.equal(grid[i], s.float()) and torch.equal(grid[i + 1], s_next.float())
    assert set(i.unique().tolist()) == set(range(10))  # every interval gets drawn


def test_cd_target_equals_hand_computed_euler_step():
    """Teacher v = A x + c s with CFG of two such fields; EMA x0 = x - s (B x); all hand-written."""
    x0, eps = randn(2, 4, 2, 3, 3, seed=10), randn(2, 4, 2, 3, 3, seed=11)
    grid = alg.distillation_grid(8, 5.0)
    sigma, sigma_next = alg.sample_grid_pairs(grid, 2, blocks(4, 2), gen(12))
    guidance = 3.0

    def cond_v(x, s):
        return 0.9 * x + 0.2 * s[:, :, None, None, None]

    def uncond_v(x, s):
        return 0.4 * x - 0.1 * s[:, :, None, None, None]

    teacher = lambda x, s: uncond_v(x, s) + guidance * (cond_v(x, s) - uncond_v(x, s))  # noqa: E731
    ema_x0 = lambda x, s: x - s[:, :, None, None, None] * (0.6 * x)  # noqa: E731
    w = torch.tensor(0.3, requires_grad=True)
    student_x0 = lambda x, s: x - s[:, :, None, None, None] * (w * x)  # noqa: E731

    loss = alg.causal_cd_loss(student_x0, teacher, ema_x0, x0, eps, sigma, sigma_next)

    ref_loss = 0.0
    for b in range(2):
        for t in range(4):
            s, s2 = float(sigma[b, t]), float(sigma_next[b, t])
            xt = (1 - s) * x0[b, t] + s * eps[b, t]
            v = (0.4 * xt - 0.1 * s) + guidance * ((0.9 * xt + 0.2 * s) - (0.4 * xt - 0.1 * s))
            x_next = xt + (s2 - s) * v
            target = x_next - s2 * 0.6 * x_next
            pred = xt - s * 0.3 * xt
            ref_loss += ((pred - target) ** 2).sum()
    ref_loss = ref_loss / x0.numel()
    torch.testing.assert_close(loss, ref_loss.float())
    loss.backward()  # gradient reaches the student only
    assert w.grad is not None and w.grad != 0


def test_cd_target_at_sigma_zero_is_the_teacher_endpoint():
    x = randn(1, 2, 1, 2, 2, seed=13)
    s, s0 = torch.full((1, 2), 0.1), torch.zeros(1, 2)
    v = randn(1, 2, 1, 2, 2, seed=14)
    target = alg.consistency_target(lambda x_, s_: v, lambda x_, s_: x_ - s_[..., None, None, None] * 99.0, x, s, s0)
    torch.testing.assert_close(target, x - 0.1 * v)


def test_cd_with_exact_gaussian_flow_map_has_zero_loss_in_the_limit():
    """If student and target are the exact flow map of the Gaussian PF-ODE and the teacher is exact,
    the CD loss vanishes as the grid gets fine (Euler error O(h^2) per step)."""
    mu, a = 0.3, 0.5

    def flow_map(x, s):  # exact x0 reached from x at s along the PF-ODE: x_s = (1-s) mu + r(s) z
        s = s[:, :, None, None, None]
        r = torch.sqrt((1 - s) ** 2 * a**2 + s**2)
        return mu + a * (x - (1 - s) * mu) / r

    teacher = lambda x, s: gaussian_velocity(x, s[:, :, None, None, None], mu, a)  # noqa: E731
    x0, eps = mu + a * randn(8, 2, 1, 1, 1, seed=15), randn(8, 2, 1, 1, 1, seed=16)
    losses = []
    for n in (20, 200):
        grid = alg.distillation_grid(n, 1.0)
        s, s2 = alg.sample_grid_pairs(grid[:-1], 8, blocks(2, 1), gen(17))  # avoid s = 1 where the map is singular in a
        losses.append(float(alg.causal_cd_loss(flow_map, teacher, flow_map, x0, eps, s.double(), s2.double())))
    assert losses[1] < losses[0] / 50 and losses[1] < 1e-7


# ----------------------------------------------------------------------------- causal ODE


def test_ode_trajectory_linear_field_matches_discrete_product():
    a = 0.7
    noise = randn(2, 3, 1, 2, 2, seed=20)
    sigmas = alg.distillation_grid(6, 3.0, include=(0.83,)).double()
    states, end = alg.ode_trajectory(lambda x, s: a * x, noise, sigmas, keep=(1.0, 0.83))
    factors = [1 + (float(sigmas[i + 1]) - float(sigmas[i])) * a for i in range(len(sigmas) - 1)]
    torch.testing.assert_close(end, noise * math.prod(factors))
    k = int((sigmas - 0.83).abs().argmin())
    torch.testing.assert_close(states[0], noise)
    torch.testing.assert_close(states[1], noise * math.prod(factors[:k]))


def test_ode_endpoint_matches_gaussian_closed_form():
    """The rectified-flow PF-ODE of N(mu, a^2) data maps eps to mu + a eps, passing x_s = (1-s) mu + r(s) eps."""
    mu, a = -0.4, 0.6
    noise = randn(3, 2, 1, 2, 2, seed=21)
    sigmas = torch.linspace(1.0, 0.0, 3001)
    keep = (1.0, float(sigmas[1500]))
    velocity = lambda x, s: gaussian_velocity(x, s[:, :, None, None, None], mu, a)  # noqa: E731
    states, end = alg.ode_trajectory(velocity, noise, sigmas, keep=keep)
    torch.testing.assert_close(end, mu + a * noise, atol=2e-3, rtol=0)
    s = keep[1]
    torch.testing.assert_close(states[1], (1 - s) * mu + math.sqrt((1 - s) ** 2 * a**2 + s**2) * noise, atol=2e-3, rtol=0)


def test_ode_trajectory_rejects_off_grid_keep():
    with pytest.raises(alg.AlgorithmError, match="not on the trajectory grid"):
        alg.ode_trajectory(lambda x, s: x, randn(1, 1, 1, 1, 1), torch.linspace(1, 0, 5), keep=(0.3,))


def test_ode_regression_loss_gathers_per_block_points():
    k, b, t = 3, 2, 4
    states = randn(k, b, t, 2, 2, 2, seed=22)
    endpoint = randn(b, t, 2, 2, 2, seed=23)
    sigmas = (1.0, 0.8, 0.5)
    points = alg.sample_trajectory_points(k, b, blocks(t, 2), gen(24))
    assert torch.equal(points[:, 0], points[:, 1])
    student = lambda x, s: x * (1 + s[:, :, None, None, None])  # noqa: E731
    loss = alg.ode_regression_loss(student, states, sigmas, endpoint, points)
    ref = 0.0
    for i in range(b):
        for j in range(t):
            p = int(points[i, j])
            ref += ((states[p, i, j] * (1 + sigmas[p]) - endpoint[i, j]) ** 2).sum()
    torch.testing.assert_close(loss, (ref / endpoint.numel()).float())


# ----------------------------------------------------------------------------- DMD


def test_dmd_direction_on_gaussians_is_the_normalised_score_difference():
    mu_r, a_r, mu_f, a_f = 0.5, 0.4, -0.2, 0.7
    x0_gen = mu_f + a_f * randn(4, 2, 1, 3, 3, seed=30)
    eps = randn(4, 2, 1, 3, 3, seed=31)
    sigma = alg.sample_sigmas(4, blocks(2, 2), gen(32), distribution="uniform", low=0.1, high=0.9)
    real = lambda x, s: gaussian_x0(x, s[:, :, None, None, None], mu_r, a_r)  # noqa: E731
    fake = lambda x, s: gaussian_x0(x, s[:, :, None, None, None], mu_f, a_f)  # noqa: E731
    x = x0_gen.clone().requires_grad_(True)
    loss, grad = alg.dmd_loss(x, real, fake, eps, sigma)

    s = sigma[:, :, None, None, None]
    x_t = (1 - s) * x0_gen + s * eps
    # closed-form posterior means, written out (not via Tweedie)
    x0_real, x0_fake = gaussian_posterior_x0(x_t, s, mu_r, a_r), gaussian_posterior_x0(x_t, s, mu_f, a_f)
    norm = (x0_gen - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(grad, ((x0_fake - x0_real) / norm).float())
    # and it points along the score difference, the KL(fake || real) gradient
    score_gap = gaussian_score(x_t, s, mu_f, a_f) - gaussian_score(x_t, s, mu_r, a_r)
    torch.testing.assert_close(grad.double() * norm, s**2 / (1 - s) * score_gap, rtol=1e-5, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(x.grad, grad.double() / x.numel())


def test_dmd_moves_a_generator_towards_the_real_distribution():
    """Generator x = m + a z, critic = exact score of the generator's current distribution: m -> mu_r."""
    mu_r, a = 1.0, 0.5
    m = torch.tensor(-1.0, requires_grad=True)
    opt = torch.optim.SGD([m], lr=0.3)
    g = gen(33)
    real = lambda x, s: gaussian_x0(x, s[:, :, None, None, None], mu_r, a)  # noqa: E731
    for _ in range(60):
        x0 = m + a * torch.randn(8, 1, 1, 16, 16, generator=g)
        eps = torch.randn(8, 1, 1, 16, 16, generator=g)
        sigma = alg.sample_sigmas(8, blocks(1, 1), g, distribution="uniform", low=0.02, high=0.98)
        fake = lambda x, s, mf=float(m.detach()): gaussian_x0(x, s[:, :, None, None, None], mf, a)  # noqa: E731
        loss, _ = alg.dmd_loss(x0, real, fake, eps, sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(float(m.detach()) - mu_r) < 1e-3


# ----------------------------------------------------------------------------- self-forcing rollout


def test_sample_exit_steps_shared_by_identical_generators():
    a = alg.sample_exit_steps(50, 3, gen(40))
    assert a == alg.sample_exit_steps(50, 3, gen(40))
    assert set(a) == {0, 1, 2}


class ToyDiT:
    """A cached "network" for :class:`worldmodel.rollout.CachedRollout`: block b's x0 at sampling step i is
    ``theta[b - 1, i] * x + 0.1 * (sum of the committed blocks)``, a distinct parameter per (block, step)
    that shows exactly which denoising steps the gradient reaches. ``calls``: (block, step, grad enabled)."""

    cfg = SimpleNamespace(block_size=1)

    def __init__(self, theta, sigmas):
        self.theta, self.sigmas, self.calls = theta, list(sigmas), []

    def new_cache(self, batch, device, dtype):
        return []

    def forward_cached(self, x, sigma, actions, poses, cache, write=False, cond_keep=None, commit=None, commit_sigma=0.0):
        if commit is not None:  # a folded commit: never in a forward with gradient
            assert not torch.is_grad_enabled() and not commit[0].requires_grad
            cache.append(commit[0])
        if write:
            assert not torch.is_grad_enabled() and not x.requires_grad  # later blocks see a detached history
            cache.append(x)
            return x
        b, i = len(cache), self.sigmas.index(float(sigma[0, 0]))
        self.calls.append((b, i, torch.is_grad_enabled()))
        x0 = self.theta[b - 1, i] * x + 0.1 * sum(cache)
        return (x - x0) / sigma[:, :, None, None, None]  # the velocity of that x0


def test_self_forcing_gradient_reaches_exactly_one_step_per_block():
    from worldmodel.rollout import CachedRollout

    sigmas = (1.0, 0.75, 0.5)
    num_blocks = 4
    exit_steps = [2, 0, 1, 2]
    theta = torch.nn.Parameter(torch.linspace(0.5, 1.5, num_blocks * len(sigmas)).view(num_blocks, len(sigmas)))
    dit = ToyDiT(theta, sigmas)
    clip = SimpleNamespace(actions=torch.zeros(2, 1 + num_blocks, 1), poses=torch.eye(4).expand(2, 1 + num_blocks, 4, 4))
    noise = torch.zeros(2, len(sigmas), 1 + num_blocks, 1, 2, 2)
    for b in range(num_blocks):
        for i in range(len(sigmas)):
            noise[:, i, b + 1] = torch.randn(2, 1, 2, 2, generator=gen(100 * b + i))
    first = torch.zeros(2, 1, 1, 2, 2)
    out = alg.self_forcing_rollout(CachedRollout(dit, clip), first, noise, sigmas, exit_steps)
    assert out.shape == (2, 1 + num_blocks, 1, 2, 2) and torch.equal(out[:, 0], first[:, 0])
    assert [c for c in dit.calls if c[2]] == [(b + 1, e, True) for b, e in enumerate(exit_steps)]
    assert len(dit.calls) == sum(e + 1 for e in exit_steps)
    out.sum().backward()
    for b in range(num_blocks):
        for i in range(len(sigmas)):
            assert (theta.grad[b, i] != 0) == (i == exit_steps[b]), (b, i)

    # values: the same sampler written as a plain loop
    history = []
    for b, e in enumerate(exit_steps):
        x = noise[:, 0, b + 1]
        for i in range(e + 1):
            x0 = theta.detach()[b, i] * x + 0.1 * (sum(history) if history else 0.0)
            if i < e:
                s_next = sigmas[i + 1]
                x = (1 - s_next) * x0 + s_next * noise[:, i + 1, b + 1]
        history.append(x0)
        torch.testing.assert_close(out[:, b + 1].detach(), x0)


def test_self_forcing_plays_the_blocks_before_trained_from_without_gradient():
    """Blocks that start before ``trained_from`` run every step without gradient (their values: the full
    sampler); later blocks exit at their exit step, with gradient, as before."""
    from worldmodel.rollout import CachedRollout

    sigmas = (1.0, 0.6)
    num_blocks, trained_from = 5, 3  # blocks 1, 2 played; blocks 3, 4, 5 trained
    exit_steps = [0, 0, 1, 0, 1]
    theta = torch.nn.Parameter(1.0 + 0.1 * torch.randn(num_blocks, len(sigmas), generator=gen(7)))
    dit = ToyDiT(theta, sigmas)
    clip = SimpleNamespace(actions=torch.zeros(2, 1 + num_blocks, 1), poses=torch.eye(4).expand(2, 1 + num_blocks, 4, 4))
    noise = torch.randn(2, len(sigmas), 1 + num_blocks, 1, 2, 2, generator=gen(8))
    first = torch.randn(2, 1, 1, 2, 2, generator=gen(9))
    out = alg.self_forcing_rollout(CachedRollout(dit, clip), first, noise, sigmas, exit_steps, trained_from)
    assert [c for c in dit.calls if c[2]] == [(b + 1, exit_steps[b], True) for b in range(trained_from - 1, num_blocks)]
    out.sum().backward()
    assert not theta.grad[: trained_from - 1].any()

    history = [first[:, 0]]
    for b in range(num_blocks):
        played = b + 1 < trained_from
        last = len(sigmas) - 1 if played else exit_steps[b]
        x = noise[:, 0, b + 1]
        for i in range(last + 1):
            x0 = theta.detach()[b, i] * x + 0.1 * sum(history)
            if i < last:
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise[:, i + 1, b + 1]
        history.append(x0)
        torch.testing.assert_close(out[:, b + 1].detach(), x0, rtol=1e-6, atol=1e-6)


def test_self_forcing_rejects_bad_exit_step():
    with pytest.raises(alg.AlgorithmError, match="exit step 2"):
        alg.self_forcing_rollout(None, torch.zeros(1), torch.zeros(1), (1.0, 0.5), [2])


# ----------------------------------------------------------------------------- EMA


def test_ema_update_matches_loop_reference():
    online = [randn(3, 4, seed=50), randn(5, seed=51), torch.tensor([3, 4])]
    ema = [randn(3, 4, seed=52), randn(5, seed=53), torch.tensor([0, 0])]
    ref = [e.clone() for e in ema]
    decay = 0.9
    alg.ema_update(ema, online, decay)
    for r, o in zip(ref[:2], online[:2]):
        flat_r, flat_o = r.view(-1), o.view(-1)
        for i in range(flat_r.numel()):
            flat_r[i] = decay * flat_r[i] + (1 - decay) * flat_o[i]
    torch.testing.assert_close(ema[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(ema[1], ref[1], rtol=0, atol=1e-12)
    assert torch.equal(ema[2], online[2])
    with pytest.raises(alg.AlgorithmError, match="EMA has 1 tensors"):
        alg.ema_update(ema[:1], online, 0.5)
