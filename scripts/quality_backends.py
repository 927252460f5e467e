"""Retrieval quality (nDCG@10, recall@100, MRR@10) of each encoder backend on the carried BEIR sets, as JSON.

Each figure is one ``stella-search eval`` run into a fresh data directory (the corpus is ingested by the backend
under test, and its queries encoded by it), so the figures are exactly what a user of that backend gets.

    python scripts/quality_backends.py tests/data/msmarco tests/data/dbpedia tests/data/scifact
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def eval_command(dataset: Path, backend: str, data_dir: Path, model: str) -> list[str]:
    return ["stella-search", "eval", str(dataset), "--model", model, "--backend", backend, "--data-dir", str(data_dir)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", type=Path, nargs="+", help="BEIR dataset folders")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--backends", default="onnx,onnx-int8", help="encoder backends, comma-separated")
    parser.add_argument("--reference", default="onnx", help="the full-precision backend others are compared with")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/quality_backends.json"))
    args = parser.parse_args()

    stella_search = str(Path(sys.executable).with_name("stella-search"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        for dataset in args.datasets:
            for backend in args.backends.split(","):
                command = eval_command(dataset, backend, Path(tmp) / backend, args.model)
                done = subprocess.run(
                    [stella_search, *command[1:], "--json"], env=env, check=True, capture_output=True, text=True
                )
                scores = json.loads(done.stdout)
                scores["command"] = " ".join(command[:-2] + ["--data-dir", "<fresh dir>"])
                results.setdefault(dataset.name, {})[backend] = scores
                print(dataset.name, backend, scores["ndcg@10"], flush=True)
    for per_backend in results.values():
        reference = per_backend.get(args.reference)
        for scores in per_backend.values():
            if reference is not None:
                scores["ndcg@10_minus_reference"] = round(scores["ndcg@10"] - reference["ndcg@10"], 4)
    out = {"model": args.model, "reference_backend": args.reference, "bound": 0.005, "datasets": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
