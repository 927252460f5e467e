"""The short crasher run: SIGKILL the server mid-write three times; no acknowledged write may be lost.
The full run (30+ kills) is `python scripts/crasher.py`, with its figures in docs/operations.md."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_acknowledged_write_is_lost_across_sigkills(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "crasher.py"),
            "--kills",
            "3",
            "--max-seconds",
            "120",
            "--seed",
            "5",
            "--out",
            str(tmp_path / "crasher.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "crasher.json").read_text())
    assert report["kills"] == 3 and report["lost"] == 0 and report["violations"] == []
    assert report["acknowledged_ops"] > 0 and report["documents_checked"] > 0
