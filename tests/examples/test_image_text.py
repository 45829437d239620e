"""The worked example: structured text (token ids + mask) and an image, trained, profiled, served."""

from __future__ import annotations

from .test_examples import run_example


def test_image_text_example_runs_end_to_end() -> None:
    out = run_example("image_text.py", timeout_s=900)
    assert "equal to forward()" in out
    assert "text only (no image sent): ['text']" in out
    assert "POST /predict -> 200" in out
    accuracy = {
        line.split()[0]: float(line.split()[2])
        for line in out.splitlines()
        if " accuracy " in line and "+/-" in line
    }
    assert accuracy["image+text"] > max(accuracy["image"], accuracy["text"]) + 0.03, accuracy
