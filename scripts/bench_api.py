"""Query latency through HTTP against in-process encode+search, and requests/s at 1, 8 and 32 clients, for the
server with query micro-batching and without it, both measured in the same run.

Everything runs on loopback and stops by itself: a real `stella-search serve` process on a free 127.0.0.1 port,
a bounded number of single queries, then a bounded duration per concurrency level. The load generator shares
the machine with the server (2 cores here), which the JSON records.

    python scripts/bench_api.py --docs 2000 --seconds 10 --out scripts/results/bench_api.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def percentiles(samples_s: list[float]) -> dict:
    ms = np.array(samples_s) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "n": len(ms),
    }


def load_queries() -> list[str]:
    queries = []
    for name in ("msmarco", "scifact", "dbpedia"):
        with open(SHARED / name / "queries.jsonl", encoding="utf-8") as f:
            queries += [json.loads(line)["text"] for line in f if line.strip()]
    return queries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load_level(
    url: str, queries: list[str], clients: int, seconds: float, k: int, collection: str = "default"
) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(offset: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            response = await http.post(
                f"/collections/{collection}/search", json={"query": queries[i % len(queries)], "k": k}
            )
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            i += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(c, http) for c in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed, 1),
        **percentiles(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2000, help="msmarco documents to index")
    parser.add_argument("--singles", type=int, default=200, help="sequential single queries per path")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each concurrency level")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("scripts/results/bench_api.json"))
    args = parser.parse_args()

    from indexer.encoder import configure_search_threads
    from indexer.pipeline import encoder_for_collection, ingest_documents
    from indexer.settings import load_settings
    from indexer.sources import read_documents
    from storage.collection import Collection

    queries = load_queries()
    settings = load_settings(cli={"encoder": {"model": "minilm"}, "processing": {"device": "cpu"}})
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        from indexer.encoder import Encoder

        encoder = Encoder.load("minilm", settings)
        collection = Collection.create(data_dir / "default", encoder.manifest())
        documents = list(read_documents(SHARED / "msmarco" / "corpus.jsonl"))[: args.docs]
        ingest_documents(collection, encoder, documents, settings, quiet=True)
        encoder = encoder_for_collection(collection, settings)
        configure_search_threads(settings)  # as the server does

        for q in queries[:10]:  # warm-up
            collection.search(encoder.encode_queries([q]), args.k)
        in_process = []
        for i in range(args.singles):
            started = time.perf_counter()
            collection.search(encoder.encode_queries([queries[i % len(queries)]]), args.k)
            in_process.append(time.perf_counter() - started)
        collection.close()

        servers = {
            name: measure_server(data_dir, queries, args, microbatch)
            for name, microbatch in (("unbatched", False), ("microbatched", True))
        }

    single_local = percentiles(in_process)
    unbatched, batched = servers["unbatched"], servers["microbatched"]
    unbatched_rps = {level["clients"]: level["requests_per_s"] for level in unbatched["concurrency"]}
    result = {
        "benchmark": "api",
        "model": "minilm",
        "documents": args.docs,
        "k": args.k,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "note": "load generator and server share the machine",
        },
        "in_process_encode_plus_search": single_local,
        **servers,
        "ratios": {
            "microbatched_vs_unbatched_requests_per_s": {
                str(level["clients"]): round(level["requests_per_s"] / unbatched_rps[level["clients"]], 2)
                for level in batched["concurrency"]
            },
            "single_client_p50_microbatched_vs_unbatched": round(
                batched["single_query"]["p50_ms"] / unbatched["single_query"]["p50_ms"], 3
            ),
            "http_p50_vs_in_process_p50": round(batched["single_query"]["p50_ms"] / single_local["p50_ms"], 2),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def measure_server(data_dir: Path, queries: list[str], args, microbatch: bool) -> dict:
    """Start `stella-search serve` on the collection, then single queries and each concurrency level."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stella = os.path.join(os.path.dirname(sys.executable), "stella-search")
    env = {**os.environ, "STELLA_SEARCH_SERVER__MICROBATCH": "true" if microbatch else "false"}
    server = subprocess.Popen(
        [stella, "serve", "--data-dir", str(data_dir), "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if http.get("/health").json()["status"] == "ok":
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not come up")
                time.sleep(0.2)
            for q in queries[:10]:
                http.post("/collections/default/search", json={"query": q, "k": args.k})
            through_http = []
            for i in range(args.singles):
                started = time.perf_counter()
                response = http.post(
                    "/collections/default/search", json={"query": queries[i % len(queries)], "k": args.k}
                )
                response.raise_for_status()
                through_http.append(time.perf_counter() - started)
        levels = [asyncio.run(load_level(url, queries, int(c), args.seconds, args.k)) for c in args.clients.split(",")]
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"microbatch": microbatch, "single_query": percentiles(through_http), "concurrency": levels}


if __name__ == "__main__":
    main()
