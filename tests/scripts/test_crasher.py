"""The crash test: SIGKILL the server while clients write; no acknowledged write may be lost, by any kind of check.

The short run is three kills; the full run (hundreds of kills) is `python scripts/crasher.py`, with its figures in
docs/operations.md. The checker itself is shown to find each kind of loss it reports, from damage done to a collection
behind the server's back."""

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from storage.collection import Collection
from tests.helpers.crash import (
    GONE,
    LOSS_KINDS,
    Checker,
    Client,
    clopper_pearson_upper,
    load_excerpts,
    searchable_words,
    self_query,
)
from tests.helpers.data import ROOT, server_settings
from tests.helpers.server import RunningServer


def test_no_acknowledged_write_is_lost_across_sigkills(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "crasher.py"),
            "--kills",
            "3",
            "--clients",
            "2",
            "--max-run",
            "1.5",
            "--max-seconds",
            "600",
            "--aim-deletes",
            "0.5",
            "--seed",
            "5",
            "--out",
            str(tmp_path / "crasher.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "crasher.json").read_text())
    assert report["kills"] == 3 and report["lost"] == 0 and report["violations"] == []
    assert report["sigkill"] + report["sigterm_then_sigkill"] + report["sigkill_aimed_at_a_delete"] == 3
    assert set(report["losses_by_kind"]) == set(LOSS_KINDS) and not any(report["losses_by_kind"].values())
    assert not any(report["invariant_violations_by_kind"].values())
    assert report["acknowledged_ops"] > 0 and report["checks"]["documents"] > 0
    assert report["checks"]["dense_searches"] == report["checks"]["lexical_searches"] == report["checks"]["documents"]
    writes = report["acknowledged_document_writes"]
    assert report["loss_rate"]["upper_95"] == clopper_pearson_upper(0, writes) < 3.1 / writes


def test_every_document_is_searched_by_words_a_lexical_search_can_match():
    # a scifact table excerpt (". . . .") written with its title was counted as missing from the full-text index
    assert searchable_words(". . . .. . 3 x") == 2
    assert self_query("Genes of Brassica", ". . . .") == "Genes of Brassica . . . ."
    assert self_query("Genes of Brassica", "gene expression") == "gene expression"
    excerpts = load_excerpts(1)
    assert excerpts and all(searchable_words(text) >= 10 for _, text in excerpts)


def test_the_loss_bound_is_clopper_pearson():
    assert abs(clopper_pearson_upper(0, 1000) - (1 - 0.05 ** (1 / 1000))) < 1e-9
    # 6 losses in 3,404 writes: the bound is the rate at which 6 or fewer losses have probability 5%
    # (scipy.stats.beta.ppf(0.95, 7, 3398) = 0.0034760)
    bound = clopper_pearson_upper(6, 3404)
    assert abs(bound - 0.0034760) < 1e-7
    at_most_six = sum(math.comb(3404, i) * bound**i * (1 - bound) ** (3404 - i) for i in range(7))
    assert abs(at_most_six - 0.05) < 1e-9


def _damage(collection_path: Path, present: list[str], deleted: str) -> dict[str, str]:
    """Break one document per kind of loss, behind the server's back; returns kind -> document id."""
    victims = dict(zip(("not_found", "wrong_text", "dense_missing", "lexical_missing"), present))
    with Collection.open(collection_path) as collection:
        # the vector index lacks one document's vectors yet holds as many as SQLite has passages, as a checkpoint
        # stamped ahead of what it contains would leave it
        with collection.connection() as db:
            passage_ids = [
                r[0] for r in db.execute("SELECT id FROM passages WHERE document_id = ?", [victims["dense_missing"]])
            ]
        collection._index.remove(passage_ids)
        bogus = np.arange(10**9, 10**9 + len(passage_ids))
        collection._index.add(np.ones((len(passage_ids), collection.dim), "float32"), bogus)
        collection._stamp = collection._index.stamp(collection._stamp.max_passage_id, collection._stamp.deletion_seq)
        collection._stamp = collection._index.save(collection.path, collection._stamp)
    conn = sqlite3.connect(collection_path / "collection.db")
    with conn:
        passage_ids = [
            r[0] for r in conn.execute("SELECT id FROM passages WHERE document_id = ?", [victims["not_found"]])
        ]
        conn.execute("DELETE FROM passages WHERE document_id = ?", [victims["not_found"]])
        conn.execute("DELETE FROM documents WHERE id = ?", [victims["not_found"]])
        conn.executemany("INSERT INTO deletions (passage_id) VALUES (?)", [(p,) for p in passage_ids])
        conn.execute("UPDATE documents SET text = 'something else' WHERE id = ?", [victims["wrong_text"]])
        conn.execute(
            "DELETE FROM passages_fts WHERE rowid IN (SELECT id FROM passages WHERE document_id = ?)",
            [victims["lexical_missing"]],
        )
        conn.execute(
            "INSERT INTO documents (id, title, text, metadata, content_hash, created_at, updated_at) "
            "VALUES (?, NULL, 'back', '{}', '', '', '')",
            [deleted],
        )
    conn.close()
    return {**victims, "resurrected": deleted}


def test_the_checker_reports_each_kind_of_loss(tmp_path):
    settings = server_settings(tmp_path / "data")
    client = Client(0, seed=3, excerpts=load_excerpts(3), clients=1, target=20, batch=4)
    with RunningServer(settings) as running:
        httpx.post(f"{running.url}/collections", json={"name": "default", "model": "minilm"}).raise_for_status()
        with httpx.Client(base_url=running.url, timeout=120) as http:
            while len(client.present()) < 8 or GONE not in client.expected.values():
                client._one_operation(http)
            checker = Checker(k=10, seed=3)
            checker.check(http, [client])
    assert not any(checker.losses.values()) and not any(checker.invariants.values()), checker.violations

    deleted = next(i for i, s in client.expected.items() if s == GONE)
    client.deleted_this_round.add(deleted)
    victims = _damage(tmp_path / "data" / "default", sorted(client.present()), deleted)
    with RunningServer(settings) as running, httpx.Client(base_url=running.url, timeout=120) as http:
        checker = Checker(k=10, seed=3)
        checker.check(http, [client])
    assert checker.losses == dict.fromkeys(LOSS_KINDS, 1), checker.violations
    for kind, doc_id in victims.items():
        assert any(v.startswith(f"{kind}: {doc_id}:") for v in checker.violations), (kind, checker.violations)


def test_an_operation_in_flight_may_land_or_not_but_only_whole(tmp_path):
    settings = server_settings(tmp_path / "data")
    client = Client(0, seed=4, excerpts=load_excerpts(4), clients=1, target=20, batch=4)
    checker = Checker(k=10, seed=4)

    def unanswered_delete(http: httpx.Client, ids: list[str], applied: list[str]) -> None:
        """A delete of ``ids`` whose answer never came, of which the server applied ``applied``."""
        if applied:
            http.post("/collections/default/documents/delete", json={"ids": applied}).raise_for_status()
        for doc_id in ids:
            client.uncertain[doc_id] = [client.expected[doc_id], GONE]
        client.in_flight, client.in_flight_kind = ids, "delete"
        checker.check(http, [client])

    with RunningServer(settings) as running, httpx.Client(base_url=running.url, timeout=120) as http:
        httpx.post(f"{running.url}/collections", json={"name": "default", "model": "minilm"}).raise_for_status()
        while len(client.present()) < 6:
            client._one_operation(http)
        first, second, third = (sorted(client.present())[i : i + 2] for i in (0, 2, 4))
        unanswered_delete(http, first, applied=first)
        unanswered_delete(http, second, applied=[])
        assert checker.in_flight == {"upsert": {"landed": 0, "not_landed": 0}, "delete": {"landed": 1, "not_landed": 1}}
        assert not any(checker.invariants.values()), checker.violations
        unanswered_delete(http, third, applied=third[:1])  # torn: one document of the two
    assert checker.invariants["partial_write"] == 1 and not any(checker.losses.values()), checker.violations
    assert [client.expected[i] == GONE for i in first + second + third] == [True, True, False, False, True, False]
