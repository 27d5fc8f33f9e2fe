"""Stage 3c (sCM by teacher forcing): the loss against closed forms and as the limit of causal CD, the
network's forward-mode JVP against torch.func.jvp of the plain network, and the stage end to end
(tiny preset, CPU) into a checkpoint that plays and that DMD starts from."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.test_transformer import random_inputs, tiny_dit
from train import algorithms as alg
from train.__main__ import main
from train.bench import write_synthetic
from train.causal_scm import student_x0_tangent
from train.clips import Clip
from train.trainer import run
from worldmodel import checkpoint, flow
from worldmodel.actions import make_action
from worldmodel.model import build_model
from worldmodel.session import Session

# ----------------------------------------------------------------------------- the loss


def per_frame(s: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B, T, 1, 1, 1]``."""
    return s[..., None, None, None]


def linear_net(a: torch.Tensor, c: torch.Tensor):
    """A "network" ``v(x, s) = a x + c s`` (scalar parameters a, c; ``s [B, T]`` per frame)."""
    return lambda x, s: a * x + c * per_frame(s)


def problem(seed: int, blocks: torch.Tensor):
    g = torch.Generator().manual_seed(seed)
    b, t = 2, len(blocks)
    x = torch.randn(b, t, 3, 2, 2, generator=g, dtype=torch.float64)
    s = torch.rand(b, int(blocks[-1]) + 1, generator=g, dtype=torch.float64)[:, blocks] * 0.9 + 0.05
    teacher_v = torch.randn(b, t, 3, 2, 2, generator=g, dtype=torch.float64)
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    return x, s, teacher_v, a, c


def test_scm_loss_matches_the_closed_form_of_a_linear_network():
    blocks = torch.tensor([0, 1, 1, 2, 2])  # block_size 2: per-block normalisation over two frames
    x, s, teacher_v, a, c = problem(0, blocks)
    s5 = per_frame(s)
    v = linear_net(a, c)
    f = flow.x0_from_v(x, v(x, s), s)  # x - s a x - s^2 c
    # the JVP of f along (v_T, 1) by hand, and the warmed tangent (v_T - v) - r s dv
    with torch.no_grad():
        dv = a * teacher_v + c
        df = teacher_v - v(x, s) - s5 * dv
        f_of = lambda x_, s_: flow.x0_from_v(x_, v(x_, s_), s_)  # noqa: E731
        _, df_auto = torch.func.jvp(f_of, (x, s), (teacher_v, torch.ones_like(s)))
    torch.testing.assert_close(df_auto, df)
    r = 0.3
    g = alg.scm_tangent(df, teacher_v - v(x, s).detach(), r).double()
    torch.testing.assert_close(g, (teacher_v - v(x, s) - r * s5 * dv).detach().float().double())

    weight, c_norm = 1.0 / s, 0.1
    loss, norm = alg.scm_loss(f, g, weight, blocks, c_norm)
    # closed form: per (sample, block) norms, g_hat = g / (||g|| + c), loss = sum (w g_hat)^2 / (B * blocks)
    b, nb = x.shape[0], 3
    block_sq = torch.stack([g[:, blocks == k].pow(2).sum((1, 2, 3, 4)) for k in range(nb)], 1)  # [B, 3]
    g_hat = g / per_frame(block_sq.sqrt()[:, blocks] + c_norm)
    w5 = per_frame(weight)
    assert float(loss.detach()) == pytest.approx(float((w5 * g_hat).pow(2).sum() / (b * nb)), rel=1e-6)
    assert float(norm) == pytest.approx(float(block_sq.sqrt().mean()), rel=1e-6)
    # the gradient is 2 w g_hat . df/dtheta per block / (B * blocks), with df/da = -s x and df/dc = -s^2
    loss.backward()
    want_a = 2 * (w5 * g_hat * (-s5 * x)).sum() / (b * nb)
    want_c = 2 * (w5 * g_hat * (-s5 * s5)).sum() / (b * nb)
    assert float(a.grad) == pytest.approx(float(want_a), rel=1e-5)
    assert float(c.grad) == pytest.approx(float(want_c), rel=1e-5)


def test_scm_gradient_is_the_continuous_limit_of_causal_cd():
    """With the online weights as target, causal CD's gradient over a teacher step D is 2 D g . df/dtheta / N
    to first order: the sCM gradient with weight w = D (||g|| + c) / N (one block, one sample)."""
    blocks = torch.zeros(4, dtype=torch.long)
    g0 = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 3, 2, 2, generator=g0, dtype=torch.float64)
    eps = torch.randn(1, 4, 3, 2, 2, generator=g0, dtype=torch.float64)
    s = torch.full((1, 4), 0.6, dtype=torch.float64)
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    teacher = lambda x, s_: torch.tanh(x) - 0.5 * per_frame(s_) * x  # noqa: E731  a nonlinear PF-ODE
    student = lambda a_, c_: (  # noqa: E731
        lambda x, s_: flow.x0_from_v(x, torch.sin(a_ * x) + c_ * per_frame(s_) ** 2, s_))
    step = 1e-6
    x = flow.add_noise(x0, eps, s)  # causal_cd_loss's terms in float64 (its MSE runs in float32)
    target = alg.consistency_target(teacher, student(a.detach(), c.detach()), x, s, s - step)
    cd_grad = torch.autograd.grad((student(a, c)(x, s) - target).pow(2).mean(), (a, c))

    with torch.no_grad():
        _, df = torch.func.jvp(student(a, c), (x, s), (teacher(x, s), torch.ones_like(s)))
    c_norm = 0.1
    weight = torch.full_like(s, step * (float(df.norm()) + c_norm) / x.numel())
    loss, _ = alg.scm_loss(student(a, c)(x, s), df, weight, blocks, c_norm)
    scm_grad = torch.autograd.grad(loss, (a, c))
    for want, got in zip(cd_grad, scm_grad):
        assert float(got) == pytest.approx(float(want), rel=1e-4)


def test_tangent_warmup_ramps_from_zero_to_one():
    assert [alg.tangent_warmup(u, 4) for u in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert alg.tangent_warmup(0, 0) == 1.0


def test_scm_sigmas_cover_the_first_sampling_step_and_stay_in_range():
    blocks = torch.tensor([0, 1, 1, 2, 2])
    s = alg.sample_scm_sigmas(4000, blocks, torch.Generator().manual_seed(0), loc=0.0, scale=1.6, p_one=0.1, low=0.02)
    assert s.shape == (4000, 5) and bool((s[:, 1] == s[:, 2]).all()) and bool((s[:, 3] == s[:, 4]).all())
    assert float(s.min()) == pytest.approx(0.02) and float(s.max()) == 1.0
    assert float((s == 1.0).double().mean()) == pytest.approx(0.1, abs=0.01)
    below_one = s[s < 1.0]
    assert float(below_one.median()) == pytest.approx(0.5, abs=0.03)  # logit-normal around sigmoid(loc)
    with pytest.raises(alg.AlgorithmError, match="p_one"):
        alg.sample_scm_sigmas(2, blocks, torch.Generator(), loc=0.0, scale=1.0, p_one=1.5, low=0.02)


# ----------------------------------------------------------------------------- the network's JVP


@pytest.mark.parametrize("mode, block_size", [("bidirectional", 1), ("causal", 2), ("teacher_forcing", 1),
                                              ("teacher_forcing", 2)])
def test_network_jvp_equals_torch_func_jvp_of_the_plain_network(mode, block_size, one_thread):
    """The dual-tensor pass (jvp attention backend, attention_jvp) against torch.func.jvp through the
    "sdpa" network on math attention, float64, every weight random (adaLN, gates and outputs included)."""
    model = tiny_dit(11, block_size=block_size)
    frames = 5
    x, sigma, actions, poses = random_inputs(2, frames, 11, model.cfg)
    g = torch.Generator().manual_seed(12)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    clean = torch.randn(x.shape, generator=g, dtype=torch.float64) if mode == "teacher_forcing" else None
    net_mode = "causal" if mode == "teacher_forcing" else mode
    clip = Clip(actions, poses)

    def f(x_, s_):
        return flow.x0_from_v(x_, model(x_, s_, actions, poses, mode=net_mode, clean=clean), s_)

    assert model.attention == "sdpa"
    with sdpa_kernel(SDPBackend.MATH):
        want_f, want_df = torch.func.jvp(f, (x, sigma), (dx, torch.ones_like(sigma)))
    v, df = student_x0_tangent(model, clip, x, sigma, dx, mode=net_mode, clean=clean)
    assert model.attention == "sdpa"  # the jvp backend only for the pass
    assert df.dtype == torch.float64 and want_df.norm() > 1e-3
    assert (df - want_df).norm() / want_df.norm() < 1e-6
    assert (flow.x0_from_v(x, v, sigma) - want_f).norm() / want_f.norm() < 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the one-pass Triton kernel)")
def test_network_jvp_on_cuda_through_the_kernel_matches_float64():
    """float32 on CUDA (attention_jvp's kernel, the reference norm under dual inputs) against the float64
    torch.func.jvp of the plain network, teacher-forced."""
    model = tiny_dit(13, block_size=2).cuda()
    x, sigma, actions, poses = [t.cuda() for t in random_inputs(2, 7, 13, model.cfg)]
    dx, clean = torch.randn_like(x), torch.randn_like(x)

    def f(x_, s_):
        return flow.x0_from_v(x_, model(x_, s_, actions, poses, mode="causal", clean=clean), s_)

    with sdpa_kernel(SDPBackend.MATH):
        _, want = torch.func.jvp(f, (x, sigma), (dx, torch.ones_like(sigma)))
    model.float()
    clip = Clip(actions.float(), poses.float())
    _, df = student_x0_tangent(model, clip, x.float(), sigma.float(), dx.float(), clean=clean.float())
    assert df.dtype == torch.float32
    assert (df.double() - want).norm() / want.norm() < 1e-5


def test_jvp_backend_runs_plain_inputs_like_sdpa(one_thread):
    model = tiny_dit(5)
    x, sigma, actions, poses = random_inputs(1, 4, 5, model.cfg)
    clean = torch.randn_like(x)
    want = model(x, sigma, actions, poses, mode="causal", clean=clean)
    model.attention = "jvp"
    got = model(x, sigma, actions, poses, mode="causal", clean=clean)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Recordings and two checkpoints of one random tiny model (random DiT weights, so every path
    matters): as an ``ar_teacher`` (sCM's input) and as a ``teacher`` (DMD's real score)."""
    root = tmp_path_factory.mktemp("scm")
    episodes = write_synthetic(root / "episodes", 2, 12, (32, 32))
    model = build_model("tiny", seed=3)
    with torch.no_grad():
        for p in model.dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    paths = {"episodes": episodes}
    for stage in ("ar_teacher", "teacher"):
        model.config.stage = stage
        paths[stage] = root / f"{stage}.safetensors"
        checkpoint.save(paths[stage], model)
    return paths


def args(inputs: dict, run_dir, steps: int, *extra: str) -> list[str]:
    return ["preset=tiny", "data.source=recordings", f"data.recordings={inputs['episodes']}", f"run.dir={run_dir}",
            f"run.steps={steps}", *extra]


def test_stage_trains_exports_a_playing_student_and_dmd_starts_from_it(inputs, tmp_path):
    scm_dir = tmp_path / "causal_scm"
    run("causal_scm", args(inputs, scm_dir, 3, f"init.teacher={inputs['ar_teacher']}", "scm.tangent_warmup=2",
                           "run.sample_every=3", "optim.warmup_steps=1", "optim.lr=1e-3"))
    records = [json.loads(line) for line in (scm_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["tangent_warmup"] for r in steps] == [0.0, 0.5, 1.0]
    assert all(math.isfinite(r["loss"]) and r["tangent_norm"] > 0 for r in steps)
    assert list((scm_dir / "samples").glob("*.mp4"))

    model = checkpoint.load(scm_dir / "model.safetensors")
    teacher = checkpoint.load(inputs["ar_teacher"])
    assert model.config.stage == "causal_scm" and list(model.config.sampler.steps) == [1.0, 0.5]
    trained, start = model.dit.state_dict(), teacher.dit.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    session = Session(model)
    session.reset(torch.zeros(32, 32, 3, dtype=torch.uint8))
    frame = session.step(make_action(model.action_spec, ["W"], dx=5)[None]).frames
    assert frame.shape == (1, 32, 32, 3) and frame.dtype == torch.uint8

    dmd_dir = tmp_path / "dmd"
    run("dmd", args(inputs, dmd_dir, 1, f"init.student={scm_dir}/model.safetensors",
                    f"init.teacher={inputs['teacher']}", "dmd.critic_updates=1"))
    assert checkpoint.load(dmd_dir / "model.safetensors").config.stage == "dmd"


def test_help_lists_the_stage_keys(capsys):
    assert main(["causal_scm", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("init.teacher", "scm.tangent_warmup", "scm.sigma_one", "scm.norm_const", "scm.guidance"):
        assert key in out
