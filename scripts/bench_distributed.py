"""Scale-out figures on Ray, with the single-machine path measured in the same run as the baseline.

- ingest passages/s: local ingest (the baseline), then Ray Data ingest with 1 and 2 encoder actors;
- search requests/s at N concurrent clients on a 3-shard collection: the single-machine server (uvicorn, the
  baseline), then Ray Serve with 1 and 2 replicas per shard.

Everything runs on a Ray cluster started here on 127.0.0.1 (or --ray ADDRESS) and stops by itself. On a 2-core
machine the figures show the overhead of distribution, not its gain: the JSON records the core count.

    python scripts/bench_distributed.py --docs 1000 --seconds 10 --out scripts/results/bench_distributed.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_api import free_port, load_level, load_queries, percentiles, wait_ready
from results_json import write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def single_queries(url: str, queries: list[str], collection: str, n: int) -> dict:
    import httpx

    samples = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for q in queries[:10]:
            http.post(f"/collections/{collection}/search", json={"query": q, "k": 10}).raise_for_status()
        for i in range(n):
            started = time.perf_counter()
            http.post(f"/collections/{collection}/search", json={"query": queries[i % len(queries)], "k": 10})
            samples.append(time.perf_counter() - started)
    return percentiles(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000, help="msmarco documents to ingest")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load level")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--singles", type=int, default=100)
    parser.add_argument("--ray", dest="address", help="an existing cluster's address (default: start one here)")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/bench_distributed.json"))
    args = parser.parse_args()

    import ray
    from ray import serve

    from indexer.distributed import ingest_paths_on_ray
    from indexer.pipeline import ingest_paths
    from indexer.settings import load_settings
    from search_api.cluster import serve_on_ray
    from storage.collection import Collection
    from storage.sharding import reshard

    if args.address:
        ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count() * 2, logging_level="WARNING", log_to_driver=False, include_dashboard=False)
    queries = load_queries()
    result: dict = {
        "benchmark": "distributed",
        "model": "minilm",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "gpus": int(ray.cluster_resources().get("GPU", 0)),
            "ray_nodes": len(ray.nodes()),
            "note": "load generator, Ray and the servers share the machine",
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        with open(DATA / "msmarco" / "corpus.jsonl", encoding="utf-8") as source, open(corpus, "w") as out:
            for _, line in zip(range(args.docs), source):
                out.write(line)
        settings = load_settings(cli={"encoder": {"model": "minilm"}, "processing": {"device": "cpu"}})

        ingest = {}
        report = ingest_paths([corpus], root / "local", "docs", settings, model="minilm")
        ingest["local"] = {"passages": report.passages_written, "seconds": round(report.seconds, 2)}
        for workers in (1, 2):
            report = ingest_paths_on_ray(
                [corpus], root / f"ray{workers}", "docs", settings, model="minilm", address="auto", workers=workers
            )
            ingest[f"ray_{workers}_actors"] = {"passages": report.passages_written, "seconds": round(report.seconds, 2)}
        for row in ingest.values():
            row["passages_per_s"] = round(row["passages"] / row["seconds"], 1)
        local_rate = ingest["local"]["passages_per_s"]
        for row in ingest.values():
            row["vs_local"] = round(row["passages_per_s"] / local_rate, 2)
        result["ingest"] = ingest
        print(json.dumps(ingest, indent=2), flush=True)

        data_dir = root / "serving"
        with Collection.open(root / "local" / "docs") as one:
            reshard(one, data_dir / "docs3", 3).close()
        search = {}
        port = free_port()
        serving = settings.model_copy(deep=True)
        serving.data_dir = data_dir
        stella = os.path.join(os.path.dirname(sys.executable), "stella-search")
        local = subprocess.Popen(
            [stella, "serve", "--data-dir", str(data_dir), "--port", str(port), "--device", "cpu"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, seconds=180)
            search["single_machine"] = {
                "single_query": single_queries(url, queries, "docs3", args.singles),
                "load": asyncio.run(load_level(url, queries, args.clients, args.seconds, 10, "docs3")),
            }
        finally:
            local.terminate()
            local.wait(timeout=30)
        for replicas in (1, 2):
            serving.server.port = free_port()
            url = serve_on_ray(serving, "auto", shard_replicas=replicas, blocking=False)
            wait_ready(url, seconds=180)
            search[f"ray_serve_{replicas}_replicas_per_shard"] = {
                "single_query": single_queries(url, queries, "docs3", args.singles),
                "load": asyncio.run(load_level(url, queries, args.clients, args.seconds, 10, "docs3")),
            }
            serve.shutdown()
        baseline = search["single_machine"]["load"]["requests_per_s"]
        for row in search.values():
            row["requests_per_s_vs_single_machine"] = round(row["load"]["requests_per_s"] / baseline, 2)
        result["search"] = {"collection": "3 shards", "clients": args.clients, **search}
    ray.shutdown()
    write_results(args.out, result)


if __name__ == "__main__":
    main()
