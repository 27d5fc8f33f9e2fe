"""Checkpoints are untrusted input: interpolations, bad weights, mixed shards and bad configs are refused."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from worldmodel import checkpoint
from worldmodel.checkpoint import CheckpointError, read_metadata
from worldmodel.model import DERIVED_DIT_FIELDS, build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def cfg(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    checkpoint.save(path, tiny)
    return read_metadata(path)["config"]


def write(path, tensors, config):
    """A checkpoint file with the given tensors and (crafted) config metadata."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              {"format": "worldmodel", "version": "1", "config": json.dumps(config)})
    return path


@pytest.mark.parametrize("key", ["world", "sampler.solver", "autoencoder.pad_mode", "actions.keys.0"])
def test_interpolations_are_refused_not_resolved(tiny, cfg, tmp_path, key):
    bad = json.loads(json.dumps(cfg))
    *parents, last = key.split(".")
    node = bad
    for p in parents:
        node = node[p]
    node[int(last) if isinstance(node, list) else last] = "${oc.env:HOME}"
    path = write(tmp_path / "interp.safetensors", tiny.state_dict(), bad)
    for read in (read_metadata, checkpoint.load):
        with pytest.raises(CheckpointError, match=rf"config key {key} holds an omegaconf interpolation") as e:
            read(path)
        assert os.environ.get("HOME", "/nonexistent") not in str(e.value).replace(str(tmp_path), "")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tiny, cfg, tmp_path, value):
    state = dict(tiny.state_dict())
    name = sorted(k for k, v in state.items() if v.is_floating_point())[3]
    state[name] = state[name].clone(memory_format=torch.contiguous_format)
    state[name].view(-1)[0] = value
    path = write(tmp_path / "nan.safetensors", state, cfg)
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds NaN or infinite values"):
        checkpoint.load(path)
    half = write(tmp_path / "nan16.safetensors", {k: v.half() for k, v in state.items()}, cfg)
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds NaN"):
        checkpoint.load(half)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.uint8])
def test_integer_weights_where_floats_belong_are_refused(tiny, cfg, tmp_path, dtype):
    state = dict(tiny.state_dict())
    name = sorted(state)[0]
    state[name] = torch.zeros_like(state[name], dtype=dtype)
    path = write(tmp_path / "int.safetensors", state, cfg)
    with pytest.raises(CheckpointError, match=rf"tensor {name} has dtype {dtype} in the file but the model holds torch.float32"):
        checkpoint.load(path)


def test_float_to_float_dtypes_still_load(tiny, cfg, tmp_path):
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        path = write(tmp_path / "cast.safetensors", {k: v.to(dtype) for k, v in tiny.state_dict().items()}, cfg)
        assert checkpoint.load(path).dit.cfg == tiny.dit.cfg


def test_shards_of_another_checkpoint_are_refused(tiny, tmp_path):
    other = build_model("tiny", seed=1)
    other.config.sampler.guidance = 3.0
    single = tmp_path / "single.safetensors"
    checkpoint.save(single, tiny)
    mib = single.stat().st_size / 3 / 2**20
    ours = checkpoint.save(tmp_path / "a" / "model.safetensors", tiny, max_shard_mib=mib)
    theirs = checkpoint.save(tmp_path / "b" / "model.safetensors", other, max_shard_mib=mib)
    assert len(ours) == len(theirs) >= 3
    checkpoint.load(ours[0].with_name("model.safetensors"))
    shutil.copy(theirs[1], ours[1])
    for read in (read_metadata, checkpoint.load):
        with pytest.raises(CheckpointError, match=rf"shard .*{ours[1].name} belongs to another checkpoint .*\['config'\] differs"):
            read(ours[0].with_name("model.safetensors"))


def test_tensor_repeated_in_two_shards_is_refused(tiny, cfg, tmp_path):
    state = tiny.state_dict()
    names = sorted(state)
    paths = checkpoint.shard_paths(tmp_path / "m.safetensors", 2)
    write(paths[0], {k: state[k] for k in names[:60]}, cfg)
    write(paths[1], {k: state[k] for k in names[59:]}, cfg)
    with pytest.raises(CheckpointError, match=rf"shard .*{paths[1].name} repeats tensor\(s\) \['{names[59]}'\]"):
        checkpoint.load(tmp_path / "m.safetensors")


@pytest.mark.parametrize("section, key, value, message", [
    ("dit", "depth", 10**9, r"dit.depth must be between 1 and 256, got 1000000000"),
    ("dit", "dim", 10**7, r"dit.dim must be between 1 and 65536"),
    ("dit", "heads", 0, r"dit.heads must be between 1 and 256, got 0"),
    ("dit", "patch_size", 0, r"dit.patch_size must be between 1"),
    ("dit", "dim", "32", r"dit.dim must be an integer, got '32'"),
    ("dit", "depth", 2.5, r"dit.depth must be an integer"),
    ("dit", "heads", True, r"dit.heads must be an integer"),
    ("dit", "mlp_ratio", "big", r"dit.mlp_ratio must be a finite number"),
    ("dit", "mlp_ratio", float("inf"), r"dit.mlp_ratio must be a finite number"),
    ("autoencoder", "encoder_channels", {"a": 1}, r"autoencoder.encoder_channels must be a list"),
    ("autoencoder", "decoder_blocks", [1, "x", 1], r"autoencoder.decoder_blocks\[1\] must be an integer"),
    ("autoencoder", "encoder_channels", [8] * 10**4, r"autoencoder.encoder_channels must be a list of at most 256"),
    ("controller", "walk_speed", None, r"controller.walk_speed must be a finite number"),
    ("actions", "keys", "wasd", r"actions.keys must be a list"),
    ("sampler", "steps", [1.0, "fast"], r"sampler.steps\[1\] must be a finite number"),
])
def test_bad_config_values_give_one_line(tiny, cfg, tmp_path, section, key, value, message):
    bad = {**cfg, section: {**cfg[section], key: value}}
    path = write(tmp_path / "bad.safetensors", tiny.state_dict(), bad)
    with pytest.raises(CheckpointError, match=r"bad model config: " + message) as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)


def test_fields_derived_from_the_autoencoder_are_not_saved_and_old_ones_must_agree(tiny, cfg, tmp_path):
    """The DiT's latent shape and action width come from the autoencoder and the actions: not saved. A
    config that still holds them (checkpoints saved before) loads alike when they agree, else one line."""
    assert not set(DERIVED_DIT_FIELDS) & set(cfg["dit"])
    stored = {**cfg, "dit": {**cfg["dit"], **{k: getattr(tiny.dit.cfg, k) for k in DERIVED_DIT_FIELDS}}}
    old = checkpoint.load(write(tmp_path / "old.safetensors", tiny.state_dict(), stored))
    assert old.dit.cfg == tiny.dit.cfg and not set(DERIVED_DIT_FIELDS) & set(old.config.dit)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in old.state_dict().items())
    for key in DERIVED_DIT_FIELDS:
        bad = {**stored, "dit": {**stored["dit"], key: stored["dit"][key] + 2}}
        path = write(tmp_path / "bad.safetensors", tiny.state_dict(), bad)
        with pytest.raises(CheckpointError, match=rf"bad model config: dit.{key} is {bad['dit'][key]} but the "
                                                  rf"autoencoder and the actions give {stored['dit'][key]}$"):
            checkpoint.load(path)


@pytest.mark.parametrize("config, message", [
    ([1, 2], r"the config must be a mapping, got list"),
    ("tiny", r"the config must be a mapping, got str"),
])
def test_config_that_is_not_a_mapping(tiny, tmp_path, config, message):
    with pytest.raises(CheckpointError, match=message):
        read_metadata(write(tmp_path / "list.safetensors", tiny.state_dict(), config))


@pytest.mark.parametrize("section", ["dit", "autoencoder", "actions", "controller", "sampler"])
def test_section_that_is_not_a_mapping(tiny, cfg, tmp_path, section):
    path = write(tmp_path / "list.safetensors", tiny.state_dict(), {**cfg, section: [1, 2]})
    with pytest.raises(CheckpointError, match=rf"bad model config: {section} must be a mapping, got list"):
        checkpoint.load(path)


def test_large_config_is_checked_against_the_file_before_allocating(tiny, cfg, tmp_path):
    """A config of a ~100 GB model over a tiny file is refused on the shapes (built on the meta device)."""
    big = {**cfg, "dit": {**cfg["dit"], "dim": 32768, "heads": 256}}
    path = write(tmp_path / "big.safetensors", tiny.state_dict(), big)
    with pytest.raises(CheckpointError, match=r"tensor \S+ has shape .* in the file but the config gives"):
        checkpoint.load(path)
