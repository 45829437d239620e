from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, timeout_s: int = 600) -> str:
    """Run ``examples/<name>`` in a fresh interpreter; its stdout (its stderr on failure)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart_runs_end_to_end() -> None:
    out = run_example("quickstart.py")
    assert "frontier for 32 request(s)" in out
    assert "DeadlineError" in out
    assert "expected accuracy" in out


def test_monitoring_over_http_catches_the_drift_and_serves_around_it() -> None:
    out = run_example("monitoring_http.py")
    assert "ALARM (drift) audio" in out
    last = out.split("after 600 jobs")[1].splitlines()[0]
    assert "'video'" in last and "'audio'" not in last and "audio+video" not in last
    assert "mosel_accuracy_drifted" in out
