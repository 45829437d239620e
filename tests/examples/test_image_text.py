"""The worked example: structured text (token ids + mask) and an image, trained, profiled, served."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_image_text_example_runs_end_to_end() -> None:
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "image_text.py")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "equal to forward()" in out
    assert "text only (no image sent): ['text']" in out
    assert "POST /predict -> 200" in out
    accuracy = {
        line.split()[0]: float(line.split()[2])
        for line in out.splitlines()
        if " accuracy " in line and "+/-" in line
    }
    assert accuracy["image+text"] > max(accuracy["image"], accuracy["text"]) + 0.03, accuracy
