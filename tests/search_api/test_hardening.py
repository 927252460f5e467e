"""Regressions for the defects a code review found: each test reproduces the reported scenario."""

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from search_api.cli import main
from search_api.client import SearchClient
from storage.collection import Collection, Document, Manifest, Passage
from storage.filters import compile_filter
from tests.helpers.data import (
    DATA,
    downgrade_to_schema_v1,
    ingest_records,
    read_jsonl,
    server_settings,
)
from tests.helpers.server import RunningServer

STELLA = str(Path(sys.executable).parent / "stella-search")


def serve(data_dir, **server):
    return RunningServer(server_settings(data_dir, **server))


@pytest.fixture
def data(tmp_path):
    ingest_records(tmp_path, read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=30))
    return tmp_path / "data"


def test_nan_in_metadata_is_a_400_and_a_file_line_error(data, tmp_path):
    with serve(data) as server:
        body = b'{"documents": [{"id": "n", "text": "not a number", "metadata": {"score": NaN}}]}'
        response = httpx.post(
            f"{server.url}/collections/default/documents", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and "NaN" in response.json()["detail"]
        assert (
            httpx.post(
                f"{server.url}/collections/default/search", json={"query": "x", "filter": {"score": {"$gt": 1}}}
            ).status_code
            == 200
        )
    bad = tmp_path / "nan.jsonl"
    bad.write_text('{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "x", "score": Infinity}\n')
    result = CliRunner().invoke(main, ["ingest", str(bad), "--data-dir", str(data)])
    assert result.exit_code == 2 and "nan.jsonl line 2" in result.output


def test_a_csv_row_longer_than_its_header_is_named(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("id,text\na,first\nb,second,surplus\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["ingest", str(path), "--data-dir", str(tmp_path / "d"), "--model", "minilm"])
    assert result.exit_code == 2 and "c.csv line 3: the row has more fields than the header" in result.output


def test_a_filter_with_too_many_values_is_a_400(data):
    huge = {"$or": [{f"f{i}": {"$in": list(range(1000))}} for i in range(33)]}
    with serve(data) as server:
        response = httpx.post(f"{server.url}/collections/default/search", json={"query": "x", "filter": huge})
    assert response.status_code == 400 and "filter is too large" in response.json()["detail"]


def test_concurrent_upserts_of_one_id_both_succeed(data):
    with serve(data) as server, SearchClient(server.url, retries=0) as client:
        client.upsert([{"id": "x", "text": "version zero"}])
        for round_ in range(5):
            new_text = {"id": "x", "text": f"version {round_ + 1} with new words"}
            same_text_new_meta = {"id": "x", "text": "version zero", "metadata": {"round": round_}}
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(lambda doc: client.upsert([doc]), [new_text, same_text_new_meta]))
            assert len(results) == 2  # neither raised
            stored = client.get("x")
            assert stored.text in (new_text["text"], "version zero")
            assert len(stored.passages) == 1


def test_deleting_a_collection_while_it_is_searched_gives_no_500(data):
    statuses = set()
    with serve(data) as server:
        stop = threading.Event()

        def search_loop():
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while not stop.is_set():
                    statuses.add(http.post("/collections/default/search", json={"query": "airline"}).status_code)

        threads = [threading.Thread(target=search_loop) for _ in range(3)]
        for thread in threads:
            thread.start()
        httpx.delete(f"{server.url}/collections/default").raise_for_status()
        for _ in range(20):
            statuses.add(httpx.post(f"{server.url}/collections/default/search", json={"query": "x"}).status_code)
        stop.set()
        for thread in threads:
            thread.join()
    assert statuses <= {200, 404} and 404 in statuses
    assert not (data / "default").exists()


@pytest.mark.parametrize("indexed", [False, True])
def test_indexed_and_unindexed_filters_agree_on_objects_and_booleans(tmp_path, indexed):
    docs = [("obj", {"f": {"a": 1}}), ("one", {"f": 1}), ("yes", {"f": True}), ("list", {"f": [1, 2]})]
    collection = Collection.create(
        tmp_path / "c", Manifest(model="t", model_id="t", revision="1", dim=4, head="native")
    )
    collection.write(
        [Document(i, None, "t", m) for i, m in docs],
        [Passage(i, 0, "t", 0, 1) for i, _ in docs],
        np.eye(4, dtype="float32"),
    )
    if indexed:
        collection.index_field("f")

    def ids(where):
        sql, params = compile_filter(where, collection.indexed_fields())
        with collection.connection() as db:
            return sorted(db.execute(f"SELECT documents.id FROM documents WHERE {sql}", params).fetchall())

    assert ids({"f": 1}) == [("list",), ("one",), ("yes",)]  # true is 1 in SQLite JSON, lists match members
    assert ids({"f": {"$gte": 1}}) == [("one",)]  # ranges see numbers only: not true, not lists, not objects
    collection.close()


def test_hybrid_pages_agree_with_one_long_page(data):
    with serve(data) as server, SearchClient(server.url, retries=0) as client:
        for fusion in ("rrf", "minmax"):
            options = {"mode": "hybrid", "fusion": fusion}
            long = [r.passage_id for r in client.search("airline film city", k=20, **options).results]
            pages = [
                r.passage_id
                for offset in (0, 10)
                for r in client.search("airline film city", k=10, offset=offset, **options).results
            ]
            assert pages == long


def test_huge_pages_are_bounded_not_errors(data):
    with serve(data) as server, SearchClient(server.url, retries=0) as client:
        results = client.search("airline", k=1000, offset=10_000, group_by="document", passages_per_document=20)
        assert results.results == []
        assert len(client.search("airline", k=1000, group_by="document").results) == 30


@pytest.mark.parametrize("prepare", ["missing index", "v1 schema"])
def test_two_processes_opening_one_collection_at_once(data, prepare):
    path = data / "default"
    if prepare == "missing index":
        (path / "index.faiss").unlink()
    else:
        downgrade_to_schema_v1(path)
    procs = [
        subprocess.Popen(
            [STELLA, "info", "--data-dir", str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    with Collection.open(path) as collection:
        assert collection.index_size == collection.count_passages() == 30
        assert collection.search_lexical("airline")


def test_finished_threads_do_not_leak_connections(data):
    with Collection.open(data / "default") as collection:
        for _ in range(50):
            thread = threading.Thread(target=collection.count_documents)
            thread.start()
            thread.join()
        assert len(collection._idle) == 1 and not collection._borrowed  # one connection, reused by each thread


@pytest.mark.parametrize(
    "queries, qrels, message",
    [
        (b'{"_id": "q1"}\n', b"q1\td1\t1\n", "queries.jsonl line 1: expected a JSON object with '_id' and 'text'"),
        (b"not json\n", b"q1\td1\t1\n", "queries.jsonl line 1: expected a JSON object"),
        (b'{"_id": "q1", "text": "x"}\n', b"q1\td1\tone\n", "test.tsv line 1: expected query-id, corpus-id and an"),
        (b'{"_id": "q1", "text": "\xff"}\n', b"q1\td1\t1\n", "a file is not UTF-8 text"),
    ],
    ids=["no text", "not json", "score not a number", "not utf-8"],
)
def test_a_malformed_beir_folder_is_a_one_line_error(tmp_path, queries, qrels, message):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a document"}\n', encoding="utf-8")
    (folder / "queries.jsonl").write_bytes(queries)
    (folder / "qrels" / "test.tsv").write_bytes(qrels)
    result = CliRunner().invoke(main, ["eval", str(folder), "--data-dir", str(tmp_path / "data"), "--model", "minilm"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, result.output
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_optimize_with_a_queries_file_that_is_not_utf8_is_a_one_line_error(data, tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_bytes(b"caf\xe9 in Paris\n")  # Latin-1
    result = CliRunner().invoke(main, ["optimize", "--data-dir", str(data), "--queries", str(queries)])
    assert result.exit_code == 2 and "queries.txt is not UTF-8 text" in result.output, result.output
    assert "save the queries as UTF-8" in result.output
