"""Untrusted input at the real command lines: a corpus of broken and hostile recordings, scripts,
configs, flags and checkpoints, each run as a subprocess (``python -m play``, ``worldmodel.data``,
``worldmodel.checkpoint``, ``train``, ``train.evaluate``) under a memory limit and a timeout. Every one must end with exit
status 2 and exactly one ``error:`` line, no traceback, and leave every input and pre-existing
output file as it was. An omegaconf interpolation in a checkpoint is refused, and the environment
value it asks for appears nowhere."""

import hashlib
import json
import os
import shlex
import subprocess
import sys
import zlib
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from train.bench import write_synthetic
from worldmodel import checkpoint
from worldmodel.data.episode import FILE_HEADER, FILE_MAGIC, RECORD_HEADER, RECORD_MAGIC, STEP_HEADER
from worldmodel.files import TEMP_NAME, remove_stale_temps
from worldmodel.model import build_model
from play.script import parse_script, script_cycle

ROOT = Path(__file__).resolve().parent.parent
MEMORY_BYTES = 3 << 30  # of address space: a decompressed 3 GiB bomb cannot fit
TIMEOUT_S = 60  # per case (SIGALRM in a forked case: status -14)
SECRET = "untrusted-cli-secret-5f1c2e"
ENV = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), UNTRUSTED_SECRET=SECRET,
           CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
BOMB_SIZE = 2048  # frame side of the bomb episode: its 3 GiB bomb fits one record of that frame size


# ----------------------------------------------------------------------------- the corpus


def meta_dict(height=16, width=16, **changes) -> dict:
    meta = {"version": 1, "action_spec": {"keys": ["W", "A", "S", "D", "SHIFT"], "mouse_scale": 0.004},
            "controller": {}, "fps": 20.0, "height": height, "width": width, "source": "test", "seed": 0,
            "created": "", "length": None, "extra": {}}
    return {**meta, **changes}


def step_payload(index, frame_bytes: bytes, height=16, width=16, action=None, timestamp=None, pose=None) -> bytes:
    action = np.zeros(7, np.float32) if action is None else np.asarray(action, np.float32)
    pose = np.eye(4, dtype=np.float32) if pose is None else pose
    return b"".join((STEP_HEADER.pack(index, index / 20 if timestamp is None else timestamp, 7, height, width),
                     action.tobytes(), pose.tobytes(), np.full((4, 4), np.nan, np.float32).tobytes(), frame_bytes))


def record(payload: bytes, length: int | None = None) -> bytes:
    return RECORD_HEADER.pack(RECORD_MAGIC, len(payload) if length is None else length, zlib.crc32(payload)) + payload


def raw_episode(path: Path, records: list[bytes], meta: dict | None = None, header: bytes | None = None) -> Path:
    """An episode directory written byte by byte (the writer refuses to write a bad one)."""
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps(meta or meta_dict()))
    (path / "steps.rec").write_bytes((FILE_HEADER.pack(FILE_MAGIC, 1) if header is None else header) + b"".join(records))
    return path


def frame(height=16, width=16) -> bytes:
    return zlib.compress(bytes(height * width * 3))


def zlib_bomb(gib: int = 3) -> bytes:
    """A valid zlib stream of ``gib`` GiB of zeros in about 1 MB per GiB (full-flushed blocks repeat)."""
    c, zeros = zlib.compressobj(9), bytes(1 << 20)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    return first + block * ((gib << 10) - 2) + c.flush()


def episodes(d: Path) -> None:
    write_synthetic(d / "good", 1, 8, (16, 16))
    good = d / "good" / "ep0000"
    raw_episode(d / "bomb", [record(step_payload(0, zlib_bomb(), BOMB_SIZE, BOMB_SIZE))],
                meta_dict(BOMB_SIZE, BOMB_SIZE, length=1))
    raw_episode(d / "deep_meta", [], header=b"")
    (d / "deep_meta" / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    raw_episode(d / "list_meta", [])
    (d / "list_meta" / "meta.json").write_text("[1, 2, 3]")
    raw_episode(d / "huge_frame", [], meta_dict(65535, 65535))
    raw_episode(d / "bad_fps", [], meta_dict(fps="fast"))
    raw_episode(d / "out_of_order", [record(step_payload(i, frame())) for i in (0, 2, 1)], meta_dict(length=3))
    raw_episode(d / "half_key", [record(step_payload(0, frame(), action=[0.5, 0, 0, 0, 0, 0, 0]))], meta_dict(length=1))
    raw_episode(d / "inf_mouse", [record(step_payload(0, frame(), action=[0, 0, 0, 0, 0, np.inf, 0]))])
    raw_episode(d / "time_back", [record(step_payload(0, frame(), timestamp=5.0)),
                                  record(step_payload(1, frame(), timestamp=1.0))])
    raw_episode(d / "nan_pose", [record(step_payload(0, frame(), pose=np.full((4, 4), np.nan, np.float32)))])
    raw_episode(d / "short_frame", [record(step_payload(0, zlib.compress(b"tiny")))])
    raw_episode(d / "garbage_frame", [record(step_payload(0, b"\x78\x9cnot zlib at all"))])
    raw_episode(d / "bad_magic", [], header=b"PKZIP\x00\x00\x00\x01\x00\x00\x00")
    raw_episode(d / "no_steps", [], header=b"")
    (d / "no_steps" / "steps.rec").unlink()
    (d / "zero_frames").mkdir()
    for name in ("meta.json", "steps.rec"):
        (d / "zero_frames" / name).write_bytes((good / name).read_bytes())
    data = (d / "zero_frames" / "steps.rec").read_bytes()
    (d / "zero_frames" / "steps.rec").write_bytes(data[: FILE_HEADER.size])
    (d / "wrong_keys").mkdir()
    meta = json.loads((good / "meta.json").read_text())
    meta["action_spec"]["keys"] = ["UP", "DOWN", "LEFT", "RIGHT", "FIRE"]
    (d / "wrong_keys" / "meta.json").write_text(json.dumps(meta))
    (d / "wrong_keys" / "steps.rec").write_bytes((good / "steps.rec").read_bytes())


def scripts(d: Path) -> None:
    (d / "dx_huge.txt").write_text("10 W 1e300 0\n")
    (d / "frames_float.txt").write_text("1e29 W 0 0\n")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00garbage\x80")
    (d / "fields.txt").write_text("10 W 0 0 extra\n")
    (d / "key.txt").write_text("10 JUMP 0 0\n")
    (d / "controls.toml").write_text('[keys]\nW = "w"\n')


def checkpoints(d: Path) -> None:
    good = d / "good.safetensors"
    checkpoint.save(good, build_model("tiny", seed=0))
    checkpoint.save(d / "dit.safetensors", build_model("tiny", seed=1), part="dit")
    tensors = load_file(str(good))
    config = checkpoint.read_metadata(good)["config"]

    def write(name, config=config, tensors=tensors, meta=None):
        raw = meta or {"format": "worldmodel", "version": "1", "config": json.dumps(config)}
        save_file(tensors, str(d / name), raw)

    write("interp.safetensors", {**config, "world": "${oc.env:UNTRUSTED_SECRET}"})
    write("deep.safetensors", {**config, "dit": {**config["dit"], "depth": 100_000}})
    write("latent.safetensors", {**config, "dit": {**config["dit"], "latent_height": 999}})
    write("list.safetensors", meta={"format": "worldmodel", "version": "1", "config": "[1, 2]"})
    write("nan.safetensors", tensors={k: v.clone().fill_(float("nan")) if v.is_floating_point() else v
                                      for k, v in tensors.items()})
    (d / "truncated.safetensors").write_bytes(good.read_bytes()[:5000])
    (d / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)


def configs(d: Path) -> None:
    (d / "a_file").write_text("I am a file, not a folder\n")
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, 10):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join(["*" + chr(96 + i)] * 9) + "]\n"
    run = d / "bomb_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(bomb)
    (run / "checkpoints" / "step_000000001.safetensors").write_bytes(b"")
    (d / "out").mkdir()
    for name in ("existing.mp4", "existing.png", "existing.npz", "existing.json", "existing.safetensors"):
        (d / "out" / name).write_bytes(b"pre-existing output " + name.encode())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    episodes(d)
    scripts(d)
    checkpoints(d)
    configs(d)
    (d / "cwd").mkdir()
    return d


PLAY = "play --untrained --preset tiny --threads 1 --fps 20"
HEADLESS = f"{PLAY} --headless --frames 3"
TRAIN = "train autoencoder preset=tiny data.source=recordings data.recordings={d}/good run.steps=1"
FULL_DISK = 64 << 10  # bytes a case may write per file when it plays a full disk
CASES = {
    # recordings: python -m worldmodel.data
    "zlib bomb info": ("worldmodel.data info {d}/bomb", "decompresses to more than"),
    "zlib bomb video keeps --out": ("worldmodel.data video {d}/bomb --out {d}/out/existing.mp4", "decompresses to more than"),
    "meta nested 100k deep": ("worldmodel.data info {d}/deep_meta", "nested too deeply"),
    "meta is a list": ("worldmodel.data info {d}/list_meta", "meta must be a JSON object"),
    "meta frame 65535x65535": ("worldmodel.data info {d}/huge_frame", "exceeds"),
    "meta fps a string": ("worldmodel.data info {d}/bad_fps", "fps must be a positive number"),
    "records out of order": ("worldmodel.data info {d}/out_of_order", "out of order"),
    "key pressed halfway": ("worldmodel.data info {d}/half_key", "impossible action"),
    "infinite mouse": ("worldmodel.data info {d}/inf_mouse", "impossible action"),
    "time runs backwards": ("worldmodel.data info {d}/time_back", "before the previous step"),
    "NaN commanded pose": ("worldmodel.data info {d}/nan_pose", "commanded pose"),
    "frame too short": ("worldmodel.data info {d}/short_frame", "expected 16x16x3"),
    "frame not zlib": ("worldmodel.data sheet {d}/garbage_frame --out {d}/out/existing.png", "does not decompress"),
    "steps wrong magic": ("worldmodel.data info {d}/bad_magic", "wrong magic"),
    "steps missing": ("worldmodel.data info {d}/no_steps", "has no steps.rec"),
    "no frames to export": ("worldmodel.data video {d}/zero_frames --out {d}/out/existing.mp4", "holds no frames"),
    "export parquet": ("worldmodel.data export {d}/good/ep0000 --format parquet", "invalid choice"),
    "export to csv": ("worldmodel.data export {d}/good/ep0000 --out {d}/out/x.csv", "must be an .npz file"),
    "export of a bomb keeps --out": ("worldmodel.data export {d}/bomb --out {d}/out/existing.npz", "decompresses"),
    "sheet scale 1e5": ("worldmodel.data sheet {d}/good/ep0000 --out {d}/s.png --scale 100000", "--scale"),
    "stats nan threshold": ("worldmodel.data stats {d}/good --turn-threshold nan", "turn threshold must be"),
    "stats json under a file": ("worldmodel.data stats {d}/good --json {d}/a_file/s.json", "a_file"),
    "ffmpeg fails, video keeps --out": ("worldmodel.data video {d}/good/ep0000 --out {d}/out/existing.mp4",
                                        "could not be written"),
    "video into /proc": ("worldmodel.data video {d}/good/ep0000 --out /proc/wm-untrusted/v.mp4", "/proc/wm-untrusted"),
    "collect unknown world": ("worldmodel.data collect --world minecraft --episodes 1 --frames 2 --out {d}/c", "minecraft"),
    "collect negative seed": ("worldmodel.data collect --world procedural --episodes 1 --frames 2 --out {d}/c --seed -1",
                              "--seed"),
    "data abbreviated flag": ("worldmodel.data collect --world procedural --episodes 1 --frame 2 --out {d}/c",
                              "did you mean --frames"),
    # the client: python -m play
    "abbreviated --headles": (f"{PLAY} --headles --frames 3 --out {{d}}/v.mp4", "did you mean --headless"),
    "unknown world": (f"{PLAY} --world minecraft", "unknown world 'minecraft'"),
    "fps 1e400": (f"{HEADLESS} --fps 1e400 --out {{d}}/v.mp4", "--fps"),
    "scale 1e5": (f"{HEADLESS} --scale 100000 --out {{d}}/v.mp4", "--scale"),
    "threads 0": (f"{HEADLESS} --threads 0 --out {{d}}/v.mp4", "--threads"),
    "device tpu": (f"{HEADLESS} --device tpu --out {{d}}/v.mp4", "--device"),
    "seed 1e30": (f"{HEADLESS} --seed 1e30 --out {{d}}/v.mp4", "--seed"),
    "headless --controls": (f"{HEADLESS} --controls {{d}}/controls.toml --out {{d}}/out/existing.mp4", "--controls"),
    "script dx 1e300": (f"{HEADLESS} --script {{d}}/dx_huge.txt --out {{d}}/out/existing.mp4", "dx_huge.txt:1"),
    "script frames 1e29": (f"{HEADLESS} --script {{d}}/frames_float.txt --out {{d}}/v.mp4", "frame count"),
    "script binary": (f"{HEADLESS} --script {{d}}/binary.txt --out {{d}}/v.mp4", "cannot be read"),
    "script five fields": (f"{HEADLESS} --script {{d}}/fields.txt --out {{d}}/v.mp4", "expected 'FRAMES KEYS DX DY'"),
    "script unknown key": (f"{HEADLESS} --script {{d}}/key.txt --out {{d}}/v.mp4", "unknown key 'JUMP'"),
    "replay a bomb keeps --out": (f"{PLAY} --headless --replay {{d}}/bomb --out {{d}}/out/existing.mp4", "decompresses"),
    "replay other keys": (f"{PLAY} --headless --replay {{d}}/wrong_keys --out {{d}}/out/existing.mp4", "has actions"),
    "record into a file": (f"{HEADLESS} --record {{d}}/a_file", "is a file"),
    "record into /proc keeps --out": (f"{HEADLESS} --record /proc/wm-untrusted --out {{d}}/out/existing.mp4",
                                      "/proc/wm-untrusted"),
    "disk full while recording": (f"{PLAY} --headless --frames 200 --record {{d}}/full", "File too large"),
    "ffmpeg fails, headless keeps --out": (f"{HEADLESS} --out {{d}}/out/existing.mp4", "could not be written"),
    "checkpoint depth 100000": ("play --checkpoint {d}/deep.safetensors --headless --frames 2 --out {d}/v.mp4",
                                "depth must be between"),
    "checkpoint NaN weights": ("play --checkpoint {d}/nan.safetensors --headless --frames 2 --out {d}/out/existing.mp4",
                               "NaN"),
    "checkpoint latent size not the autoencoder's": (
        "play --checkpoint {d}/latent.safetensors --headless --frames 2 --out {d}/v.mp4",
        "dit.latent_height is 999 but the autoencoder"),
    "checkpoint config a list": ("play --checkpoint {d}/list.safetensors --headless --frames 2 --out {d}/v.mp4",
                                 "must be a mapping"),
    "export a truncated recording": ("play export {d}/zero_frames --out {d}/out/existing.mp4", "holds no frames"),
    # training: python -m train, python -m train.evaluate
    "batch abc at --print-config": ("train teacher data.batch=abc --print-config", "data.batch must be int"),
    "steps zero": ("train teacher run.steps=0 --print-config", "run.steps must be"),
    "run.device tpu": ("train teacher run.device=tpu --print-config", "run.device must be"),
    "preset outside configs": ("train teacher preset=../../../etc/passwd --print-config", "unknown model preset"),
    "train abbreviated flag": ("train teacher --print-conf", "did you mean --print-config"),
    "run.dir is a file": (f"{TRAIN} run.dir={{d}}/a_file", "a_file"),
    "run.dir is a file at --print-config": ("train teacher run.dir={d}/a_file --print-config", "is a file, not a folder"),
    "alias bomb in the run config": (f"{TRAIN} run.dir={{d}}/bomb_run", "cannot read config"),
    "evaluate a truncated checkpoint": ("train.evaluate {d}/truncated.safetensors --world procedural --out {d}/eval",
                                        "corrupt or truncated"),
    "evaluate a pickle": ("train.evaluate {d}/pickle.safetensors --world procedural --out {d}/eval",
                          "not a valid safetensors"),
    # DiT-only checkpoints: python -m worldmodel.checkpoint
    "join with another autoencoder keeps OUT": (
        "worldmodel.checkpoint join {d}/dit.safetensors {d}/good.safetensors {d}/out/existing.safetensors", "are not those"),
    "play a DiT-only file": ("play --checkpoint {d}/dit.safetensors --headless --frames 2 --out {d}/v.mp4",
                             "holds only the DiT and needs an autoencoder"),
    "split an interpolating checkpoint keeps OUT": (
        "worldmodel.checkpoint dit-only {d}/interp.safetensors {d}/out/existing.safetensors", "omegaconf interpolation"),
}
LIMITS = {"disk full while recording": FULL_DISK}
ENVIRONMENTS = {name: {"IMAGEIO_FFMPEG_EXE": "/bin/false"} for name in CASES if name.startswith("ffmpeg fails")}
AS_PROCESSES = ("zlib bomb info", "replay a bomb keeps --out", "batch abc at --print-config", "evaluate a pickle")
"""Cases also run as plain ``python -m`` processes, to show the fork server runs the CLIs as they are."""


def serve() -> None:
    """Fork server: import the CLIs once, then run each job of the JSON list on stdin in a forked child
    as ``python -m MODULE ARGS`` would (``runpy``), at most two at once, under the memory limit (and the
    job's file-size limit, SIGXFSZ ignored so that a full disk is an OSError) and the timeout. Prints
    one JSON line ``[job index, exit status]`` per finished job (status -N: killed by signal N)."""
    import resource
    import runpy
    import signal
    import traceback

    # the CLIs' dependencies, imported once here, not in every child (the CLI modules themselves are
    # left to runpy, which would warn about running a module that is already imported)
    import imageio.v2  # noqa: F401
    import play.cli  # noqa: F401
    import train.trainer  # noqa: F401
    import worldmodel.data.stats  # noqa: F401
    import worldmodel.metrics  # noqa: F401
    import worldmodel.session  # noqa: F401

    jobs, running = json.load(sys.stdin), {}

    def child(job) -> int:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
        if job["fsize"]:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
        signal.alarm(TIMEOUT_S)
        os.environ.update(job["env"])
        os.chdir(job["cwd"])
        for fd, name in ((1, job["out"]), (2, job["err"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [job["module"], *job["args"]]
        try:
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            return 1
        return 0

    def reap() -> None:
        pid, status = os.wait()
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps([running.pop(pid), code]), flush=True)

    for index, job in enumerate(jobs):
        while len(running) >= 2:
            reap()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(job)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        running[pid] = index
    while running:
        reap()


def run_forked(cases: list[str], d: Path) -> list[tuple[int, str, str]]:
    """(status, stdout, stderr) of each ``"MODULE ARGS"`` case (a CASES key or a command line), run by :func:`serve`."""
    logs = d / "logs"
    logs.mkdir(exist_ok=True)
    jobs = []
    for i, case in enumerate(cases):
        module, *args = shlex.split(CASES.get(case, (case,))[0].format(d=d))
        jobs.append({"module": module, "args": args, "cwd": str(d / "cwd"), "fsize": LIMITS.get(case),
                     "env": ENVIRONMENTS.get(case, {}), "out": str(logs / f"{i}.out"), "err": str(logs / f"{i}.err")})
    server = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
                                    f"from test_untrusted_cli import serve; serve()"]
    done = subprocess.run(server, input=json.dumps(jobs), capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=len(jobs) * TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    status = dict(json.loads(line) for line in done.stdout.splitlines())
    return [(status[i], Path(j["out"]).read_text(), Path(j["err"]).read_text()) for i, j in enumerate(jobs)]


def run_process(line: str, d: Path) -> tuple[int, str, str]:
    """(status, stdout, stderr) of ``python -m MODULE ARGS`` under the memory limit and the timeout."""
    python = f"exec {shlex.quote(sys.executable)} -m {line.format(d=d)}"
    try:
        r = subprocess.run(["bash", "-c", f"ulimit -v {MEMORY_BYTES >> 10}; {python}"], cwd=d / "cwd", env=ENV,
                           capture_output=True, text=True, timeout=TIMEOUT_S)
        return r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired:
        return -1, "", "timed out"


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*")
            if p.is_file() and p.parent.name != "logs"}


@pytest.fixture(scope="module")
def results(corpus):
    """Every case's (status, stdout, stderr) forked and as a process, and the corpus files before and after."""
    before = snapshot(corpus)
    with ThreadPool(2) as pool:
        processes = pool.map_async(lambda name: run_process(CASES[name][0], corpus), AS_PROCESSES)
        forked = run_forked(list(CASES), corpus)
        processes = dict(zip(AS_PROCESSES, processes.get()))
    return dict(zip(CASES, forked)), processes, before, snapshot(corpus)


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40


def check_one_error_line(status: int, stderr: str, message: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert status == 2 and len(errors) == 1, (status, stderr[-3000:])
    assert message in errors[0], errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_gives_one_error_line(results, case):
    status, _, stderr = results[0][case]
    check_one_error_line(status, stderr, CASES[case][1])


@pytest.mark.parametrize("case", AS_PROCESSES)
def test_python_dash_m_behaves_as_the_forked_cli(results, case):
    forked, processes = results[0][case], results[1][case]
    check_one_error_line(processes[0], processes[2], CASES[case][1])
    assert processes[2] == forked[2]


def test_inputs_and_existing_outputs_are_unchanged(results):
    _, _, before, after = results
    changed = sorted(name for name, digest in before.items() if after.get(name) != digest)
    temps = sorted(name for name in after if TEMP_NAME.fullmatch(Path(name).name))
    assert not changed and not temps, (changed, temps)


def test_checkpoint_interpolation_is_refused_and_leaks_nothing(corpus, tmp_path):
    """``${oc.env:...}`` in a checkpoint's config is refused by every tool that loads one, and the
    variable's value appears in no output, file or message."""
    interp = corpus / "interp.safetensors"
    out = tmp_path / "out"
    cases = [
        f"play --checkpoint {interp} --headless --frames 2 --record {out}/rec --out {out}/v.mp4 --threads 1",
        f"train teacher preset=tiny init.autoencoder={interp} run.dir={out}/run data.source=recordings "
        f"data.recordings={corpus}/good run.steps=1",
        f"train.evaluate {interp} --world procedural --out {out}/eval",
    ]
    for line, (status, stdout, stderr) in zip(cases, run_forked(cases, corpus)):
        check_one_error_line(status, stderr, "interpolation")
        assert SECRET not in stdout + stderr, line
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(SECRET.encode() in p.read_bytes() for p in written), written


def test_script_actions_are_lazy():
    """A segment of 10^29 frames costs one tensor, not a list of them."""
    from worldmodel.actions import ActionSpec

    spec = ActionSpec()
    actions = script_cycle(parse_script(f"{10**29} W 3 0\n1 - 0 0\n", spec), spec)
    first = [next(actions) for _ in range(5)]
    assert all(torch.equal(a, first[0]) for a in first) and first[0][0] == 1 and first[0][-2] == 3


def test_stale_temp_files_of_other_processes_are_removed(tmp_path):
    killed = [tmp_path / ".step_000000010.safetensors.tmp4242", tmp_path / ".model.tmp4242.safetensors"]
    mine, kept = tmp_path / f".config.tmp{os.getpid()}.yaml", tmp_path / "step_000000010.safetensors"
    for p in killed + [mine, kept]:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(killed)
    assert mine.exists() and kept.exists() and not any(p.exists() for p in killed)


def test_npz_export_holds_actions_poses_and_timestamps(corpus, tmp_path):
    from worldmodel.data.__main__ import main
    from worldmodel.data.episode import read_episode

    out = tmp_path / "ep.npz"
    assert main(["export", str(corpus / "good" / "ep0000"), "--format", "npz", "--out", str(out)]) == 0
    episode, data = read_episode(corpus / "good" / "ep0000"), np.load(out)  # plain arrays: no pickle needed
    for key in ("actions", "commanded_poses", "true_poses", "timestamps"):
        assert np.array_equal(data[key], getattr(episode, key).numpy(), equal_nan=True)
    assert list(data["keys"]) == list(episode.meta.action_spec.keys)
    assert json.loads(str(data["meta"]))["fps"] == episode.meta.fps


def test_stage_help_lists_the_stage_keys_one_line_each(capsys):
    from train.__main__ import main

    assert main(["teacher", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split("=", 1)[0].strip() for line in lines if line.startswith("  ")]
    assert {"run.steps", "data.batch", "flow.shift", "init.autoencoder"} <= set(keys) and len(keys) == len(set(keys))
    assert any(line.strip().startswith("init.autoencoder=??? (required)") for line in lines)
