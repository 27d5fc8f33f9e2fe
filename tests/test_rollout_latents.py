"""train/scripts/rollout_latents.py's --std-cap: each frame scaled about its mean to a std of at most the cap."""

from pathlib import Path

import torch


def test_cap_scales_only_the_frames_above_it(train_script):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 6, generator=g, dtype=torch.float64) + 0.3
    x[0, 1] *= 3.0  # one frame far above the cap
    x[1, 2] *= 0.5  # one below it
    out = train_script("rollout_latents").capped(lambda: x, 1.5)()
    for b in range(2):
        for t in range(3):
            frame, got = x[b, t], out[b, t]
            if frame.std() <= 1.5:
                torch.testing.assert_close(got, frame, rtol=0, atol=1e-12)
            else:  # the same mean, the std at the cap, the same shape up to the scale
                torch.testing.assert_close(got.mean(), frame.mean(), rtol=0, atol=1e-12)
                torch.testing.assert_close(got.std(), torch.tensor(1.5, dtype=torch.float64), rtol=0, atol=1e-12)
                torch.testing.assert_close((got - got.mean()) * frame.std() / 1.5, frame - frame.mean(), rtol=0, atol=1e-12)


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, train_script):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    main = train_script("rollout_latents").main
    assert main([str(bad)]) == 2
    assert main([str(bad), "--frames", "0"]) == 2
    shipped = Path(__file__).resolve().parents[1] / "assets" / "models" / "procedural.safetensors"
    assert main([str(shipped), "--world", "procedural", "--script", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert "bad.safetensors" in err[2]  # the script, not the checkpoint
