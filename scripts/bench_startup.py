"""Start-up on a warm cache: ``stella-search serve`` until ``GET /ready`` answers 200, and one ``stella-search
search`` from start to exit, against baselines measured in the same run, written as JSON.

A collection of the embedded model is ingested first (``scripts/sample_data/dbpedia_sample.jsonl``), which also
leaves its ONNX exports in the cache; then, round after round: the baselines (a bare ``import fastapi, uvicorn``:
the floor of any server start; a plain sentence-transformers load of the same model encoding one query: what a
start paid before the cached query graph), the server start (each a fresh process on a free port, polled every
20 ms; also until ``/health`` says ``ok``, the full encoders that writes need loaded in the background), and the
CLI search. Medians and minimums are reported per measure; the goals are a server ready in under 5 s and a CLI
search in under 3 s.

    python scripts/bench_startup.py
    python scripts/bench_startup.py --rounds 7 --cache-dir /tmp/stella-cache --out scripts/results/bench_startup.json
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from results_json import write_results

ROOT = Path(__file__).resolve().parents[1]
STELLA = str(Path(sys.executable).with_name("stella-search"))
SAMPLE = ROOT / "scripts" / "sample_data" / "dbpedia_sample.jsonl"
QUERY = "a river in central Europe"
GOALS = {"serve_to_ready": 5.0, "cli_search": 3.0}
PLAIN_LOAD = """
import sys
from sentence_transformers import SentenceTransformer
SentenceTransformer(sys.argv[1], device="cpu").encode([sys.argv[2]], normalize_embeddings=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_run(args: list[str], env: dict) -> float:
    """Seconds from start to exit of ``args``; a failure stops the benchmark with its output."""
    started = time.perf_counter()
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{result.stderr[-3000:]}")
    return seconds


def serve_until_ready(data_dir: Path, env: dict, log: Path, timeout: float = 300) -> dict[str, float]:
    """Seconds from ``stella-search serve`` to /ready 200, and to /health ``ok``; the server is stopped after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    marks: dict[str, float] = {}
    with open(log, "ab") as output:
        started = time.perf_counter()
        server = subprocess.Popen(
            [STELLA, "serve", "--data-dir", str(data_dir), "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                while "health_ok" not in marks:
                    if server.poll() is not None or time.perf_counter() - started > timeout:
                        raise SystemExit(f"the server did not get ready:\n{log.read_text(errors='replace')[-3000:]}")
                    try:
                        if "ready" not in marks and http.get("/ready").status_code == 200:
                            marks["ready"] = time.perf_counter() - started
                        if "ready" in marks and http.get("/health").json()["status"] == "ok":
                            marks["health_ok"] = time.perf_counter() - started
                    except httpx.TransportError:
                        pass  # not listening yet
                    time.sleep(0.02)
        finally:
            server.terminate()
            server.wait(timeout=60)
    return marks


def summary(samples: list[float]) -> dict:
    return {"median_s": round(statistics.median(samples), 3), "min_s": round(min(samples), 3), "rounds": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, help="STELLA_SEARCH_CACHE_DIR (default: the user's cache folder)")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/bench_startup.json"))
    args = parser.parse_args()

    import onnxruntime

    from indexer.models import model_folder, resolve_profile
    from indexer.settings import load_settings

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.cache_dir:
        env["STELLA_SEARCH_CACHE_DIR"] = str(args.cache_dir.resolve())
    cache_dir = load_settings(environ=env).cache_dir
    folder = str(model_folder(resolve_profile("minilm")))
    started, load_before = time.time(), os.getloadavg()  # other work on the machine skews every figure alike
    samples: dict[str, list[float]] = {
        name: [] for name in ("import_fastapi_uvicorn", "plain_model_load", "serve_to_ready", "serve_to_health_ok")
    }
    samples["cli_search"] = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        data_dir, log = Path(tmp) / "data", Path(tmp) / "server.log"
        timed_run([STELLA, "ingest", str(SAMPLE), "--data-dir", str(data_dir), "--model", "minilm"], env)
        search = [STELLA, "search", QUERY, "--data-dir", str(data_dir), "-k", "10"]
        timed_run(search, env)  # the first search after an ingest reads what the ingest left in the page cache
        for _ in range(args.rounds):
            samples["import_fastapi_uvicorn"].append(timed_run([sys.executable, "-c", "import fastapi, uvicorn"], env))
            samples["plain_model_load"].append(timed_run([sys.executable, "-c", PLAIN_LOAD, folder, QUERY], env))
            marks = serve_until_ready(data_dir, env, log)
            samples["serve_to_ready"].append(marks["ready"])
            samples["serve_to_health_ok"].append(marks["health_ok"])
            samples["cli_search"].append(timed_run(search, env))
    results = {name: summary([round(s, 3) for s in values]) for name, values in samples.items()}
    result = {
        "benchmark": "startup",
        "command": "python scripts/bench_startup.py " + " ".join(sys.argv[1:]),
        "model": "minilm",
        "cache_dir": str(cache_dir),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "load_average_before_after": [load_before, os.getloadavg()],
        },
        "minutes": round((time.time() - started) / 60, 1),
        "what": {
            "import_fastapi_uvicorn": "baseline: python -c 'import fastapi, uvicorn' (the floor of a server start)",
            "plain_model_load": "baseline: a fresh python loading SentenceTransformer(minilm) and encoding a query",
            "serve_to_ready": "stella-search serve (one minilm collection) until GET /ready is 200",
            "serve_to_health_ok": "the same start until /health says ok (the full encoders for writes loaded too)",
            "cli_search": f"stella-search search {QUERY!r} -k 10, start to exit",
        },
        "goals_s": GOALS,
        "goals_met": {name: results[name]["median_s"] < goal for name, goal in GOALS.items()},
        "results": results,
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
