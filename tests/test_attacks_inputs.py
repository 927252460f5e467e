"""Inputs an attack run sent to a served collection: each must be a clear 400 (or a CLI error), never a 500, and
nothing one document stores may make later reads fail."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from indexer.pipeline import ingest_paths
from search_api.batching import QueryBatcher
from search_api.cli import main
from storage.collection import Collection, Document, Passage

from conftest import DATA, cpu_settings, read_jsonl, server_settings, write_jsonl
from server import RunningServer, free_port

SURROGATE = "\\ud800"  # as a JSON escape: json.loads gives a str with a lone surrogate, which has no UTF-8 form


def nested(levels: int) -> dict:
    """Metadata whose innermost object sits ``levels`` objects deep."""
    metadata: dict = {"leaf": 1}
    for _ in range(levels - 1):
        metadata = {"a": metadata}
    return metadata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacks")
    corpus = write_jsonl(tmp / "c.jsonl", read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=20))
    ingest_paths([corpus], tmp / "data", "default", cpu_settings(), model="minilm")
    return tmp / "data"


@pytest.fixture(scope="module")
def server(data):
    with RunningServer(server_settings(data)) as running:
        yield running


def post_raw(server, path: str, body: str) -> httpx.Response:
    """``body`` sent as written: JSON escapes such as ``\\ud800`` reach the server's JSON parser untouched."""
    return httpx.post(
        f"{server.url}{path}", content=body.encode(), headers={"content-type": "application/json"}, timeout=120
    )


# -- metadata nesting and size ---------------------------------------------------------------------------------


def test_deeply_nested_metadata_is_a_400_naming_the_limit(server):
    for levels in (33, 256):
        response = httpx.post(
            f"{server.url}/collections/default/documents",
            json={"documents": [{"id": f"deep-{levels}", "text": "an airline", "metadata": nested(levels)}]},
            timeout=120,
        )
        assert response.status_code == 400, response.text
        assert f"nested {levels} levels deep" in response.json()["detail"]
        assert "ingest.max_metadata_depth" in response.json()["detail"]
    at_limit = {"documents": [{"id": "deep-32", "text": "an airline", "metadata": nested(32)}]}
    assert httpx.post(f"{server.url}/collections/default/documents", json=at_limit, timeout=120).status_code == 200
    document = httpx.get(f"{server.url}/collections/default/documents/deep-32").json()
    assert document["metadata"] == nested(32)
    search = httpx.post(f"{server.url}/collections/default/search", json={"query": "an airline", "k": 30}, timeout=60)
    assert search.status_code == 200 and "deep-32" in [hit["id"] for hit in search.json()["results"]]


def test_metadata_over_the_size_limit_is_a_400(server):
    body = {"documents": [{"id": "big", "text": "big metadata", "metadata": {"blob": "x" * 70_000}}]}
    response = httpx.post(f"{server.url}/collections/default/documents", json=body, timeout=120)
    assert response.status_code == 400, response.text
    assert "ingest.max_metadata_bytes" in response.json()["detail"]
    assert httpx.get(f"{server.url}/collections/default/documents/big").status_code == 404


def test_a_stored_document_with_deep_metadata_does_not_poison_reads(tmp_path):
    """A document written before writes were limited (here through the storage API, which copies what it is
    given) is still returned, with a marker, by GET and by every search that finds it."""
    corpus = write_jsonl(tmp_path / "c.jsonl", read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=5))
    ingest_paths([corpus], tmp_path / "data", "default", cpu_settings(), model="minilm")
    with Collection.open(tmp_path / "data" / "default") as collection:
        vector = collection.passage_vectors(read_jsonl(corpus)[0]["_id"])[:1]
        collection.write(
            [Document("poison", "Poison", "an old document", nested(256))],
            [Passage("poison", 0, "an old document", 0, 15)],
            vector,
        )
    with RunningServer(server_settings(tmp_path / "data")) as server:
        got = httpx.get(f"{server.url}/collections/default/documents/poison")
        assert got.status_code == 200, got.text
        metadata = got.json()["metadata"]
        assert "nested 256 levels deep" in metadata["$unreadable"]
        assert json.loads(metadata["$stored_json"]) == nested(256)
        for body in (
            {"query": "an old document", "k": 10},
            {"query": "an old document", "k": 10, "mode": "hybrid"},
            {"query": "an old document", "k": 10, "filter": {"leaf": {"$exists": False}}},
            {"query": "an old document", "k": 10, "group_by": "document", "passages_per_document": 2},
        ):
            response = httpx.post(f"{server.url}/collections/default/search", json=body, timeout=60)
            assert response.status_code == 200, (body, response.text)
            assert "poison" in [hit["id"] for hit in response.json()["results"]]
        batch = httpx.post(
            f"{server.url}/collections/default/search/batch", json={"queries": ["an old document"] * 3}, timeout=60
        )
        assert batch.status_code == 200 and all(
            "poison" in [hit["id"] for hit in r["results"]] for r in batch.json()["responses"]
        )
        similar = httpx.post(f"{server.url}/collections/default/similar", json={"text": "an old document"}, timeout=60)
        assert similar.status_code == 200


def test_file_ingest_refuses_deep_or_large_metadata_naming_the_line(tmp_path):
    records = read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=3)
    deep = write_jsonl(tmp_path / "deep.jsonl", [*records[:2], {**records[2], "metadata": nested(40)}])
    result = CliRunner().invoke(main, ["ingest", str(deep), "--data-dir", str(tmp_path / "d"), "--model", "minilm"])
    assert result.exit_code == 2, result.output
    assert "deep.jsonl line 3" in result.output and "ingest.max_metadata_depth" in result.output
    large = write_jsonl(tmp_path / "large.jsonl", [{**records[0], "blob": "y" * 70_000}])
    result = CliRunner().invoke(main, ["ingest", str(large), "--data-dir", str(tmp_path / "d"), "--model", "minilm"])
    assert result.exit_code == 2 and "large.jsonl line 1" in result.output and "max_metadata_bytes" in result.output
    assert not (tmp_path / "d" / "default").exists()  # refused before anything was written


# -- strings that are not valid Unicode ------------------------------------------------------------------------

SURROGATE_BODIES = {
    "search query": ("/collections/default/search", '{"query": "a%s"}'),
    "search filter value": ("/collections/default/search", '{"query": "a", "filter": {"lang": "%s"}}'),
    "search filter key": ("/collections/default/search", '{"query": "a", "filter": {"l%s": 1}}'),
    "search filter list": ("/collections/default/search", '{"query": "a", "filter": {"lang": {"$in": ["%s"]}}}'),
    "batch query": ("/collections/default/search/batch", '{"queries": ["fine", "a%s"]}'),
    "similar id": ("/collections/default/similar", '{"id": "x%s"}'),
    "similar text": ("/collections/default/similar", '{"text": "x%s"}'),
    "document id": ("/collections/default/documents", '{"documents": [{"id": "x%s", "text": "t"}]}'),
    "document title": ("/collections/default/documents", '{"documents": [{"id": "x", "title": "%s", "text": "t"}]}'),
    "document text": ("/collections/default/documents", '{"documents": [{"id": "x", "text": "t%s"}]}'),
    "metadata key": (
        "/collections/default/documents",
        '{"documents": [{"id": "x", "text": "t", "metadata": {"k%s": 1}}]}',
    ),
    "metadata value": (
        "/collections/default/documents",
        '{"documents": [{"id": "x", "text": "t", "metadata": {"k": ["ok", "%s"]}}]}',
    ),
    "delete id": ("/collections/default/documents/delete", '{"ids": ["%s"]}'),
    "delete filter": ("/collections/default/documents/delete", '{"filter": {"k": "%s"}}'),
    "collection name": ("/collections", '{"name": "n%s"}'),
    "snapshot name": ("/collections/restore", '{"snapshot": "s%s", "collection": "c"}'),
    "restore target": ("/collections/restore", '{"snapshot": "s", "collection": "c%s"}'),
}


@pytest.mark.parametrize("case", sorted(SURROGATE_BODIES))
def test_a_lone_surrogate_anywhere_in_a_body_is_a_400(server, case):
    path, body = SURROGATE_BODIES[case]
    response = post_raw(server, path, body % SURROGATE)
    assert response.status_code == 400, response.text
    assert "surrogate" in response.json()["detail"] or "invalid" in response.json()["detail"]
    assert httpx.get(f"{server.url}/collections/default/documents/x").status_code == 404  # nothing was written


def test_a_surrogate_escape_in_a_jsonl_file_is_refused_naming_the_line(tmp_path):
    good = json.dumps({"_id": "a", "text": "fine"})
    for bad in ('{"_id": "b", "text": "x%s"}', '{"_id": "b%s", "text": "x"}', '{"_id": "b", "text": "x", "k": "%s"}'):
        path = tmp_path / "s.jsonl"
        path.write_text(f"{good}\n{bad % SURROGATE}\n", encoding="utf-8")
        result = CliRunner().invoke(main, ["ingest", str(path), "--data-dir", str(tmp_path / "d"), "--model", "minilm"])
        assert result.exit_code == 2, result.output
        assert "s.jsonl line 2" in result.output and "surrogate" in result.output
    assert not (tmp_path / "d" / "default").exists()


def test_cli_arguments_that_are_not_utf8_are_one_line_errors(data):
    """Bytes that are not UTF-8 in argv reach Python as lone surrogates (surrogateescape)."""
    base = ["--data-dir", str(data)]
    for arguments in (
        ["search", "caf\udce9", *base],
        ["search", "airline", "--filter", json.dumps({"lang": "x"}).replace("x", SURROGATE), *base],
        ["delete", "--id", "caf\udce9", *base],
    ):
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 2, (arguments, result.output, result.exception)
        assert "surrogate" in result.output


# -- names that must match in full -----------------------------------------------------------------------------


def test_names_with_a_trailing_newline_are_refused(server, data, tmp_path):
    created = httpx.post(f"{server.url}/collections", json={"name": "default\n", "model": "minilm"}, timeout=120)
    assert created.status_code == 400, created.text
    assert "invalid collection name" in created.json()["detail"]
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == ["default"]
    field = httpx.post(f"{server.url}/collections/default/search", json={"query": "a", "filter": {"lang\n": "en"}})
    assert field.status_code == 400 and "invalid metadata field name" in field.json()["detail"]
    restored = httpx.post(f"{server.url}/collections/restore", json={"snapshot": "x\n", "collection": "fresh"})
    assert restored.status_code == 400 and "invalid snapshot name" in restored.json()["detail"]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "fine"}])
    result = CliRunner().invoke(main, ["ingest", str(corpus), "--data-dir", str(data), "--collection", "default\n"])
    assert result.exit_code == 2 and "invalid collection name" in result.output
    result = CliRunner().invoke(main, ["index-field", "lang\n", "--data-dir", str(data)])
    assert result.exit_code == 2 and "invalid metadata field name" in result.output


# -- one request must not take the server down -----------------------------------------------------------------

STELLA = str(Path(sys.executable).parent / "stella-search")


def test_too_many_shards_are_refused_naming_the_setting(server, tmp_path):
    response = httpx.post(f"{server.url}/collections", json={"name": "wide", "model": "minilm", "shards": 65})
    assert response.status_code == 400, response.text
    assert "server.max_shards" in response.json()["detail"]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "fine"}])
    result = CliRunner().invoke(main, ["ingest", str(corpus), "--data-dir", str(tmp_path / "d"), "--shards", "65"])
    assert result.exit_code == 2 and "server.max_shards" in result.output
    assert not (tmp_path / "d" / "default").exists()


def test_a_batch_too_large_to_answer_is_a_413_before_any_work(server):
    queries = [f"airline {i}" for i in range(256)]
    response = httpx.post(
        f"{server.url}/collections/default/search/batch", json={"queries": queries, "k": 1000}, timeout=120
    )
    assert response.status_code == 413, response.text[:300]
    assert (
        "server.max_response_hits" in response.json()["detail"] and "256 queries x k=1000" in response.json()["detail"]
    )
    grouped = {"query": "airline", "k": 1000, "group_by": "document", "passages_per_document": 20}
    assert httpx.post(f"{server.url}/collections/default/search", json=grouped, timeout=60).status_code == 200
    two = {"queries": ["airline", "ship"], "k": 1000, "group_by": "document", "passages_per_document": 20}
    response = httpx.post(f"{server.url}/collections/default/search/batch", json=two, timeout=60)
    assert response.status_code == 413 and "passages_per_document" in response.json()["detail"]
    within = {"queries": queries[:20], "k": 1000}
    assert httpx.post(f"{server.url}/collections/default/search/batch", json=within, timeout=120).status_code == 200


def test_encoders_no_collection_uses_are_released_and_bounded(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=10))
    ingest_paths([corpus], tmp_path / "data", "default", cpu_settings(), model="minilm")
    documents = [{"id": r["_id"], "text": r["text"]} for r in read_jsonl(corpus)]

    def loaded(url) -> list[str]:
        return httpx.get(f"{url}/health").json()["models"]

    with RunningServer(server_settings(tmp_path / "data", max_loaded_encoders=2)) as server:
        url = server.url
        assert loaded(url) == ["minilm (native, s2p)"]
        created = httpx.post(f"{url}/collections", json={"name": "d256", "model": "minilm", "dim": 256}, timeout=300)
        assert created.status_code == 201, created.text
        assert httpx.post(f"{url}/collections/d256/documents", json={"documents": documents}, timeout=300).is_success
        assert loaded(url) == ["minilm (native, s2p)", "minilm (native[:256], s2p)"]
        assert httpx.delete(f"{url}/collections/d256", timeout=60).status_code == 200
        assert loaded(url) == ["minilm (native, s2p)"]  # the deleted collection's encoder went with it
        # three collections of three encoders under a bound of two: the least recently used is released, and its
        # collection is still answered (loading it again) and still counted ready
        for dim in (256, 128):
            body = {"name": f"d{dim}", "model": "minilm", "dim": dim}
            assert httpx.post(f"{url}/collections", json=body, timeout=300).status_code == 201
            assert httpx.post(
                f"{url}/collections/d{dim}/documents", json={"documents": documents}, timeout=300
            ).is_success
        assert len(loaded(url)) == 2 and "minilm (native, s2p)" not in loaded(url)
        assert httpx.get(f"{url}/ready").status_code == 200
        for name in ("default", "d256", "d128", "default"):
            search = httpx.post(f"{url}/collections/{name}/search", json={"query": "an airline", "k": 3}, timeout=300)
            assert search.status_code == 200 and search.json()["results"], (name, search.text)
            assert len(loaded(url)) <= 2
        assert httpx.get(f"{url}/ready").status_code == 200


def test_a_closed_query_batcher_still_encodes(minilm):
    """A request may hold the batcher of an encoder released meanwhile: it encodes on its own thread."""
    batcher = QueryBatcher(minilm)
    batcher.close()
    assert batcher.encode_queries(["an airline"]).shape == (1, minilm.dim)


def test_a_64_shard_collection_answers_300_requests_at_once_within_1024_descriptors(tmp_path):
    """A real `stella-search serve` under the common default `ulimit -n` of 1024: every shard connection a fan-out
    thread ever used stayed open, per thread and per shard, until every request failed."""
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - the child holds it

    def limit_open_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    env = {**os.environ, "STELLA_SEARCH_ENCODER__MODEL": "minilm", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [STELLA, "serve", "--data-dir", str(tmp_path / "data"), "--port", str(port), "--device", "cpu"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=limit_open_files,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, tmp_path / "server.log")
        created = httpx.post(f"{url}/collections", json={"name": "wide", "model": "minilm", "shards": 64}, timeout=300)
        assert created.status_code == 201, created.text
        records = read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=200)
        documents = [{"id": r["_id"], "title": r["title"], "text": r["text"]} for r in records]
        assert httpx.post(f"{url}/collections/wide/documents", json={"documents": documents}, timeout=300).is_success
        gate = threading.Event()

        def one(i: int) -> str:
            gate.wait()
            try:
                with httpx.Client(base_url=url, timeout=300) as http:  # a connection of its own
                    if i % 2:
                        return str(http.get("/health").status_code)
                    return str(http.post("/collections/wide/search", json={"query": f"airline {i}"}).status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__

        with ThreadPoolExecutor(300) as pool:
            answers = [pool.submit(one, i) for i in range(300)]
            time.sleep(0.5)
            gate.set()
            statuses = Counter(a.result() for a in answers)
        assert statuses == {"200": 300}, (statuses, (tmp_path / "server.log").read_text(errors="replace")[-2000:])
        assert len(os.listdir(f"/proc/{process.pid}/fd")) < 1024
        assert httpx.get(f"{url}/health").json()["collections"]["wide"]["documents"] == 200
    finally:
        process.terminate()
        process.wait(timeout=60)


def wait_ready(url: str, process: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the server did not come up:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
