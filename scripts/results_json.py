"""How every benchmark leaves its figures: one JSON file (written whole, then renamed into place) and the same JSON
on stdout."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_results(out: Path, result: dict) -> None:
    """Write ``result`` to ``out`` (its folder created) and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(text)
    os.replace(partial, out)
    print(text, end="")
