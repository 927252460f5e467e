"""Kill the server while several clients write, restart it, and prove that no acknowledged write was lost.

A real `stella-search serve` process on a free 127.0.0.1 port. Several client threads write at once: each upserts
new documents, replaces its own documents and deletes them (by id, one by one, and by metadata filter), and records
every operation the server acknowledged. Each client owns its documents, so what each one should find is exact
however the threads interleave. At a random moment the server gets SIGKILL (or, in some rounds, SIGTERM and then
SIGKILL a moment later, which can land during the shutdown's index checkpoint; with ``--aim-deletes``, a SIGKILL
a moment after a delete's request is sent). After each restart every acknowledged document is checked, and each
failure is counted by kind:

- ``not_found``: an acknowledged upsert whose document the server does not return by id;
- ``wrong_text``: returned by id, but with another text, title or metadata (an older version, say);
- ``dense_missing``: returned by id, but a dense search for its own text, restricted by a metadata filter to that
  document, does not find it (the vector index lacks a vector SQLite has);
- ``lexical_missing``: the same with a lexical (BM25) search (the full-text index lacks it);
- ``resurrected``: an acknowledged delete whose document is back.

A search for a document's own text that misses it in the unfiltered top ``--k`` but finds it with the filter is
a ranking miss, counted apart (not a loss). An operation in flight at the kill may have landed or not: the checker
accepts either and learns which (counted per kind of operation: a delete answered by nobody may well have been
applied), but it must have landed whole (``partial_write`` otherwise). The index must hold exactly the stored
passages (``index_count``). The JSON result has the counts per kind, the kills and the operations, and the loss
rate per acknowledged document write with a one-sided 95% Clopper-Pearson upper bound (about 3/N when nothing was
lost in N writes). Bounded in kills and time.

    python scripts/crasher.py --kills 300 --clients 4 --out scripts/results/crasher.json
"""

from __future__ import annotations

import argparse
import json
import math
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
ROOT = Path(__file__).resolve().parents[1]
CORPORA = [ROOT / "tests" / "data" / name / "corpus.jsonl" for name in ("scifact", "dbpedia", "msmarco")]
COLLECTION = "/collections/default"
GONE = ("deleted",)
LOSS_KINDS = ("not_found", "wrong_text", "dense_missing", "lexical_missing", "resurrected")
INVARIANT_KINDS = ("partial_write", "index_count", "unexpected_response")
EXCERPT_WORDS = (20, 60)
GONE_SAMPLE = 100  # earlier deletes re-checked per client and restart (the latest round's are all checked)
SEARCH_BATCH = 256  # the server's default max_batch_queries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll ``url``/ready until it answers 200; RuntimeError naming the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not come up; its log is {log}")
        time.sleep(0.1)


def clopper_pearson_upper(losses: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided upper bound on a rate after ``losses`` in ``trials``: the p at which P(X <= losses) = 1 - confidence.

    >>> round(clopper_pearson_upper(0, 1000), 5)  # 1 - 0.05 ** (1 / 1000): the "3/N" rule
    0.00299
    """
    if trials == 0:
        return 1.0
    if losses >= trials:
        return 1.0
    alpha = 1 - confidence

    def cdf(p: float) -> float:
        total = 0.0
        for i in range(losses + 1):
            log_term = math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1)
            log_term += i * math.log(p) + (trials - i) * math.log1p(-p)
            total += math.exp(log_term)
        return total

    low, high = losses / trials, 1.0
    for _ in range(200):
        mid = (low + high) / 2
        if cdf(mid) > alpha:
            low = mid
        else:
            high = mid
    return high


def searchable_words(text: str) -> int:
    """Words with a letter or a digit: what the full-text tokenizer (unicode61) keeps of ``text``."""
    return sum(any(c.isalnum() for c in word) for word in text.split())


def self_query(title: str | None, text: str) -> str:
    """The query a document is searched by: its text, or its title and text when its text has no word."""
    return text if searchable_words(text) or not title else f"{title} {text}"


def load_excerpts(seed: int) -> list[tuple[str | None, str]]:
    """(title, text) excerpts of the carried BEIR corpora, shuffled: real text that a search for it finds."""
    rng = random.Random(seed)
    excerpts = []
    for path in CORPORA:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                words = record.get("text", "").split()
                if len(words) >= EXCERPT_WORDS[0]:
                    start = rng.randint(0, max(0, len(words) - EXCERPT_WORDS[1]))
                    text = " ".join(words[start : start + rng.randint(*EXCERPT_WORDS)])
                    # a stretch of a table (". . . .") has no word a lexical search could match
                    if searchable_words(text) >= EXCERPT_WORDS[0] // 2:
                        excerpts.append((record.get("title") or None, text))
    rng.shuffle(excerpts)
    return excerpts


class Client:
    """One writing thread: its own documents (ids ``c<k>-<n>``), what the server acknowledged about each, and
    what it may hold for documents of an operation in flight at a kill."""

    def __init__(self, number: int, seed: int, excerpts: list[tuple[str, str]], clients: int, target: int, batch: int):
        self.owner = f"c{number}"
        self.rng = random.Random(seed * 1000 + number)
        self.excerpts = excerpts[number::clients]
        self.next_excerpt = 0
        self.target = target
        self.batch = batch
        self.counter = 0
        self.expected: dict[str, tuple] = {}  # id -> ("present", title, text, metadata) | GONE
        self.uncertain: dict[str, list[tuple]] = {}  # id -> states it may be in after an unacknowledged op
        self.in_flight: list[str] = []  # the ids of the unacknowledged op: it must land whole or not at all
        self.in_flight_kind = ""  # upsert or delete
        self.deleted_this_round: set[str] = set()
        self.ops = {"upsert": 0, "replace": 0, "delete_ids": 0, "delete_one": 0, "delete_filter": 0}
        self.in_flight_ops = 0
        self.document_writes = {"upserted": 0, "deleted": 0}
        self.unexpected: list[str] = []
        self.acknowledged = threading.Event()  # set by this round's first acknowledgement
        self.aimed = threading.Event()  # asked to delete next, for a kill aimed at a delete
        self.delete_sent = threading.Event()  # that delete's request is being sent

    def _excerpt(self) -> tuple[str | None, str]:
        title, text = self.excerpts[self.next_excerpt % len(self.excerpts)]
        rounds = self.next_excerpt // len(self.excerpts)
        self.next_excerpt += 1
        # a second pass over the excerpts keeps texts distinct by a marker word
        return title, text if rounds == 0 else f"{text} round{rounds}"

    def _document(self, n: int, version: int) -> dict:
        title, text = self._excerpt()
        return {
            "id": f"{self.owner}-{n}",
            "title": title,
            "text": text,
            "metadata": {"owner": self.owner, "n": n, "version": version, "batch": self.rng.randint(0, 9)},
        }

    def present(self) -> list[str]:
        return [i for i, state in self.expected.items() if state != GONE and i not in self.uncertain]

    def run(self, url: str, stop: threading.Event) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            try:
                while not stop.is_set():
                    self._one_operation(http)
            except httpx.TransportError:
                pass

    def _one_operation(self, http: httpx.Client) -> None:
        present = self.present()
        fill = len(present) / self.target
        roll = self.rng.random()
        if self.aimed.is_set() and present:
            roll = self.rng.choice([0.8, 0.88, 0.95] if fill < 1 else [0.6, 0.75, 0.9])  # one of the three deletes
        if len(present) < 3 or roll < (0.6 if fill < 1 else 0.2):
            docs = []
            for _ in range(self.rng.randint(1, self.batch)):
                self.counter += 1
                docs.append(self._document(self.counter, 0))
            self._upsert(http, docs, "upsert")
        elif roll < (0.75 if fill < 1 else 0.45):
            docs = []
            for doc_id in self.rng.sample(present, min(len(present), self.rng.randint(1, self.batch))):
                n, version = self.expected[doc_id][3]["n"], self.expected[doc_id][3]["version"]
                docs.append(self._document(n, version + 1))
            self._upsert(http, docs, "replace")
        elif roll < (0.85 if fill < 1 else 0.7):
            ids = self.rng.sample(present, min(len(present), self.rng.randint(1, 3)))
            body = {"ids": ids}
            self._call(http, "POST", f"{COLLECTION}/documents/delete", body, dict.fromkeys(ids, GONE), "delete_ids")
        elif roll < (0.9 if fill < 1 else 0.8):
            doc_id = self.rng.choice(present)
            self._call(http, "DELETE", f"{COLLECTION}/documents/{doc_id}", None, {doc_id: GONE}, "delete_one")
        else:
            batch = self.rng.randint(0, 9)
            ids = [i for i in present if self.expected[i][3]["batch"] == batch]
            body = {"filter": {"owner": self.owner, "batch": batch}}
            self._call(http, "POST", f"{COLLECTION}/documents/delete", body, dict.fromkeys(ids, GONE), "delete_filter")

    def _upsert(self, http: httpx.Client, docs: list[dict], kind: str) -> None:
        effects = {d["id"]: ("present", d["title"], d["text"], d["metadata"]) for d in docs}
        self._call(http, "POST", f"{COLLECTION}/documents", {"documents": docs}, effects, kind)

    def _call(self, http: httpx.Client, method: str, path: str, body: dict | None, effects: dict, kind: str) -> None:
        for doc_id, state in effects.items():
            self.uncertain[doc_id] = [self.expected.get(doc_id, GONE), state]
        self.in_flight = list(effects)
        self.in_flight_kind = "delete" if kind.startswith("delete") else "upsert"
        if self.in_flight_kind == "delete" and self.aimed.is_set():
            self.delete_sent.set()
        try:
            response = http.request(method, path, json=body)
        except httpx.TransportError:  # the server died with this op in flight: it may or may not have landed
            self.in_flight_ops += 1
            raise
        if response.status_code != 200:  # not acknowledged: it may have landed or not, like one in flight
            self.unexpected.append(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
            return
        for doc_id, state in effects.items():
            self.expected[doc_id] = state
            self.uncertain.pop(doc_id, None)
            if state == GONE:
                self.deleted_this_round.add(doc_id)
        self.in_flight = []
        self.acknowledged.set()
        self.ops[kind] += 1
        self.document_writes["deleted" if kind.startswith("delete") else "upserted"] += len(effects)


class Checker:
    """What the restarted server holds, against what each client was acknowledged: failures counted by kind."""

    def __init__(self, k: int, seed: int):
        self.k = k
        self.rng = random.Random(seed)
        self.losses = dict.fromkeys(LOSS_KINDS, 0)
        self.invariants = dict.fromkeys(INVARIANT_KINDS, 0)
        self.ranking_misses = {"dense": 0, "lexical": 0}
        self.checks = {"documents": 0, "deleted_documents": 0, "dense_searches": 0, "lexical_searches": 0}
        self.in_flight = {kind: {"landed": 0, "not_landed": 0} for kind in ("upsert", "delete")}
        self.violations: list[str] = []

    def check(self, http: httpx.Client, clients: list[Client]) -> None:
        health = http.get("/health").json()["collections"]["default"]
        if health["index_vectors"] != health["passages"]:
            self._fail(
                "index_count", f"index holds {health['index_vectors']} vectors but SQLite {health['passages']} passages"
            )
        for client in clients:
            self._resolve_in_flight(http, client)
            self._check_deleted(http, client)
        present = []
        for client in clients:
            for doc_id in client.present():
                state = client.expected[doc_id]
                self.checks["documents"] += 1
                observed = self._observe(http, doc_id)
                if observed == GONE:
                    self._fail("not_found", f"{doc_id}: acknowledged upsert, but not found by id")
                elif observed != state:
                    self._fail("wrong_text", f"{doc_id}: acknowledged {state[1:]}, found {observed[1:]}")
                else:
                    present.append((doc_id, state))
        for mode in ("dense", "lexical"):
            self._self_search(http, present, mode)
        for client in clients:
            unexpected, client.unexpected = client.unexpected, []
            for message in unexpected:
                self._fail("unexpected_response", message)

    def _resolve_in_flight(self, http: httpx.Client, client: Client) -> None:
        """Adopt what an op in flight at the kill left (either state is fine), and require it whole."""
        if not client.uncertain:
            return
        landed = []
        for doc_id in list(client.uncertain):
            before, after = client.uncertain.pop(doc_id)
            observed = self._observe(http, doc_id)
            if observed == after and before != after:
                landed.append(True)
            elif observed == before:
                landed.append(False)
            else:
                self._fail(
                    "partial_write",
                    f"{doc_id} after an unacknowledged op is {observed[:3]}, neither before "
                    f"{before[:3]} nor after {after[:3]}",
                )
            if observed == GONE and before == GONE:  # a new document that never landed
                client.expected.pop(doc_id, None)
                continue
            client.expected[doc_id] = observed
            if observed == GONE:
                client.deleted_this_round.add(doc_id)
        if landed and len(set(landed)) > 1:
            self._fail("partial_write", f"{client.owner}: an op in flight landed for some of {client.in_flight} only")
        if landed:
            self.in_flight[client.in_flight_kind]["landed" if any(landed) else "not_landed"] += 1
        client.in_flight = []

    def _check_deleted(self, http: httpx.Client, client: Client) -> None:
        """Every delete of the last round, and a sample of older ones, must still be gone."""
        older = [i for i, s in client.expected.items() if s == GONE and i not in client.deleted_this_round]
        sample = self.rng.sample(older, min(GONE_SAMPLE, len(older)))
        for doc_id in sorted(client.deleted_this_round) + sample:
            self.checks["deleted_documents"] += 1
            if client.expected.get(doc_id) == GONE and self._observe(http, doc_id) != GONE:
                self._fail("resurrected", f"{doc_id}: acknowledged delete, but found by id")
        client.deleted_this_round = set()

    def _self_search(self, http: httpx.Client, present: list[tuple[str, tuple]], mode: str) -> None:
        """Each document searched by its own text; a miss in the top k is looked for again within its own filter."""
        for start in range(0, len(present), SEARCH_BATCH):
            chunk = present[start : start + SEARCH_BATCH]
            queries = [self_query(state[1], state[2]) for _, state in chunk]
            body = {"queries": queries, "k": self.k, "mode": mode, "group_by": "document"}
            responses = http.post(f"{COLLECTION}/search/batch", json=body).json()["responses"]
            for (doc_id, state), query, response in zip(chunk, queries, responses):
                self.checks[f"{mode}_searches"] += 1
                if doc_id in [hit["id"] for hit in response["results"]]:
                    continue
                metadata = state[3]
                within = {
                    "query": query,
                    "k": 1,
                    "mode": mode,
                    "filter": {"owner": metadata["owner"], "n": metadata["n"]},
                }
                hits = http.post(f"{COLLECTION}/search", json=within).json()["results"]
                if doc_id in [hit["id"] for hit in hits]:
                    self.ranking_misses[mode] += 1
                else:
                    self._fail(
                        f"{mode}_missing",
                        f"{doc_id}: found by id, but a {mode} search for its text does not "
                        "find it even within a filter to it",
                    )

    @staticmethod
    def _observe(http: httpx.Client, doc_id: str) -> tuple:
        response = http.get(f"{COLLECTION}/documents/{doc_id}")
        if response.status_code == 404:
            return GONE
        response.raise_for_status()
        body = response.json()
        return ("present", body["title"], body["text"], body["metadata"])

    def _fail(self, kind: str, message: str) -> None:
        (self.losses if kind in self.losses else self.invariants)[kind] += 1
        if len(self.violations) < 200:
            self.violations.append(f"{kind}: {message}")
        print(f"VIOLATION {kind}: {message}", file=sys.stderr)


class Server:
    """``stella-search serve`` in its own process group, started until /ready answers 200."""

    def __init__(self, data_dir: Path, log_path: Path):
        self.data_dir = data_dir
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        stella = os.path.join(os.path.dirname(sys.executable), "stella-search")
        command = [stella, "serve", "--data-dir", str(self.data_dir), "--port", str(port), "--model", "minilm"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_until_ready(self.url, self.process, self.log_path)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None

    def kill(self, term_first: float | None = None) -> None:
        """SIGKILL the server; with ``term_first``, SIGTERM it and SIGKILL it that many seconds later."""
        if term_first is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=term_first)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def run(args: argparse.Namespace, data_dir: Path, log_path: Path) -> dict:
    started = time.monotonic()
    rng = random.Random(args.seed)
    excerpts = load_excerpts(args.seed)
    clients = [
        Client(n, args.seed, excerpts, args.clients, max(3, args.documents // args.clients), args.batch)
        for n in range(args.clients)
    ]
    checker = Checker(args.k, args.seed)
    kills = {"sigkill": 0, "sigterm_then_sigkill": 0, "sigkill_aimed_at_a_delete": 0}
    server = Server(data_dir, log_path)
    server.start()
    httpx.post(f"{server.url}/collections", json={"name": "default", "model": "minilm"}).raise_for_status()
    while sum(kills.values()) < args.kills and time.monotonic() - started < args.max_seconds:
        stop = threading.Event()
        threads = [threading.Thread(target=c.run, args=(server.url, stop), daemon=True) for c in clients]
        for client in clients:
            client.acknowledged.clear()
        for thread in threads:
            thread.start()
        # the clock starts at the round's first acknowledged write: the first ones wait for the encoder to load
        deadline = time.monotonic() + 300
        while not any(c.acknowledged.is_set() for c in clients) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(args.min_run, args.max_run))
        aimed = rng.choice(clients) if rng.random() < args.aim_deletes else None
        if aimed is not None:  # the kill lands a moment after a delete's request is sent
            aimed.delete_sent.clear()
            aimed.aimed.set()
            aimed.delete_sent.wait(timeout=120)
            time.sleep(rng.uniform(0.0, args.aim_window))
            server.kill()
            kills["sigkill_aimed_at_a_delete"] += 1
        else:
            term = rng.random() < args.term_fraction
            server.kill(term_first=rng.uniform(0.0, 1.0) if term else None)
            kills["sigterm_then_sigkill" if term else "sigkill"] += 1
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        if aimed is not None:
            aimed.aimed.clear()
        server.start()
        with httpx.Client(base_url=server.url, timeout=120) as http:
            checker.check(http, clients)
        lost = sum(checker.losses.values())
        print(
            f"kill {sum(kills.values())}: {sum(sum(c.ops.values()) for c in clients)} ops acknowledged, "
            f"{sum(len(c.present()) for c in clients)} documents present, lost {lost}",
            file=sys.stderr,
        )
        save(args.out, report(args, clients, checker, kills, time.monotonic() - started, finished=False))
    server.stop()
    return report(args, clients, checker, kills, time.monotonic() - started, finished=True)


def save(out: Path, result: dict) -> None:
    """Write the result atomically: a long run leaves its figures so far after every round."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


def report(
    args: argparse.Namespace, clients: list[Client], checker: Checker, kills: dict, seconds: float, finished: bool
) -> dict:
    ops = {kind: sum(c.ops[kind] for c in clients) for kind in clients[0].ops}
    writes = {kind: sum(c.document_writes[kind] for c in clients) for kind in ("upserted", "deleted")}
    acknowledged = sum(writes.values())
    lost = sum(checker.losses.values())
    return {
        "benchmark": "crasher",
        "kills": sum(kills.values()),
        **kills,
        "clients": args.clients,
        "acknowledged_ops": sum(ops.values()),
        "acknowledged_ops_by_kind": ops,
        "acknowledged_document_writes": acknowledged,
        "acknowledged_document_writes_by_kind": writes,
        "in_flight_ops_at_kill": sum(c.in_flight_ops for c in clients),
        "in_flight_ops_landed": checker.in_flight,
        "losses_by_kind": checker.losses,
        "lost": lost,
        "invariant_violations_by_kind": checker.invariants,
        "ranking_misses": checker.ranking_misses,
        "checks": checker.checks,
        "loss_rate": {
            "per": "acknowledged document write",
            "estimate": lost / acknowledged if acknowledged else None,
            "upper_95": clopper_pearson_upper(lost, acknowledged),
            "method": "one-sided Clopper-Pearson; with 0 losses in N it is 1 - 0.05^(1/N), about 3/N",
        },
        "violations": checker.violations,
        "documents_present_at_end": sum(len(c.present()) for c in clients),
        "settings": {
            "k": args.k,
            "documents": args.documents,
            "batch": args.batch,
            "min_run": args.min_run,
            "max_run": args.max_run,
            "term_fraction": args.term_fraction,
            "aim_deletes": args.aim_deletes,
            "aim_window": args.aim_window,
        },
        "seconds": round(seconds, 1),
        "seed": args.seed,
        "finished": finished,
        "command": "python scripts/crasher.py " + " ".join(sys.argv[1:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop after this long, kills or not")
    parser.add_argument("--clients", type=int, default=4, help="writing threads, each with its own documents")
    parser.add_argument(
        "--min-run", type=float, default=0.3, help="shortest writing before a kill (after the first ack)"
    )
    parser.add_argument(
        "--max-run", type=float, default=3.0, help="longest writing before a kill (after the first ack)"
    )
    parser.add_argument("--term-fraction", type=float, default=0.2, help="kills that are SIGTERM, then SIGKILL")
    parser.add_argument(
        "--aim-deletes", type=float, default=0.0, help="kills that land a moment after a delete's request is sent"
    )
    parser.add_argument("--aim-window", type=float, default=0.05, help="longest such moment, in seconds")
    parser.add_argument("--batch", type=int, default=8, help="most documents per upsert")
    parser.add_argument("--documents", type=int, default=400, help="about how many documents the clients keep")
    parser.add_argument("--k", type=int, default=10, help="depth of the self-searches")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, help="kept, with the server's log beside it (default: temporary)")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/crasher.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        result = run(args, data_dir, data_dir.parent / "crasher-server.log")
    save(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "violations"}, indent=2))
    failed = result["lost"] or any(result["invariant_violations_by_kind"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
