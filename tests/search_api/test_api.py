"""The HTTP API through a real uvicorn server, driven by the real client and by raw httpx."""

import asyncio
import inspect
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from search_api.cli import main
from search_api.client import AsyncSearchClient, SearchAPIError, SearchClient
from storage.collection import Collection, Manifest
from tests.helpers.data import (
    DATA,
    ingest_records,
    read_jsonl,
    server_settings,
    slice_dataset,
    write_jsonl,
)
from tests.helpers.processes import free_port
from tests.helpers.server import RunningServer

CORPUS = read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=80)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    ingest_records(root, CORPUS)
    return root / "data"


@pytest.fixture(scope="module")
def server(data_dir):
    settings = server_settings(data_dir, max_body_bytes=64 * 1024, max_documents_per_request=20)
    with RunningServer(settings) as running:
        yield running


@pytest.fixture
def client(server):
    with SearchClient(server.url, retries=0) as c:
        yield c


def test_search_returns_ranked_passages_with_metadata(client):
    response = client.search("fictional airline in the TV show Lost", k=5)
    assert len(response.results) == 5 and response.took_ms > 0
    top = response.results[0]
    assert (top.id, top.title) == ("<dbpedia:Oceanic_Airlines>", "Oceanic Airlines")
    assert top.text.startswith("Oceanic Airlines") and isinstance(top.metadata, dict)
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True)


def test_batch_search_equals_one_query_at_a_time(client):
    queries = ["fictional airline", "a city in France", "American film director"]
    batch = client.search_batch(queries, k=3)
    for query, response in zip(queries, batch):
        single = client.search(query, k=3)
        assert [r.passage_id for r in response.results] == [r.passage_id for r in single.results]
        assert [r.score for r in response.results] == pytest.approx([r.score for r in single.results], abs=1e-5)


def test_upsert_get_search_delete_round_trip(client):
    doc = {
        "id": "zebra-1",
        "title": "Zebra crossings",
        "text": "A zebra crossing is a striped pedestrian crossing first used in the United Kingdom in 1951.",
        "metadata": {"year": 1951, "tags": ["road"]},
    }
    result = client.upsert([doc])
    assert (result.added, result.passages_written) == (1, 1)
    hit = client.search("striped pedestrian crossing", k=1).results[0]
    assert (hit.id, hit.metadata) == ("zebra-1", {"year": 1951, "tags": ["road"]})
    stored = client.get("zebra-1")
    assert stored.text == doc["text"] and stored.passages[0].text == doc["text"]
    assert client.upsert([doc]).unchanged == 1
    assert client.delete("zebra-1").deleted == "zebra-1"
    assert all(r.id != "zebra-1" for r in client.search("striped pedestrian crossing", k=10).results)
    with pytest.raises(SearchAPIError) as err:
        client.get("zebra-1")
    assert err.value.status_code == 404 and "zebra-1" in err.value.detail


def test_a_title_only_document_is_upserted_encoded_from_its_title_and_found(client):
    doc = {"id": "okapi-1", "title": "The okapi, a forest giraffe of the Congo", "text": ""}
    result = client.upsert([doc])
    assert (result.added, result.passages_written) == (1, 1)
    stored = client.get("okapi-1")
    assert (stored.title, stored.text, [p.text for p in stored.passages]) == (doc["title"], "", [""])
    assert client.search("forest giraffe", k=1).results[0].id == "okapi-1"
    assert client.search("okapi", k=1, mode="lexical").results[0].id == "okapi-1"
    assert client.upsert([dict(doc, text="   ")]).unchanged == 1  # a blank text is no text
    client.delete("okapi-1")


def test_ids_with_slashes_and_brackets_round_trip(client):
    assert client.get("<dbpedia:Oceanic_Airlines>").title == "Oceanic Airlines"
    client.upsert([{"id": "notes/2024/a b.md", "text": "path-like identifiers survive the URL"}])
    assert client.get("notes/2024/a b.md").text == "path-like identifiers survive the URL"
    client.delete("notes/2024/a b.md")


def test_collections_create_use_and_delete(client):
    names = {c.name: c for c in client.collections()}
    assert names["default"].documents == len(CORPUS) and names["default"].dim == 384
    created = client.create_collection("scratch", model="minilm", dim=128)
    assert (created.dim, created.head, created.documents) == (128, "native[:128]", 0)
    client.upsert([{"id": "s1", "text": "only in scratch"}], collection="scratch")
    assert client.search("only in scratch", collection="scratch").results[0].id == "s1"
    client.delete_collection("scratch")
    with pytest.raises(SearchAPIError) as err:
        client.search("anything", collection="scratch")
    assert err.value.status_code == 404


ERROR_CASES = [
    ("POST", "/collections/nope/search", {"query": "x"}, 404, "no collection named 'nope'"),
    ("GET", "/collections/default/documents/missing", None, 404, "no document with id 'missing'"),
    ("DELETE", "/collections/default/documents/missing", None, 404, "no document with id 'missing'"),
    ("POST", "/collections/default/search", {"query": "x", "k": 0}, 422, "k: Input should be greater than"),
    ("POST", "/collections/default/search", {"query": "x", "k": 5000}, 400, "between 1 and 1000"),
    ("POST", "/collections/default/search", {"query": "   "}, 400, "query is empty"),
    ("POST", "/collections/default/search", {"query": "x" * 5000}, 400, "the limit is 4096"),
    ("POST", "/collections/default/search", {"qurey": "x"}, 422, "query: Field required"),
    ("POST", "/collections/default/search", {"query": "x", "moed": "dense"}, 422, "moed: Extra inputs"),
    ("POST", "/collections/default/search", {"query": "x", "mode": "fuzzy"}, 422, "mode: Input should be 'dense'"),
    ("POST", "/collections/default/search", {"query": "x", "filter": {"y": {"$regex": "a"}}}, 400, "unknown operator"),
    ("POST", "/collections/default/search", {"query": "x", "filter": {"a'--": 1}}, 400, "invalid metadata field"),
    ("POST", "/collections/default/similar", {"k": 3}, 400, "exactly one of 'id'"),
    ("POST", "/collections/default/similar", {"id": "nope"}, 404, "no document with id 'nope'"),
    ("POST", "/collections/default/search/batch", {"queries": []}, 422, "queries: List should have"),
    ("POST", "/collections/bad$name/search", {"query": "x"}, 400, "invalid collection name"),
    (
        "POST",
        "/collections/default/serach",
        {"query": "x"},
        404,
        "no endpoint POST /collections/default/serach",
    ),
    (
        "POST",
        "/collections/default/documents",
        {"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]},
        400,
        "repeated: ['a']",
    ),
    ("POST", "/collections/default/documents", {"documents": [{"id": "a", "text": " "}]}, 400, "empty text"),
    ("POST", "/collections/default/documents", {"documents": [{"id": "a", "text": ""}]}, 400, "and no title"),
    (
        "POST",
        "/collections/default/documents",
        {"documents": [{"id": "a", "title": " ", "text": ""}]},
        400,
        "empty text and no title",
    ),
    ("POST", "/collections/default/documents", {"documents": [{"id": "a"}]}, 422, "text: Field required"),
    (
        "POST",
        "/collections/default/documents",
        {"documents": [{"id": "a", "text": "t", "metadata": [1]}]},
        422,
        "metadata: Input should be a valid dictionary",
    ),
    (
        "POST",
        "/collections/default/documents",
        {"documents": [{"id": f"d{i}", "text": "t"} for i in range(21)]},
        413,
        "the limit is 20",
    ),
    (
        "POST",
        "/collections/default/documents",
        {"documents": [{"id": "big", "text": "x" * 70_000}]},
        413,
        "byte limit",
    ),
    ("POST", "/collections", {"name": "default", "model": "minilm"}, 409, "already exists"),
    (
        "POST",
        "/collections",
        {"name": "new", "model": "minilm", "dim": 4096},
        400,
        "--dim 4096 is not available",
    ),
    ("POST", "/collections", {"name": "new", "model": "no-such"}, 400, "'no-such' is not a profile"),
    ("POST", "/collections", {"name": "../up", "model": "minilm"}, 400, "invalid collection name"),
]


@pytest.mark.parametrize(
    "method, path, body, status, message", ERROR_CASES, ids=[f"{c[3]}-{c[4][:30]}" for c in ERROR_CASES]
)
def test_errors_have_their_status_and_an_actionable_message(server, method, path, body, status, message):
    before = httpx.get(f"{server.url}/collections").json()
    response = httpx.request(method, server.url + path, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert message in detail and "Traceback" not in detail
    assert httpx.get(f"{server.url}/collections").json() == before  # a rejected request changes nothing


def test_malformed_json_is_a_422(server):
    response = httpx.post(
        f"{server.url}/collections/default/search",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422 and "JSON" in response.json()["detail"]


def test_an_unavailable_model_is_a_503_and_the_client_retries_it(tmp_path):
    manifest = Manifest(
        model="stella-1.5b",
        model_id="dunzhang/stella_en_1.5B_v5",
        revision="d03be74b361d4eb24f42a2fe5bd2e29917df4604",
        dim=1024,
        head="2_Dense_1024",
    )
    Collection.create(tmp_path / "data" / "stella", manifest).close()

    class CountingTransport(httpx.HTTPTransport):
        calls = 0

        def handle_request(self, request):
            CountingTransport.calls += 1
            return super().handle_request(request)

    with RunningServer(server_settings(tmp_path / "data")) as running:
        health = httpx.get(f"{running.url}/health").json()
        assert health["status"] == "unavailable" and health["model_loaded"] is False
        assert "stella_en_1.5B_v5" in health["error"]
        with SearchClient(running.url, retries=2, backoff=0.01, transport=CountingTransport()) as c:
            with pytest.raises(SearchAPIError) as err:
                c.search("anything", collection="stella")
    assert err.value.status_code == 503 and "--model minilm" in err.value.detail
    assert CountingTransport.calls == 3  # one try and two retries


def test_health_and_metrics(client, server):
    client.search("warm up the metrics", k=1)
    health = client.health()
    assert health.status == "ok" and health.model_loaded and health.device == "cpu"
    assert health.collections["default"]["index_vectors"] == health.collections["default"]["passages"]
    assert health.gpu_memory is None
    text = httpx.get(f"{server.url}/metrics").text
    assert (
        'stella_http_request_duration_seconds_bucket{le="0.001",method="POST",route="/collections/{collection}/search"'
        in text.replace(',status="200"', "")
    )
    assert "stella_encoded_texts_total" in text and 'stella_collection_passages{collection="default"}' in text


def test_async_client(server):
    async def run():
        async with AsyncSearchClient(server.url, retries=0) as c:
            results = await asyncio.gather(*(c.search(q, k=2) for q in ["airline", "film", "city"]))
            return results, await c.health()

    results, health = asyncio.run(run())
    assert all(len(r.results) == 2 for r in results) and health.status == "ok"


def test_the_async_client_has_every_call_of_the_sync_one(server):
    sync_calls = {name for name in dir(SearchClient) if not name.startswith("_")} - {"close"}
    assert sync_calls == {name for name in dir(AsyncSearchClient) if not name.startswith("_")} - {"aclose"}
    assert all(inspect.iscoroutinefunction(getattr(AsyncSearchClient, name)) for name in sync_calls)

    async def run():
        async with AsyncSearchClient(server.url, retries=0) as c:
            created = await c.create_collection("async-scratch", model="minilm")
            docs = [
                {"id": "a1", "text": "Tide pools hold anemones and small crabs.", "metadata": {"shore": True}},
                {"id": "a2", "text": "Sea anemones and crabs live in rocky tide pools.", "metadata": {"shore": True}},
                {"id": "a3", "text": "The tax office opens at nine.", "metadata": {"shore": False}},
            ]
            upserted = await c.upsert(docs, collection="async-scratch")
            batch = await c.search_batch(["crabs in tide pools", "tax office"], k=1, collection="async-scratch")
            similar = await c.similar(id="a1", k=1, collection="async-scratch")
            fetched = await c.get("a3", collection="async-scratch")
            deleted = await c.delete("a3", collection="async-scratch")
            many = await c.delete_many(filter={"shore": True}, collection="async-scratch")
            names = [info.name for info in await c.collections()]
            gone = await c.delete_collection("async-scratch")
            with pytest.raises(SearchAPIError) as err:
                await c.search("crabs", collection="async-scratch")
            return created, upserted, batch, similar, fetched, deleted, many, names, gone, err.value

    created, upserted, batch, similar, fetched, deleted, many, names, gone, error = asyncio.run(run())
    assert (created.name, created.dim, upserted.added) == ("async-scratch", 384, 3)
    assert batch[0].results[0].id in {"a1", "a2"} and batch[1].results[0].id == "a3"
    assert similar.results[0].id == "a2" and fetched.text == "The tax office opens at nine."
    assert deleted.deleted == "a3" and many.deleted == 2 and "async-scratch" in names
    assert gone.deleted == "async-scratch" and error.status_code == 404


@pytest.mark.parametrize(
    "keys, call, expected",
    [
        ({"api_key": "w"}, ("search", None), 200),
        ({"api_key": "w"}, ("upsert", None), 401),
        ({"api_key": "w"}, ("upsert", "nope"), 403),
        ({"api_key": "w"}, ("upsert", "w"), 200),
        ({"api_key": "w", "read_api_key": "r"}, ("search", None), 401),
        ({"api_key": "w", "read_api_key": "r"}, ("search", "x"), 403),
        ({"api_key": "w", "read_api_key": "r"}, ("search", "r"), 200),
        ({"api_key": "w", "read_api_key": "r"}, ("search", "w"), 200),
        ({"api_key": "w", "read_api_key": "r"}, ("upsert", "r"), 403),
        ({}, ("upsert", None), 200),
    ],
)
def test_auth(data_dir, keys, call, expected, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    operation, key = call
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with RunningServer(server_settings(copy, **keys)) as running:
        if operation == "search":
            response = httpx.post(f"{running.url}/collections/default/search", json={"query": "x"}, headers=headers)
        else:
            response = httpx.post(
                f"{running.url}/collections/default/documents",
                json={"documents": [{"id": "a", "text": "auth test"}]},
                headers=headers,
            )
        assert httpx.get(f"{running.url}/health").status_code == 200
    assert response.status_code == expected, response.text
    if expected == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_eval_through_http_equals_in_process(tmp_path):
    slice_dataset("msmarco", tmp_path / "ms", queries=4, extra_docs=60)
    data = tmp_path / "data"
    args = ["eval", str(tmp_path / "ms"), "--model", "minilm", "--data-dir", str(data), "--json"]
    local = CliRunner().invoke(main, args)
    assert local.exit_code == 0, local.output
    with RunningServer(server_settings(data)) as running:
        remote = CliRunner().invoke(
            main, ["eval", str(tmp_path / "ms"), "--collection", "ms-minilm", "--url", running.url, "--json"]
        )
    assert remote.exit_code == 0, remote.output
    local_scores = json.loads(local.output[local.output.index("{") :])
    remote_scores = json.loads(remote.output[remote.output.index("{") :])
    for metric in ("ndcg@10", "recall@100", "mrr@10"):
        assert remote_scores[metric] == local_scores[metric]


def test_cli_search_through_http(server):
    result = CliRunner().invoke(main, ["search", "fictional airline", "--url", server.url, "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output[result.output.index("{") :])["results"]
    assert hits[0]["id"] == "<dbpedia:Oceanic_Airlines>"


def test_cli_errors_through_http_are_one_line_and_the_key_comes_from_the_environment(data_dir):
    runner = CliRunner()
    search = ["search", "fictional airline", "-k", "1", "--json"]
    with RunningServer(server_settings(data_dir, api_key="w", read_api_key="r")) as running:
        # STELLA_SEARCH_API_KEY is the client's key, not a setting: it must not break loading the settings
        allowed = runner.invoke(main, [*search, "--url", running.url], env={"STELLA_SEARCH_API_KEY": "r"})
        assert allowed.exit_code == 0, allowed.output
        assert (
            json.loads(allowed.output[allowed.output.index("{") :])["results"][0]["id"] == "<dbpedia:Oceanic_Airlines>"
        )
        refused = runner.invoke(main, [*search, "--url", running.url], env={"STELLA_SEARCH_API_KEY": None})
        assert refused.exit_code == 2 and refused.output.startswith("error: the server answered 401:"), refused.output
        missing = runner.invoke(main, [*search, "--url", running.url, "--api-key", "r", "--collection", "nope"])
        assert missing.exit_code == 2
        assert missing.output.startswith("error: the server answered 404: no collection named 'nope'")
    closed = runner.invoke(main, [*search, "--url", f"http://127.0.0.1:{free_port()}"])
    assert closed.exit_code == 2 and closed.output.startswith("error: the HTTP request to http://127.0.0.1:")
    local_only = runner.invoke(main, [*search, "--url", "http://127.0.0.1:1", "--dim", "128"])
    assert local_only.exit_code == 2 and "--dim apply to a local collection" in local_only.output
    assert "ConnectError" in closed.output
    assert all("Traceback" not in r.output for r in (refused, missing, closed))


def test_a_collection_the_cli_creates_while_the_server_runs_is_served(server, data_dir, tmp_path):
    import shutil

    corpus = write_jsonl(tmp_path / "late.jsonl", [{"_id": "late-1", "text": "Okapis live in the Ituri rainforest."}])
    with SearchClient(server.url, retries=0) as client:
        with pytest.raises(SearchAPIError) as err:
            client.search("okapi", collection="late")
        assert err.value.status_code == 404
        ingest = ["ingest", str(corpus), "--data-dir", str(data_dir), "--collection", "late", "--model", "minilm"]
        assert CliRunner().invoke(main, ingest).exit_code == 0
        # a replaced collection kept aside by `restore --replace` is a hidden folder: neither listed nor an error
        shutil.copytree(data_dir / "late", data_dir / ".replaced-late-20260101T000000")
        assert "late" in [c.name for c in client.collections()]
        assert all(not c.name.startswith(".") for c in client.collections())
        shutil.rmtree(data_dir / ".replaced-late-20260101T000000")
        assert client.search("okapi", collection="late").results[0].id == "late-1"
        client.delete_collection("late")
        assert not (data_dir / "late").exists() and "late" not in [c.name for c in client.collections()]


def test_a_collection_delete_refused_as_busy_leaves_it_served(server, data_dir, tmp_path, monkeypatch):
    import search_api.service

    service = server.app.state.service
    monkeypatch.setattr(search_api.service, "WRITE_WAIT_S", 0.2)
    with SearchClient(server.url, retries=0) as client:
        client.create_collection("busy", model="minilm")
        client.upsert([{"id": "b1", "text": "a document in a busy collection"}], collection="busy")
        served = service.collection("busy")
        with Collection.open(data_dir / "busy") as other_writer, other_writer.writing():
            with pytest.raises(SearchAPIError) as err:
                client.delete_collection("busy")
        assert err.value.status_code == 409
        assert service.collection("busy") is served  # still the served object, not one re-opened from disk
        assert client.search("busy collection", collection="busy").results[0].id == "b1"
        # a second DELETE while the first waits for the writer lock is a 409, and the first then succeeds
        monkeypatch.setattr(search_api.service, "WRITE_WAIT_S", 30)
        with Collection.open(data_dir / "busy") as other_writer, ThreadPoolExecutor(1) as pool:
            with other_writer.writing():
                first = pool.submit(client.delete_collection, "busy")
                while "busy" not in service._deleting:
                    time.sleep(0.01)
                with pytest.raises(SearchAPIError, match="being deleted by another request") as err:
                    client.delete_collection("busy")
                assert err.value.status_code == 409
            assert first.result(timeout=30).deleted == "busy"  # the writer lock was released: the first goes on
        assert not (data_dir / "busy").exists()


def test_concurrent_queries_are_micro_batched_with_identical_vectors(minilm):
    from search_api.batching import QueryBatcher

    sizes = []
    batcher = QueryBatcher(minilm, max_batch=64, observe=lambda seconds, texts, requests: sizes.append(requests))
    queries = [f"query number {i} about vector search" for i in range(48)]
    try:
        with ThreadPoolExecutor(16) as pool:
            batched = list(pool.map(lambda q: batcher.encode_queries([q])[0], queries))
    finally:
        batcher.close()
    np.testing.assert_allclose(np.stack(batched), minilm.encode_queries(queries), atol=1e-5)
    assert sum(sizes) == len(queries) and max(sizes) > 1  # some requests shared a forward pass


def test_an_encode_error_reaches_every_waiting_caller(minilm):
    from search_api.batching import QueryBatcher

    batcher = QueryBatcher(minilm)
    try:
        with pytest.raises(TypeError):
            batcher.encode_queries([None])
        assert batcher.encode_queries(["still serving"]).shape == (1, 384)
    finally:
        batcher.close()
