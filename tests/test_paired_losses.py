"""train/scripts/paired_losses.py averages two runs' logged losses over the steps both logged, window by window."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "train" / "scripts" / "paired_losses.py"


def test_windows_average_the_shared_steps(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    a.write_text("".join(json.dumps({"step": s, "loss": 0.1 * s, "psnr": 20.0 + s}) + "\n" for s in (1, 2, 3, 4)) +
                 json.dumps({"step": 4, "prepare_seconds": 1.0}) + "\n")
    with gzip.open(b, "wt") as f:  # step 3 missing: windows use the steps both runs logged
        f.writelines(json.dumps({"step": s, "loss": 0.2 * s, "psnr": 21.0 + s}) + "\n" for s in (1, 2, 4, 5))
    out = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b), "--every", "2"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[2] == "| 1-2 | 2 | 0.1500 | 0.3000 | 21.50 | 22.50 | +1.00 |"
    assert out[3] == "| 3-4 | 1 | 0.4000 | 0.8000 | 24.00 | 25.00 | +1.00 |"
    assert len(out) == 4
