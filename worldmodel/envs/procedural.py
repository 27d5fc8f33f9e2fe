"""A built-in procedural 3D world, rendered by batched analytic ray casting in torch.

Each seed makes a different world (a CPU ``torch.Generator`` draws its parameters, so a seed gives
the same world on every device): a ground plane with a checker and slow colour waves, a sky with a
gradient, a sun and clouds, and a layout of axis-aligned boxes and walls, spheres (resting or
floating), pillars and a few tall landmark towers, in seeded sizes and colours around a seeded
palette. Shading is Lambert from the seed's sun plus a sky-tinted ambient term, a per-object
texture, contact darkening near the ground, and distance fog into the horizon colour.

Endless world. The layout of ordinary objects repeats with period ``TILE`` in x and z, the
landmarks with period ``LANDMARK_TILE``; only the copy of each object nearest to the camera is
drawn, and fog hides everything before a copy can switch (fog is complete at ``FOG_END``,
landmarks fog ``LANDMARK_FOG`` times slower), so walking anywhere never runs out of world.

Speed. Per batch item, objects outside the view frustum or beyond the fog are culled first; per
kind, the visible ones are gathered into ``[b, K]`` (K: the most visible in the chunk) and every
ray is intersected with them in one broadcast op chain over ``[b, rays, K]``, with bounded memory
(``chunk`` batch items at a time). Everything is float32 tensor code, identical on CPU and CUDA;
``compile=True`` runs the intersection and shading through ``torch.compile`` (falls back to eager
with a warning if compilation fails).

Collisions (on by default): the camera is a vertical body of radius ``BODY_RADIUS``; after each
step the true position takes the commanded displacement and is then pushed out of every solid
footprint (boxes: rectangles, pillars/landmarks/resting spheres: circles), so walking into a
wall slides along it. Yaw and pitch are never blocked. The commanded pose (the controller's
integration of the actions, what training conditions on) walks on regardless, so commanded and
true poses differ once the camera has been blocked: the frames always show the true pose. With
``collisions=False`` the camera passes through objects (their insides are not drawn) and the
two poses stay equal.
"""

from __future__ import annotations

import math
import warnings

import torch
from einops import rearrange

from worldmodel.actions import ActionSpec
from worldmodel.camera import CameraState, ControllerSpec, state_to_pose
from worldmodel.envs.base import World, WorldError, WorldStep

TILE = 40.0  # period of the ordinary layout in x and z (world units; eye height is 1)
LANDMARK_TILE = 160.0  # period of the landmark layout
FOG_START, FOG_END = 4.0, 16.0  # fog ramps from nothing to complete between these distances
LANDMARK_FOG = 0.2  # landmarks fog this many times as fast (visible to FOG_END / LANDMARK_FOG)
BODY_RADIUS = 0.25  # how close the camera's centre may get to a solid footprint
START_CLEARANCE = 2.0  # free radius around the start (the origin) for ordinary objects
FOV_DEGREES = 90.0  # horizontal field of view
EPS = 1e-3  # hits closer than this are ignored (the camera is never that close to a surface)

N_BOXES, N_WALLS = 16, 8  # walls are long thin boxes
N_SPHERES, N_FLOATING = 8, 2  # the last N_FLOATING spheres float overhead (not solid)
N_PILLARS, N_LANDMARKS = 14, 4  # both vertical cylinders standing on the ground
N_SITES, SITE_SPREAD = 4, 4.0  # most ordinary objects cluster around a few sites (gaussian spread)
BOX, SPHERE, CYLINDER = 0, 1, 2
KIND_SLICES = {  # objects are stored in kind blocks along N
    BOX: slice(0, N_BOXES + N_WALLS),
    SPHERE: slice(N_BOXES + N_WALLS, N_BOXES + N_WALLS + N_SPHERES),
    CYLINDER: slice(N_BOXES + N_WALLS + N_SPHERES, N_BOXES + N_WALLS + N_SPHERES + N_PILLARS + N_LANDMARKS),
}
N_OBJECTS = KIND_SLICES[CYLINDER].stop
OP_COST = {BOX: 22, SPHERE: 9, CYLINDER: 20}  # rough elementwise ops per ray and object of each kind
KINDS = torch.tensor([BOX] * (N_BOXES + N_WALLS) + [SPHERE] * N_SPHERES + [CYLINDER] * (N_PILLARS + N_LANDMARKS))


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Colours ``[..., 3]`` in [0, 1] from hue (turns), saturation and value ``[...]``."""
    k = torch.remainder(h[..., None] * 6 + torch.tensor([5.0, 3.0, 1.0]), 6)
    return v[..., None] * (1 - s[..., None] * (torch.minimum(k, 4 - k).clamp(0, 1)))


def spread_from_start(xz: torch.Tensor, reach: torch.Tensor, clearance: float) -> torch.Tensor:
    """Move centres ``xz [N, 2]`` whose footprint (radius ``reach [N]``) comes within ``clearance`` of the origin."""
    dist = xz.norm(dim=-1, keepdim=True)
    direction = torch.where(dist > 1e-6, xz / dist.clamp_min(1e-6), torch.tensor([1.0, 0.0]))
    need = (clearance + reach)[:, None]
    return torch.where(dist < need, direction * need, xz)


def make_scene(seed: int) -> dict[str, torch.Tensor]:
    """Parameters of the world of ``seed`` (CPU float32 tensors; objects ``[N, ...]`` in kind blocks)."""
    g = torch.Generator().manual_seed(int(seed))

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    palette = uniform(0, 1)
    n = N_OBJECTS
    near_palette = torch.rand(n, generator=g) < 0.6
    hue = torch.where(near_palette, palette + 0.12 * torch.randn(n, generator=g), uniform(0, 1, n))
    color = hsv_to_rgb(hue, uniform(0.3, 0.85, n), uniform(0.45, 0.95, n))

    # half extents (x, y, z): boxes and walls, spheres (r, r, r), cylinders (r, h/2, r)
    box = torch.stack([uniform(0.3, 1.5, N_BOXES), uniform(0.2, 1.5, N_BOXES), uniform(0.3, 1.5, N_BOXES)], -1)
    wall_long, wall_thin = uniform(2.0, 3.5, N_WALLS), uniform(0.15, 0.25, N_WALLS)
    along_x = torch.rand(N_WALLS, generator=g) < 0.5
    wall = torch.stack([torch.where(along_x, wall_long, wall_thin), uniform(0.75, 1.5, N_WALLS),
                        torch.where(along_x, wall_thin, wall_long)], -1)
    sphere_r = torch.cat([uniform(0.3, 1.1, N_SPHERES - N_FLOATING), uniform(0.3, 0.8, N_FLOATING)])
    cyl_r = torch.cat([uniform(0.15, 0.6, N_PILLARS), uniform(1.0, 3.0, N_LANDMARKS)])
    cyl_half_h = torch.cat([uniform(0.75, 3.0, N_PILLARS), uniform(7.0, 15.0, N_LANDMARKS)])
    size = torch.cat([box, wall, sphere_r[:, None].expand(-1, 3), torch.stack([cyl_r, cyl_half_h, cyl_r], -1)])

    # centres: y so that objects stand on the ground (y = 0 is the ground, y points down)
    floating_y = -uniform(2.6, 4.5, N_FLOATING)
    center_y = -size[:, 1].clone()
    sph = KIND_SLICES[SPHERE]
    center_y[sph.stop - N_FLOATING : sph.stop] = floating_y
    landmark = torch.zeros(n, dtype=torch.bool)
    landmark[n - N_LANDMARKS :] = True
    sites = uniform(-TILE / 2, TILE / 2, N_SITES, 2)
    at_site = sites[torch.randint(N_SITES, (n,), generator=g)] + SITE_SPREAD * torch.randn(n, 2, generator=g)
    xz = torch.where(torch.rand(n, 1, generator=g) < 0.65, at_site, uniform(-TILE / 2, TILE / 2, n, 2))
    xz = torch.where(landmark[:, None], uniform(-LANDMARK_TILE / 2, LANDMARK_TILE / 2, n, 2), xz)
    reach = size[:, [0, 2]].norm(dim=-1)
    xz = torch.where(landmark[:, None], spread_from_start(xz, reach, 10.0), spread_from_start(xz, reach, START_CLEARANCE))
    center = torch.stack([xz[:, 0], center_y, xz[:, 1]], -1)
    color[landmark] = hsv_to_rgb(uniform(0, 1, N_LANDMARKS), uniform(0.6, 0.9, N_LANDMARKS), uniform(0.75, 1.0, N_LANDMARKS))
    bottom_height = -(center[:, 1] + size[:, 1])
    solid = bottom_height < 1.5  # anything that reaches down to head height blocks the body

    sun_azimuth, sun_elevation = uniform(0, 2 * math.pi), uniform(math.radians(15), math.radians(65))
    sun = torch.stack([sun_elevation.cos() * sun_azimuth.sin(), -sun_elevation.sin(), sun_elevation.cos() * sun_azimuth.cos()])
    sunset = torch.rand((), generator=g) < 0.2
    zenith = hsv_to_rgb(uniform(0.53, 0.66), uniform(0.35, 0.75), uniform(0.6, 0.95))
    horizon_hue = torch.where(sunset, uniform(0.02, 0.12), uniform(0.5, 0.62))
    horizon = hsv_to_rgb(horizon_hue, uniform(0.08, 0.35), uniform(0.8, 0.97))
    ground_hue = uniform(0, 1)
    ground = torch.stack([hsv_to_rgb(ground_hue, uniform(0.15, 0.5), uniform(0.35, 0.55)),
                          hsv_to_rgb(ground_hue + uniform(-0.08, 0.08), uniform(0.15, 0.5), uniform(0.45, 0.7))])
    wave_angle, wave_length = uniform(0, math.pi, 3), uniform(5.0, 15.0, 3)
    waves = torch.stack([wave_angle.cos() * 2 * math.pi / wave_length, wave_angle.sin() * 2 * math.pi / wave_length,
                         uniform(0, 2 * math.pi, 3)], -1)
    return {
        "center": center, "size": size, "color": color.clamp(0.03, 1.0), "solid": solid,
        "period": torch.where(landmark, LANDMARK_TILE, TILE),
        "fog_scale": torch.where(landmark, LANDMARK_FOG, 1.0),
        "sun": sun, "zenith": zenith, "horizon": horizon, "ground": ground, "waves": waves,
        "checker": uniform(0.75, 2.0), "clouds": torch.stack([uniform(0.15, 0.6), uniform(0, 100), uniform(0, 100)]),
    }


def stack_scenes(seeds: list[int], device) -> dict[str, torch.Tensor]:
    """The scenes of ``seeds``, stacked along a leading batch dimension and moved to ``device``."""
    scenes = [make_scene(s) for s in seeds]
    return {k: torch.stack([s[k] for s in scenes]).to(device) for k in scenes[0]}


def camera_rays(height: int, width: int, fov_degrees: float = FOV_DEGREES, device=None) -> torch.Tensor:
    """Unit ray directions ``[H*W, 3]`` through pixel centres, camera axes (OpenCV: x right, y down, z forward)."""
    focal = (width / 2) / math.tan(math.radians(fov_degrees) / 2)  # pixels, square pixels
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5 - width / 2) / focal
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5 - height / 2) / focal
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    d = rearrange(torch.stack([x, y, torch.ones_like(x)], -1), "h w c -> (h w) c")
    return d / d.norm(dim=-1, keepdim=True)


def nearest_copies(center: torch.Tensor, period: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Centres ``[B, N, 3]`` of the copies of each tiled object nearest to ``origin [B, 3]`` (x and z wrapped)."""
    offset = center - origin[:, None]
    wrapped = torch.remainder(offset + period[..., None] / 2, period[..., None]) - period[..., None] / 2
    return origin[:, None] + torch.cat([wrapped[..., :1], offset[..., 1:2], wrapped[..., 2:]], -1)


def visible_objects(center: torch.Tensor, size: torch.Tensor, fog_scale: torch.Tensor, rotation: torch.Tensor,
                    origin: torch.Tensor, tan_x: float, tan_y: float) -> torch.Tensor:
    """Bool ``[B, N]``: the object's bounding sphere meets the view frustum within the fog distance."""
    rel = center - origin[:, None]
    cam = torch.einsum("bij,bni->bnj", rotation, rel)  # R^T rel: centres in camera axes
    x, y, z = cam.unbind(-1)
    radius = size.norm(dim=-1)
    side_x, side_y = radius * math.sqrt(1 + tan_x**2), radius * math.sqrt(1 + tan_y**2)
    in_frustum = (z > -radius) & (x.abs() - tan_x * z < side_x) & (y.abs() - tan_y * z < side_y)
    return in_frustum & (rel.norm(dim=-1) - radius < FOG_END / fog_scale)


def gather_visible(visible: torch.Tensor, offset: int):
    """Indices ``[B, K]`` (plus ``offset``) of the visible objects of one kind and their validity ``[B, K]``."""
    count = visible.sum(1)
    k = int(count.max())
    order = torch.argsort(visible.to(torch.int32), dim=1, descending=True, stable=True)[:, :k]
    valid = torch.arange(k, device=visible.device) < count[:, None]
    return order + offset, valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C]`` at ``index [B, M]`` -> ``[B, M, C]``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def box_hits(origin, inv_dir, center, half):
    """Distances ``[B, R, K]`` to axis-aligned boxes (slab test; inf where missed or behind).

    origin ``[B, 3]``, inv_dir ``[B, R, 3]`` (1 / ray direction), center and half ``[B, K, 3]``.
    """
    lo = (center - half - origin[:, None])[:, None]  # [B, 1, K, 3]
    hi = (center + half - origin[:, None])[:, None]
    t0, t1 = lo * inv_dir[:, :, None], hi * inv_dir[:, :, None]  # [B, R, K, 3]
    t_in = torch.minimum(t0, t1).amax(-1)
    t_out = torch.maximum(t0, t1).amin(-1)
    return torch.where((t_in <= t_out) & (t_in > EPS), t_in, math.inf)


def sphere_hits(origin, direction, center, radius):
    """Distances ``[B, R, K]`` to spheres (front surface only); direction ``[B, R, 3]`` unit, radius ``[B, K]``."""
    oc = origin[:, None] - center  # [B, K, 3]
    half_b = torch.bmm(direction, oc.transpose(1, 2))  # [B, R, K]
    c = ((oc * oc).sum(-1) - radius * radius)[:, None]
    disc = half_b * half_b - c
    t = -half_b - disc.clamp_min(0).sqrt()
    return torch.where((disc > 0) & (t > EPS), t, math.inf)


def cylinder_hits(origin, direction, inv_dir_y, center, radius, half_height, caps: bool = True):
    """Distances ``[B, R, K]`` to vertical capped cylinders seen from outside.

    center ``[B, K, 3]`` (mid-height), radius and half_height ``[B, K]``; inv_dir_y ``[B, R, 1]``;
    ``caps=False`` skips the top caps (right when no camera is above any of these cylinders).
    """
    oc = (origin[:, None] - center)[..., [0, 2]]  # [B, K, 2]
    d_xz = direction[..., [0, 2]]  # [B, R, 2]
    a = (d_xz * d_xz).sum(-1, keepdim=True).clamp_min(1e-12)  # [B, R, 1]
    half_b = torch.bmm(d_xz, oc.transpose(1, 2))  # [B, R, K]
    c = ((oc * oc).sum(-1) - radius * radius)[:, None]
    disc = half_b * half_b - a * c
    t_side = (-half_b - disc.clamp_min(0).sqrt()) / a
    y_rel = (origin[:, 1:2] - center[..., 1])[:, None] + t_side * direction[..., 1:2]  # hit height vs the middle
    t_side = torch.where((disc > 0) & (t_side > EPS) & (y_rel.abs() <= half_height[:, None]), t_side, math.inf)
    top = center[..., 1] - half_height  # [B, K]; y points down, so the top cap has the smaller y
    if not caps:
        return t_side
    above = (origin[:, 1:2] < top)[:, None]  # only the top cap can face a camera outside the cylinder
    t_cap = (top - origin[:, 1:2])[:, None] * inv_dir_y
    px = oc[..., 0][:, None] + t_cap * direction[..., 0:1]
    pz = oc[..., 1][:, None] + t_cap * direction[..., 2:3]
    cap = above & (t_cap > EPS) & (px * px + pz * pz <= (radius * radius)[:, None])
    return torch.where(cap, torch.minimum(t_cap, t_side), t_side)


def smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return x * x * (3 - 2 * x)


def shade(scene, origin, direction, t_obj, index, centers, pixel_angle: float) -> torch.Tensor:
    """Colours ``[B, R, 3]`` in [0, 1] for rays ``direction [B, R, 3]`` from ``origin [B, 3]``.

    ``t_obj, index [B, R]``: distance to and index of the nearest object (inf where none);
    ``centers [B, N, 3]``: the object copies that were intersected.
    """
    dx, dy, dz = direction.unbind(-1)
    ox, oy, oz = (v[:, None] for v in origin.unbind(-1))
    sun, horizon, zenith = scene["sun"][:, None], scene["horizon"][:, None], scene["zenith"][:, None]
    ambient = 0.3 + 0.3 * zenith  # sky-tinted ambient light [B, 1, 3]

    # ground plane y = 0: checker (faded where a pixel covers many cells) and slow colour waves
    t_ground = torch.where(dy > 1e-6, -oy / dy.clamp_min(1e-6), math.inf)
    t_g = torch.where(torch.isfinite(t_ground), t_ground, 0.0)
    gx, gz = ox + t_g * dx, oz + t_g * dz
    cell = scene["checker"][:, None]
    parity = torch.remainder(torch.floor(gx / cell) + torch.floor(gz / cell), 2) * 2 - 1
    footprint = t_g * pixel_angle / (dy.clamp_min(1e-3) * cell)
    checker = 1 + 0.13 * parity * (1 - footprint).clamp(0, 1)
    k = scene["waves"]  # [B, 3, 3]: kx, kz, phase
    waves = sum(torch.sin(gx * k[:, i, 0:1] + gz * k[:, i, 1:2] + k[:, i, 2:3]) for i in range(3)) / 3
    ground_a, ground_b = scene["ground"][:, None, 0], scene["ground"][:, None, 1]
    ground_light = ambient + 0.75 * (-sun[..., 1:2])  # the ground faces up (-y)
    ground = (ground_a + (ground_b - ground_a) * (0.5 + 0.5 * waves)[..., None]) * (checker[..., None] * ground_light)

    # objects: normal from the hit point and the object's kind, a 3D checker texture, contact darkening
    t_o = torch.where(torch.isfinite(t_obj), t_obj, 0.0)
    hit = origin[:, None] + t_o[..., None] * direction
    c = gather_rows(centers, index)
    half = gather_rows(scene["size"], index).clamp_min(1e-6)
    kind = KINDS.to(index.device)[index]
    q = (hit - c) / half  # [B, R, 3]; on the surface: max |q| = 1 (box), |q| = 1 (sphere), ...
    qa = q.abs()
    n_box = torch.where(qa >= qa.amax(-1, keepdim=True), torch.sign(q), 0.0)
    n_sphere = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    radial = q * torch.tensor([1.0, 0.0, 1.0], device=q.device)
    on_cap = (qa[..., 1:2] > 1 - 1e-3) & (radial.norm(dim=-1, keepdim=True) < 1 - 1e-3)
    n_cyl = torch.where(on_cap, torch.sign(q) * torch.tensor([0.0, 1.0, 0.0], device=q.device),
                        radial / radial.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    kind = kind[..., None]
    normal = torch.where(kind == BOX, n_box, torch.where(kind == SPHERE, n_sphere, n_cyl))
    lambert = (normal * sun).sum(-1, keepdim=True).clamp_min(0)
    light = ambient * (0.85 - 0.15 * normal[..., 1:2]) + 0.75 * lambert
    cells = torch.floor((hit - c) * 2).sum(-1, keepdim=True)
    texture = 1 - 0.08 * torch.remainder(cells, 2)
    contact = 1 - 0.35 * torch.exp(3 * hit[..., 1:2])  # darker near the ground (height = -y)
    obj = gather_rows(scene["color"], index) * light * texture * contact

    # nearest surface, fog into the horizon colour, sky with sun and clouds
    is_obj = t_obj < t_ground
    fog_scale = torch.where(is_obj, torch.gather(scene["fog_scale"], 1, index), 1.0)
    t_surface = torch.where(is_obj, t_o, t_g)
    fog = smoothstep((t_surface * fog_scale - FOG_START) / (FOG_END - FOG_START))[..., None]
    surface = torch.where(is_obj[..., None], obj, ground)
    surface = surface + (horizon - surface) * fog
    up = (-dy).clamp(0, 1)
    sky = horizon + (zenith - horizon) * up.pow(0.6)[..., None]
    to_sun = (direction * sun).sum(-1).clamp(0, 1)
    sky = sky + torch.tensor([1.0, 0.92, 0.75], device=sky.device) * (3 * to_sun.pow(900) + 0.3 * to_sun.pow(12))[..., None]
    reach = 40.0 / up.clamp_min(0.02)  # clouds on a plane 40 units up
    cover, u0, v0 = scene["clouds"][:, 0:1], scene["clouds"][:, 1:2], scene["clouds"][:, 2:3]
    cu, cv = (ox + reach * dx) * 0.02 + u0, (oz + reach * dz) * 0.02 + v0
    pattern = torch.sin(cu * 1.7) * torch.sin(cv * 1.3) + 0.5 * torch.sin((cu + cv) * 3.1) + 0.25 * torch.sin((cu - cv) * 6.3)
    clouds = (smoothstep((pattern - 1 + 2 * cover) * 1.5) * smoothstep(up * 6))[..., None]
    sky = sky + (0.95 - sky) * 0.85 * clouds
    return torch.where(torch.isfinite(t_ground)[..., None] | is_obj[..., None], surface, sky)



def nearest_box(origin, inv_dir, center, half):
    """Distance ``[B, R]`` to and slot ``[B, R]`` of the nearest box hit (see box_hits)."""
    return box_hits(origin, inv_dir, center, half).min(-1)


def nearest_sphere(origin, direction, center, radius):
    return sphere_hits(origin, direction, center, radius).min(-1)


def nearest_cylinder(origin, direction, inv_dir_y, center, radius, half_height, caps: bool):
    return cylinder_hits(origin, direction, inv_dir_y, center, radius, half_height, caps).min(-1)


KERNELS = {"box": nearest_box, "sphere": nearest_sphere, "cylinder": nearest_cylinder, "shade": shade}
"""The per-ray work (everything over [b, rays, ...]); ``compile=True`` runs these through torch.compile."""


class CompiledOrEager:
    """``fn`` through ``torch.compile``; eager from the first failure on, with a warning."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # e.g. no working compiler toolchain; eager always works
                warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(e).__name__}: {e}); running it eagerly")
                self.compiled = None
        return self.fn(*args)


def trace(scene, rotation, origin, rays, tan_x: float, tan_y: float, kernels=KERNELS):
    """Nearest object hit for each ray: directions ``[B, R, 3]``, distance ``[B, R]`` (inf: none), index ``[B, R]``,
    and the object copies ``[B, N, 3]`` that were tested."""
    direction = torch.einsum("bij,rj->bri", rotation, rays)
    centers = nearest_copies(scene["center"], scene["period"], origin)
    visible = visible_objects(centers, scene["size"], scene["fog_scale"], rotation, origin, tan_x, tan_y)
    safe = torch.where(direction.abs() < 1e-9, torch.full_like(direction, 1e-9), direction)
    inv_dir = 1.0 / safe
    best_t = torch.full(direction.shape[:2], math.inf, device=direction.device)
    best_i = torch.zeros(direction.shape[:2], dtype=torch.long, device=direction.device)
    parking = origin * torch.tensor([1.0, 0.0, 1.0], device=origin.device) + torch.tensor([0.0, 1e4, 0.0], device=origin.device)
    for kind, part in KIND_SLICES.items():
        index, valid = gather_visible(visible[:, part], part.start)
        if index.shape[1] == 0:
            continue
        # invisible slots become empty objects far below the ground, so the ground always hides them
        c = torch.where(valid[..., None], gather_rows(centers, index), parking[:, None])
        s = torch.where(valid[..., None], gather_rows(scene["size"], index), 0.0)
        if kind == BOX:
            t_kind, slot = kernels["box"](origin, inv_dir, c, s)
        elif kind == SPHERE:
            t_kind, slot = kernels["sphere"](origin, direction, c, s[..., 0])
        else:  # caps matter only where a camera is above a cylinder's top (never, for eye height < 1.5)
            caps = bool((valid & (origin[:, 1:2] < c[..., 1] - s[..., 1])).any())
            t_kind, slot = kernels["cylinder"](origin, direction, inv_dir[..., 1:2], c, s[..., 0], s[..., 1], caps)
        closer = t_kind < best_t
        best_t = torch.where(closer, t_kind, best_t)
        best_i = torch.where(closer, torch.gather(index, 1, slot), best_i)
    return direction, best_t, best_i, centers


def render_rays(scene, rotation, origin, rays, tan_x: float, tan_y: float, pixel_angle: float,
                kernels=KERNELS) -> torch.Tensor:
    """Colours ``[B, R, 3]`` in [0, 1] seen from cameras ``rotation [B, 3, 3]`` (world-from-camera), ``origin [B, 3]``."""
    direction, t_obj, index, centers = trace(scene, rotation, origin, rays, tan_x, tan_y, kernels)
    return kernels["shade"](scene, origin, direction, t_obj, index, centers, pixel_angle)


def push_out(scene: dict, xz: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Positions ``xz [B, 2]`` moved out of every solid footprint (plus BODY_RADIUS), nearest copies.

    ``scene`` holds CPU float64 ``center [B, N, 3]``, ``size``, ``period``, ``solid``.
    """
    center, size = scene["center"][..., [0, 2]], scene["size"][..., [0, 2]]
    is_box = (KINDS == BOX).to(xz.device)
    period = scene["period"][..., None]
    for _ in range(iterations):
        rel = xz[:, None] - center
        rel = torch.remainder(rel + period / 2, period) - period / 2  # [B, N, 2] from the nearest copy
        # boxes: from the nearest point of the rectangle; inside: out along the shallower axis
        outside = rel - rel.clamp(-size, size)
        dist = outside.norm(dim=-1, keepdim=True)
        box_push = outside / dist.clamp_min(1e-9) * (BODY_RADIUS - dist).clamp_min(0)
        depth = size + BODY_RADIUS - rel.abs()
        shallow_x = depth[..., :1] <= depth[..., 1:]
        inside_push = torch.sign(rel + 1e-12) * torch.where(shallow_x, depth * torch.tensor([1.0, 0.0], dtype=xz.dtype),
                                                            depth * torch.tensor([0.0, 1.0], dtype=xz.dtype))
        box_push = torch.where(dist > 1e-9, box_push, inside_push)
        # circles (pillars, landmarks, resting spheres)
        r = rel.norm(dim=-1, keepdim=True)
        direction = torch.where(r > 1e-9, rel / r.clamp_min(1e-9), torch.tensor([1.0, 0.0], dtype=xz.dtype))
        circle_push = direction * (size[..., :1] + BODY_RADIUS - r).clamp_min(0)
        push = torch.where(is_box[:, None], box_push, circle_push) * scene["solid"][..., None]
        xz = xz + push.sum(1)
    return xz


class ProceduralWorld(World):
    """The procedural world; see the module docstring. Options: frame size, device, collisions, chunk, compile."""

    name = "procedural"
    fps = 20.0

    def __init__(self, batch: int = 1, height: int = 128, width: int = 128, device="cpu", chunk: int | None = None,
                 collisions: bool = True, compile: bool = False, action_spec: ActionSpec | None = None,
                 controller: ControllerSpec | None = None):
        super().__init__(batch, height, width, action_spec or ActionSpec(), controller or ControllerSpec())
        try:
            self.device = torch.device(device)
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:
            raise WorldError(f"cannot render on device {device!r}: {e}") from None
        rays = height * width
        budget = 2**27 if self.device.type == "cuda" else 2**23  # elements of the largest [b, rays, K, 3] tensor
        self.chunk = chunk or max(1, budget // (rays * (N_BOXES + N_WALLS) * 3))
        if self.chunk < 1:
            raise WorldError(f"chunk must be >= 1, got {chunk}")
        self.collisions = collisions
        self.rays = camera_rays(height, width, FOV_DEGREES, self.device)
        self.tan_x = math.tan(math.radians(FOV_DEGREES) / 2)
        self.tan_y = self.tan_x * height / width
        self.pixel_angle = 2 * self.tan_x / width
        self.kernels = {k: CompiledOrEager(fn) for k, fn in KERNELS.items()} if compile else KERNELS
        self.scene: dict | None = None
        self.true: CameraState | None = None

    def render(self, poses: torch.Tensor) -> torch.Tensor:
        """Frames uint8 ``[B, H, W, 3]`` (CPU) of the current worlds seen from ``poses [B, 4, 4]`` (world-from-camera)."""
        if self.scene is None:
            raise WorldError("call reset() before render()")
        if tuple(poses.shape) != (self.batch, 4, 4):
            raise WorldError(f"poses must be [{self.batch}, 4, 4], got {tuple(poses.shape)}")
        poses = poses.to(self.device, torch.float32)
        rotation, origin = poses[:, :3, :3], poses[:, :3, 3]
        frames = torch.empty(self.batch, self.height * self.width, 3, dtype=torch.uint8, device=self.device)
        for idx in self.chunks(rotation, origin):
            scene = {k: v[idx] for k, v in self.scene.items()}
            colour = render_rays(scene, rotation[idx], origin[idx], self.rays, self.tan_x, self.tan_y, self.pixel_angle,
                                 self.kernels)
            frames[idx] = (colour.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        out = torch.empty(self.batch, self.height, self.width, 3, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        out.copy_(rearrange(frames, "b (h w) c -> b h w c", h=self.height), non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def chunks(self, rotation: torch.Tensor, origin: torch.Tensor) -> list[torch.Tensor]:
        """Batch indices rendered together, ``chunk`` at a time. With several chunks, items with similar
        numbers of visible objects go together, so few rays are tested against padding slots."""
        if self.chunk >= self.batch:
            return [torch.arange(self.batch, device=self.device)]
        centers = nearest_copies(self.scene["center"], self.scene["period"], origin)
        visible = visible_objects(centers, self.scene["size"], self.scene["fog_scale"], rotation, origin, self.tan_x, self.tan_y)
        cost = sum(OP_COST[kind] * visible[:, part].sum(1) for kind, part in KIND_SLICES.items())
        order = torch.argsort(cost, stable=True)
        return list(order.split(self.chunk))

    def _result(self) -> WorldStep:
        true_pose = state_to_pose(self.true).float()
        return WorldStep(self.render(true_pose), self.commanded_pose(), true_pose,
                         torch.zeros(self.batch, dtype=torch.bool))

    def _reset(self, seeds):
        self.scene = stack_scenes(seeds, self.device)
        self.footprints = {k: self.scene[k].cpu().double() for k in ("center", "size", "period")}
        self.footprints["solid"] = self.scene["solid"].cpu()
        self.true = self.commanded.clone()
        self.last_commanded = self.commanded.position.clone()
        return self._result()

    def _step(self, actions):
        position = self.true.position + (self.commanded.position - self.last_commanded)
        if self.collisions:
            position[:, [0, 2]] = push_out(self.footprints, position[:, [0, 2]])
        self.true = CameraState(position, self.commanded.yaw.clone(), self.commanded.pitch.clone())
        self.last_commanded = self.commanded.position.clone()
        return self._result()
