"""Search features: exact filtered search at any selectivity, lexical/hybrid kept in step with writes,
document grouping and paging, more-like-this, prompt type as a collection property."""

import sqlite3

import httpx
import numpy as np
import pytest

from indexer.encoder import Encoder
from search_api.client import SearchAPIError, SearchClient
from search_api.retrieval import Retriever, SearchOptions, minmax, rrf
from storage.collection import Collection, Document, Hit, Manifest, Passage
from storage.errors import InvalidInputError
from storage.filters import compile_filter
from storage.vector_index import GPU_MAX_K, VectorIndex, filtered_search
from tests.helpers.data import DATA, cpu_settings, downgrade_to_schema_v1, ingest_records, read_jsonl, write_jsonl
from tests.helpers.server import RunningServer

N, DIM = 20_000, 32


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """20,000 passages with random unit vectors (the filter mechanism, not recall, is under test)."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(N, DIM)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("big") / "c"
    collection = Collection.create(path, Manifest(model="t", model_id="t", revision="1", dim=DIM, head="native"))
    docs = [Document(f"d{i}", None, f"text {i}", {"i": i, "parity": i % 2}) for i in range(N)]
    collection.write(docs, [Passage(d.id, 0, d.text, 0, len(d.text)) for d in docs], vectors)
    yield collection, vectors
    collection.close()


SELECTIVITY = {"50%": {"parity": 0}, "1%": {"i": {"$lt": 200}}, "0.01%": {"i": {"$in": [7, 19_999]}}}


def brute_force(vectors, queries, matching, k):
    scores = queries @ vectors[matching].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[f"d{matching[j]}" for j in row] for row in order], np.take_along_axis(scores, order, axis=1)


def matching_rows(where):
    if "parity" in where:
        return np.arange(0, N, 2)
    if "$lt" in where["i"]:
        return np.arange(200)
    return np.array([7, 19_999])


@pytest.mark.parametrize("selectivity", SELECTIVITY)
def test_filtered_search_is_exact_at_any_selectivity(big, selectivity):
    collection, vectors = big
    where = SELECTIVITY[selectivity]
    queries = np.random.default_rng(1).normal(size=(5, DIM)).astype("float32")
    expected_ids, expected_scores = brute_force(vectors, queries, matching_rows(where), k=10)
    found = collection.search(queries, k=10, where=where)
    for hits, ids, scores in zip(found, expected_ids, expected_scores):
        assert [h.document_id for h in hits] == ids  # k results whenever k match, all of them otherwise
        assert [h.score for h in hits] == pytest.approx(scores.tolist(), abs=1e-5)


@pytest.mark.parametrize("selectivity", SELECTIVITY)
@pytest.mark.parametrize("exact_below", [0, 10**9])
def test_the_gpu_strategy_is_exact_too(big, selectivity, exact_below):
    """GPU indexes ignore IDSelectors; their strategy (over-fetch, else brute force over the matches) runs here
    on the CPU index searched without a selector, at both of its branches."""
    collection, vectors = big
    where = SELECTIVITY[selectivity]
    allowed = matching_rows(where).astype("int64") + 1  # passage ids start at 1
    index = VectorIndex.empty(DIM, use_gpu=False)
    index.add(vectors, np.arange(1, N + 1))
    queries = np.random.default_rng(2).normal(size=(5, DIM)).astype("float32")
    k = min(10, len(allowed))
    scores, ids = filtered_search(
        index._cpu.search, index._exact_subset, queries, k, allowed, N, max_fetch=GPU_MAX_K, exact_below=exact_below
    )
    expected_ids, expected_scores = brute_force(vectors, queries, allowed - 1, k)
    assert [[f"d{i - 1}" for i in row] for row in ids] == expected_ids
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_fusion_never_adds_raw_scores():
    def hit(pid, score):
        return Hit(pid, score, f"d{pid}", 0, "", 0, 0, None, {})

    dense = [hit(1, 0.9), hit(2, 0.8), hit(3, 0.1)]
    lexical = [hit(3, 25.0), hit(1, 3.0)]
    assert [h.passage_id for h, _ in rrf([dense, lexical])] == [1, 3, 2]
    fused = dict((h.passage_id, s) for h, s in minmax(dense, lexical, alpha=0.5))
    assert fused == pytest.approx({1: 0.5, 2: 0.5 * 0.875, 3: 0.5})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    records = read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=60)
    for i, record in enumerate(records):
        record.update(year=1990 + i % 30, lang=["en", "de", "fr"][i % 3])
    long_text = " ".join(
        f"Sentence {i} of a very long report about zebra migration in the Serengeti." for i in range(120)
    )
    records.append({"_id": "long-report", "title": "Zebra report", "text": long_text, "year": 2024, "lang": "en"})
    ingest_records(root, records)
    settings = cpu_settings()
    settings.data_dir = root / "data"
    with RunningServer(settings) as server:
        yield server, root / "data"


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_filters_apply_in_every_mode(served, mode):
    server, _ = served
    with SearchClient(server.url, retries=0) as client:
        where = {"lang": "de", "year": {"$gte": 2000}}
        results = client.search("airline film city", k=50, mode=mode, filter=where).results
        assert results
        assert all(r.metadata["lang"] == "de" and r.metadata["year"] >= 2000 for r in results)


def test_lexical_and_dense_stay_in_step_with_writes(served):
    server, data = served
    with SearchClient(server.url, retries=0) as client:
        client.upsert([{"id": "okapi", "text": "The okapi is a giraffid mammal native to the Congo rainforest."}])
        assert [r.id for r in client.search("okapi", mode="lexical").results] == ["okapi"]
        assert client.search("okapi giraffid mammal", k=1).results[0].id == "okapi"
        client.upsert([{"id": "okapi", "text": "The bongo is a forest antelope of central Africa."}])
        assert client.search("okapi", mode="lexical").results == []
        assert [r.id for r in client.search("bongo", mode="lexical").results] == ["okapi"]
        client.delete("okapi")
        assert client.search("bongo", mode="lexical").results == []
        assert "okapi" not in [r.id for r in client.search("forest antelope bongo", k=5).results]
    conn = sqlite3.connect(data / "default" / "collection.db")
    fts, passages = (conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("passages_fts", "passages"))
    assert fts == passages


def test_hybrid_fuses_both_lists(served):
    server, _ = served
    with SearchClient(server.url, retries=0) as client:
        dense = {r.passage_id for r in client.search("fictional airline crash", k=20).results}
        lexical = {r.passage_id for r in client.search("fictional airline crash", k=20, mode="lexical").results}
        for fusion in ("rrf", "minmax"):
            hybrid = client.search("fictional airline crash", k=20, mode="hybrid", fusion=fusion).results
            ids = {r.passage_id for r in hybrid}
            assert ids <= dense | lexical and ids & dense and ids & lexical
            scores = [r.score for r in hybrid]
            assert scores == sorted(scores, reverse=True)


def test_group_by_document_with_passages_and_paging(served):
    server, _ = served
    with SearchClient(server.url, retries=0) as client:
        passages = client.search("zebra migration Serengeti", k=10).results
        assert sum(r.id == "long-report" for r in passages) > 1  # a long document crowds the passage list
        docs = client.search("zebra migration Serengeti", k=10, group_by="document", passages_per_document=3).results
        assert len({r.id for r in docs}) == len(docs) == 10
        assert docs[0].id == "long-report" and len(docs[0].passages) == 3
        assert [p.score for p in docs[0].passages] == sorted((p.score for p in docs[0].passages), reverse=True)
        page1 = client.search("zebra", k=5, group_by="document").results
        page2 = client.search("zebra", k=5, group_by="document", offset=5).results
        both = client.search("zebra", k=10, group_by="document").results
        assert [r.id for r in page1 + page2] == [r.id for r in both]


def test_more_like_this_by_id_and_by_text(served):
    server, _ = served
    with SearchClient(server.url, retries=0) as client:
        by_id = client.similar(id="long-report", k=5, group_by="document").results
        assert "long-report" not in [r.id for r in by_id] and len(by_id) == 5
        by_text = client.similar(text="A fictional airline that appears in films and TV shows.", k=1).results
        assert by_text[0].id == "<dbpedia:Oceanic_Airlines>"


def test_more_like_this_uses_stored_vectors_without_encoding(tmp_path, minilm):
    with Collection.create(tmp_path / "c", minilm.manifest()) as collection:
        texts = ["Paris is the capital of France.", "Lyon is a French city.", "Rust is a programming language."]
        docs = [Document(f"d{i}", None, t) for i, t in enumerate(texts)]
        collection.write(docs, [Passage(d.id, 0, d.text, 0, len(d.text)) for d in docs], minilm.encode_passages(texts))
        before = minilm.stats.texts
        results = Retriever(collection, minilm).similar(SearchOptions(query="", k=2), document_id="d0")
        assert minilm.stats.texts == before
        assert [r.hit.document_id for r in results] == ["d1", "d2"]


def test_prompt_type_is_a_collection_property(tiny_stella, tmp_path):
    settings = cpu_settings()
    settings.data_dir = tmp_path / "data"
    with RunningServer(settings) as server, SearchClient(server.url, retries=0) as client:
        with pytest.raises(SearchAPIError, match="server.allow_model_paths"):
            client.create_collection("refused", model=str(tiny_stella))
    settings.server.allow_model_paths = True
    with RunningServer(settings) as server, SearchClient(server.url, retries=0) as client:
        created = client.create_collection("similar-texts", model=str(tiny_stella), dim=256, prompt_type="s2s")
        assert created.prompt_type == "s2s" and created.head == "2_Dense_256"
        client.upsert([{"id": "a", "text": "a sentence to compare"}], collection="similar-texts")
        assert client.search("a sentence to compare", collection="similar-texts", k=1).results[0].id == "a"
    with Collection.open(tmp_path / "data" / "similar-texts") as collection:
        s2s = Encoder.load(str(tiny_stella), cpu_settings(prompt_type="s2s"), dim=256)
        np.testing.assert_allclose(
            collection.passage_vectors("a")[0], s2s.encode_passages(["a sentence to compare"])[0], atol=1e-5
        )
        assert collection.manifest.prompt_type == "s2s"


def test_a_v1_collection_is_migrated_to_get_its_lexical_index(tmp_path, minilm):
    path = tmp_path / "c"
    with Collection.create(path, minilm.manifest()) as collection:
        doc = Document("a", "Okapi", "The okapi lives in the forest.")
        collection.write([doc], [Passage("a", 0, doc.text, 0, len(doc.text))], minilm.encode_passages([doc.text]))
    downgrade_to_schema_v1(path)
    with Collection.open(path) as migrated:
        assert migrated.manifest.schema_version == 2
        assert [h.document_id for h in migrated.search_lexical("okapi forest")] == ["a"]


def test_bad_search_options_are_400s(served):
    server, _ = served
    for body, message in [
        ({"query": "x", "filter": {"$or": [{"year": 1}], "$nor": []}}, "unknown operator '$nor'"),
        ({"query": "x", "filter": {"year": {"$gt": {"$gt": 1}}}}, "takes a string, number, boolean or null"),
        ({"query": "x", "filter": {"year'; DROP TABLE documents; --": 1}}, "invalid metadata field name"),
    ]:
        response = httpx.post(f"{server.url}/collections/default/search", json=body)
        assert response.status_code == 400 and message in response.json()["detail"]
    with SearchClient(server.url, retries=0) as client, pytest.raises(SearchAPIError) as err:
        client.search("x", alpha=2.0, mode="hybrid", fusion="minmax")
    assert err.value.status_code == 422


def test_integers_beyond_64_bits_filter_as_their_stored_values_read(tmp_path):
    """SQLite binds integers of at most 64 bits; a larger one in a filter compares as the real number SQLite's JSON
    functions read from stored metadata (it was an OverflowError: a 500), on both the scan and the indexed path."""
    records = [{"_id": "small", "text": "small", "n": 5}, {"_id": "big", "text": "big", "n": 10**20}]
    records.append({"_id": "bigger", "text": "bigger", "n": [3 * 10**20]})
    manifest = Manifest(model="minilm", model_id="all-MiniLM-L6-v2", revision=None, dim=4, head="native")
    with Collection.create(tmp_path / "c", manifest) as collection:
        documents = [Document(r["_id"], None, r["text"], {"n": r["n"]}) for r in records]
        passages = [Passage(d.id, 0, d.text, 0, len(d.text)) for d in documents]
        collection.write(documents, passages, np.eye(3, 4, dtype="float32"))
        filters = {
            "equal": ({"n": 10**20}, ["big"]),
            "range": ({"n": {"$gt": 2**63}}, ["big"]),  # ranges never look inside lists
            "in a list": ({"n": {"$in": [3 * 10**20]}}, ["bigger"]),
            "below": ({"n": {"$lt": -(2**64)}}, []),
        }
        for indexed in (False, True):
            if indexed:
                collection.index_field("n")
            for name, (where, expected) in filters.items():
                sql, params = compile_filter(where, collection.indexed_fields())
                with collection.connection() as db:
                    ids = [r[0] for r in db.execute(f"SELECT id FROM documents WHERE {sql}", params)]
                assert sorted(ids) == expected, (name, indexed)
    with pytest.raises(InvalidInputError, match="is too large"):
        compile_filter({"n": {"$gt": 10**400}})


def test_index_field_keeps_results_and_follows_every_write(tmp_path):
    from click.testing import CliRunner

    from search_api.cli import main

    records = [
        {"_id": f"d{i}", "text": f"document {i}", "year": 2000 + i % 5, "tags": ["x", f"t{i % 3}"]} for i in range(30)
    ]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    runner = CliRunner()
    assert (
        runner.invoke(
            main, ["ingest", str(corpus), "--data-dir", str(tmp_path / "data"), "--model", "minilm"]
        ).exit_code
        == 0
    )
    filters = [{"year": 2003}, {"year": {"$gte": 2003}}, {"tags": {"$in": ["t1"]}}, {"tags": {"$gt": "a"}}]
    with Collection.open(tmp_path / "data" / "default") as collection:
        before = [sorted(collection._allowed_ids(f).tolist()) for f in filters]
    for field_name in ("year", "tags"):
        result = runner.invoke(main, ["index-field", field_name, "--data-dir", str(tmp_path / "data")])
        assert result.exit_code == 0 and f"indexed {field_name!r}" in result.output
    bad = runner.invoke(main, ["index-field", "year'; --", "--data-dir", str(tmp_path / "data")])
    assert bad.exit_code == 2 and "invalid metadata field name" in bad.output
    with Collection.open(tmp_path / "data" / "default") as collection:
        assert collection.indexed_fields() == {"year", "tags"}
        assert [sorted(collection._allowed_ids(f).tolist()) for f in filters] == before
        sql, params = compile_filter({"year": 2003}, collection.indexed_fields())
        with collection.connection() as db:
            plan = " ".join(
                r[3] for r in db.execute(f"EXPLAIN QUERY PLAN SELECT id FROM documents WHERE {sql}", params)
            )
        assert "metadata_index_lookup" in plan
        # later writes keep the index in step: an update moves a document out, a delete removes one
        collection.write([Document("d3", None, "document 3", {"year": 1999})], [], np.empty((0, 384), dtype="float32"))
        collection.delete(["d8"])
        expected = {f"d{i}" for i in range(30) if i % 5 == 3} - {"d3", "d8"}
        with collection.connection() as db:
            rows = db.execute(f"SELECT id FROM documents WHERE {sql}", params).fetchall()
        assert {r[0] for r in rows} == expected
