"""A built-in procedural 3D world, rendered by batched analytic ray casting in torch.

Each seed makes a different world: a ground plane with a checker-and-stripe texture, a sky with a
sun, and objects of three shapes (vertical cylinders, yaw-rotated boxes, spheres resting on the
ground) in seeded sizes and colours, a few of them tall landmarks. Shading is Lambert from the
seed's sun plus ambient light, with distance fog towards the horizon colour, so motion, parallax
and rotation are all visible. The layout repeats with period ``TILE`` world units in x and z,
so the world never ends; fog hides every copy but the nearest, which is the only one tested.

Collisions: the true camera cannot enter an object's footprint (plus a small margin): a step
that would is kept for its turn but not its move. The commanded pose (the controller's
integration of the actions) walks on regardless, so the two differ once the camera is blocked.

Same code on CPU and CUDA; deterministic for a seed (scene parameters come from a CPU generator).
"""

from __future__ import annotations

import math

import torch

from worldmodel.actions import ActionSpec
from worldmodel.camera import CameraState, ControllerSpec, state_to_pose, step_state, yaw_pitch_rotation
from worldmodel.envs.base import World, WorldStep

TILE = 48.0  # world units between copies of the layout
FOG = 18.0  # distance at which fog hides 63% of a surface
N_CYL, N_BOX, N_SPH = 14, 18, 10
MARGIN = 0.3  # how close the camera may get to an object
INF = 1e9


def make_scene(seed: int) -> dict[str, torch.Tensor]:
    """Scene parameters of one world (CPU tensors)."""
    g = torch.Generator().manual_seed(int(seed))
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731

    def centres(n):  # uniform over the tile, none within 3 units of the start (the origin)
        c = u(n, 2) * TILE - TILE / 2
        close = c.norm(dim=-1) < 3.0
        return torch.where(close[:, None], c + torch.sign(c + 1e-6) * 4.0, c)

    def colours(n):
        hue = u(n) * 2 * math.pi
        base = 0.55 + 0.35 * torch.stack([torch.cos(hue), torch.cos(hue - 2.1), torch.cos(hue + 2.1)], -1)
        return (base * (0.6 + 0.4 * u(n, 1))).clamp(0.05, 1.0)

    cyl_h = 1.0 + u(N_CYL) * 3.0
    cyl_h[:2] = 9.0 + u(2) * 6.0  # landmarks: two tall towers
    sun_elevation, sun_azimuth = 0.35 + 0.6 * u(()), u(()) * 2 * math.pi
    sun = torch.stack([torch.cos(sun_elevation) * torch.sin(sun_azimuth), -torch.sin(sun_elevation),
                       torch.cos(sun_elevation) * torch.cos(sun_azimuth)])  # direction towards the sun
    return {
        "cyl_c": centres(N_CYL), "cyl_r": 0.3 + u(N_CYL) * 0.9, "cyl_h": cyl_h, "cyl_col": colours(N_CYL),
        "box_c": centres(N_BOX), "box_half": 0.4 + u(N_BOX, 2) * 1.6, "box_h": 0.5 + u(N_BOX) * 2.5,
        "box_yaw": u(N_BOX) * math.pi, "box_col": colours(N_BOX),
        "sph_c": centres(N_SPH), "sph_r": 0.3 + u(N_SPH) * 1.0, "sph_col": colours(N_SPH),
        "ground": torch.stack([colours(1)[0] * 0.5 + 0.25, colours(1)[0] * 0.4 + 0.2]),
        "checker": 1.0 + u(()).round(),  # checker cell of 1 or 2 units (TILE is a multiple of both)
        "sky": torch.stack([torch.tensor([0.25, 0.45, 0.85]) * (0.7 + 0.3 * u(())), torch.tensor([0.85, 0.85, 0.9])]),
        "sun": sun,
    }


def stack_scenes(seeds: list[int], device) -> dict[str, torch.Tensor]:
    scenes = [make_scene(s) for s in seeds]
    return {k: torch.stack([s[k] for s in scenes]).to(device) for k in scenes[0]}


def camera_rays(height: int, width: int, fov_degrees: float = 90.0, device=None) -> torch.Tensor:
    """Unit ray directions ``[H*W, 3]`` in camera coordinates (OpenCV: x right, y down, z forward)."""
    focal = 1.0 / math.tan(math.radians(fov_degrees) / 2)
    xs = (torch.arange(width, device=device) + 0.5) / width * 2 - 1
    ys = ((torch.arange(height, device=device) + 0.5) / height * 2 - 1) * height / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    d = torch.stack([x, y, torch.full_like(x, focal)], -1).reshape(-1, 3)
    return d / d.norm(dim=-1, keepdim=True)


def wrap(delta: torch.Tensor) -> torch.Tensor:
    """Offsets to the nearest copy of the tiled layout."""
    return torch.remainder(delta + TILE / 2, TILE) - TILE / 2


def _first_hit(t: torch.Tensor, valid: torch.Tensor):
    """Nearest valid hit over objects: ``t, valid [B, P, M]`` -> distance ``[B, P]``, index ``[B, P]``."""
    t = torch.where(valid & (t > 1e-3), t, INF)
    return t.min(-1)


def render(scene: dict, eye: torch.Tensor, yaw: torch.Tensor, pitch: torch.Tensor, rays_cam: torch.Tensor,
           height: int, width: int) -> torch.Tensor:
    """Frames uint8 ``[B, H, W, 3]`` seen from ``eye [B, 3]`` (xz already wrapped into the tile)."""
    d = torch.einsum("bij,pj->bpi", yaw_pitch_rotation(yaw, pitch), rays_cam)  # [B, P, 3]
    dx, dy, dz = d.unbind(-1)
    oy = eye[:, 1:2]  # [B, 1]
    gather = lambda v, idx: torch.gather(v, 1, idx)  # noqa: E731

    # vertical cylinders from y = 0 up to y = -h, walls and top cap
    c = wrap(scene["cyl_c"] - eye[:, None, [0, 2]])  # [B, M, 2] relative to the eye
    cx, cz = c[..., 0][:, None], c[..., 1][:, None]  # [B, 1, M]
    r, h = scene["cyl_r"][:, None], scene["cyl_h"][:, None]
    a = (dx * dx + dz * dz)[..., None].clamp_min(1e-9)
    b = -(dx[..., None] * cx + dz[..., None] * cz)
    disc = b * b - a * (cx * cx + cz * cz - r * r)
    t_side = (-b - disc.clamp_min(0).sqrt()) / a
    y_side = oy[..., None] + t_side * dy[..., None]
    side_ok = (disc > 0) & (y_side <= 0) & (y_side >= -h)
    t_cap = (-h - oy[..., None]) / torch.where(dy.abs() < 1e-9, torch.full_like(dy, -1e-9), dy)[..., None]
    cap_off = (t_cap * dx[..., None] - cx) ** 2 + (t_cap * dz[..., None] - cz) ** 2
    cap_ok = (cap_off <= r * r) & (oy[..., None] < -h)
    t_cyl = torch.where(side_ok, t_side, INF).minimum(torch.where(cap_ok, t_cap, INF))
    t_c, i_c = _first_hit(t_cyl, t_cyl < INF)
    cap_hit = gather(torch.where(cap_ok, t_cap, INF), i_c[..., None])[..., 0] <= t_c + 1e-6
    hx = t_c * dx - gather(cx[:, 0], i_c)
    hz = t_c * dz - gather(cz[:, 0], i_c)
    n_c = torch.where(cap_hit[..., None], torch.tensor([0.0, -1.0, 0.0], device=d.device),
                      torch.stack([hx, torch.zeros_like(hx), hz], -1) / gather(r[:, 0], i_c)[..., None])
    col_c = torch.gather(scene["cyl_col"], 1, i_c[..., None].expand(-1, -1, 3))

    # yaw-rotated boxes on the ground: slab test in each box's frame
    c = wrap(scene["box_c"] - eye[:, None, [0, 2]])
    cos_y, sin_y = scene["box_yaw"].cos()[:, None], scene["box_yaw"].sin()[:, None]  # [B, 1, M]
    lx = dx[..., None] * cos_y - dz[..., None] * sin_y  # ray direction in box frames [B, P, M]
    lz = dx[..., None] * sin_y + dz[..., None] * cos_y
    ox = -(c[..., 0] * cos_y[:, 0] - c[..., 1] * sin_y[:, 0])[:, None]  # eye in box frames [B, 1, M]
    oz = -(c[..., 0] * sin_y[:, 0] + c[..., 1] * cos_y[:, 0])[:, None]
    half = scene["box_half"][:, None]
    bh = scene["box_h"][:, None]
    safe = lambda v: torch.where(v.abs() < 1e-9, torch.full_like(v, 1e-9), v)  # noqa: E731
    slabs = []
    for o, dirn, lo, hi in ((ox, lx, -half[..., 0], half[..., 0]), (oy[..., None].expand_as(ox), dy[..., None].expand_as(lx), -bh, torch.zeros_like(bh)),
                            (oz, lz, -half[..., 1], half[..., 1])):
        inv = 1.0 / safe(dirn)
        t0, t1 = (lo - o) * inv, (hi - o) * inv
        slabs.append((torch.minimum(t0, t1), torch.maximum(t0, t1)))
    t_in = torch.maximum(torch.maximum(slabs[0][0], slabs[1][0]), slabs[2][0])
    t_out = torch.minimum(torch.minimum(slabs[0][1], slabs[1][1]), slabs[2][1])
    t_b, i_b = _first_hit(t_in, t_in <= t_out)
    axis = torch.stack([gather(s[0], i_b[..., None])[..., 0] for s in slabs], -1).argmax(-1)  # which slab was entered last
    sign_in = lambda dirn: -torch.sign(gather(dirn, i_b[..., None])[..., 0])  # noqa: E731
    nx_l, nz_l = torch.where(axis == 0, sign_in(lx), 0.0), torch.where(axis == 2, sign_in(lz), 0.0)
    cb, sb = gather(cos_y[:, 0], i_b), gather(sin_y[:, 0], i_b)
    n_b = torch.stack([nx_l * cb + nz_l * sb, torch.where(axis == 1, -torch.sign(dy) * 1.0, 0.0), -nx_l * sb + nz_l * cb], -1)
    col_b = torch.gather(scene["box_col"], 1, i_b[..., None].expand(-1, -1, 3))

    # spheres resting on the ground (centre at y = -r)
    c = wrap(scene["sph_c"] - eye[:, None, [0, 2]])
    rs = scene["sph_r"][:, None]
    cs = torch.stack([c[..., 0], -scene["sph_r"] - oy, c[..., 1]], -1)  # [B, M, 3] relative to the eye
    bq = torch.einsum("bpi,bmi->bpm", d, cs)
    disc = bq * bq - ((cs * cs).sum(-1)[:, None] - rs * rs)
    t_s, i_s = _first_hit(bq - disc.clamp_min(0).sqrt(), disc > 0)
    n_s = t_s[..., None] * d - torch.gather(cs, 1, i_s[..., None].expand(-1, -1, 3))
    n_s = n_s / n_s.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    col_s = torch.gather(scene["sph_col"], 1, i_s[..., None].expand(-1, -1, 3))

    # ground plane y = 0 with a checker and slow stripes, in tiled world coordinates
    t_g = torch.where(dy > 1e-6, -oy / dy.clamp_min(1e-6), INF)
    gx, gz = eye[:, 0:1] + t_g.clamp(max=1e4) * dx, eye[:, 2:3] + t_g.clamp(max=1e4) * dz
    cell = scene["checker"][:, None]
    parity = (torch.floor(gx / cell) + torch.floor(gz / cell)).remainder(2)[..., None]
    ground = scene["ground"]
    stripes = 0.9 + 0.1 * torch.sin(gx * (2 * math.pi / 6.0))[..., None] * torch.sin(gz * (2 * math.pi / 8.0))[..., None]
    col_g = (ground[:, None, 0] * parity + ground[:, None, 1] * (1 - parity)) * stripes
    n_g = torch.tensor([0.0, -1.0, 0.0], device=d.device).expand_as(d)

    # nearest surface, shading, fog, sky
    t_all = torch.stack([t_g, t_c, t_b, t_s], -1)
    t_hit, which = t_all.min(-1)
    pick = lambda *vals: sum(torch.where((which == k)[..., None], v, 0.0) for k, v in enumerate(vals))  # noqa: E731
    normal, base = pick(n_g, n_c, n_b, n_s), pick(col_g, col_c, col_b, col_s)
    sun = scene["sun"][:, None]
    lambert = (normal * sun).sum(-1, keepdim=True).clamp_min(0)
    shaded = base * (0.35 + 0.75 * lambert)
    sky_top, horizon = scene["sky"][:, None, 0], scene["sky"][:, None, 1]
    up = (-dy).clamp(0, 1)[..., None]
    glow = (d * sun).sum(-1, keepdim=True).clamp_min(0) ** 64
    sky = horizon * (1 - up) + sky_top * up + glow * torch.tensor([1.0, 0.9, 0.6], device=d.device)
    fog = torch.exp(-t_hit.clamp(max=1e4) / FOG)[..., None]
    colour = torch.where((t_hit < INF)[..., None], shaded * fog + horizon * (1 - fog), sky)
    return (colour.clamp(0, 1) * 255).round().to(torch.uint8).reshape(-1, height, width, 3)


def blocked(scene: dict, xz: torch.Tensor) -> torch.Tensor:
    """Whether positions ``xz [B, 2]`` lie inside any object's footprint (plus MARGIN): ``[B]`` bool."""
    c = wrap(scene["cyl_c"] - xz[:, None])
    in_cyl = (c.norm(dim=-1) < scene["cyl_r"] + MARGIN).any(-1)
    c = wrap(scene["sph_c"] - xz[:, None])
    in_sph = (c.norm(dim=-1) < scene["sph_r"] + MARGIN).any(-1)
    c = wrap(scene["box_c"] - xz[:, None])
    cos_y, sin_y = scene["box_yaw"].cos(), scene["box_yaw"].sin()
    lx, lz = c[..., 0] * cos_y - c[..., 1] * sin_y, c[..., 0] * sin_y + c[..., 1] * cos_y
    in_box = ((lx.abs() < scene["box_half"][..., 0] + MARGIN) & (lz.abs() < scene["box_half"][..., 1] + MARGIN)).any(-1)
    return in_cyl | in_sph | in_box


class ProceduralWorld(World):
    name = "procedural"
    fps = 20

    def __init__(self, batch: int = 1, height: int = 128, width: int = 128, device="cpu", chunk: int = 64,
                 action_spec: ActionSpec | None = None, controller: ControllerSpec | None = None, compile: bool = False):
        super().__init__(batch, height, width, action_spec or ActionSpec(), controller or ControllerSpec())
        self.device = torch.device(device)
        self.chunk = chunk  # batch items rendered at once (bounds memory: about chunk * H * W * 50 * 4 bytes)
        self.rays = camera_rays(height, width, 90.0, self.device)
        self.scene = None
        self.true: CameraState | None = None
        # torch.compile fuses the renderer's hundreds of elementwise ops (GPU data generation)
        self._render_fn = torch.compile(render, dynamic=False) if compile else render

    def _render(self) -> torch.Tensor:
        eye = self.true.position.to(self.device, torch.float32)
        eye = torch.cat([torch.remainder(eye[:, :1], TILE), eye[:, 1:2], torch.remainder(eye[:, 2:], TILE)], -1)
        yaw, pitch = self.true.yaw.to(self.device, torch.float32), self.true.pitch.to(self.device, torch.float32)
        out = []
        for i in range(0, self.batch, self.chunk):
            sl = slice(i, i + self.chunk)
            part = {k: v[sl] for k, v in self.scene.items()}
            out.append(self._render_fn(part, eye[sl], yaw[sl], pitch[sl], self.rays, self.height, self.width))
        return torch.cat(out).cpu()

    def _result(self) -> WorldStep:
        return WorldStep(self._render(), self.commanded_pose(), state_to_pose(self.true).float())

    def _reset(self, seeds):
        self.scene = stack_scenes(seeds, self.device)
        self.scene_cpu = {k: v.cpu().double() for k, v in self.scene.items()}
        self.true = self.commanded.clone()
        return self._result()

    def _step(self, actions):
        moved = step_state(self.true, actions, self.action_spec, self.controller)
        stop = blocked(self.scene_cpu, moved.position[:, [0, 2]])
        moved.position = torch.where(stop[:, None], self.true.position, moved.position)
        self.true = moved
        return self._result()
