"""A built-in procedural 3D world, rendered by batched analytic ray casting in torch.

Each seed makes a different world (a CPU ``torch.Generator`` draws its parameters, so a seed gives
the same world on every device): a ground plane with a checker and slow colour waves, a sky with a
gradient, a sun and clouds, and a layout of axis-aligned boxes and walls, spheres (resting or
floating), pillars and a few tall landmark towers, in seeded sizes and colours around a seeded
palette. Shading is Lambert from the seed's sun plus a sky-tinted ambient term, a per-object
texture, contact darkening near the ground, and distance fog into the sky seen along each ray.

Endless world. The layout of ordinary objects repeats with period ``TILE`` in x and z, the
landmarks with period ``LANDMARK_TILE``; only the copy of each object nearest to the camera is
drawn. Fog fades every surface into the sky seen along its ray and is complete at ``FOG_END``
(landmarks fog ``LANDMARK_FOG`` times slower); a surface beyond that is not there at all (it
neither shows nor hides anything), so a copy can switch without a visible change and walking
anywhere never runs out of world.

Speed. The image is cut into screen tiles of up to 32x32 pixels; per tile, objects whose
bounding sphere misses the tile's frustum or lies beyond the fog are culled, and only the
surviving (tile, object) pairs are intersected, ``[pairs, rays per tile]`` per kind, with a
scatter-min giving each ray its nearest object. Rays are then split into sky, ground and object
rays and each class is shaded on its own rays. So the work follows what is on screen, with no
padding to the busiest view in the batch. Everything is float32 tensor code, the same on CPU and
CUDA; ``chunk`` bounds how many batch items are rendered at once (memory), and ``compile=True``
runs the per-ray kernels through ``torch.compile`` (falling back to eager, with a warning, if
compilation fails).

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
from dataclasses import dataclass

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
        "center": center, "size": size, "color": color.clamp(0.03, 1.0), "solid": solid, "kind": KINDS.clone(),
        "period": torch.where(landmark, LANDMARK_TILE, TILE),
        "fog_scale": torch.where(landmark, LANDMARK_FOG, 1.0),
        "sun": sun, "zenith": zenith, "horizon": horizon, "ground": ground, "waves": waves,
        "checker": uniform(0.75, 2.0), "clouds": torch.stack([uniform(0.15, 0.6), uniform(0, 100), uniform(0, 100)]),
    }


def stack_scenes(seeds: list[int], device) -> dict[str, torch.Tensor]:
    """The scenes of ``seeds``, stacked along a leading batch dimension and moved to ``device``."""
    scenes = [make_scene(s) for s in seeds]
    return {k: torch.stack([s[k] for s in scenes]).to(device) for k in scenes[0]}


def tile_size(n: int, most: int = 32) -> int:
    """The largest divisor of ``n`` that is at most ``most`` (screen tiles are this many pixels)."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


@dataclass
class RayTiles:
    """Pixel rays grouped in screen tiles: ``rays [T, R, 3]`` (unit, camera axes, row-major within a tile),
    ``bounds [T, 4]`` (x_lo, x_hi, y_lo, y_hi: the tile's extent as tangents x/z and y/z), tile grid and sizes."""

    rays: torch.Tensor
    bounds: torch.Tensor
    grid: tuple[int, int]  # tiles down, tiles across
    size: tuple[int, int]  # pixels per tile: height, width
    pixel_angle: float  # radians per pixel at the centre

    @classmethod
    def make(cls, height: int, width: int, fov_degrees: float = FOV_DEGREES, device=None) -> "RayTiles":
        focal = (width / 2) / math.tan(math.radians(fov_degrees) / 2)  # pixels (square pixels)
        th, tw = tile_size(height), tile_size(width)
        xs = (torch.arange(width, dtype=torch.float64) + 0.5 - width / 2) / focal
        ys = (torch.arange(height, dtype=torch.float64) + 0.5 - height / 2) / focal
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        d = torch.stack([x, y, torch.ones_like(x)], -1)
        d = d / d.norm(dim=-1, keepdim=True)
        rays = rearrange(d, "(ty th) (tx tw) c -> (ty tx) (th tw) c", th=th, tw=tw)
        edge_x = (torch.arange(0, width + 1, tw, dtype=torch.float64) - width / 2) / focal
        edge_y = (torch.arange(0, height + 1, th, dtype=torch.float64) - height / 2) / focal
        ty, tx = height // th, width // tw
        bounds = torch.stack([edge_x[:-1].repeat(ty), edge_x[1:].repeat(ty),
                              edge_y[:-1].repeat_interleave(tx), edge_y[1:].repeat_interleave(tx)], -1)
        return cls(rays.float().to(device), bounds.float().to(device), (ty, tx), (th, tw), 1.0 / focal)

    def image(self, colour: torch.Tensor) -> torch.Tensor:
        """``colour [B, T, R, C]`` -> ``[B, H, W, C]``."""
        (ty, tx), (th, tw) = self.grid, self.size
        return rearrange(colour, "b (ty tx) (th tw) c -> b (ty th) (tx tw) c", ty=ty, tx=tx, th=th, tw=tw)


def nearest_copies(center: torch.Tensor, period: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Centres ``[B, N, 3]`` of the copies of each tiled object nearest to ``origin [B, 3]`` (x and z wrapped)."""
    offset = center - origin[:, None]
    wrapped = torch.remainder(offset + period[..., None] / 2, period[..., None]) - period[..., None] / 2 + origin[:, None]
    return torch.cat([wrapped[..., :1], center[..., 1:2], wrapped[..., 2:]], -1)


def visible_in_tiles(centers, size, fog_scale, rotation, origin, bounds) -> torch.Tensor:
    """Bool ``[B, T, N]``: the object's bounding sphere meets tile t's frustum within the fog distance.

    centers ``[B, N, 3]`` (world), size ``[B, N, 3]`` half extents, rotation ``[B, 3, 3]`` world-from-camera,
    origin ``[B, 3]``, bounds ``[T, 4]`` tile tangents (see RayTiles). Conservative: never drops a visible object.
    """
    rel = centers - origin[:, None]
    x, y, z = (v[:, None] for v in torch.einsum("bij,bni->bnj", rotation, rel).unbind(-1))  # camera axes [B, 1, N]
    radius = size.norm(dim=-1)[:, None]
    x_lo, x_hi, y_lo, y_hi = (v[None, :, None] for v in bounds.unbind(-1))  # [1, T, 1]
    inside = ((x - x_hi * z < radius * (1 + x_hi * x_hi).sqrt()) & (x_lo * z - x < radius * (1 + x_lo * x_lo).sqrt())
              & (y - y_hi * z < radius * (1 + y_hi * y_hi).sqrt()) & (y_lo * z - y < radius * (1 + y_lo * y_lo).sqrt()))
    near = (z > -radius) & (rel.norm(dim=-1) - size.norm(dim=-1) < FOG_END / fog_scale)[:, None]
    return inside & near


def box_hits(origin, direction, center, half, far):
    """Distances ``[P, R]`` along rays ``direction [P, R, 3]`` (unit) from ``origin [P, 3]`` to the axis-aligned
    boxes ``center, half [P, 3]`` (slab test); inf where missed, behind, beyond ``far [P]``, or from inside."""
    inv = 1.0 / torch.where(direction.abs() < 1e-9, torch.full_like(direction, 1e-9), direction)
    t0 = (center - half - origin)[:, None] * inv
    t1 = (center + half - origin)[:, None] * inv
    t_in = torch.minimum(t0, t1).amax(-1)
    t_out = torch.maximum(t0, t1).amin(-1)
    return torch.where((t_in <= t_out) & (t_in > EPS) & (t_in < far[:, None]), t_in, math.inf)


def sphere_hits(origin, direction, center, radius, far):
    """Distances ``[P, R]`` to spheres ``center [P, 3]``, ``radius [P]`` (front surface; inf where missed or
    beyond ``far [P]``)."""
    oc = origin - center
    half_b = torch.bmm(direction, oc[:, :, None])[..., 0]
    disc = half_b * half_b - ((oc * oc).sum(-1) - radius * radius)[:, None]
    t = -half_b - disc.clamp_min(0).sqrt()
    return torch.where((disc > 0) & (t > EPS) & (t < far[:, None]), t, math.inf)


def cylinder_hits(origin, direction, center, radius, half_height, far, caps: bool = True):
    """Distances ``[P, R]`` to vertical capped cylinders seen from outside: ``center [P, 3]`` (mid-height),
    ``radius, half_height, far [P]`` (inf beyond far). ``caps=False`` skips the top caps (right when no origin
    is above a top)."""
    oc = (origin - center)[:, [0, 2]]
    d_xz = direction[..., [0, 2]]
    a = (d_xz * d_xz).sum(-1).clamp_min(1e-12)
    half_b = torch.bmm(d_xz, oc[:, :, None])[..., 0]
    disc = half_b * half_b - a * ((oc * oc).sum(-1) - radius * radius)[:, None]
    t_side = (-half_b - disc.clamp_min(0).sqrt()) / a
    y_rel = (origin[:, 1] - center[:, 1])[:, None] + t_side * direction[..., 1]  # hit height from the middle
    t_side = torch.where((disc > 0) & (t_side > EPS) & (t_side < far[:, None]) & (y_rel.abs() <= half_height[:, None]),
                         t_side, math.inf)
    if not caps:
        return t_side
    top = center[:, 1] - half_height  # y points down: the top cap has the smaller y
    dy = direction[..., 1]
    t_cap = (top - origin[:, 1])[:, None] / torch.where(dy.abs() < 1e-9, torch.full_like(dy, 1e-9), dy)
    px = oc[:, 0:1] + t_cap * direction[..., 0]
    pz = oc[:, 1:2] + t_cap * direction[..., 2]
    cap = ((origin[:, 1] < top)[:, None] & (t_cap > EPS) & (t_cap < far[:, None])
           & (px * px + pz * pz <= (radius * radius)[:, None]))
    return torch.where(cap, torch.minimum(t_cap, t_side), t_side)


def smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return x * x * (3 - 2 * x)


def fogged(colour, t, fog_scale, sky):
    """``colour [M, 3]`` seen at distance ``t [M]`` through fog (``fog_scale`` times as dense) that fades it into
    ``sky [M, 3]``, the sky along the same ray: a fully fogged surface is exactly what culling it would show."""
    fog = smoothstep((t * fog_scale - FOG_START) / (FOG_END - FOG_START))[:, None]
    return colour + (sky - colour) * fog


def sun_glow(direction, sun):
    """Warm light ``[M, 3]`` around the sun: a small disc and a wide glow."""
    to_sun = (direction * sun).sum(-1).clamp(0, 1)
    glow = (3 * to_sun.pow(900) + 0.3 * to_sun.pow(12))[:, None]
    return torch.cat([glow, 0.92 * glow, 0.75 * glow], -1)  # built from the data: no device constants, no host sync


def shade_sky(direction, origin, sun, zenith, horizon, clouds):
    """Sky colours ``[M, 3]``: horizon-to-zenith gradient, sun disc and glow, clouds on a plane 40 units up.

    direction, origin, sun, zenith, horizon ``[M, 3]``; clouds ``[M, 3]`` (cover, u offset, v offset).
    Below the horizon this is exactly ``horizon + sun_glow`` (what ground rays fade into).
    """
    up = (-direction[:, 1]).clamp(0, 1)
    sky = horizon + (zenith - horizon) * up.pow(0.6)[:, None] + sun_glow(direction, sun)
    reach = 40.0 / up.clamp_min(0.02)
    cu = (origin[:, 0] + reach * direction[:, 0]) * 0.02 + clouds[:, 1]
    cv = (origin[:, 2] + reach * direction[:, 2]) * 0.02 + clouds[:, 2]
    pattern = torch.sin(cu * 1.7) * torch.sin(cv * 1.3) + 0.5 * torch.sin((cu + cv) * 3.1) + 0.25 * torch.sin((cu - cv) * 6.3)
    cover = smoothstep((pattern - 1 + 2 * clouds[:, 0]) * 1.5) * smoothstep(up * 6)
    return sky + (0.95 - sky) * (0.85 * cover)[:, None]


def shade_ground(direction, origin, t, sun, zenith, horizon, ground, waves, checker, pixel_angle: float):
    """Ground colours ``[M, 3]`` at distance ``t [M]``: a checker (faded where a pixel spans many cells) over
    slow colour waves, lit by the sun, fogged into the sky below the horizon. ground ``[M, 2, 3]``,
    waves ``[M, 3, 3]`` (kx, kz, phase), checker ``[M]`` cell size."""
    gx = origin[:, 0] + t * direction[:, 0]
    gz = origin[:, 2] + t * direction[:, 2]
    parity = torch.remainder(torch.floor(gx / checker) + torch.floor(gz / checker), 2) * 2 - 1
    footprint = t * pixel_angle / (direction[:, 1].clamp_min(1e-3) * checker)
    shade = 1 + 0.13 * parity * (1 - footprint).clamp(0, 1)
    wave = (torch.sin(gx[:, None] * waves[..., 0] + gz[:, None] * waves[..., 1] + waves[..., 2])).mean(-1)
    base = ground[:, 0] + (ground[:, 1] - ground[:, 0]) * (0.5 + 0.5 * wave)[:, None]
    light = 0.3 + 0.3 * zenith + 0.75 * (-sun[:, 1:2])  # sky-tinted ambient + sun on an upward face
    return fogged(base * light * shade[:, None], t, 1.0, horizon + sun_glow(direction, sun))


def shade_objects(direction, origin, t, center, half, color, kind, fog_scale, sun, zenith, sky):
    """Object colours ``[M, 3]`` at distance ``t [M]`` on the objects ``center, half, color [M, 3]`` of ``kind [M]``:
    Lambert from the sun plus sky-tinted ambient, a 3D checker texture, darkening near the ground, fog into ``sky``."""
    hit = origin + t[:, None] * direction
    q = (hit - center) / half.clamp_min(1e-6)  # on the surface: max |q| = 1 (box), |q| = 1 (sphere), ...
    qa = q.abs()
    n_box = torch.where(qa >= qa.amax(-1, keepdim=True), torch.sign(q), 0.0)
    zero = torch.zeros_like(q[:, :1])
    radial = torch.cat([q[:, :1], zero, q[:, 2:]], -1)
    radial_len = radial.norm(dim=-1, keepdim=True)
    on_cap = qa[:, 1:2] > radial_len  # |q_y| = 1 on a cap, radial length 1 on the side
    n_cyl = torch.where(on_cap, torch.cat([zero, torch.sign(q[:, 1:2]), zero], -1), radial / radial_len.clamp_min(1e-6))
    kind = kind[:, None]
    normal = torch.where(kind == BOX, n_box, torch.where(kind == SPHERE, q / q.norm(dim=-1, keepdim=True), n_cyl))
    lambert = (normal * sun).sum(-1, keepdim=True).clamp_min(0)
    light = (0.3 + 0.3 * zenith) * (0.85 - 0.15 * normal[:, 1:2]) + 0.75 * lambert
    texture = 1 - 0.08 * torch.remainder(torch.floor((hit - center) * 2).sum(-1, keepdim=True), 2)
    contact = 1 - 0.35 * torch.exp(3 * hit[:, 1:2])  # height above the ground is -y
    return fogged(color * light * texture * contact, t, fog_scale, sky)


KERNELS = {"box": box_hits, "sphere": sphere_hits, "cylinder": cylinder_hits,
           "sky": shade_sky, "ground": shade_ground, "objects": shade_objects}
"""The per-ray work; ``compile=True`` runs these through torch.compile."""


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


def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0 (index_select: faster than advanced indexing on the CPU)."""
    return x.index_select(0, index)


def pairs(x: torch.Tensor, item: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
    """``x[item, obj]`` for ``x [B, N, ...]`` and index vectors ``item, obj [P]``."""
    return x.flatten(0, 1).index_select(0, item * x.shape[1] + obj)


def trace(scene, rotation, origin, tiles: RayTiles, kernels=KERNELS):
    """Nearest object along every ray: directions ``[B, T, R, 3]``, distance ``[B, T, R]`` (inf: none),
    object index ``[B, T, R]`` (-1: none) and the object copies ``[B, N, 3]`` that were tested.

    Only (tile, object) pairs that pass culling are intersected: ``[P, R]`` per kind, then a scatter-min per ray.
    """
    b, t_count, r = origin.shape[0], *tiles.rays.shape[:2]
    direction = torch.einsum("bij,trj->btri", rotation, tiles.rays)
    centers = nearest_copies(scene["center"], scene["period"], origin)
    visible = visible_in_tiles(centers, scene["size"], scene["fog_scale"], rotation, origin, tiles.bounds)
    hits, units, objects = [], [], []
    for kind, part in KIND_SLICES.items():
        item, tile, obj = visible[:, :, part].nonzero(as_tuple=True)
        if item.numel() == 0:
            continue
        obj, unit = obj + part.start, item * t_count + tile
        o, d = rows(origin, item), rows(direction.flatten(0, 1), unit)
        c, s = pairs(centers, item, obj), pairs(scene["size"], item, obj)
        far = FOG_END / pairs(scene["fog_scale"], item, obj)  # fully fogged surfaces are not there (culling drops them too)
        if kind == BOX:
            hits.append(kernels["box"](o, d, c, s, far))
        elif kind == SPHERE:
            hits.append(kernels["sphere"](o, d, c, s[:, 0], far))
        else:  # caps matter only where a camera is above a cylinder's top (never at eye height < 1.5)
            caps = bool((o[:, 1] < c[:, 1] - s[:, 1]).any())
            hits.append(kernels["cylinder"](o, d, c, s[:, 0], s[:, 1], far, caps))
        units.append(unit)
        objects.append(obj)
    best_t = torch.full((b * t_count, r), math.inf, device=origin.device)
    best_i = torch.full((b * t_count, r), -1, dtype=torch.long, device=origin.device)
    if hits:
        hits, units, objects = torch.cat(hits), torch.cat(units), torch.cat(objects)
        where = units[:, None].expand(-1, r)
        best_t = best_t.scatter_reduce(0, where, hits, "amin")
        nearest = (hits == rows(best_t, units)) & torch.isfinite(hits)
        best_i = best_i.scatter_reduce(0, where, torch.where(nearest, objects[:, None], -1), "amax")
    return direction, best_t.view(b, t_count, r), best_i.view(b, t_count, r), centers


def render_rays(scene, rotation, origin, tiles: RayTiles, kernels=KERNELS) -> torch.Tensor:
    """Colours ``[B, T, R, 3]`` in [0, 1] seen from cameras ``rotation [B, 3, 3]`` (world-from-camera), ``origin [B, 3]``.

    Rays are sorted into sky, ground and object rays, and each class is shaded on its own rays only.
    """
    direction, t_obj, index, centers = trace(scene, rotation, origin, tiles, kernels)
    dy = direction[..., 1]
    t_ground = torch.where(dy > 1e-6, -origin[:, 1, None, None] / dy.clamp_min(1e-6), math.inf)
    is_obj = t_obj < t_ground
    is_ground = ~is_obj & torch.isfinite(t_ground)
    colour = torch.empty(*direction.shape, device=origin.device)
    flat_colour, flat_direction = colour.view(-1, 3), direction.reshape(-1, 3)
    per_item = direction.shape[1] * direction.shape[2]
    for name, mask in (("objects", is_obj), ("ground", is_ground), ("sky", ~(is_obj | is_ground))):
        rays = mask.flatten().nonzero()[:, 0]
        if rays.numel() == 0:
            continue
        item = rays // per_item
        d, o = rows(flat_direction, rays), rows(origin, item)
        sun, zenith, horizon = rows(scene["sun"], item), rows(scene["zenith"], item), rows(scene["horizon"], item)
        if name == "ground":
            colour_of_class = kernels["ground"](d, o, rows(t_ground.flatten(), rays), sun, zenith, horizon,
                                                rows(scene["ground"], item), rows(scene["waves"], item),
                                                rows(scene["checker"], item), tiles.pixel_angle)
        else:
            sky = kernels["sky"](d, o, sun, zenith, horizon, rows(scene["clouds"], item))  # objects fog into it
            if name == "sky":
                colour_of_class = sky
            else:
                obj = rows(index.flatten(), rays)
                colour_of_class = kernels["objects"](
                    d, o, rows(t_obj.flatten(), rays), pairs(centers, item, obj), pairs(scene["size"], item, obj),
                    pairs(scene["color"], item, obj), pairs(scene["kind"], item, obj),
                    pairs(scene["fog_scale"], item, obj), sun, zenith, sky)
        flat_colour.index_copy_(0, rays, colour_of_class)
    return colour


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
        budget = 2**28 if self.device.type == "cuda" else 2**20  # rays x visible objects per render call
        self.chunk = max(1, budget // (height * width * 16)) if chunk is None else chunk
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise WorldError(f"chunk must be a positive integer, got {chunk!r}")
        self.collisions = collisions
        self.tiles = RayTiles.make(height, width, FOV_DEGREES, self.device)
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
        frames = []
        for i in range(0, self.batch, self.chunk):
            part = slice(i, i + self.chunk)
            scene = {k: v[part] for k, v in self.scene.items()}
            colour = render_rays(scene, poses[part, :3, :3], poses[part, :3, 3], self.tiles, self.kernels)
            frames.append((colour.clamp(0, 1) * 255 + 0.5).to(torch.uint8))
        out = torch.empty(self.batch, self.height, self.width, 3, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        out.copy_(self.tiles.image(torch.cat(frames)), non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return out

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
