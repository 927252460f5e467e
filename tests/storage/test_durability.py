"""The write path: atomic visibility under concurrent search, one writer across processes, resumable ingest,
delete by filter, snapshots, and rejected writes that leave the files byte-for-byte unchanged."""

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from indexer.pipeline import ingest_paths
from search_api.cli import main
from search_api.client import SearchClient
from storage.collection import Collection, Document, Manifest, Passage
from storage.errors import CollectionBusyError, InvalidInputError, InvalidSnapshotError
from storage.filters import compile_filter
from storage.snapshots import restore_snapshot, take_snapshot
from tests.helpers.data import DATA, cpu_settings, read_jsonl, server_settings, write_jsonl
from tests.helpers.server import RunningServer

STELLA = str(Path(sys.executable).parent / "stella-search")


def files_digest(collection_path: Path) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(collection_path.iterdir())
        if p.is_file() and p.name != "write.lock"
    }


# -- metadata filters ---------------------------------------------------------------------------------------

DIM = 4


def small_collection(path, docs):
    collection = Collection.create(path, Manifest(model="t", model_id="t", revision="1", dim=DIM, head="native"))
    vectors = np.eye(len(docs), DIM, dtype="float32") + 0.01
    collection.write(
        [Document(i, None, f"text {i}", m) for i, m in docs],
        [Passage(i, 0, f"text {i}", 0, 6) for i, _ in docs],
        vectors,
    )
    return collection


FILTER_CASES = [
    ({"year": 2020}, {"a"}),
    ({"year": {"$gte": 2020}}, {"a", "b"}),
    ({"year": {"$lt": 2020}}, {"c"}),
    ({"year": {"$gt": "1999"}}, set()),  # strings never compare with numbers
    ({"lang": {"$in": ["en", "de"]}}, {"a", "c"}),
    ({"lang": {"$nin": ["en"]}}, {"b", "c", "d"}),  # d has no lang, so it is not "en"
    ({"lang": {"$ne": "en"}}, {"b", "c", "d"}),
    ({"tags": "road"}, {"a", "b"}),  # list membership
    ({"tags": {"$exists": False}}, {"c", "d"}),
    ({"$or": [{"lang": "fr"}, {"year": {"$lt": 2020}}]}, {"b", "c"}),
    ({"$and": [{"year": {"$gte": 2019}}, {"tags": {"$in": ["rail"]}}]}, {"b"}),
]


@pytest.mark.parametrize("indexed", [False, True], ids=["scan", "indexed"])
@pytest.mark.parametrize("where, expected", FILTER_CASES, ids=[json.dumps(c[0]) for c in FILTER_CASES])
def test_delete_by_metadata_filter(tmp_path, where, expected, indexed):
    docs = [
        ("a", {"year": 2020, "lang": "en", "tags": ["road"]}),
        ("b", {"year": 2021, "lang": "fr", "tags": ["road", "rail"]}),
        ("c", {"year": 1999, "lang": "de"}),
        ("d", {"year": "1999"}),
    ]
    with small_collection(tmp_path / "c", docs) as collection:
        if indexed:
            for field_name in ("year", "lang", "tags"):
                collection.index_field(field_name)
        assert collection.delete(where=where) == len(expected)
        remaining = {h.document_id for h in collection.search(np.ones((1, DIM), dtype="float32"), k=10)[0]}
        assert remaining == {"a", "b", "c", "d"} - expected
        assert collection.index_size == collection.count_passages() == 4 - len(expected)


@pytest.mark.parametrize(
    "where, message",
    [
        ({"year'); DROP TABLE documents; --": 1}, "invalid metadata field name"),
        ({'a"b': 1}, "invalid metadata field name"),
        ({"year": {"$regex": ".*"}}, "unknown operator '$regex'"),
        ({"$where": "1=1"}, "unknown operator '$where'"),
        ({"year": {"$in": "2020"}}, "takes a non-empty list"),
        ({"year": {"$gt": [1]}}, "takes a string, number, boolean or null"),
        ({"year": {"$exists": "yes"}}, "takes true or false"),
        ({"$or": []}, "non-empty list"),
        ([1, 2], "must be a non-empty object"),
    ],
)
def test_bad_filters_are_clear_errors(where, message):
    with pytest.raises(InvalidInputError, match=message.replace("$", r"\$")):
        compile_filter(where)


def test_deeply_nested_filters_are_refused():
    where = {"year": 1}
    for _ in range(12):
        where = {"$and": [where]}
    with pytest.raises(InvalidInputError, match="nested more than 8 levels"):
        compile_filter(where)


def test_sql_in_values_is_only_ever_a_bound_parameter(tmp_path):
    docs = [("a", {"name": "x'); DELETE FROM documents; --"}), ("b", {"name": "y"})]
    with small_collection(tmp_path / "c", docs) as collection:
        assert collection.delete(where={"name": "y'); DELETE FROM documents; --"}) == 0
        assert collection.count_documents() == 2
        assert collection.delete(where={"name": "x'); DELETE FROM documents; --"}) == 1
        assert collection.count_documents() == 1


# -- concurrency ----------------------------------------------------------------------------------------------


def test_searches_see_each_upsert_whole_or_not_at_all(tmp_path, minilm):
    data = tmp_path / "data"
    corpus = write_jsonl(tmp_path / "c.jsonl", read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=40))
    ingest_paths([corpus], data, "default", cpu_settings(), model="minilm")
    batch, batches = 25, 6
    seen_counts, errors = [], []
    done = threading.Event()

    with RunningServer(server_settings(data)) as server:

        def search_loop():
            with SearchClient(server.url, retries=0) as client:
                while not done.is_set():
                    try:
                        response = client.search("zebra bulk document", k=1000)
                    except Exception as exc:  # any failure is a test failure, recorded with its message
                        errors.append(repr(exc))
                        continue
                    ids = [h.id for h in response.results if h.id.startswith("bulk-")]
                    assert len(ids) == len(set(ids))
                    seen_counts.append(len(ids))

        readers = [threading.Thread(target=search_loop) for _ in range(3)]
        for reader in readers:
            reader.start()
        with SearchClient(server.url, retries=0) as client:
            for b in range(batches):
                docs = [
                    {"id": f"bulk-{b}-{i}", "text": f"zebra bulk document {b} {i} about striped animals"}
                    for i in range(batch)
                ]
                client.upsert(docs)
                time.sleep(0.05)
            for b in range(batches):  # replacements must never show a document twice or not at all
                client.upsert(
                    [{"id": f"bulk-{b}-{i}", "text": f"zebra bulk document rewritten {b} {i}"} for i in range(batch)]
                )
        time.sleep(0.2)
        done.set()
        for reader in readers:
            reader.join()
    assert not errors
    assert len(seen_counts) > 10
    assert all(count % batch == 0 for count in seen_counts), sorted(set(seen_counts))
    assert seen_counts[-1] == batch * batches


def test_a_second_writer_waits_or_fails_naming_the_holder(tmp_path):
    data = tmp_path / "data"
    first = write_jsonl(tmp_path / "a.jsonl", [{"_id": "a", "text": "first writer"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"_id": "b", "text": "second writer"}])
    runner = CliRunner()
    assert runner.invoke(main, ["ingest", str(first), "--data-dir", str(data), "--model", "minilm"]).exit_code == 0
    holder = Collection.open(data / "default")
    with holder.writing():
        result = subprocess.run(
            [STELLA, "ingest", str(second), "--data-dir", str(data), "--model", "minilm"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ},
        )
        assert result.returncode == 2
        assert f"being written by pid {os.getpid()}" in result.stderr and "--wait" in result.stderr
        waiting = subprocess.Popen(
            [STELLA, "ingest", str(second), "--data-dir", str(data), "--model", "minilm", "--wait", "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert waiting.poll() is None  # still waiting for the lock
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    holder.close()
    with Collection.open(data / "default") as collection:
        assert collection.count_documents() == 2 and collection.index_size == 2


def test_two_ingest_processes_on_one_collection(tmp_path):
    data = tmp_path / "data"
    records = read_jsonl(DATA / "msmarco" / "corpus.jsonl", limit=120)
    halves = [write_jsonl(tmp_path / f"{i}.jsonl", records[i * 60 : (i + 1) * 60]) for i in range(2)]
    procs = [
        subprocess.Popen(
            [STELLA, "ingest", str(h), "--data-dir", str(data), "--model", "minilm", "--wait", "300"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for h in halves
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with Collection.open(data / "default") as collection:
        assert collection.count_documents() == 120
        assert collection.index_size == collection.count_passages() == 120


def test_the_server_sees_writes_made_by_another_process(tmp_path):
    data = tmp_path / "data"
    first = write_jsonl(tmp_path / "a.jsonl", [{"_id": "a", "text": "the original document"}])
    CliRunner().invoke(main, ["ingest", str(first), "--data-dir", str(data), "--model", "minilm"])
    with RunningServer(server_settings(data)) as server, SearchClient(server.url, retries=0) as client:
        assert [h.id for h in client.search("anything", k=10).results] == ["a"]
        later = write_jsonl(tmp_path / "b.jsonl", [{"_id": "b", "text": "an okapi lives in the forest"}])
        result = subprocess.run(
            [STELLA, "ingest", str(later), "--data-dir", str(data)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert client.search("okapi forest animal", k=1).results[0].id == "b"
        subprocess.run([STELLA, "delete", "--data-dir", str(data), "--id", "a"], check=True, capture_output=True)
        assert [h.id for h in client.search("anything", k=10).results] == ["b"]
        assert client.health().collections["default"]["index_vectors"] == 1


# -- resumable ingest ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_an_interrupted_ingest_resumes_without_reencoding_committed_batches(tmp_path, sig):
    data = tmp_path / "data"
    corpus = write_jsonl(tmp_path / "c.jsonl", read_jsonl(DATA / "msmarco" / "corpus.jsonl", limit=150))
    env = {**os.environ, "STELLA_SEARCH_INGEST__COMMIT_DOCUMENTS": "25"}
    args = [STELLA, "ingest", str(corpus), "--data-dir", str(data), "--model", "minilm", "--json"]
    # a shell without job control starts background jobs with SIGINT ignored, and children inherit that: give the
    # ingest the default disposition so the test means the same however the suite was launched
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    db = data / "default" / "collection.db"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            conn = sqlite3.connect(db, timeout=0.2)  # never stall the poll behind a busy writer
            try:
                if conn.execute("SELECT count(*) FROM documents").fetchone()[0] >= 50:
                    break
            except sqlite3.OperationalError:
                pass
            finally:
                conn.close()
        time.sleep(0.05)
    assert proc.poll() is None, "the ingest finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    with Collection.open(data / "default") as collection:  # nothing half-written: rows and index agree
        committed = collection.count_documents()
        assert collection.index_size == collection.count_passages() == committed
        assert 50 <= committed < 150 and committed % 25 == 0
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["documents_unchanged"] == committed
    assert report["documents_added"] == 150 - committed  # only the batch in flight and the rest are encoded
    assert report["collection"] == {"documents": 150, "passages": 150}


# -- snapshots ------------------------------------------------------------------------------------------------


def test_snapshot_while_serving_then_restore_verified(tmp_path):
    data = tmp_path / "data"
    corpus = write_jsonl(tmp_path / "c.jsonl", read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=30))
    ingest_paths([corpus], data, "default", cpu_settings(), model="minilm")
    with RunningServer(server_settings(data)) as server, SearchClient(server.url, retries=0) as client:
        taken = httpx.post(f"{server.url}/collections/default/snapshots").json()
        assert taken["documents"] == 30
        client.upsert([{"id": "after", "text": "written after the snapshot"}])
        assert [s["snapshot"] for s in httpx.get(f"{server.url}/snapshots").json()] == [taken["snapshot"]]
        restored = httpx.post(
            f"{server.url}/collections/restore", json={"snapshot": taken["snapshot"], "collection": "restored"}
        )
        assert restored.status_code == 201 and restored.json()["documents"] == 30
        assert (
            client.search("Oceanic Airlines", k=1, collection="restored").results[0].id
            == client.search("Oceanic Airlines", k=1).results[0].id
        )
        refused = httpx.post(
            f"{server.url}/collections/restore", json={"snapshot": taken["snapshot"], "collection": "default"}
        )
        assert refused.status_code == 409
        missing = httpx.post(f"{server.url}/collections/restore", json={"snapshot": "nope", "collection": "x"})
        assert missing.status_code == 404


def test_a_damaged_snapshot_is_refused_and_nothing_is_installed(tmp_path, minilm):
    with Collection.create(tmp_path / "data" / "c", minilm.manifest()) as collection:
        docs = [Document("a", None, "alpha"), Document("b", None, "beta")]
        collection.write(
            docs, [Passage(d.id, 0, d.text, 0, 5) for d in docs], minilm.encode_passages(["alpha", "beta"])
        )
        take_snapshot(collection, tmp_path / "snap")
    restore_snapshot(tmp_path / "snap", tmp_path / "data" / "copy")
    with Collection.open(tmp_path / "data" / "copy") as copy:
        assert copy.count_documents() == 2 and copy.index_size == 2
    index = tmp_path / "snap" / "index.faiss"
    index.write_bytes(index.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(InvalidSnapshotError, match="index.faiss fails its checksum"):
        restore_snapshot(tmp_path / "snap", tmp_path / "data" / "second")
    assert not (tmp_path / "data" / "second").exists()


def test_cli_snapshot_and_restore_replace_keeps_the_old_copy(tmp_path):
    data = tmp_path / "data"
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "kept"}])
    runner = CliRunner()
    runner.invoke(main, ["ingest", str(corpus), "--data-dir", str(data), "--model", "minilm"])
    result = runner.invoke(main, ["snapshot", "--data-dir", str(data), "--out", str(tmp_path / "snap")])
    assert result.exit_code == 0, result.output
    more = write_jsonl(tmp_path / "m.jsonl", [{"_id": "b", "text": "added later"}])
    runner.invoke(main, ["ingest", str(more), "--data-dir", str(data)])
    refused = runner.invoke(main, ["restore", str(tmp_path / "snap"), "--data-dir", str(data)])
    assert refused.exit_code == 2 and "already exists" in refused.output
    done = runner.invoke(main, ["restore", str(tmp_path / "snap"), "--data-dir", str(data), "--replace"])
    assert done.exit_code == 0, done.output
    with Collection.open(data / "default") as collection:
        assert collection.count_documents() == 1
    assert any(p.name.startswith(".replaced-default-") for p in data.iterdir())


# -- rejected writes ----------------------------------------------------------------------------------------

REJECTED = [
    ({"documents": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]}, 400),
    ({"documents": [{"id": "x", "text": "   "}]}, 400),
    ({"documents": [{"id": "x", "text": "y" * 5000}]}, 413),
    ({"documents": [{"id": "x", "text": "ok", "metadata": ["list"]}]}, 422),
    ({"documents": [{"id": "x", "text": "ok", "metadata": {"$where": 1}}]}, 400),
    ({"documents": [{"id": "x", "text": "ok", "metadata": {"": 1}}]}, 400),
    ({"documents": [{"id": "x", "text": "ok", "vector": [1.0]}]}, 422),
]


def test_rejected_writes_leave_the_collection_byte_for_byte_unchanged(tmp_path):
    data = tmp_path / "data"
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "existing document", "year": 2020}])
    ingest_paths([corpus], data, "default", cpu_settings(), model="minilm")
    with RunningServer(server_settings(data, max_document_chars=4000)) as server:
        before = files_digest(data / "default")
        for body, status in REJECTED:
            response = httpx.post(f"{server.url}/collections/default/documents", json=body)
            assert response.status_code == status, (body, response.text)
        for body in ({"filter": {"year": {"$regex": "x"}}}, {}, {"ids": "a"}):
            assert httpx.post(f"{server.url}/collections/default/documents/delete", json=body).status_code in (400, 422)
        wrong_dim = httpx.post(f"{server.url}/collections", json={"name": "default", "model": "minilm", "dim": 128})
        assert wrong_dim.status_code == 409
        assert files_digest(data / "default") == before
        deleted = httpx.post(f"{server.url}/collections/default/documents/delete", json={"filter": {"year": 2020}})
        assert deleted.json() == {"deleted": 1}


def test_in_process_writer_lock_times_out_with_a_clear_error(tmp_path):
    with small_collection(tmp_path / "c", [("a", {})]) as first, Collection.open(tmp_path / "c") as second:
        with first.writing():
            done = []
            thread = threading.Thread(target=lambda: done.append(_try_write(second)))
            thread.start()
            thread.join()
        assert "being written by" in done[0]


def _try_write(collection):
    try:
        with collection.writing(wait=0.2):
            return "acquired"
    except CollectionBusyError as exc:
        return str(exc)
