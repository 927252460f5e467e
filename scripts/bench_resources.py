"""What one client can make a server hold: file descriptors, encoder memory and response size, measured on a real
`stella-search serve` process, and the same measurements of a baseline checkout in the same run.

Phases, each against the server process (its /proc/<pid>):

- encoders: a collection of MiniLM truncated to each of ``--dims`` (384, 256, 128, 64: a new encoder each) is
  created, written, searched and deleted in turn; the server's RSS after each pair, and its growth.
- descriptors: a ``--shards``-shard collection of ``--docs`` dbpedia documents, then ``--requests`` requests sent
  at once, half /health and half searches, each on its own connection; the peak count of the server's open file
  descriptors (sampled every 10 ms), and every status answered.
- search throughput: searches per second at 1 and 16 concurrent keep-alive clients, hybrid with a filter (the
  encoder, FAISS and SQLite all take part), on an unsharded copy of the same documents.
- batch response: one /search/batch of 256 queries x k=1000 on the sharded collection: its status, body size and
  the server's peak RSS growth.

``--baseline REF`` runs every phase a second time on a server from a git worktree of REF (e.g. the commit before
a change), with the same load generator; the JSON holds both. The server inherits this shell's open-files limit
(``ulimit -n``), which the JSON records: under 1,024, a server that needs more fails requests, which are counted.

    python scripts/bench_resources.py --baseline HEAD~1 --out scripts/results/bench_resources.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path, limit: int) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
            if len(out) >= limit:
                break
    return out


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Sampler:
    """The peak open descriptors and RSS of a process while the block runs, sampled every 10 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_descriptors = open_descriptors(pid)
        self.peak_rss_mb = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_descriptors = max(self.peak_descriptors, open_descriptors(self.pid))
                self.peak_rss_mb = max(self.peak_rss_mb, rss_mb(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Server:
    """`stella-search serve` from the checkout ``source`` (its code first on PYTHONPATH), MiniLM on the CPU."""

    def __init__(self, source: Path, data_dir: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        stella = Path(sys.executable).parent / "stella-search"
        command = [str(stella)] if stella.exists() else [sys.executable, "-m", "search_api.cli"]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "STELLA_SEARCH_ENCODER__MODEL": "minilm",
        }
        self.log = log
        self.process = subprocess.Popen(
            [*command, "serve", "--data-dir", str(data_dir), "--port", str(self.port), "--device", "cpu"],
            stdout=open(log, "wb"),  # noqa: SIM115 - the child holds it; read back if it fails
            stderr=subprocess.STDOUT,
            env=env,
            cwd=source,
        )
        self.http = httpx.Client(base_url=self.url, timeout=600)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                if self.http.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"{self.url} did not come up:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise SystemExit(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
        return response

    def upsert(self, collection: str, documents: list[dict], per_request: int = 250) -> None:
        for i in range(0, len(documents), per_request):
            part = {"documents": documents[i : i + per_request]}
            self.call("POST", f"/collections/{collection}/documents", json=part)

    def close(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def as_documents(records: list[dict]) -> list[dict]:
    return [
        {"id": r["_id"], "title": r.get("title") or None, "text": r.get("text") or r["title"], "metadata": {"n": n}}
        for n, r in enumerate(records)
    ]


def measure_encoders(server: Server, dims: list[int], documents: list[dict], queries: list[str]) -> dict:
    """RSS after each create/write/search/delete of a collection with a new dimension."""
    start = rss_mb(server.pid)
    after = []
    for dim in dims:
        name = f"dim-{dim}"
        server.call("POST", "/collections", json={"name": name, "model": "minilm", "dim": dim})
        server.upsert(name, documents)
        server.call("POST", f"/collections/{name}/search", json={"query": queries[0], "k": 5})
        server.call("DELETE", f"/collections/{name}")
        after.append(rss_mb(server.pid))
    return {
        "dims": dims,
        "rss_mb_at_start": start,
        "rss_mb_after_each": after,
        "growth_mb": round(after[-1] - start, 1),
    }


def one_request(url: str, kind: str, query: str, go: threading.Event) -> str:
    go.wait()
    try:
        with httpx.Client(base_url=url, timeout=300) as http:  # a connection of its own, as separate clients
            if kind == "health":
                response = http.get("/health")
            else:
                response = http.post("/collections/sharded/search", json={"query": query, "k": 10})
        return str(response.status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def measure_descriptors(server: Server, shards: int, requests: int, queries: list[str]) -> dict:
    """Peak open descriptors while ``requests`` mixed requests arrive at once, twice over."""
    idle = open_descriptors(server.pid)
    rounds = []
    for _ in range(2):
        go = threading.Event()
        with ThreadPoolExecutor(requests) as pool, Sampler(server.pid) as sampler:
            futures = [
                pool.submit(one_request, server.url, "health" if i % 2 else "search", queries[i % len(queries)], go)
                for i in range(requests)
            ]
            time.sleep(0.5)  # every thread waiting at the gate
            go.set()
            statuses = Counter(f.result() for f in futures)
        rounds.append({"peak_descriptors": sampler.peak_descriptors, "answers": dict(sorted(statuses.items()))})
    return {
        "shards": shards,
        "requests": requests,
        "descriptors_before": idle,
        "peak_descriptors": max(r["peak_descriptors"] for r in rounds),
        "descriptors_after": open_descriptors(server.pid),
        "failed_requests": sum(n for r in rounds for s, n in r["answers"].items() if s != "200"),
        "rounds": rounds,
    }


def search_client(url: str, collection: str, queries: list[str]) -> int:
    """One keep-alive client sending ``queries`` in turn (hybrid, filtered); how many were answered 200."""
    done = 0
    with httpx.Client(base_url=url, timeout=300) as http:
        for query in queries:
            body = {"query": query, "k": 10, "mode": "hybrid", "filter": {"n": {"$gte": 0}}}
            done += http.post(f"/collections/{collection}/search", json=body).status_code == 200
    return done


def measure_throughput(server: Server, collection: str, queries: list[str], searches: int = 160) -> dict:
    """Searches per second at 1 and 16 concurrent keep-alive clients."""
    out = {}
    for clients in (1, 16):
        per_client = searches // clients
        shares = [[queries[(c * per_client + i) % len(queries)] for i in range(per_client)] for c in range(clients)]
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            ok = sum(pool.map(lambda share: search_client(server.url, collection, share), shares))
        seconds = time.perf_counter() - started
        out[f"clients_{clients}"] = {"searches": per_client * clients, "ok": ok, "per_s": round(ok / seconds, 1)}
    return out


def measure_batch(server: Server, queries: list[str], count: int = 256, k: int = 1000) -> dict:
    before = rss_mb(server.pid)
    body = {"queries": [queries[i % len(queries)] for i in range(count)], "k": k}
    with Sampler(server.pid) as sampler:
        response = server.http.post("/collections/sharded/search/batch", json=body)
    return {
        "queries": count,
        "k": k,
        "status": response.status_code,
        "response_bytes": len(response.content),
        "detail": response.json().get("detail") if response.status_code != 200 else None,
        "rss_mb_before": before,
        "peak_rss_growth_mb": round(sampler.peak_rss_mb - before, 1),
    }


def measure(source: Path, tmp: Path, args, documents: list[dict], queries: list[str]) -> dict:
    data_dir = tmp / "data"
    server = Server(source, data_dir, tmp / "server.log")
    try:
        server.wait_ready()
        result = {"commit": git(source, "describe", "--always", "--dirty")}
        result["encoders"] = measure_encoders(server, args.dims, documents[:20], queries)
        server.call("POST", "/collections", json={"name": "sharded", "model": "minilm", "shards": args.shards})
        server.upsert("sharded", documents)
        server.call("POST", "/collections", json={"name": "single", "model": "minilm"})
        server.upsert("single", documents)
        result["descriptors"] = measure_descriptors(server, args.shards, args.requests, queries)
        result["search_throughput"] = measure_throughput(server, "single", queries)
        result["batch_response"] = measure_batch(server, queries)
        result["rss_mb_at_end"] = rss_mb(server.pid)
        return result
    finally:
        server.close()


def git(source: Path, *arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=source, check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="BEIR folders (dbpedia is used)")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--dims", type=lambda s: [int(d) for d in s.split(",")], default=[384, 256, 128, 64])
    parser.add_argument("--baseline", help="a git ref to measure the same way, e.g. HEAD~1")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "bench_resources.json")
    args = parser.parse_args()

    documents = as_documents(read_jsonl(args.data / "dbpedia" / "corpus.jsonl", args.docs))
    queries = [q["text"] for q in read_jsonl(args.data / "dbpedia" / "queries.jsonl", 10_000)]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "documents": len(documents),
    }
    with tempfile.TemporaryDirectory(prefix="bench-resources-") as tmp:
        tmp = Path(tmp)
        (tmp / "current").mkdir()
        result["current"] = measure(ROOT, tmp / "current", args, documents, queries)
        print(json.dumps(result["current"], indent=2), flush=True)
        if args.baseline:
            checkout = tmp / "baseline-checkout"
            git(ROOT, "worktree", "add", "--detach", str(checkout), args.baseline)
            try:
                (tmp / "baseline").mkdir()
                baseline = measure(checkout, tmp / "baseline", args, documents, queries)
                result["baseline"] = {"ref": args.baseline, **baseline}
                print(json.dumps(result["baseline"], indent=2), flush=True)
            finally:
                git(ROOT, "worktree", "remove", "--force", str(checkout))
                shutil.rmtree(checkout, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
