"""ViZDoom as a ground-truth world: the Freedoom 2 maps, played headless with WASD + mouse.

One Doom game per batch item (in this process, or spread over ``workers`` processes), item i
playing ``maps[i % len(maps)]`` with no monsters, god mode, no HUD, weapon, crosshair or view bob.

Time. Doom runs at 35 tics/s; one frame is ``TICS_PER_FRAME = 2`` tics (the action is held for
both, the frame shows the second), so the world runs at 17.5 frames/s, close to the procedural
world's 20.

Actions (same ActionSpec as every world). Movement uses Doom's delta buttons, which take the
same thrust units as Doom's own keys: W/S -> MOVE_FORWARD_BACKWARD_DELTA = +/-25 (Doom's walking
forwardmove), A/D -> MOVE_LEFT_RIGHT_DELTA = -/+25, both doubled with SHIFT (Doom's running
speed). Unlike Doom's strafe keys (sidemove 24 walking, 40 running) this makes strafing exactly
as fast as walking, as the controller assumes. The mouse turns the view in closed loop: each
frame the TURN_LEFT_RIGHT_DELTA / LOOK_UP_DOWN_DELTA buttons (degrees per tic) ask for the
difference between the commanded yaw/pitch and Doom's current ANGLE/PITCH, so Doom's view
follows the commanded one to Doom's angle resolution (0.0055 degrees) with no drift.

Units and poses. One world unit is ``MAP_UNITS = 32`` Doom map units (about a metre: the player
is 56 units tall). Doom's axes map to ours (OpenCV, y down) as x = X, y = -Z, z = Y (right-handed,
since X cross Y is up); Doom's ANGLE (degrees, counter-clockwise from +X) is our yaw = 90 deg -
ANGLE, Doom's PITCH (degrees, positive looking down) is our pitch = -PITCH; the camera sits at
POSITION_Z + VIEW_HEIGHT. ``true_pose`` is that pose expressed in the episode frame: the pose at
the first frame is mapped onto the commanded start pose (the floor under the start is y = 0, the
start heading is +z), so commanded and true poses agree at frame 0 and differ only by what Doom
does differently: momentum (Doom accelerates over ~10 tics and glides after a key is released),
walls, stairs and lifts. The controller's walk speed is Doom's steady walking speed: thrust 25
gives 25 * 2048 / 65536 = 0.78125 units/tic^2 of push against friction 0xE800 / 0x10000, a
terminal speed of 0.78125 / (1 - 0.90625) = 8.33 map units/tic (measured: 7.9 after 30 tics, still
converging), so 2 * 8.33 / 32 = 0.52 world units per frame. Pitch: Doom's free look reaches 32
degrees up and 56 down, so the controller clamps pitch to 32 degrees (``pitch=False``: level
gaze, mouse dy ignored). Doom's software renderer draws pitch as a vertical shear of the image,
not a true rotation.

Seeds vary the start, not the map: after the level starts, the seed turns the player to a random
heading, walks it forward for a random time (up to 2 s, stopping at walls), turns it to another
random heading and waits for it to stand still; frame 0 is taken there. If Doom ends an episode (a walk-over level exit), the item
restarts its map with the same seed, re-anchored at its current commanded pose, and the step
reports it in ``WorldStep.restarted``.

Files: each game's ini goes to a temporary directory (removed on close). vizdoom wants an empty ``_vizdoom/``
directory in the working directory; it is made before any game starts, because engines that start at once race to
make it and the loser crashes.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import struct
import tempfile

import numpy as np
import torch

from worldmodel.actions import ActionSpec
from worldmodel.camera import CameraState, ControllerSpec, rigid_inverse, state_to_pose, yaw_pitch_rotation
from worldmodel.data.splits import DOOM_TRAIN_MAPS
from worldmodel.envs.base import World, WorldError, WorldStep

TICS_PER_FRAME = 2
MAP_UNITS = 32.0  # Doom map units per world unit
WALK_THRUST = 25.0  # Doom's walking forwardmove; running doubles it
EYE_HEIGHT = 41.0 / MAP_UNITS  # Doom's default view height
WALK_SPEED = TICS_PER_FRAME * (WALK_THRUST * 2048 / 65536) / (1 - 0xE800 / 0x10000) / MAP_UNITS
MAX_PITCH = math.radians(32.0)  # Doom's free look: 32 degrees up (56 down)
START_TICS = 14  # tics Doom runs before the player can move (spawn freeze)
SETTLE_TICS = 40  # after the seeded start walk: momentum decays to ~2%
RESOLUTIONS = {(120, 160): "RES_160X120", (125, 200): "RES_200X125", (150, 200): "RES_200X150",
               (144, 256): "RES_256X144", (160, 256): "RES_256X160", (192, 256): "RES_256X192",
               (240, 320): "RES_320X240", (180, 320): "RES_320X180", (200, 320): "RES_320X200"}
VARIABLES = ("POSITION_X", "POSITION_Y", "POSITION_Z", "ANGLE", "PITCH", "VIEW_HEIGHT")
BUTTONS = ("MOVE_FORWARD_BACKWARD_DELTA", "MOVE_LEFT_RIGHT_DELTA", "TURN_LEFT_RIGHT_DELTA", "LOOK_UP_DOWN_DELTA")


def import_vizdoom():
    try:
        import vizdoom
    except ImportError as e:
        raise WorldError(f"the doom world needs the vizdoom package (pip install vizdoom): {e}") from None
    return vizdoom


def default_wad() -> str:
    return os.path.join(os.path.dirname(import_vizdoom().__file__), "freedoom2.wad")


def wad_maps(path: str) -> list[str]:
    """Names of the maps (MAPxx / ExMy lumps) in a WAD file."""
    try:
        with open(path, "rb") as f:
            kind, count, offset = struct.unpack("<4sii", f.read(12))
            if kind not in (b"IWAD", b"PWAD"):
                raise WorldError(f"{path} is not a WAD file")
            f.seek(offset)
            directory = f.read(16 * count)
    except (OSError, struct.error) as e:
        raise WorldError(f"cannot read the WAD {path}: {e}") from None
    names = [directory[i + 8 : i + 16].rstrip(b"\0").decode("ascii", "replace") for i in range(0, len(directory), 16)]
    return [n for n in names if (n.startswith("MAP") and n[3:].isdigit()) or (len(n) == 4 and n[0] == "E" and n[2] == "M")]


def doom_to_world(variables: np.ndarray) -> torch.Tensor:
    """Doom's camera poses in world units and our axes, world-from-camera float64 ``[n, 4, 4]``.

    variables ``[n, 6]``: POSITION_X, POSITION_Y, POSITION_Z, ANGLE, PITCH, VIEW_HEIGHT.
    """
    v = torch.as_tensor(variables, dtype=torch.float64)
    x, y, z, angle, pitch, view = v.unbind(-1)
    pose = torch.zeros(v.shape[0], 4, 4, dtype=torch.float64)
    pose[:, :3, :3] = yaw_pitch_rotation(math.pi / 2 - torch.deg2rad(angle), -torch.deg2rad(pitch))
    pose[:, :3, 3] = torch.stack([x, -(z + view), y], -1) / MAP_UNITS
    pose[:, 3, 3] = 1.0
    return pose


def wrap_degrees(a: np.ndarray) -> np.ndarray:
    return (a + 180.0) % 360.0 - 180.0


class DoomGames:
    """Doom games run in this process: the engine side of DoomWorld (also what a worker runs)."""

    def __init__(self, maps: list[str], wad: str, resolution: str, pitch: bool):
        vzd = import_vizdoom()
        self.games = []
        self.config_dir = tempfile.mkdtemp(prefix="worldmodel-doom-")  # Doom's ini goes here, not into the cwd
        # made here first: vizdoom's init() makes it unless it exists, and of collectors starting at once one crashed
        # ("Failed to create ./_vizdoom/ directory: File exists", then a segfault)
        os.makedirs("_vizdoom", exist_ok=True)
        try:
            for n, name in enumerate(maps):
                game = vzd.DoomGame()
                game.set_doom_game_path(wad)
                game.set_doom_config_path(os.path.join(self.config_dir, f"game{n}.ini"))
                game.set_doom_map(name)
                game.set_window_visible(False)
                game.set_screen_resolution(getattr(vzd.ScreenResolution, resolution))
                game.set_screen_format(vzd.ScreenFormat.RGB24)
                game.set_render_hud(False)
                game.set_render_crosshair(False)
                game.set_render_weapon(False)
                game.set_render_messages(False)
                game.set_render_screen_flashes(False)
                game.set_episode_timeout(0)
                game.set_episode_start_time(START_TICS)
                game.add_game_args(f"+sv_nomonsters 1 +movebob 0 +sv_cheats 1 +freelook {int(pitch)}")
                game.set_available_buttons([getattr(vzd.Button, b) for b in BUTTONS])
                game.set_available_game_variables([getattr(vzd.GameVariable, v) for v in VARIABLES])
                game.set_mode(vzd.Mode.PLAYER)
                game.init()
                self.games.append(game)
        except Exception as e:
            self.close()
            raise WorldError(f"vizdoom could not start ({type(e).__name__}: {e})") from None

    def observe(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        state = self.games[i].get_state()
        return state.screen_buffer, np.asarray(state.game_variables, dtype=np.float64)

    def reset(self, items: list[int], seeds: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """New episodes; the seed turns the player and walks it a little before frame 0."""
        out = []
        for i, seed in zip(items, seeds):
            game = self.games[i]
            game.set_seed(seed % 2**31)
            game.new_episode()
            game.send_game_command("god")
            rng = np.random.default_rng(seed)
            turn, walk, look = rng.uniform(-180, 180), int(rng.integers(0, 71)), rng.uniform(-180, 180)
            game.make_action([0.0, 0.0, turn, 0.0], 1)
            if walk:
                game.make_action([WALK_THRUST, 0.0, 0.0, 0.0], walk)
            game.make_action([0.0, 0.0, look, 0.0], 1)  # then face anywhere (not only the wall it walked into)
            game.make_action([0.0, 0.0, 0.0, 0.0], SETTLE_TICS)
            out.append(self.observe(i))
        return out

    def act(self, items: list[int], buttons: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, bool]]:
        """Hold ``buttons [n, 4]`` (per tic) for one frame in each game; (screen, variables, finished)."""
        out = []
        for i, b in zip(items, buttons):
            game = self.games[i]
            game.make_action([float(v) for v in b], TICS_PER_FRAME)
            if game.is_episode_finished():
                out.append((None, None, True))
            else:
                out.append((*self.observe(i), False))
        return out

    def close(self):
        for game in self.games:
            game.close()
        self.games = []
        shutil.rmtree(self.config_dir, ignore_errors=True)


def serve(conn, maps, wad, resolution, pitch):
    """Worker process: run DoomGames over a pipe until told to close."""
    try:
        games = DoomGames(maps, wad, resolution, pitch)
    except WorldError as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ready", None))
    while True:
        command, args = conn.recv()
        if command == "close":
            games.close()
            conn.send(("closed", None))
            return
        try:
            conn.send(("ok", getattr(games, command)(*args)))
        except Exception as e:  # report, do not die silently
            conn.send(("error", f"{type(e).__name__}: {e}"))


class Worker:
    """A process running DoomGames for some batch items."""

    def __init__(self, maps, wad, resolution, pitch):
        self.conn, child = mp.get_context("spawn").Pipe()
        self.process = mp.get_context("spawn").Process(target=serve, args=(child, maps, wad, resolution, pitch),
                                                       daemon=True)
        self.process.start()

    def ready(self):
        self.receive()

    def send(self, command: str, *args):
        self.conn.send((command, args))

    def receive(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise WorldError("a vizdoom worker process died") from None
        if status == "error":
            raise WorldError(f"vizdoom worker: {value}")
        return value

    def close(self):
        if self.process.is_alive():
            try:
                self.send("close")
                self.receive()
            except (WorldError, OSError, BrokenPipeError):
                pass
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()


class DoomWorld(World):
    """ViZDoom behind the World interface; see the module docstring.

    Options: ``maps`` (names in the WAD, default the training split's; item i plays ``maps[i % len(maps)]``),
    ``height``/``width`` (a ViZDoom resolution, default 120x160), ``workers`` (0: games in this process;
    n: spread over n processes), ``pitch`` (free look), ``wad`` (default: vizdoom's freedoom2.wad). ``device`` is
    accepted for a uniform interface; Doom renders on the CPU. ``controller`` overrides the commanded
    motion only: Doom itself always moves at its own walking/running speed.
    """

    name = "doom"
    fps = 35.0 / TICS_PER_FRAME

    def __init__(self, batch: int = 1, height: int = 120, width: int = 160, maps=None, workers: int = 0,
                 pitch: bool = True, wad: str | None = None, device="cpu", action_spec: ActionSpec | None = None,
                 controller: ControllerSpec | None = None):
        controller = controller or ControllerSpec(walk_speed=WALK_SPEED, sprint_factor=2.0,
                                                  max_pitch=MAX_PITCH if pitch else 0.0, eye_height=EYE_HEIGHT)
        super().__init__(batch, height, width, action_spec or ActionSpec(), controller)
        if (height, width) not in RESOLUTIONS:
            raise WorldError(f"doom renders at {height}x{width}? choose one of "
                             f"{sorted(f'{h}x{w}' for h, w in RESOLUTIONS)} (height x width)")
        wad = wad or default_wad()
        available = wad_maps(wad)
        maps = [str(m).upper() for m in (DOOM_TRAIN_MAPS if maps is None else ([maps] if isinstance(maps, str) else maps))]
        unknown = [m for m in maps if m not in available]
        if not maps or unknown:
            raise WorldError(f"unknown maps {unknown or maps} for {os.path.basename(wad)}; it has {available}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise WorldError(f"workers must be a non-negative integer, got {workers!r}")
        self.maps = [maps[i % len(maps)] for i in range(batch)]
        self.pitch = pitch
        self.keys = {k: action_spec_index(self.action_spec, k) for k in ("W", "A", "S", "D", "SHIFT")}
        self.workers, self.games = [], None
        if workers == 0:
            self.games = DoomGames(self.maps, wad, RESOLUTIONS[height, width], pitch)
            self.shares = [list(range(batch))]
        else:
            self.shares = [list(part) for part in np.array_split(np.arange(batch), min(workers, batch))]
            try:
                for share in self.shares:
                    self.workers.append(Worker([self.maps[i] for i in share], wad, RESOLUTIONS[height, width], pitch))
                for w in self.workers:
                    w.ready()
            except WorldError:
                self.close()
                raise
        self.seeds: list[int] | None = None
        self.anchor: torch.Tensor | None = None  # [B, 4, 4] episode-from-Doom transform
        self.doom_pose: torch.Tensor | None = None  # [B, 4, 4] Doom's camera pose (our axes, world units)
        self.variables: np.ndarray | None = None  # [B, 6] Doom's last game variables

    def _call(self, command: str, items: list[int], per_item: list) -> list:
        """Run ``command`` for batch ``items`` (with one argument each) on whichever side holds them."""
        if self.games is not None:
            return getattr(self.games, command)(items, per_item)
        where = {item: (w, share.index(item)) for w, share in enumerate(self.shares) for item in share}
        jobs = {}
        for n, item in enumerate(items):
            w, local = where[item]
            jobs.setdefault(w, []).append((n, local))
        for w, job in jobs.items():
            arg = [per_item[n] for n, _ in job]
            self.workers[w].send(command, [local for _, local in job], np.stack(arg) if command == "act" else arg)
        out = [None] * len(items)
        for w, job in jobs.items():
            for (n, _), result in zip(job, self.workers[w].receive()):
                out[n] = result
        return out

    def _reset(self, seeds):
        self.seeds = seeds
        results = self._call("reset", list(range(self.batch)), seeds)
        frames = np.stack([screen for screen, _ in results])
        self.variables = np.stack([v for _, v in results])
        self.doom_pose = doom_to_world(self.variables)
        self.anchor = self.level_pose() @ rigid_inverse(self.doom_pose)
        return self._result(frames, torch.zeros(self.batch, dtype=torch.bool))

    def level_pose(self) -> torch.Tensor:
        """The commanded pose with its pitch dropped ``[B, 4, 4]``: where a (level) Doom spawn is anchored."""
        c = self.commanded
        return state_to_pose(CameraState(c.position, c.yaw, torch.zeros_like(c.pitch)))

    def _buttons(self, actions: torch.Tensor) -> np.ndarray:
        """Per-tic button values ``[B, 4]`` for one frame of ``actions`` (after the commanded state advanced)."""
        a = actions.double().numpy()
        key = lambda k: a[:, self.keys[k]] if self.keys[k] is not None else np.zeros(self.batch)  # noqa: E731
        thrust = WALK_THRUST * (1.0 + key("SHIFT"))
        forward, right = (key("W") - key("S")) * thrust, (key("D") - key("A")) * thrust
        # closed-loop view: ask for the difference between the commanded view and Doom's view
        start_yaw = torch.atan2(self.anchor[:, 0, 2], self.anchor[:, 0, 0])  # rotation of Doom into the episode frame
        target_yaw = (self.commanded.yaw - start_yaw).numpy()  # in Doom's frame, our yaw convention
        target_angle = 90.0 - np.degrees(target_yaw)
        turn = wrap_degrees(self.variables[:, 3] - target_angle) / TICS_PER_FRAME  # positive turns right
        target_pitch = -np.degrees(self.commanded.pitch.numpy())
        look = (self.variables[:, 4] - target_pitch) / TICS_PER_FRAME if self.pitch else np.zeros(self.batch)
        return np.stack([forward, right, turn, look], -1)

    def _step(self, actions):
        results = self._call("act", list(range(self.batch)), list(self._buttons(actions)))
        restarted = torch.tensor([finished for _, _, finished in results])
        if restarted.any():  # a level exit: start the map again, anchored at the current commanded pose
            items = restarted.nonzero()[:, 0].tolist()
            again = self._call("reset", items, [self.seeds[i] for i in items])
            for i, (screen, v) in zip(items, again):
                results[i] = (screen, v, True)
        frames = np.stack([screen for screen, _, _ in results])
        self.variables = np.stack([v for _, v, _ in results])
        self.doom_pose = doom_to_world(self.variables)
        if restarted.any():
            self.anchor[restarted] = (self.level_pose() @ rigid_inverse(self.doom_pose))[restarted]
        return self._result(frames, restarted)

    def _result(self, frames: np.ndarray, restarted: torch.Tensor) -> WorldStep:
        true_pose = (self.anchor @ self.doom_pose).float()
        return WorldStep(torch.from_numpy(frames), self.commanded_pose(), true_pose, restarted)

    def close(self):
        if self.games is not None:
            self.games.close()
            self.games = None
        for w in self.workers:
            w.close()
        self.workers = []


def action_spec_index(spec: ActionSpec, key: str) -> int | None:
    """Index of ``key`` in the action vector, or None when the spec has no such key."""
    return spec.keys.index(key) if key in spec.keys else None
