"""Ground-truth worlds: the procedural renderer (geometry against slow references, culling, tiling,
parallax, collisions, determinism), the shared World interface, the Doom adapter, the bench."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.actions import ActionError, ActionSpec, make_action
from worldmodel.camera import CameraState, integrate, state_to_pose, yaw_pitch_rotation
from worldmodel.envs import WorldError, make_world
from worldmodel.envs import procedural as P
from worldmodel.envs.policies import make_policy

SPEC = ActionSpec()


pytestmark = pytest.mark.usefixtures("one_thread")


def play(world, seeds, steps, policy_seed=0):
    """Reset to ``seeds`` and play the mix policy: actions [B, T, A] (frame 0: zero), steps (list of WorldStep)."""
    step = world.reset(seeds)
    policy = make_policy("mix", world.action_spec, world.batch, seed=policy_seed)
    actions, out = [torch.zeros(world.batch, world.action_spec.width)], [step]
    for t in range(1, steps):
        actions.append(policy(t, step))
        step = world.step(actions[-1])
        out.append(step)
    return torch.stack(actions, 1), out


# ---------------------------------------------------------------- slow references for the ray tests


def ref_box(o, d, c, h):
    """Nearest t > EPS where the ray meets one of the box's 6 faces (face by face, not slabs)."""
    best = math.inf
    for axis in range(3):
        if abs(d[axis]) < 1e-12:
            continue
        for side in (-1, 1):
            t = (c[axis] + side * h[axis] - o[axis]) / d[axis]
            p = [o[i] + t * d[i] for i in range(3)]
            if t > P.EPS and all(abs(p[i] - c[i]) <= h[i] for i in range(3) if i != axis):
                best = min(best, t)
    return best


def ref_sphere(o, d, c, size):
    (r,) = size
    best = math.inf
    for t in np.roots([1.0, 2 * sum(d[i] * (o[i] - c[i]) for i in range(3)), sum((o[i] - c[i]) ** 2 for i in range(3)) - r * r]):
        if abs(t.imag) < 1e-12 and t.real > P.EPS:
            best = min(best, t.real)
    return best


def ref_cylinder(o, d, c, size):
    """Side roots, then the top and bottom cap discs, checked one by one."""
    r, hh = size
    best = math.inf
    ox, oz = o[0] - c[0], o[2] - c[2]
    a = d[0] ** 2 + d[2] ** 2
    for t in (np.roots([a, 2 * (ox * d[0] + oz * d[2]), ox * ox + oz * oz - r * r]) if a > 1e-12 else []):
        if abs(t.imag) < 1e-12 and t.real > P.EPS and abs(o[1] + t.real * d[1] - c[1]) <= hh:
            best = min(best, t.real)
    for y in (c[1] - hh, c[1] + hh):
        if abs(d[1]) > 1e-12:
            t = (y - o[1]) / d[1]
            if t > P.EPS and (ox + t * d[0]) ** 2 + (oz + t * d[2]) ** 2 <= r * r:
                best = min(best, t)
    return best


def unambiguous(ref, o, d, c, size, t):
    """The reference answer does not flip when the primitive grows or shrinks by 1e-3 (no grazing rays)."""
    grown, shrunk = ref(o, d, c, [s * 1.001 for s in size]), ref(o, d, c, [s * 0.999 for s in size])
    return math.isinf(grown) == math.isinf(shrunk) == math.isinf(t) and (math.isinf(t) or abs(grown - shrunk) < 0.05)


def random_rays(g, objects, rays):
    """Origins outside the primitives looking roughly at them: origin [P, 3], direction [P, R, 3] unit."""
    origin = torch.randn(objects, 3, generator=g, dtype=torch.float64) * 2
    origin[:, [0, 2]] += torch.sign(origin[:, [0, 2]]) * 4.0  # at least 4 units away horizontally
    aim = torch.randn(objects, rays, 3, generator=g, dtype=torch.float64) * 1.2 - origin[:, None]
    return origin, aim / aim.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("kind", ["box", "sphere", "cylinder"])
def test_ray_primitive_hits_match_slow_references(kind):
    g = torch.Generator().manual_seed({"box": 0, "sphere": 1, "cylinder": 2}[kind])
    objects, rays = 12, 40
    origin, direction = random_rays(g, objects, rays)
    center = torch.randn(objects, 3, generator=g, dtype=torch.float64) * 0.5
    size = 0.3 + torch.rand(objects, 3, generator=g, dtype=torch.float64) * 1.5
    far = torch.full((objects,), math.inf)
    if kind == "box":
        got = P.box_hits(origin.float(), direction.float(), center.float(), size.float(), far)
        ref, params = ref_box, lambda p: size[p].tolist()
    elif kind == "sphere":
        got = P.sphere_hits(origin.float(), direction.float(), center.float(), size[:, 0].float(), far)
        ref, params = ref_sphere, lambda p: [size[p, 0].item()]
    else:
        origin[:4, 1] = center[:4, 1] - size[:4, 1] - 1.5  # some cameras above the top: caps visible
        got = P.cylinder_hits(origin.float(), direction.float(), center.float(), size[:, 0].float(), size[:, 1].float(), far)
        ref, params = ref_cylinder, lambda p: [size[p, 0].item(), size[p, 1].item()]
    checked = hits = 0
    for p in range(objects):
        sz = params(p)
        for r in range(rays):
            o, d, c = origin[p].tolist(), direction[p, r].tolist(), center[p].tolist()
            t = ref(o, d, c, sz)
            if not unambiguous(ref, o, d, c, sz, t):
                continue
            checked += 1
            hits += math.isfinite(t)
            if math.isinf(t):
                assert math.isinf(got[p, r].item()), (kind, p, r, got[p, r].item())
            else:
                assert got[p, r].item() == pytest.approx(t, rel=1e-4, abs=1e-4), (kind, p, r)
    assert checked > 0.9 * objects * rays and 0.2 * checked < hits < 0.9 * checked  # a real mix of hits and misses


def test_cylinder_caps_flag_only_matters_when_looking_down_on_a_top():
    g = torch.Generator().manual_seed(3)
    origin, direction = random_rays(g, 6, 30)
    center = torch.zeros(6, 3, dtype=torch.float64)
    center[:, 1] = -1.0  # standing on the ground, 2 units tall; all origins below the top (y > -2)
    origin[:, 1] = -1.2
    args = (origin.float(), direction.float(), center.float(), torch.full((6,), 0.8), torch.full((6,), 1.0),
            torch.full((6,), math.inf))
    assert torch.equal(P.cylinder_hits(*args, caps=True), P.cylinder_hits(*args, caps=False))


def test_nearest_copies_lie_within_half_a_period_and_are_copies():
    g = torch.Generator().manual_seed(4)
    center = torch.randn(3, 7, 3, generator=g) * 30
    period = torch.tensor([P.TILE, P.LANDMARK_TILE] * 3 + [P.TILE]).expand(3, 7)
    origin = torch.randn(3, 3, generator=g) * 500
    near = P.nearest_copies(center, period, origin)
    offset = (near - origin[:, None])[..., [0, 2]]
    assert (offset.abs() <= period[..., None] / 2 + 1e-3).all()
    shift = (near - center)[..., [0, 2]] / period[..., None]
    assert torch.allclose(shift, shift.round(), atol=1e-4) and torch.equal(near[..., 1], center[..., 1])


def test_hits_beyond_far_are_misses():
    g = torch.Generator().manual_seed(5)
    origin, direction = random_rays(g, 8, 30)
    center, size = torch.zeros(8, 3), torch.ones(8, 3)
    unlimited = P.box_hits(origin.float(), direction.float(), center, size, torch.full((8,), math.inf))
    cut = unlimited[torch.isfinite(unlimited)].median()
    limited = P.box_hits(origin.float(), direction.float(), center, size, cut.expand(8))
    assert (unlimited < cut).sum() > 10 and (torch.isfinite(unlimited) & (unlimited > cut)).sum() > 10
    assert torch.equal(limited, torch.where(unlimited < cut, unlimited, math.inf))


def test_the_sky_below_the_horizon_is_what_the_ground_fogs_into():
    g = torch.Generator().manual_seed(6)
    m = 50
    d = torch.randn(m, 3, generator=g)
    d[:, 1] = d[:, 1].abs() + 0.01  # below the horizon (y down)
    d = d / d.norm(dim=-1, keepdim=True)
    sun, zenith, horizon = torch.randn(m, 3, generator=g), torch.rand(m, 3, generator=g), torch.rand(m, 3, generator=g)
    sky = P.shade_sky(d, torch.randn(m, 3, generator=g), sun, zenith, horizon, torch.rand(m, 3, generator=g))
    assert torch.allclose(sky, horizon + P.sun_glow(d, sun), atol=1e-6)


def test_tile_culling_never_drops_a_visible_object(monkeypatch):
    world = make_world("procedural", batch=4, height=64, width=64)
    _, steps = play(world, [11, 12, 13, 14], 25)
    views = steps[::6]
    poses = torch.stack([s.true_pose for s in views]).flatten(0, 1)  # 20 views, (step, item) order
    scene = {k: v.repeat(len(views), *[1] * (v.ndim - 1)) for k, v in world.scene.items()}
    culled = P.render_rays(scene, poses[:, :3, :3], poses[:, :3, 3], world.tiles)
    everything = lambda centers, size, fog_scale, rotation, origin, bounds: torch.ones(  # noqa: E731
        centers.shape[0], bounds.shape[0], centers.shape[1], dtype=torch.bool)
    monkeypatch.setattr(P, "visible_in_tiles", everything)
    full = P.render_rays(scene, poses[:, :3, :3], poses[:, :3, 3], world.tiles)
    assert (culled - full).abs().max() < 1e-5


def test_parallax_near_objects_move_more_and_follow_the_pinhole():
    """Two boxes straight ahead at depths 3 and 12; a sideways step of 0.5 shifts the near one 4x as far."""
    world = make_world("procedural", batch=1, height=64, width=64, collisions=False)
    world.reset([0])
    scene = {k: v.clone() for k, v in world.scene.items()}
    scene["center"][:] = torch.tensor([0.0, 1e4, 0.0])  # everything else far below the ground
    scene["size"][:] = 0.0
    scene["center"][0, 0] = torch.tensor([0.0, -1.0, 3.0])
    scene["size"][0, 0] = torch.tensor([0.2, 0.4, 0.2])
    scene["center"][0, 1] = torch.tensor([0.0, -2.0, 12.0])
    scene["size"][0, 1] = torch.tensor([0.8, 1.6, 0.8])
    world.scene = scene
    focal = 32.0  # 64 px, 90 degrees

    def columns(x):
        pose = state_to_pose(CameraState(torch.tensor([[x, -1.0, 0.0]]), torch.zeros(1), torch.zeros(1)))
        _, _, index, _ = P.trace(scene, pose[:, :3, :3], pose[:, :3, 3], world.tiles)
        index = world.tiles.image(index[..., None])[0, ..., 0]
        cols = torch.arange(64.0).expand(64, 64)
        return [cols[index == i].mean().item() + 0.5 for i in (0, 1)]

    (near0, far0), (near1, far1) = columns(0.0), columns(0.5)
    assert near0 == pytest.approx(32, abs=0.5) and far0 == pytest.approx(32, abs=0.5)
    assert near1 == pytest.approx(32 - focal * 0.5 / 3, abs=1.0)
    assert far1 == pytest.approx(32 - focal * 0.5 / 12, abs=1.0)
    assert near0 - near1 > 3 * (far0 - far1) > 0


def test_frames_show_sky_above_ground_and_are_not_blank():
    world = make_world("procedural", batch=6, height=32, width=32)
    frames = world.reset(list(range(6))).frames.float()
    assert frames.shape == (6, 32, 32, 3) and world.reset(list(range(6))).frames.dtype == torch.uint8
    assert (frames.flatten(1).std(1) > 10).all()  # not blank
    sky, ground = frames[:, :4].mean((1, 2)), frames[:, -4:].mean((1, 2))
    assert (sky.sum(-1) > ground.sum(-1)).all()  # the sky is brighter than the ground under it
    assert ((sky[:, 2] - sky[:, 0]) > -10).all()  # and not reddish, except at sunset
    # the horizon of a level camera is the middle row: fog makes the rows around it close to the sky's horizon colour
    rows = frames.mean(2)  # [B, H, 3]
    assert ((rows[:, 15] - rows[:, 16]).abs().sum(-1) < (rows[:, 0] - rows[:, -1]).abs().sum(-1)).all()


def test_seeds_give_different_worlds_and_the_same_seed_the_same_world():
    a = make_world("procedural", batch=3, height=32, width=32)
    b = make_world("procedural", batch=3, height=32, width=32, chunk=1)
    actions_a, steps_a = play(a, [5, 6, 7], 12)
    actions_b, steps_b = play(b, [5, 6, 7], 12)
    assert torch.equal(actions_a, actions_b)
    for sa, sb in zip(steps_a, steps_b):  # chunking does not change anything either
        assert torch.equal(sa.frames, sb.frames) and torch.equal(sa.true_pose, sb.true_pose)
    scenes = [P.make_scene(s) for s in (5, 6)]
    assert not torch.allclose(scenes[0]["center"], scenes[1]["center"])
    assert not torch.allclose(scenes[0]["sun"], scenes[1]["sun"])
    same_pose = a.render(torch.eye(4).expand(3, 4, 4).clone())
    assert not torch.equal(same_pose[0], same_pose[1])


def test_commanded_pose_is_the_integral_of_the_actions():
    world = make_world("procedural", batch=3, height=16, width=16)
    actions, steps = play(world, [1, 2, 3], 80)
    commanded = torch.stack([s.commanded_pose for s in steps], 1)
    exact, _ = integrate(actions, SPEC, world.controller, start=CameraState.start(3, world.controller, dtype=torch.float64))
    assert torch.allclose(commanded, exact.float(), atol=1e-5)
    single, _ = integrate(actions, SPEC, world.controller)  # float32 integration, as a trainer might do
    assert torch.allclose(commanded, single, atol=1e-4)
    assert torch.equal(steps[0].commanded_pose, steps[0].true_pose)


def test_collisions_keep_the_body_out_of_solid_footprints_and_slide():
    world = make_world("procedural", batch=4, height=16, width=16)
    _, steps = play(world, [21, 22, 23, 24], 150)
    true = torch.stack([s.true_pose for s in steps], 1)
    commanded = torch.stack([s.commanded_pose for s in steps], 1)
    assert torch.equal(true[..., :3, :3], commanded[..., :3, :3])  # turning is never blocked
    assert (true[..., 1, 3] == -world.controller.eye_height).all()
    blocked = (true[..., :3, 3] - commanded[..., :3, 3]).norm(dim=-1)[:, -1] > 0.1
    assert blocked.any()  # the policy ran into something
    xz = true[..., [0, 2], 3].double()
    scene = world.footprints
    for t in range(0, 150, 5):  # pushing the true positions out again changes nothing: they are outside
        assert torch.allclose(P.push_out(scene, xz[:, t]), xz[:, t], atol=1e-5)
    free = make_world("procedural", batch=4, height=16, width=16, collisions=False)
    _, steps = play(free, [21, 22, 23, 24], 60)
    assert all(torch.equal(s.true_pose, s.commanded_pose) for s in steps)


def test_push_out_against_hand_computed_cases():
    box, circle = int((P.KINDS == P.BOX).nonzero()[0]), int((P.KINDS == P.CYLINDER).nonzero()[0])
    n = P.N_OBJECTS
    full = {"center": torch.zeros(1, n, 3, dtype=torch.float64), "size": torch.zeros(1, n, 3, dtype=torch.float64),
            "period": torch.full((1, n), 1000.0, dtype=torch.float64), "solid": torch.zeros(1, n, dtype=torch.bool)}
    full["center"][0, :, 0] = 500.0  # everything else far away (and not solid)
    full["center"][0, box] = torch.tensor([0.0, -1.0, 0.0])
    full["size"][0, box] = torch.tensor([2.0, 1.0, 0.5])  # x in [-2, 2], z in [-0.5, 0.5]
    full["center"][0, circle] = torch.tensor([10.0, -1.0, 0.0])
    full["size"][0, circle] = torch.tensor([1.0, 1.0, 1.0])
    full["solid"][0, box] = full["solid"][0, circle] = True
    r = P.BODY_RADIUS
    cases = [((0.3, -0.6), (0.3, -0.5 - r)),  # just below the box: out along z
             ((1.9, 0.1), (2.0 + r, 0.1)),  # inside near the x end: out along x (the shallower way)
             ((0.0, 3.0), (0.0, 3.0)),  # free
             ((10.0, 1.1), (10.0, 1.0 + r)),  # inside the circle's margin: out radially
             ((2.1, 0.6), (2.0 + r / math.sqrt(2), 0.5 + r / math.sqrt(2)))]  # near a corner: out diagonally
    for start, expected in cases:
        got = P.push_out(full, torch.tensor([start], dtype=torch.float64))[0]
        assert got.tolist() == pytest.approx(expected, abs=1e-6), (start, got)


def test_bad_input_is_rejected_with_clear_errors():
    world = make_world("procedural", batch=2, height=16, width=16)
    with pytest.raises(WorldError, match="reset"):
        world.step(torch.zeros(2, SPEC.width))
    world.reset([0, 1])
    with pytest.raises(ActionError, match="NaN"):
        world.step(torch.full((2, SPEC.width), float("nan")))
    with pytest.raises(ActionError, match="width"):
        world.step(torch.zeros(2, SPEC.width + 1))
    with pytest.raises(ActionError, match="0 or 1"):
        world.step(torch.full((2, SPEC.width), 0.5))
    with pytest.raises(WorldError, match=r"\[2, 7\]"):
        world.step(torch.zeros(3, SPEC.width))
    with pytest.raises(WorldError, match="one seed per batch item"):
        world.reset([0])
    with pytest.raises(WorldError, match="non-negative"):
        world.reset([0, -1])
    with pytest.raises(WorldError, match="integers"):
        world.reset([0, 1.5])
    with pytest.raises(WorldError, match="poses"):
        world.render(torch.eye(4))
    with pytest.raises(WorldError, match="unknown world"):
        make_world("quake")
    with pytest.raises(WorldError, match="bad options"):
        make_world("procedural", colour="red")
    with pytest.raises(WorldError, match="batch"):
        make_world("procedural", batch=0)
    with pytest.raises(WorldError, match="chunk"):
        make_world("procedural", chunk=0)


def test_bench_prints_frames_per_second(capsys):
    from worldmodel.envs.bench import main

    assert main(["--world", "procedural", "--batch", "2", "--frames", "4", "--size", "16", "16", "--device", "cpu",
                 "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "frames/s" in out and "procedural 16x16 batch 2" in out
    assert main(["--world", "procedural", "--batch", "0", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------- Doom


def test_doom_games_make_vizdooms_directory_before_the_engine_starts(monkeypatch, tmp_path):
    """vizdoom's init() makes ./_vizdoom/ unless it exists, and collectors started at once raced on it (one crashed):
    the directory must exist before any game starts. A stand-in engine fails to start where it does not."""
    from worldmodel.envs import doom as doom_module

    class Names:
        def __getattr__(self, name):
            return name

    class FakeGame:
        def __getattr__(self, name):  # every set_* / add_* call is accepted and ignored
            return lambda *args: None

        def init(self):
            if not Path("_vizdoom").is_dir():
                raise RuntimeError("Failed to create ./_vizdoom/ directory")

        def close(self):
            pass

    engine = type("vizdoom", (), {"DoomGame": FakeGame, "ScreenResolution": Names(), "ScreenFormat": Names(),
                                  "Button": Names(), "GameVariable": Names(), "Mode": Names()})
    monkeypatch.setattr(doom_module, "import_vizdoom", lambda: engine)
    monkeypatch.chdir(tmp_path)
    games = doom_module.DoomGames(["MAP01", "MAP02"], "freedoom2.wad", "RES_160X120", pitch=True)
    assert len(games.games) == 2 and (tmp_path / "_vizdoom").is_dir()
    games.close()


@pytest.fixture(scope="module")
def doom():
    pytest.importorskip("vizdoom")
    world = make_world("doom", batch=2, maps=["MAP01"])
    yield world
    world.close()


def test_doom_pose_conversion_axes():
    pytest.importorskip("vizdoom")
    from worldmodel.envs.doom import MAP_UNITS, doom_to_world

    # at ANGLE 90 (facing +Y, north) the camera looks along +z; at ANGLE 0 (east) along +x; PITCH -30 looks up
    pose = doom_to_world(np.array([[32.0, 64.0, 16.0, 90.0, 0.0, 41.0], [0.0, 0.0, 0.0, 0.0, -30.0, 41.0]]))
    assert pose[0, :3, 3].tolist() == pytest.approx([1.0, -(16 + 41) / MAP_UNITS, 2.0])
    assert pose[0, :3, 2].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-9)
    forward = pose[1, :3, 2]
    assert forward[0].item() == pytest.approx(math.cos(math.radians(30))) and forward[1].item() == pytest.approx(-0.5)
    assert torch.allclose(pose[:, :3, :3] @ pose[:, :3, :3].transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    assert torch.linalg.det(pose[:, :3, :3]).tolist() == pytest.approx([1.0, 1.0])


def test_doom_walks_forward_at_the_controllers_speed(doom):
    step0 = doom.reset([0, 0])
    assert torch.equal(step0.true_pose, step0.commanded_pose)
    walk = torch.stack([make_action(SPEC, ["W"])] * 2)
    positions = [step0.true_pose[0, :3, 3]]
    for _ in range(16):
        positions.append(doom.step(walk).true_pose[0, :3, 3])
    moves = torch.stack(positions).diff(dim=0)
    assert (moves[:, 2] > 0).all() and moves[:, [0, 1]].abs().max() < 0.02  # straight ahead (+z)
    # Doom accelerates towards the controller's speed: after 32 tics, 1 - (0xE800/0x10000)^32 of it
    expected = doom.controller.walk_speed * (1 - (0xE800 / 0x10000) ** 32)
    assert moves[-1].norm().item() == pytest.approx(expected, rel=0.03)


def test_doom_view_follows_the_commanded_turns_and_pitch(doom):
    doom.reset([3, 4])
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        a = torch.zeros(2, SPEC.width)
        a[:, -2:] = torch.randint(-60, 61, (2, 2), generator=g).float()
        step = doom.step(a)
        rotation_gap = (step.true_pose[:, :3, :3] - step.commanded_pose[:, :3, :3]).abs().max()
        assert rotation_gap < math.radians(0.05)
    assert doom.commanded.pitch.abs().max() > 0.05  # it did look up/down


def test_doom_is_deterministic_and_commanded_poses_integrate(doom):
    actions, first = play(doom, [7, 8], 20, policy_seed=3)
    _, again = play(doom, [7, 8], 20, policy_seed=3)
    for a, b in zip(first, again):
        assert torch.equal(a.frames, b.frames) and torch.equal(a.true_pose, b.true_pose)
    assert first[0].frames.shape == (2, 120, 160, 3) and first[0].frames.dtype == torch.uint8
    assert not torch.equal(first[0].frames[0], first[0].frames[1])  # different seeds, different starts
    commanded = torch.stack([s.commanded_pose for s in first], 1)
    start = CameraState.start(2, doom.controller, dtype=torch.float64)
    assert torch.allclose(commanded, integrate(actions, SPEC, doom.controller, start=start)[0].float(), atol=1e-5)


def test_doom_workers_match_in_process_games(doom):
    with make_world("doom", batch=2, maps=["MAP01"], workers=1) as remote:
        _, local_steps = play(doom, [9, 10], 6)
        _, remote_steps = play(remote, [9, 10], 6)
    for a, b in zip(local_steps, remote_steps):
        assert torch.equal(a.frames, b.frames) and torch.equal(a.true_pose, b.true_pose)


def test_doom_level_exit_restarts_the_item_anchored_at_its_commanded_pose(doom, monkeypatch):
    doom.reset([1, 2])
    turn_and_walk = torch.stack([make_action(SPEC, ["W"], dx=30)] * 2)
    for _ in range(5):
        doom.step(turn_and_walk)
    act = doom.games.act

    def exit_item_1(items, buttons):  # as if item 1 had walked over an exit line
        out = act(items, buttons)
        return [(None, None, True) if i == 1 else o for i, o in zip(items, out)]

    monkeypatch.setattr(doom.games, "act", exit_item_1)
    step = doom.step(turn_and_walk)
    assert step.restarted.tolist() == [False, True] and step.frames.shape == (2, 120, 160, 3)
    assert torch.allclose(step.true_pose[1], step.commanded_pose[1], atol=1e-4)  # re-anchored where it was commanded
    monkeypatch.setattr(doom.games, "act", act)
    assert doom.step(turn_and_walk).restarted.tolist() == [False, False]


def test_doom_bad_options_fail_fast():
    pytest.importorskip("vizdoom")
    with pytest.raises(WorldError, match="unknown maps"):
        make_world("doom", maps=["MAP77"])  # vizdoom itself would hang on a missing map
    with pytest.raises(WorldError, match="renders at"):
        make_world("doom", height=100, width=100)
    with pytest.raises(WorldError, match="workers"):
        make_world("doom", workers=-1)


def test_yaw_pitch_rotation_convention_used_by_the_worlds():
    """Positive yaw turns the view right (+z towards +x), positive pitch looks up (-y)."""
    r = yaw_pitch_rotation(torch.tensor([math.pi / 2, 0.0]), torch.tensor([0.0, math.pi / 6]))
    assert r[0, :, 2].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    assert r[1, 1, 2].item() == pytest.approx(-0.5)
