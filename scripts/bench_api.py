"""Query latency through HTTP against in-process encode+search, and requests/s at 1, 8 and 32 clients, for the
server with query micro-batching and without it, both measured in the same run; with ``--seed-server``, also a
seed-configured server (today's code, unbatched, torch fp32 query encoder), the default server's baseline.

Everything runs on loopback and stops by itself: two real `stella-search serve` processes on free 127.0.0.1
ports (micro-batching on and off), a bounded number of single queries alternating between them, then for each
concurrency level a few short rounds per server, taking turns. The load generator is a lean keep-alive HTTP/1.1
client sharing the machine with the servers (2 cores here), which the JSON records.

    python scripts/bench_api.py --docs 2000 --seconds 5 --rounds 4 --out scripts/results/bench_api.json
    python scripts/bench_api.py --backend auto --seed-server --out scripts/results/bench_api_default.json

On the GPU machine (item 3's single-query p50 through HTTP with the Stella-1.5B shape): ``--shape 1.5b --device
cuda`` builds the full-size random-weight Stella-1.5B-shaped folder (its byte-level BPE trained on the indexed
documents) into ``--model-dir`` (kept; an existing folder is reused, e.g. the one bench_gpu.py built), indexes
the documents with it on the GPU and serves it from there. ``--data`` names the BEIR folders (default: the
repository's ``tests/data``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from results_json import write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def percentiles(samples_s: list[float]) -> dict:
    ms = np.array(samples_s) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "n": len(ms),
    }


def load_queries(data: Path = DATA) -> list[str]:
    """The real queries of msmarco, scifact and dbpedia (those of them ``data`` holds)."""
    queries = []
    for name in ("msmarco", "scifact", "dbpedia"):
        path = data / name / "queries.jsonl"
        if path.exists():
            with open(path, encoding="utf-8") as f:
                queries += [json.loads(line)["text"] for line in f if line.strip()]
    if not queries:
        raise SystemExit(f"no queries.jsonl under {data}/{{msmarco,scifact,dbpedia}}")
    return queries


def shaped_model(shape: str, folder: Path | None, texts: list[str], scratch: Path) -> Path:
    """A Stella-1.5B-shaped random-weight folder (``shape`` 1.5b: full size; tiny: the tests' size), its BPE
    trained on ``texts``; kept in ``folder`` when given, and reused from there when already built."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stella_shaped import FULL_1_5B, build_stella_shaped

    if folder is not None and (folder / "modules.json").exists():
        config = json.loads((folder / "config.json").read_text())
        wanted = FULL_1_5B["hidden"] if shape == "1.5b" else 64
        if config.get("model_type") != "qwen2" or config.get("hidden_size") != wanted:
            raise SystemExit(f"{folder} holds another model than the {shape} Stella shape; name another --model-dir")
        return folder

    return build_stella_shaped(
        folder or scratch / f"stella-{shape}",
        tokenizer_texts=texts,
        tokenizer_vocab=32000,
        **(FULL_1_5B if shape == "1.5b" else {}),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Connection:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads the response: a load generator far lighter
    than httpx (about a tenth of its CPU per request), so that on 2 shared cores the server, not the client, is
    what is measured. It reads only what uvicorn sends: a status line, headers with Content-Length, a body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer, parts.netloc)

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header[9:12])
        length = 0
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def load_level(
    url: str, queries: list[str], clients: int, seconds: float, k: int, collection: str = "default"
) -> dict:
    """``clients`` connections each posting one search after another for ``seconds``; rate and latency."""
    latencies: list[float] = []
    errors = 0
    path = f"/collections/{collection}/search"
    connections = [await Connection.open(url) for _ in range(clients)]
    deadline = time.perf_counter() + seconds

    async def worker(offset: int, connection: Connection) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status, _ = await connection.post(path, {"query": queries[i % len(queries)], "k": k})
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            i += clients

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(c, conn) for c, conn in enumerate(connections)))
        elapsed = time.perf_counter() - started
    finally:
        for connection in connections:
            connection.close()
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
    parser.add_argument("--singles", type=int, default=200, help="sequential single queries per server")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of one round of one concurrency level")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per level, alternating the two servers")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--backend", default="torch", help="the query encoder of both servers")
    parser.add_argument("--model", default="minilm", help="model name or folder (default: the embedded MiniLM)")
    parser.add_argument("--shape", choices=["1.5b", "tiny"], help="serve a Stella-1.5B-shaped random-weight model")
    parser.add_argument("--model-dir", type=Path, help="where --shape keeps (or finds) its folder")
    parser.add_argument("--device", default="cpu", help="the servers' and the in-process encoder's device")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the BEIR corpora (msmarco, ...)")
    parser.add_argument(
        "--seed-server",
        action="store_true",
        help="a third server configured as the seed's: unbatched, torch encoder (the default server's baseline)",
    )
    parser.add_argument("--out", type=Path, default=Path("scripts/results/bench_api.json"))
    args = parser.parse_args()

    from indexer.encoder import Encoder, configure_search_threads
    from indexer.pipeline import encoder_for_collection, ingest_documents
    from indexer.settings import load_settings
    from indexer.sources import read_documents
    from storage.collection import Collection

    queries = load_queries(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        documents = list(read_documents(args.data / "msmarco" / "corpus.jsonl"))[: args.docs]
        if args.shape:
            texts = [d.text for d in documents]
            args.model = str(shaped_model(args.shape, args.model_dir, texts, Path(tmp)))
        settings = load_settings(
            cli={"encoder": {"model": args.model, "backend": args.backend}, "processing": {"device": args.device}}
        )
        data_dir = Path(tmp) / "data"
        # fp32 passages (torch writes them), so that every server's --backend is what encodes its queries: on an
        # int8 collection a torch server would encode with onnx-int8's session (queries are fp32 either way)
        fp32 = settings.model_copy(deep=True)
        fp32.encoder.backend = "torch"
        encoder = Encoder.load(args.model, fp32)
        collection = Collection.create(data_dir / "default", encoder.manifest())
        ingest_documents(collection, encoder, documents, fp32, quiet=True)
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
        del encoder
        _release_gpu_memory(args.device)
        servers = measure_servers(Path(tmp), data_dir, queries, args)

    single_local = percentiles(in_process)
    unbatched, batched = servers["unbatched"], servers["microbatched"]
    result = {
        "benchmark": "api",
        "model": args.shape and f"stella-{args.shape}-shaped (random weights)" or args.model,
        "backend": args.backend,
        "device": _device_name(args.device),
        "documents": args.docs,
        "k": args.k,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "note": "load generator and both servers share the machine; the servers take turns, never loaded at once",
        },
        "method": "both servers up at once; single queries in alternating blocks of 25 (after 5 unmeasured); "
        f"each concurrency level runs {args.rounds} rounds of {args.seconds} s per server, alternating, so drift "
        "on a shared machine hits both",
        "in_process_encode_plus_search": single_local,
        **servers,
        "ratios": {
            "microbatched_vs_unbatched_requests_per_s": rps_ratios(batched, unbatched),
            "single_client_p50_microbatched_vs_unbatched": p50_ratio(batched, unbatched),
            "http_p50_vs_in_process_p50": round(batched["single_query"]["p50_ms"] / single_local["p50_ms"], 2),
        },
    }
    if "seed" in servers:
        result["ratios"]["microbatched_vs_seed_requests_per_s"] = rps_ratios(batched, servers["seed"])
        result["ratios"]["single_client_p50_microbatched_vs_seed"] = p50_ratio(batched, servers["seed"])
    write_results(args.out, result)


def _release_gpu_memory(device: str) -> None:
    """The in-process encoder's GPU memory back before the servers load their own copies."""
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def rps_ratios(server: dict, baseline: dict) -> dict[str, float]:
    """requests/s of ``server`` over ``baseline``'s, per concurrency level."""
    base = {level["clients"]: level["requests_per_s"] for level in baseline["concurrency"]}
    return {
        str(level["clients"]): round(level["requests_per_s"] / base[level["clients"]], 2)
        for level in server["concurrency"]
    }


def p50_ratio(server: dict, baseline: dict) -> float:
    return round(server["single_query"]["p50_ms"] / baseline["single_query"]["p50_ms"], 3)


def start_server(data_dir: Path, microbatch: bool, backend: str, device: str = "cpu") -> tuple[subprocess.Popen, str]:
    """A `stella-search serve` process on a free loopback port; its output goes to ``<data_dir>.log``."""
    port = free_port()
    stella = os.path.join(os.path.dirname(sys.executable), "stella-search")
    # the installed console script, or the CLI module where the project is not installed (the GPU machine)
    command = [stella] if os.path.exists(stella) else [sys.executable, "-m", "search_api.cli"]
    env = {
        **os.environ,
        "STELLA_SEARCH_SERVER__MICROBATCH": "true" if microbatch else "false",
        "STELLA_SEARCH_ENCODER__BACKEND": backend,
    }
    server = subprocess.Popen(
        [*command, "serve", "--data-dir", str(data_dir), "--port", str(port), "--device", device],
        stdout=open(f"{data_dir}.log", "wb"),  # noqa: SIM115 - the child holds it; read back if it fails
        stderr=subprocess.STDOUT,
        env=env,
    )
    return server, f"http://127.0.0.1:{port}"


def wait_ready(url: str, server: subprocess.Popen | None = None, seconds: float = 120, log: Path | None = None) -> None:
    """Until ``url``'s /health says ok; gives up after ``seconds`` or when the ``server`` process exits, with the
    tail of its ``log``."""
    with httpx.Client(base_url=url, timeout=60) as http:
        deadline = time.monotonic() + seconds
        while True:
            try:
                if http.get("/health").json()["status"] == "ok":
                    return
            except (httpx.TransportError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or (server is not None and server.poll() is not None):
                tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
                raise SystemExit(f"{url} did not come up\n{tail}")
            time.sleep(0.2)


async def single_queries(
    urls: dict[str, str], queries: list[str], n: int, k: int, block: int = 25, warm: int = 5
) -> dict[str, list[float]]:
    """``n`` sequential queries per server, in alternating blocks of ``block`` (the first ``warm`` of each block
    unmeasured): drift hits both servers alike, and each is measured as a lone client meets it, not just
    after the other server had the cores (alternating query by query added 3-6 ms to both, cores waking)."""
    connections = {name: await Connection.open(url) for name, url in urls.items()}
    samples: dict[str, list[float]] = {name: [] for name in urls}
    i = 0
    try:
        while min(len(s) for s in samples.values()) < n:
            for name, connection in connections.items():
                for j in range(block + warm):
                    started = time.perf_counter()
                    status, body = await connection.post(
                        "/collections/default/search", {"query": queries[(i + j) % len(queries)], "k": k}
                    )
                    if status != 200:
                        raise SystemExit(f"{name} answered {status}: {body[:200]!r}")
                    if j >= warm and len(samples[name]) < n:
                        samples[name].append(time.perf_counter() - started)
            i += block + warm
    finally:
        for connection in connections.values():
            connection.close()
    return samples


def measure_servers(tmp: Path, data_dir: Path, queries: list[str], args) -> dict:
    """Start `stella-search serve` with and without micro-batching (each on its own copy of the collection; and
    a seed-configured server, unbatched with torch, when asked), then single queries and each concurrency level, taking
    turns."""
    modes = {"unbatched": (False, args.backend), "microbatched": (True, args.backend)}
    if args.seed_server:
        modes["seed"] = (False, "torch")
    running = {}
    try:
        for name, (microbatch, backend) in modes.items():
            copy = tmp / name
            shutil.copytree(data_dir, copy)
            running[name] = start_server(copy, microbatch, backend, args.device)
            # one at a time: servers loading a trust_remote_code folder at once would race on HF's modules cache
            server, url = running[name]
            wait_ready(url, server, 600 if args.device.startswith("cuda") else 120, Path(f"{copy}.log"))
        urls = {name: url for name, (_, url) in running.items()}
        singles = asyncio.run(single_queries(urls, queries, args.singles, args.k))
        rounds: dict[str, dict[int, list[dict]]] = {name: {} for name in modes}
        for clients in (int(c) for c in args.clients.split(",")):
            for _ in range(args.rounds):
                for name, url in urls.items():
                    level = asyncio.run(load_level(url, queries, clients, args.seconds, args.k))
                    rounds[name].setdefault(clients, []).append(level)
    finally:
        for server, _ in running.values():
            server.terminate()
        for server, _ in running.values():
            server.wait(timeout=30)
    return {
        name: {
            "microbatch": microbatch,
            "backend": backend,
            "single_query": percentiles(singles[name]),
            "concurrency": [combine(levels) for levels in rounds[name].values()],
        }
        for name, (microbatch, backend) in modes.items()
    }


def combine(levels: list[dict]) -> dict:
    """One concurrency level over its rounds: total requests over total time; latency percentiles are the
    median of the rounds'."""
    seconds = sum(level["seconds"] for level in levels)
    requests = sum(level["requests"] for level in levels)
    return {
        "clients": levels[0]["clients"],
        "seconds": round(seconds, 2),
        "requests": requests,
        "errors": sum(level["errors"] for level in levels),
        "requests_per_s": round(requests / seconds, 1),
        "requests_per_s_by_round": [level["requests_per_s"] for level in levels],
        "p50_ms": round(float(np.median([level["p50_ms"] for level in levels])), 2),
        "p99_ms": round(float(np.median([level["p99_ms"] for level in levels])), 2),
        "mean_ms": round(sum(level["mean_ms"] * level["n"] for level in levels) / max(requests, 1), 2),
        "n": requests,
    }


if __name__ == "__main__":
    main()
