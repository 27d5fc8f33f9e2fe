"""Partial checkpoints. DiT-only: the DiT alone (no autoencoder tensors) with the fingerprint of its autoencoder,
loaded only joined with that autoencoder, validated like a full checkpoint; the command line that
splits and joins them, and the AR teacher stage starting from a joined file. Autoencoder-only: a latent space
carried alone, loaded only where the autoencoder alone is used."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from train.bench import write_synthetic
from train.inputs import StageInputError, load_input
from train.trainer import run as run_stage
from worldmodel import checkpoint
from worldmodel.checkpoint import CheckpointError
from worldmodel.files import TEMP_NAME
from worldmodel.model import build_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An AR teacher (``teacher``, as saved in full) whose autoencoder comes from ``ae`` (a float16 checkpoint,
    as the shipped model is), its DiT-only file, and ``other``: ``ae`` with one weight changed."""
    d = tmp_path_factory.mktemp("dit_only")
    checkpoint.save(d / "ae.safetensors", build_model("tiny", seed=0), dtype=torch.float16)
    teacher = build_model("tiny", seed=1)
    teacher.autoencoder.load_state_dict(checkpoint.load(d / "ae.safetensors").autoencoder.state_dict())
    teacher.config.stage = "ar_teacher"
    checkpoint.save(d / "teacher.safetensors", teacher)
    checkpoint.save(d / "dit.safetensors", teacher, part="dit")
    other = checkpoint.load(d / "ae.safetensors")
    weight = next(iter(other.autoencoder.parameters())).data
    weight[(0,) * weight.dim()] += 1.0
    checkpoint.save(d / "other.safetensors", other)
    return {"dir": d, "teacher": teacher, **{k: d / f"{k}.safetensors" for k in ("ae", "dit", "other")}}


def assert_equal_states(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    assert all(found[k].dtype == expected[k].dtype and torch.equal(found[k], expected[k]) for k in expected)


def test_round_trip_in_float32_is_exact(files):
    for source in (files["ae"], checkpoint.load(files["ae"])):
        joined = checkpoint.load(files["dit"], autoencoder_from=source)
        assert_equal_states(joined.state_dict(), files["teacher"].state_dict())
        assert joined.config == files["teacher"].config


def test_bfloat16_dit_only_file_joins_to_the_bfloat16_cast(files, tmp_path):
    checkpoint.save(tmp_path / "bf16.safetensors", files["teacher"], dtype=torch.bfloat16, part="dit")
    assert {v.dtype for v in load_file(str(tmp_path / "bf16.safetensors")).values()} == {torch.bfloat16}
    joined = checkpoint.load(tmp_path / "bf16.safetensors", autoencoder_from=files["ae"])
    expected = {k: v.bfloat16().float() if k.startswith("dit.") else v for k, v in files["teacher"].state_dict().items()}
    assert_equal_states(joined.state_dict(), expected)


def test_dit_only_file_holds_no_autoencoder_tensors(files):
    with safe_open(str(files["dit"]), framework="pt") as f:
        names, meta = set(f.keys()), f.metadata()
    assert names == {f"dit.{k}" for k in files["teacher"].dit.state_dict()}
    assert meta["contents"] == "dit"
    assert meta["autoencoder_fingerprint"] == checkpoint.weights_fingerprint(files["teacher"].autoencoder)
    assert json.loads(meta["config"]) == checkpoint.read_metadata(files["dir"] / "teacher.safetensors")["config"]
    assert "contents" not in checkpoint.read_metadata(files["dir"] / "teacher.safetensors")


def test_plain_load_is_refused_in_one_line(files):
    with pytest.raises(CheckpointError, match=r"holds only the DiT and needs an autoencoder") as e:
        checkpoint.load(files["dit"])
    assert "\n" not in str(e.value)
    with pytest.raises(StageInputError, match=r"^init.teacher: .* holds only the DiT"):
        load_input(files["dit"], "init.teacher", ("teacher", "ar_teacher"), "ar_teacher")


def test_full_checkpoint_takes_no_other_autoencoder(files):
    with pytest.raises(CheckpointError, match=r"is a full checkpoint with its own autoencoder"):
        checkpoint.load(files["dir"] / "teacher.safetensors", autoencoder_from=files["ae"])


def test_autoencoder_weights_changed_by_one_element_are_refused(files):
    for source in (files["other"], checkpoint.load(files["other"])):
        with pytest.raises(CheckpointError, match=r"its autoencoder's encoder and latent statistics \(fingerprint \w+\) "
                                                  r"are not those .*DiT was trained against") as e:
            checkpoint.load(files["dit"], autoencoder_from=source)
        assert "\n" not in str(e.value)


def with_changed_decoder(path: Path) -> checkpoint.WorldModel:
    model = checkpoint.load(path)
    model.autoencoder.decoder.output_weight.data.add_(0.5)
    return model


def test_a_new_decoder_of_the_same_latent_space_joins(files):
    """Only the encoder and the latent statistics bind a DiT: the joined model carries the other decoder."""
    source = with_changed_decoder(files["ae"])
    joined = checkpoint.load(files["dit"], autoencoder_from=source)
    assert_equal_states(joined.autoencoder.state_dict(), source.autoencoder.state_dict())
    assert_equal_states(joined.dit.state_dict(), files["teacher"].dit.state_dict())
    stats = source.autoencoder.latent_scale
    stats.add_(1e-3)
    with pytest.raises(CheckpointError, match=r"encoder and latent statistics .* are not those"):
        checkpoint.load(files["dit"], autoencoder_from=source)


def test_an_older_file_without_a_latent_fingerprint_needs_the_whole_autoencoder(files, tmp_path):
    meta = checkpoint.file_metadata(files["dit"])
    del meta["latent_fingerprint"]
    path = crafted(tmp_path / "old.safetensors", load_file(str(files["dit"])), meta)
    checkpoint.load(path, autoencoder_from=files["ae"])
    with pytest.raises(CheckpointError, match=r"its autoencoder's weights \(fingerprint \w+\) are not those"):
        checkpoint.load(path, autoencoder_from=with_changed_decoder(files["ae"]))


def test_autoencoder_of_another_config_is_refused(files):
    other = build_model("tiny", seed=0, frame_size=(48, 48))
    with pytest.raises(CheckpointError, match=r"autoencoder config differs .* \(keys \['frame_height', 'frame_width'\]\)"):
        checkpoint.load(files["dit"], autoencoder_from=other)


def crafted(path: Path, tensors: dict, meta: dict, **changes) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), {**meta, **changes})
    return path


@pytest.mark.parametrize("case, message", [
    ("nan", r"tensor dit\.\S+ holds NaN or infinite values"),
    ("missing", r"tensors do not match the config: missing \['dit\."),
    ("autoencoder tensor", r"tensors do not match the config: missing \[\], unexpected \['autoencoder\."),
    ("shape", r"tensor dit\.\S+ has shape .* in the file but the config gives"),
    ("integer", r"tensor dit\.\S+ has dtype torch.int64 in the file but the model holds torch.float32"),
    ("interpolation", r"config key world holds an omegaconf interpolation"),
    ("fingerprint", r"is DiT-only but has no valid autoencoder_fingerprint"),
    ("latent fingerprint", r"has an invalid latent_fingerprint"),
    ("contents", r"has contents 'everything'"),
])
def test_dit_only_file_is_validated_like_a_full_one(files, tmp_path, case, message):
    tensors, meta = load_file(str(files["dit"])), checkpoint.file_metadata(files["dit"])
    name = sorted(tensors)[2]
    if case == "nan":
        tensors[name] = tensors[name].clone().fill_(float("nan"))
    elif case == "missing":
        del tensors[name]
    elif case == "autoencoder tensor":
        tensors["autoencoder.extra"] = torch.zeros(2)
    elif case == "shape":
        tensors[name] = torch.zeros(3, 5)
    elif case == "integer":
        tensors[name] = tensors[name].long()
    elif case == "interpolation":
        meta["config"] = json.dumps({**json.loads(meta["config"]), "world": "${oc.env:HOME}"})
    elif case == "fingerprint":
        meta["autoencoder_fingerprint"] = "not-hex"
    elif case == "latent fingerprint":
        meta["latent_fingerprint"] = "0" * 63
    else:
        meta["contents"] = "everything"
    path = crafted(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=message) as e:
        checkpoint.load(path, autoencoder_from=files["ae"])
    assert "\n" not in str(e.value)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worldmodel.checkpoint", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_splits_in_bfloat16_and_joins_with_a_float16_autoencoder(files, tmp_path):
    split = cli("dit-only", files["dir"] / "teacher.safetensors", tmp_path / "dit.safetensors", "--dtype", "bfloat16")
    assert split.returncode == 0 and "wrote" in split.stdout, split.stderr
    join = cli("join", tmp_path / "dit.safetensors", files["ae"], tmp_path / "full.safetensors")
    assert join.returncode == 0 and "wrote" in join.stdout, join.stderr
    joined = checkpoint.load(tmp_path / "full.safetensors")
    expected = {k: v.bfloat16().float() if k.startswith("dit.") else v for k, v in files["teacher"].state_dict().items()}
    assert_equal_states(joined.state_dict(), expected)
    assert joined.config == files["teacher"].config


def test_cli_error_is_one_line_with_status_2(files, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"pre-existing output")
    r = cli("join", files["dit"], files["dit"], out)
    assert r.returncode == 2 and r.stderr.splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(f"error: {files['dit']} holds only the DiT and needs an autoencoder")
    assert out.read_bytes() == b"pre-existing output"


@pytest.mark.parametrize("argv, message", [
    (["join", "{dit}", "{other}", "{out}"], "are not those"),
    (["join", "{teacher}", "{ae}", "{out}"], "is a full checkpoint with its own autoencoder"),
    (["dit-only", "{dit}", "{out}"], "holds only the DiT"),
    (["dit-only", "{dir}/absent.safetensors", "{out}"], "does not exist"),
    (["dit-only", "{teacher}", "{dir}/out.pt"], "must be a .safetensors file"),
    (["dit-only", "{teacher}", "{out}", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["dit-only", "{teacher}", "{out}", "--dtyp", "float16"], "did you mean --dtype"),
    (["split", "{teacher}", "{out}"], "invalid choice: 'split'"),
])
def test_cli_refusals_leave_the_output_as_it_was(files, tmp_path, capsys, argv, message):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"pre-existing output")
    paths = {"dit": files["dit"], "ae": files["ae"], "teacher": files["dir"] / "teacher.safetensors",
             "other": files["other"], "out": out, "dir": tmp_path}
    assert checkpoint.main([a.format(**paths) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and captured.err.startswith("error: ")
    assert message in captured.err, captured.err
    assert out.read_bytes() == b"pre-existing output"
    assert not [p for p in tmp_path.iterdir() if TEMP_NAME.fullmatch(p.name)]


def test_ar_teacher_stage_starts_from_a_joined_file(files, tmp_path):
    """The pipeline's AR_INIT path: join, then the ar_teacher stage takes the joined file as init.teacher."""
    episodes = write_synthetic(tmp_path / "episodes", 2, 12, (32, 32))
    assert checkpoint.main(["join", str(files["dit"]), str(files["ae"]), str(tmp_path / "init.safetensors")]) == 0
    run_stage("ar_teacher", ["preset=tiny", "data.source=recordings", f"data.recordings={episodes}",
                             f"run.dir={tmp_path / 'run'}", "run.steps=1", f"init.teacher={tmp_path / 'init.safetensors'}"])
    trained = checkpoint.load(tmp_path / "run" / "model.safetensors")
    assert trained.config.stage == "ar_teacher"
    assert_equal_states(trained.autoencoder.state_dict(), files["teacher"].autoencoder.state_dict())


# ---------------------------------------------------------------- autoencoder-only files


def test_autoencoder_only_file_holds_the_autoencoder_alone(files, tmp_path):
    """A latent space carried before any DiT is trained on it: only where the autoencoder alone is used."""
    path = tmp_path / "ae_only.safetensors"
    source = checkpoint.load(files["ae"])
    checkpoint.save(path, source, part="autoencoder")
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {f"autoencoder.{k}" for k in source.autoencoder.state_dict()}
        assert f.metadata()["contents"] == "autoencoder"
    loaded = checkpoint.load(path, untrained_dit=True)
    assert_equal_states(loaded.autoencoder.state_dict(), source.autoencoder.state_dict())
    assert loaded.config == source.config
    with pytest.raises(CheckpointError, match=r"holds only an autoencoder, no trained DiT: give it as") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)
    with pytest.raises(StageInputError, match=r"^init.teacher: .* holds only an autoencoder"):
        load_input(path, "init.teacher", ("untrained", "teacher", "ar_teacher"), "ar_teacher")
    assert_equal_states(load_input(path, "init.autoencoder", ("untrained",), "teacher").autoencoder.state_dict(),
                        source.autoencoder.state_dict())
    with pytest.raises(CheckpointError, match=r"is an autoencoder-only checkpoint with its own autoencoder"):
        checkpoint.load(path, autoencoder_from=files["ae"])
    joined = checkpoint.load(files["dit"], autoencoder_from=path)  # a DiT joins it as it joins the full file
    assert_equal_states(joined.state_dict(), files["teacher"].state_dict())


def test_autoencoder_only_file_is_validated(files, tmp_path):
    path = tmp_path / "ae_only.safetensors"
    checkpoint.save(path, checkpoint.load(files["ae"]), part="autoencoder")
    tensors, meta = load_file(str(path)), checkpoint.file_metadata(path)
    tensors["dit.extra"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['dit\.extra'\]"):
        checkpoint.load(crafted(tmp_path / "bad.safetensors", tensors, meta), untrained_dit=True)
    del tensors["dit.extra"]
    tensors[sorted(tensors)[0]] = tensors[sorted(tensors)[0]].clone().fill_(float("inf"))
    with pytest.raises(CheckpointError, match=r"holds NaN or infinite values"):
        checkpoint.load(crafted(tmp_path / "bad.safetensors", tensors, meta), untrained_dit=True)
    with pytest.raises(ValueError, match=r"part must be one of \['autoencoder', 'dit'\]"):
        checkpoint.save(tmp_path / "x.safetensors", files["teacher"], part="decoder")


def test_cli_writes_an_autoencoder_only_file_that_the_teacher_and_autoencoder_stages_start_from(files, tmp_path):
    out = tmp_path / "ae_only.safetensors"
    r = cli("autoencoder-only", files["dir"] / "teacher.safetensors", out, "--dtype", "bfloat16")
    assert r.returncode == 0 and "wrote" in r.stdout, r.stderr
    assert out.stat().st_size < (files["dir"] / "teacher.safetensors").stat().st_size / 2
    episodes = write_synthetic(tmp_path / "episodes", 2, 12, (32, 32))
    run_stage("teacher", ["preset=tiny", "data.source=recordings", f"data.recordings={episodes}",
                          f"run.dir={tmp_path / 'run'}", "run.steps=1", f"init.autoencoder={out}"])
    trained = checkpoint.load(tmp_path / "run" / "model.safetensors")
    expected = {k: v.bfloat16().float() for k, v in files["teacher"].autoencoder.state_dict().items()}
    assert_equal_states(trained.autoencoder.state_dict(), expected)
    run_stage("autoencoder", ["preset=tiny", "data.source=recordings", f"data.recordings={episodes}",
                              f"run.dir={tmp_path / 'ae_run'}", "run.steps=1", f"init.autoencoder={out}"])
    assert checkpoint.load(tmp_path / "ae_run" / "model.safetensors").config.stage == "autoencoder"
