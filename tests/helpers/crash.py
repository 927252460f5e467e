"""The crash checker: clients that write and record what the server acknowledged, and the checks that count
each loss by kind after a restart. ``scripts/crasher.py`` runs it for hundreds of kills; tests/scripts/test_crasher.py
runs it for a few and shows that it finds each kind of loss."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tests.helpers.processes import ServerProcess  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[2]
CORPORA = [ROOT / "tests" / "data" / name / "corpus.jsonl" for name in ("scifact", "dbpedia", "msmarco")]
COLLECTION = "/collections/default"
GONE = ("deleted",)
LOSS_KINDS = ("not_found", "wrong_text", "dense_missing", "lexical_missing", "resurrected")
INVARIANT_KINDS = ("partial_write", "index_count", "unexpected_response")
EXCERPT_WORDS = (20, 60)
GONE_SAMPLE = 100  # earlier deletes re-checked per client and restart (the latest round's are all checked)
SEARCH_BATCH = 256  # the server's default max_batch_queries


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
