"""The one on-disk episode format: written by the client's recorder, by collection from worlds, read by training.

An episode is a directory::

    EPISODE/
      meta.json   EpisodeMeta as JSON; written atomically (temp file + rename) when the writer opens,
                  rewritten with the final ``length`` when it closes. ``length`` is null while recording
                  (or after a crash).
      steps.rec   append-only record log: an 12-byte file header (magic ``WMSTEPS\\n``, uint32 version),
                  then one record per step.

Every record is ``header | payload``. The header is ``<4sII``: magic ``STEP``, payload length, CRC32 of
the payload. The payload is::

    <IdHHH  step index, timestamp (float64 seconds), action width A, frame height H, frame width W
    float32 [A]        action (raw: keys 0/1, mouse dx, dy counts)
    float32 [4, 4]     commanded pose (world-from-camera, OpenCV axes)
    float32 [4, 4]     true pose (NaN where the source does not know it)
    bytes              frame uint8 [H, W, 3], zlib-compressed (lossless)

Each record is flushed to the OS as it is appended (a killed process loses at most the record in
flight) and fsynced every ``fsync_every`` records and on close. Reading walks the records and
stops at the first short or corrupt one: the steps before it are returned and a warning says how
many were recovered. Everything else that does not fit (missing or unknown meta, wrong magic,
frame or action shapes that disagree with the meta, records out of order, impossible actions or
timestamps) raises :class:`EpisodeError`.

Recordings are untrusted input: meta.json is size-limited and its nesting depth is bounded, a
frame is decompressed as a stream that stops one byte past the size meta.json gives it (a zlib
bomb costs one frame of memory), and no record may claim more bytes than such a frame can take.
"""

from __future__ import annotations

import json
import math
import mmap
import numbers
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from worldmodel.actions import ActionError, ActionSpec, validate_actions
from worldmodel.camera import ControllerSpec
from worldmodel.files import write_text_atomic

FORMAT_VERSION = 1
META_NAME = "meta.json"
STEPS_NAME = "steps.rec"
FILE_MAGIC = b"WMSTEPS\n"
FILE_HEADER = struct.Struct("<8sI")  # magic, format version
RECORD_MAGIC = b"STEP"
RECORD_HEADER = struct.Struct("<4sII")  # magic, payload length, CRC32 of payload
STEP_HEADER = struct.Struct("<IdHHH")  # step index, timestamp, action width, height, width
POSE_BYTES = 16 * 4
MAX_FRAME_PIXELS = 4096 * 4096
"""The largest frame (height x width) an episode may have."""
MAX_META_BYTES = 1 << 20
"""The largest meta.json a reader accepts."""
META_FIELDS = ("version", "action_spec", "controller", "fps", "height", "width", "source", "seed", "created",
               "length", "extra")
"""The fields of meta.json, in the order written."""
TENSORS = ("frames", "actions", "commanded_poses", "true_poses", "timestamps")
"""The per-step tensors of an :class:`Episode`, in field order."""


class EpisodeError(ValueError):
    """An episode that cannot be written or read as asked."""


class EpisodeRecoveryWarning(UserWarning):
    """An episode whose record log ends early (crash, kill, or truncation); its prefix was read."""


@dataclass(frozen=True)
class EpisodeMeta:
    """Everything needed to interpret an episode's steps."""

    action_spec: ActionSpec
    controller: ControllerSpec
    fps: float
    height: int
    width: int
    source: str  # "procedural" | "doom" | "play" | any other world name
    seed: int | None = None
    extra: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    version: int = FORMAT_VERSION
    length: int | None = None  # number of steps, set when the writer closes

    def __post_init__(self):
        for name in ("height", "width", "seed", "length"):  # numpy integers from worlds become plain ints
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))
        if isinstance(self.fps, numbers.Real) and not isinstance(self.fps, bool):
            object.__setattr__(self, "fps", float(self.fps))
        if not isinstance(self.action_spec, ActionSpec):
            raise EpisodeError(f"meta action_spec must be an ActionSpec, got {type(self.action_spec).__name__}")
        if not isinstance(self.controller, ControllerSpec):
            raise EpisodeError(f"meta controller must be a ControllerSpec, got {type(self.controller).__name__}")
        if not (isinstance(self.fps, float) and math.isfinite(self.fps) and self.fps > 0):
            raise EpisodeError(f"meta fps must be a positive number, got {self.fps!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536):
                raise EpisodeError(f"meta {name} must be an integer in 1..65535, got {value!r}")
        if self.height * self.width > MAX_FRAME_PIXELS:
            raise EpisodeError(f"meta frame size {self.width}x{self.height} exceeds {MAX_FRAME_PIXELS} pixels")
        if not (isinstance(self.source, str) and self.source):
            raise EpisodeError(f"meta source must be a non-empty string, got {self.source!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise EpisodeError(f"meta seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.extra, dict):
            raise EpisodeError(f"meta extra must be a dict, got {type(self.extra).__name__}")
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError) as e:
            raise EpisodeError(f"meta extra must be JSON-serialisable: {e}") from None

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in META_FIELDS}
        return {**d, "action_spec": self.action_spec.to_dict(), "controller": self.controller.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "EpisodeMeta":
        if not isinstance(d, dict):
            raise EpisodeError(f"meta must be a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if not isinstance(version, int):
            raise EpisodeError(f"meta has no integer format version (got {version!r})")
        if version != FORMAT_VERSION:
            raise EpisodeError(f"episode format version {version} is not supported (this reader reads {FORMAT_VERSION})")
        missing = {"action_spec", "controller", "fps", "height", "width", "source"} - set(d)
        if missing:
            raise EpisodeError(f"meta lacks fields {sorted(missing)}")
        unknown = set(d) - set(META_FIELDS)
        if unknown:
            raise EpisodeError(f"meta has unknown fields {sorted(unknown)}")
        try:
            action_spec = ActionSpec.from_dict(d["action_spec"])
            controller = ControllerSpec.from_dict(d["controller"])
        except (ValueError, TypeError, AttributeError) as e:
            raise EpisodeError(f"meta action_spec/controller invalid: {e}") from None
        length = d.get("length")
        if length is not None and not (isinstance(length, int) and length >= 0):
            raise EpisodeError(f"meta length must be a non-negative integer or null, got {length!r}")
        return cls(action_spec, controller, d["fps"], d["height"], d["width"], d["source"], seed=d.get("seed"),
                   extra=d.get("extra", {}), created=d.get("created", ""), version=version, length=length)


@dataclass
class Episode:
    """Steps of an episode in memory.

    frames uint8 [T, H, W, 3], actions float32 [T, A], commanded_poses float32 [T, 4, 4],
    true_poses float32 [T, 4, 4] (NaN where unknown), timestamps float64 [T] (seconds).
    ``recovered`` is True when the record log ended early (crash or truncation) and only its
    readable prefix is here.
    """

    frames: torch.Tensor
    actions: torch.Tensor
    commanded_poses: torch.Tensor
    true_poses: torch.Tensor
    timestamps: torch.Tensor
    meta: EpisodeMeta
    recovered: bool = False

    def __post_init__(self):
        t = self.frames.shape[0]
        m = self.meta
        expected = {
            "frames": (t, m.height, m.width, 3),
            "actions": (t, m.action_spec.width),
            "commanded_poses": (t, 4, 4),
            "true_poses": (t, 4, 4),
            "timestamps": (t,),
        }
        if self.frames.dtype != torch.uint8:
            raise EpisodeError(f"episode frames must be uint8, got {self.frames.dtype}")
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise EpisodeError(f"episode {name} has shape {got}, expected {shape} (T = {t} frames)")

    def __len__(self) -> int:
        return self.frames.shape[0]

    def __getitem__(self, index: slice) -> "Episode":
        """A clip: ``episode[start:stop]`` (slices only)."""
        if not isinstance(index, slice):
            raise TypeError(f"episodes are sliced into clips with a slice, got {type(index).__name__}")
        return replace(self, **{name: getattr(self, name)[index] for name in TENSORS})


def _as_numpy(x, dtype, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if dtype == np.uint8 and arr.dtype != np.uint8:
        raise EpisodeError(f"{name} must be uint8, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


class EpisodeWriter:
    """Append steps to a new episode directory; use as a context manager.

    ``append`` validates each step against the meta and flushes it to the OS. Refuses to write into
    an existing episode. Not thread-safe: one writer per thread.
    """

    def __init__(self, path, meta: EpisodeMeta, fsync_every: int = 100, compress_level: int = 6):
        self.path = Path(path)
        if meta.length is not None:
            meta = replace(meta, length=None)
        self.meta = meta
        self.fsync_every = fsync_every
        self.compress_level = compress_level
        self.length = 0
        self._last_timestamp = -math.inf
        if (self.path / META_NAME).exists() or (self.path / STEPS_NAME).exists():
            raise EpisodeError(f"an episode already exists at {self.path}; refusing to overwrite it")
        if self.path.exists() and not self.path.is_dir():
            raise EpisodeError(f"{self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._file = open(self.path / STEPS_NAME, "xb")
        except FileExistsError:
            raise EpisodeError(f"an episode already exists at {self.path}; refusing to overwrite it") from None
        self._file.write(FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION))
        self._file.flush()
        write_text_atomic(self.path / META_NAME, json.dumps(meta.to_dict(), indent=2) + "\n")

    @property
    def closed(self) -> bool:
        return self._file.closed

    def append(self, frame, action, commanded_pose, true_pose=None, timestamp: float | None = None) -> None:
        """Write one step: frame uint8 [H, W, 3], action [A], poses [4, 4] (true_pose None = unknown).

        ``timestamp`` in seconds, non-decreasing; None means ``step / fps``.
        """
        if self.closed:
            raise EpisodeError(f"episode writer for {self.path} is closed")
        m = self.meta
        frame = _as_numpy(frame, np.uint8, "frame")
        if frame.shape != (m.height, m.width, 3):
            raise EpisodeError(f"frame has shape {frame.shape}, the episode meta says {(m.height, m.width, 3)}")
        try:
            action_t = validate_actions(torch.as_tensor(_as_numpy(action, np.float32, "action")), m.action_spec)
        except ActionError as e:
            raise EpisodeError(f"step {self.length}: {e}") from None
        if action_t.shape != (m.action_spec.width,):
            raise EpisodeError(f"action must have shape ({m.action_spec.width},), got {tuple(action_t.shape)}")
        commanded = _as_numpy(commanded_pose, np.float32, "commanded_pose")
        true = np.full((4, 4), np.nan, np.float32) if true_pose is None else _as_numpy(true_pose, np.float32, "true_pose")
        for name, pose in (("commanded_pose", commanded), ("true_pose", true)):
            if pose.shape != (4, 4):
                raise EpisodeError(f"{name} must have shape (4, 4), got {pose.shape}")
        if not np.isfinite(commanded).all():
            raise EpisodeError(f"step {self.length}: commanded_pose contains NaN or infinite values")
        timestamp = self.length / m.fps if timestamp is None else float(timestamp)
        if not math.isfinite(timestamp) or timestamp < self._last_timestamp:
            raise EpisodeError(
                f"step {self.length}: timestamp {timestamp} must be finite and not before the previous one "
                f"({self._last_timestamp})"
            )
        payload = b"".join((
            STEP_HEADER.pack(self.length, timestamp, m.action_spec.width, m.height, m.width),
            action_t.numpy().tobytes(),
            commanded.tobytes(),
            true.tobytes(),
            zlib.compress(frame.tobytes(), self.compress_level),
        ))
        self._file.write(RECORD_HEADER.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload)
        self._file.flush()
        self.length += 1
        self._last_timestamp = timestamp
        if self.length % self.fsync_every == 0:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Fsync the steps and record the final length in meta.json. Idempotent."""
        if self.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        self.meta = replace(self.meta, length=self.length)
        write_text_atomic(self.path / META_NAME, json.dumps(self.meta.to_dict(), indent=2) + "\n")

    def __enter__(self) -> "EpisodeWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_meta(path) -> EpisodeMeta:
    """The meta of the episode at ``path`` (a directory), validated."""
    path = Path(path)
    if not path.is_dir():
        raise EpisodeError(f"no episode at {path}: not a directory")
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise EpisodeError(f"no episode at {path}: {META_NAME} is missing")
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise EpisodeError(f"{meta_path} is larger than {MAX_META_BYTES} bytes")
    try:
        data = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EpisodeError(f"{meta_path} is not valid JSON: {e}") from None
    except RecursionError:
        raise EpisodeError(f"{meta_path} is nested too deeply to be an episode meta") from None
    return EpisodeMeta.from_dict(data)


class EpisodeFile:
    """Random access to the steps of an episode on disk, without holding them in memory.

    Opening walks the record log once (checking magic, lengths and CRC32) and keeps only the byte
    offset of each record, so reading a clip is one seek and one read. Picklable (holds no open file).
    Attributes: path, meta, offsets int64 [T + 1] (record starts, then the end of the last good
    record), recovered (the log ended early), dropped_bytes (bytes after the last good record).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        steps_path = self.path / STEPS_NAME
        if not steps_path.is_file():
            raise EpisodeError(f"episode {self.path} has no {STEPS_NAME}")
        with open(steps_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < FILE_HEADER.size:
                raise EpisodeError(f"episode {self.path}: {STEPS_NAME} is too short to hold its file header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                self.offsets, problem = _scan_records(data, self.path, _max_payload(self.meta))
        self.dropped_bytes = size - int(self.offsets[-1])
        n = len(self)
        if self.meta.length is not None and n > self.meta.length:
            raise EpisodeError(
                f"episode {self.path}: meta.json says {self.meta.length} steps but the record log holds {n}"
            )
        short_of_meta = self.meta.length is not None and n < self.meta.length
        self.recovered = problem is not None or short_of_meta
        if self.recovered:
            expected = f" of {self.meta.length}" if self.meta.length is not None else ""
            reason = problem or "the record log is shorter than meta.json says"
            warnings.warn(
                f"episode {self.path}: {reason}; recovered {n}{expected} steps", EpisodeRecoveryWarning, stacklevel=2
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def status(self) -> str:
        """One line: complete, still open / crashed, or truncated, with step counts."""
        n, m = len(self), self.meta.length
        if m is None:
            state = "not closed (still recording, or the writer was killed)"
        elif n < m:
            state = f"truncated: meta.json says {m} steps"
        else:
            state = "complete"
        dropped = f"; {self.dropped_bytes} bytes after the last good record ignored" if self.dropped_bytes else ""
        return f"{state}; {n} steps readable{dropped}"

    def _records(self, start: int, stop: int):
        """Decoded steps ``start:stop`` (see :func:`_decode_step`), each checked; the first bad one raises."""
        with open(self.path / STEPS_NAME, "rb") as f:
            f.seek(int(self.offsets[start]))
            data = f.read(int(self.offsets[stop] - self.offsets[start]))
        base, previous = int(self.offsets[start]), -math.inf
        for i in range(start, stop):
            step = _decode_step(data, int(self.offsets[i]) - base, int(self.offsets[i + 1]) - base, i, self.meta,
                                self.path, previous)
            previous = step[-1]
            yield step

    def check(self) -> None:
        """Decode every readable record (frames included) and raise EpisodeError at the first one that
        is out of order, holds an impossible action, pose or timestamp, or a frame that does not decode."""
        for _ in self._records(0, len(self)):
            pass

    def read(self, start: int = 0, stop: int | None = None) -> Episode:
        """Steps ``start:stop`` as an :class:`Episode` (decodes only those records)."""
        n = len(self)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise EpisodeError(f"episode {self.path}: steps {start}:{stop} out of range 0:{n}")
        steps = list(self._records(start, stop))
        m = self.meta
        if steps:
            frames, actions, commanded, true, times = (np.stack(x) for x in zip(*steps))
        else:
            frames = np.zeros((0, m.height, m.width, 3), np.uint8)
            actions = np.zeros((0, m.action_spec.width), np.float32)
            commanded = true = np.zeros((0, 4, 4), np.float32)
            times = np.zeros((0,), np.float64)
        tensors = (torch.from_numpy(a) for a in (frames, actions, commanded, true, times))
        return Episode(*tensors, meta=m, recovered=self.recovered)


def _max_payload(meta: EpisodeMeta) -> int:
    """The most bytes a record of this episode can hold: its header, the widest action the header can
    state (the width is checked when the step is decoded), poses and an incompressible frame (zlib's
    worst case adds 5 bytes per 16 KiB block, plus 6 for the stream)."""
    frame = meta.height * meta.width * 3
    return STEP_HEADER.size + 4 * 0xFFFF + 2 * POSE_BYTES + frame + 5 * (frame // 16384 + 1) + 6


def _scan_records(data, path: Path, max_payload: int) -> tuple[np.ndarray, str | None]:
    """Record offsets int64 [T + 1] of the readable prefix of ``data`` (bytes or an mmap), and why
    reading stopped early (None if it did not)."""
    magic, version = FILE_HEADER.unpack_from(data, 0)
    if magic != FILE_MAGIC:
        raise EpisodeError(f"episode {path}: {STEPS_NAME} has wrong magic {magic!r}, expected {FILE_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise EpisodeError(f"episode {path}: {STEPS_NAME} has format version {version}, this reader reads {FORMAT_VERSION}")
    offsets = [FILE_HEADER.size]
    pos, end, problem = FILE_HEADER.size, len(data), None
    view = memoryview(data)
    while pos < end:
        step = len(offsets) - 1
        if end - pos < RECORD_HEADER.size:
            problem = f"record {step} is cut short in its header"
            break
        magic, length, crc = RECORD_HEADER.unpack_from(data, pos)
        if magic != RECORD_MAGIC:
            problem = f"record {step} at byte {pos} has wrong magic {magic!r}"
            break
        body = pos + RECORD_HEADER.size
        if length > max_payload:
            problem = f"record {step} at byte {pos} claims {length} bytes, more than a step of this episode can hold"
            break
        if end - body < length:
            problem = f"record {step} is cut short ({end - body} of {length} payload bytes)"
            break
        if zlib.crc32(view[body : body + length]) != crc:
            problem = f"record {step} at byte {pos} fails its CRC32 check"
            break
        pos = body + length
        offsets.append(pos)
    return np.asarray(offsets, dtype=np.int64), problem


def _decode_step(data: bytes, start: int, stop: int, step: int, meta: EpisodeMeta, path: Path,
                 previous: float = -math.inf):
    """One record's (frame [H, W, 3], action [A], commanded [4, 4], true [4, 4], timestamp), checked
    against the meta and the ``previous`` step's timestamp."""
    body = start + RECORD_HEADER.size
    if stop - body < STEP_HEADER.size:
        raise EpisodeError(f"episode {path}: record {step} is too short to hold a step")
    index, timestamp, a, h, w = STEP_HEADER.unpack_from(data, body)
    if index != step:
        raise EpisodeError(f"episode {path}: record {step} is labelled step {index} (records out of order)")
    if not (math.isfinite(timestamp) and timestamp >= previous):
        raise EpisodeError(f"episode {path}: step {step} has timestamp {timestamp}, before the previous step's "
                           f"{previous} or not finite")
    if a != meta.action_spec.width:
        raise EpisodeError(
            f"episode {path}: step {step} has action width {a}, the action spec has {meta.action_spec.width} "
            f"({len(meta.action_spec.keys)} keys + mouse dx, dy)"
        )
    if (h, w) != (meta.height, meta.width):
        raise EpisodeError(f"episode {path}: step {step} has a {h}x{w} frame, meta.json says {meta.height}x{meta.width}")
    pos = body + STEP_HEADER.size
    if stop - pos < 4 * a + 2 * POSE_BYTES:
        raise EpisodeError(f"episode {path}: record {step} is too short to hold its action and poses")
    action = np.frombuffer(data, np.float32, a, pos)
    try:
        validate_actions(torch.from_numpy(action.copy()), meta.action_spec)
    except ActionError as e:
        raise EpisodeError(f"episode {path}: step {step} holds an impossible action: {e}") from None
    pos += 4 * a
    commanded = np.frombuffer(data, np.float32, 16, pos).reshape(4, 4)
    if not np.isfinite(commanded).all():
        raise EpisodeError(f"episode {path}: step {step} has a commanded pose with NaN or infinite values")
    true = np.frombuffer(data, np.float32, 16, pos + POSE_BYTES).reshape(4, 4)
    pos += 2 * POSE_BYTES
    frame = _decompress_frame(memoryview(data)[pos:stop], h, w, f"episode {path}: step {step}")
    return frame, action, commanded, true, timestamp


def _decompress_frame(compressed, h: int, w: int, where: str) -> np.ndarray:
    """uint8 [H, W, 3] from zlib ``compressed``, decompressing at most one byte more than that."""
    expected = h * w * 3
    stream = zlib.decompressobj()
    try:
        raw = stream.decompress(compressed, expected + 1)
    except zlib.error as e:
        raise EpisodeError(f"{where} frame does not decompress: {e}") from None
    if len(raw) > expected or stream.unconsumed_tail:
        raise EpisodeError(f"{where} frame decompresses to more than {h}x{w}x3 = {expected} bytes")
    if len(raw) < expected or not stream.eof:
        raise EpisodeError(f"{where} frame holds {len(raw)} bytes, expected {h}x{w}x3 = {expected}")
    return np.frombuffer(raw, np.uint8).reshape(h, w, 3)


def read_episode(path) -> Episode:
    """All readable steps of the episode at ``path``; warns (EpisodeRecoveryWarning) if the log ended early."""
    return EpisodeFile(path).read()
