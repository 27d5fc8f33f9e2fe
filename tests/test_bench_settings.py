"""``python -m worldmodel.bench --set``: the preset's autoencoder and DiT changed before timing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from worldmodel.bench import with_settings
from worldmodel.model import WorldModel, model_config

ROOT = Path(__file__).resolve().parent.parent


def test_settings_change_the_model_and_leave_the_preset_alone():
    base = model_config("default", "doom")
    config = with_settings(base, ["autoencoder.encoder_channels=[32,64,128]", "autoencoder.decoder_channels=[96,48]",
                                  "autoencoder.decoder_blocks=[2,1]", "dit.patch_size=4"])
    model = WorldModel(config)
    assert model.autoencoder.config.downsample == 4 and model.dit.cfg.patch_size == 4
    assert model.dit.cfg.tokens_per_frame == WorldModel(base).dit.cfg.tokens_per_frame == 80  # 40x32 / 4x4 = 20x16 / 2x2
    assert list(base.autoencoder.encoder_channels) == [32, 64, 128, 256] and base.dit.patch_size == 2


@pytest.mark.parametrize("setting, message", [
    ("dit.patch_size", "expected SECTION.KEY=VALUE"),
    ("sampler.steps=[1.0]", "SECTION one of ['autoencoder', 'dit']"),
    ("dit.patch=4", "a key it has (patch_size, dim, depth"),
    ("dit.patch_size=four", "the value is not JSON"),
    ("dit.dim=${oc.env:HOME}", "the value is not JSON"),
])
def test_bad_settings_are_refused_in_one_line(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        with_settings(model_config("tiny"), [setting])
    assert "\n" not in str(e.value)


def test_cli_refuses_a_model_the_settings_make_impossible():
    r = subprocess.run([sys.executable, "-m", "worldmodel.bench", "--preset", "tiny", "--device", "cpu", "--frames", "1",
                        "--set", "dit.patch_size=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "not divisible by patch 3" in r.stderr
