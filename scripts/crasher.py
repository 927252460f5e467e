"""Kill the server while it writes, restart it, and prove that no acknowledged write was lost.

A real `stella-search serve` process on a free 127.0.0.1 port; a client thread upserts new documents, replaces
and deletes existing ones (by id and by metadata filter), recording every operation the server acknowledged.
At a random moment the server gets SIGKILL. After each restart the checker requires: every acknowledged upsert
is there with its exact text and metadata and is found by searching its own text, every acknowledged delete is
gone, and the index holds exactly the stored passages. An operation in flight at the kill may have landed or
not; the checker accepts either and learns which. Bounded in kills and time; stops by itself.

    python scripts/crasher.py --kills 30 --out scripts/results/crasher.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORDS = (
    "vector index passage query shard replica commit durable crash restart search faiss sqlite "
    "matryoshka stella embedding latency recall journal checkpoint snapshot"
).split()
GONE = ("deleted",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Crasher:
    def __init__(self, data_dir: Path, seed: int, batch: int):
        self.data_dir = data_dir
        self.rng = random.Random(seed)
        self.batch = batch
        self.expected: dict[str, tuple] = {}  # id -> ("present", text, metadata) | GONE
        self.uncertain: dict[str, list[tuple]] = {}  # id -> states it may be in after an unacknowledged op
        self.counter = 0
        self.stats = {
            "kills": 0,
            "acknowledged_ops": 0,
            "acknowledged_upserts": 0,
            "acknowledged_deletes": 0,
            "unacknowledged_ops": 0,
            "documents_checked": 0,
            "searches_checked": 0,
            "lost": 0,
            "violations": [],
        }
        self.server: subprocess.Popen | None = None
        self.url = ""

    # -- the server --------------------------------------------------------------------------------------

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        stella = os.path.join(os.path.dirname(sys.executable), "stella-search")
        self.server = subprocess.Popen(
            [
                stella,
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(port),
                "--model",
                "minilm",
                "--device",
                "cpu",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).json()["status"] == "ok":
                    return
            except (httpx.TransportError, ValueError):
                pass
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not come up")
            time.sleep(0.1)

    def kill(self) -> None:
        os.killpg(self.server.pid, signal.SIGKILL)
        self.server.wait()
        self.stats["kills"] += 1

    # -- the writer ---------------------------------------------------------------------------------------

    def _new_document(self) -> dict:
        self.counter += 1
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(8, 40)))
        return {
            "id": f"doc-{self.counter}",
            "title": f"Document {self.counter}",
            "text": f"crash test document {self.counter} version {self.rng.randint(0, 10**9)}: {words}",
            "metadata": {"n": self.counter, "group": self.rng.choice(["a", "b", "c"]), "batch": self.counter // 10},
        }

    def _present(self) -> list[str]:
        return [i for i, state in self.expected.items() if state != GONE and i not in self.uncertain]

    def write_until_killed(self, http: httpx.Client, stop: threading.Event) -> None:
        try:
            self._write(http, stop)
        except httpx.TransportError:
            pass

    def _write(self, http: httpx.Client, stop: threading.Event) -> None:
        while not stop.is_set():
            roll = self.rng.random()
            present = self._present()
            if roll < 0.55 or len(present) < 5:
                self._upsert(http, [self._new_document() for _ in range(self.rng.randint(1, self.batch))])
            elif roll < 0.75:
                docs = []
                for doc_id in self.rng.sample(present, min(len(present), self.rng.randint(1, self.batch))):
                    n = int(doc_id.split("-")[1])
                    docs.append(
                        {
                            "id": doc_id,
                            "text": f"crash test document {n} rewritten {self.rng.random()}",
                            "metadata": {"n": n, "group": "rewritten"},
                        }
                    )
                self._upsert(http, docs)
            elif roll < 0.9:
                ids = self.rng.sample(present, min(len(present), self.rng.randint(1, 3)))
                self._call(
                    http,
                    "POST",
                    "/collections/default/documents/delete",
                    {"ids": ids},
                    dict.fromkeys(ids, GONE),
                    "delete",
                )
            else:
                batch = self.rng.choice(
                    [self.expected[i][2]["batch"] for i in present if "batch" in self.expected[i][2]]
                )
                ids = [i for i in present if self.expected[i][2].get("batch") == batch]
                # only documents whose metadata still says this batch: the filter is exact
                self._call(
                    http,
                    "POST",
                    "/collections/default/documents/delete",
                    {"filter": {"batch": batch}},
                    dict.fromkeys(ids, GONE),
                    "delete",
                )

    def _upsert(self, http: httpx.Client, docs: list[dict]) -> None:
        effects = {d["id"]: ("present", d["text"], d["metadata"]) for d in docs}
        self._call(http, "POST", "/collections/default/documents", {"documents": docs}, effects, "upsert")

    def _call(self, http: httpx.Client, method: str, path: str, body: dict, effects: dict, kind: str) -> None:
        for doc_id, state in effects.items():
            self.uncertain[doc_id] = [self.expected.get(doc_id, GONE), state]
        try:
            response = http.request(method, path, json=body)
        except httpx.TransportError:  # the server died with this op in flight: it may or may not have landed
            self.stats["unacknowledged_ops"] += 1
            raise
        if response.status_code != 200:
            raise SystemExit(f"{method} {path} answered {response.status_code}: {response.text}")
        for doc_id, state in effects.items():
            self.expected[doc_id] = state
            self.uncertain.pop(doc_id, None)
        self.stats["acknowledged_ops"] += 1
        self.stats[f"acknowledged_{kind}s"] += 1

    # -- the checker --------------------------------------------------------------------------------------

    def check(self, http: httpx.Client, searches: int) -> None:
        health = http.get("/health").json()["collections"]["default"]
        if health["index_vectors"] != health["passages"]:
            self._violation(f"index holds {health['index_vectors']} vectors but SQLite {health['passages']} passages")
        for doc_id in list(self.uncertain):
            observed = self._observe(http, doc_id)
            if observed not in self.uncertain[doc_id]:
                self._violation(
                    f"{doc_id} after an unacknowledged op is {observed}, not one of {self.uncertain[doc_id]}"
                )
            self.expected[doc_id] = observed
            del self.uncertain[doc_id]
        for doc_id, state in self.expected.items():
            self.stats["documents_checked"] += 1
            if self._observe(http, doc_id) != state:
                self.stats["lost"] += 1
                self._violation(f"{doc_id}: acknowledged {state[0]} but found otherwise")
        present = self._present()
        for doc_id in self.rng.sample(present, min(searches, len(present))):
            text = self.expected[doc_id][1]
            hits = http.post("/collections/default/search", json={"query": text, "k": 3}).json()["results"]
            self.stats["searches_checked"] += 1
            if doc_id not in [h["id"] for h in hits]:
                self._violation(f"{doc_id} is stored but a search for its own text does not find it")

    def _observe(self, http: httpx.Client, doc_id: str) -> tuple:
        response = http.get(f"/collections/default/documents/{doc_id}")
        if response.status_code == 404:
            return GONE
        body = response.json()
        return ("present", body["text"], body["metadata"])

    def _violation(self, message: str) -> None:
        self.stats["violations"].append(message)
        print("VIOLATION:", message, file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=1200.0, help="stop after this long, kills or not")
    parser.add_argument("--min-run", type=float, default=0.3, help="shortest time the server writes before a kill")
    parser.add_argument("--max-run", type=float, default=3.0, help="longest time the server writes before a kill")
    parser.add_argument("--batch", type=int, default=8, help="most documents per upsert")
    parser.add_argument("--searches", type=int, default=20, help="self-searches checked after each restart")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/crasher.json"))
    args = parser.parse_args()

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        crasher = Crasher(args.data_dir or Path(tmp) / "data", args.seed, args.batch)
        crasher.start()
        httpx.post(f"{crasher.url}/collections", json={"name": "default", "model": "minilm"}).raise_for_status()
        while crasher.stats["kills"] < args.kills and time.monotonic() - started < args.max_seconds:
            stop = threading.Event()
            with httpx.Client(base_url=crasher.url, timeout=60) as http:
                writer = threading.Thread(target=crasher.write_until_killed, args=(http, stop), daemon=True)
                writer.start()
                time.sleep(crasher.rng.uniform(args.min_run, args.max_run))
                crasher.kill()
                stop.set()
                writer.join(timeout=60)
            crasher.start()
            with httpx.Client(base_url=crasher.url, timeout=60) as http:
                crasher.check(http, args.searches)
            print(
                f"kill {crasher.stats['kills']}: {crasher.stats['acknowledged_ops']} ops acknowledged, "
                f"{len(crasher._present())} documents present, lost {crasher.stats['lost']}",
                file=sys.stderr,
            )
        crasher.server.terminate()
        crasher.server.wait(timeout=30)
    result = {
        "benchmark": "crasher",
        **crasher.stats,
        "documents_expected_present": len(crasher._present()),
        "seconds": round(time.monotonic() - started, 1),
        "seed": args.seed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 and not result["violations"] else 1


if __name__ == "__main__":
    sys.exit(main())
