"""Index types on real embeddings: Flat, IVF (SQ8 and Flat codes) and HNSW, each built, tuned, searched, changed.

Vectors are MiniLM encodings of real MS MARCO passages, encoded once per module; collections are real SQLite
files with real FAISS indexes in tmp_path. Recall is measured against exact search over the same stored vectors,
with passages the collection has never seen as queries.
"""

import json
import re
import sqlite3

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from search_api.cli import main
from storage.collection import Collection, Document, Passage, collection_dir
from storage.errors import InvalidInputError
from storage.vector_index import AUTO_FLAT_MAX, INDEX_TYPE, recall_at_k, resolve_index_type
from tests.helpers.data import DATA, read_jsonl, server_settings, write_jsonl
from tests.helpers.server import RunningServer

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(" ".join(text.split())) if len(s.strip()) > 1]


STORED = 1000
HELD_OUT = 150
TYPES = ["Flat", "IVF,SQ8", "IVF,Flat", "HNSW32"]


@pytest.fixture(scope="module")
def passages(minilm):
    """(texts, vectors) of STORED + HELD_OUT real passages: the first sentences of MS MARCO passages.

    Single sentences keep the one encode this module does short on a 2-core machine.
    """
    texts = []
    for record in read_jsonl(DATA / "msmarco" / "corpus.jsonl"):
        texts += [t for t in dict.fromkeys(sentences(record["text"])) if t not in texts][:2]
        if len(texts) >= STORED + HELD_OUT:
            break
    texts = texts[: STORED + HELD_OUT]
    return texts, minilm.encode_passages(texts)


@pytest.fixture(scope="module")
def manifest(minilm):
    return minilm.manifest()


def fill(collection: Collection, texts: list[str], vectors: np.ndarray, first: int = 0) -> None:
    """One document per passage, ids ``d{first}``..., metadata ``group`` = index mod 10 (filters)."""
    docs = [Document(f"d{first + i}", None, t, {"group": (first + i) % 10}) for i, t in enumerate(texts)]
    parts = [Passage(d.id, 0, d.text, 0, len(d.text)) for d in docs]
    collection.write(docs, parts, vectors)


def exact_top10(collection: Collection, queries: np.ndarray) -> np.ndarray:
    """Exact top-10 passage ids from the vectors SQLite stores, the ground truth."""
    with collection.connection() as db:
        rows = db.execute("SELECT id, vector FROM passages ORDER BY id").fetchall()
    ids = np.array([r[0] for r in rows])
    vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="float32").reshape(len(rows), -1)
    return ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]]


def search_ids(collection: Collection, queries: np.ndarray, k: int = 10, where: dict | None = None) -> np.ndarray:
    return np.array(
        [[h.passage_id for h in hits] + [-1] * (k - len(hits)) for hits in collection.search(queries, k, where)]
    )


@pytest.fixture
def built(tmp_path, passages, request, manifest):
    """A collection of STORED passages optimized as ``request.param``."""
    texts, vectors = passages
    collection = Collection.create(tmp_path / "c", manifest)
    fill(collection, texts[:STORED], vectors[:STORED])
    collection.optimize(request.param, recall=0.95)
    yield collection
    collection.close()


def test_auto_is_flat_when_small_and_ivf_sq8_when_large():
    assert resolve_index_type("auto", AUTO_FLAT_MAX - 1) == INDEX_TYPE
    assert resolve_index_type("auto", 250_000) == "IVF2000,SQ8"
    assert resolve_index_type("auto", 4_000_000) == "IVF8000_HNSW32,SQ8"
    assert resolve_index_type("HNSW32", 10) == "IDMap2,HNSW32"
    assert resolve_index_type("IVF,Flat", 10_000) == "IVF400,Flat"
    assert resolve_index_type("IVF1024,PQ48", 10) == "IVF1024,PQ48"
    with pytest.raises(InvalidInputError, match="unknown index type"):
        resolve_index_type("LSH", 10)
    with pytest.raises(InvalidInputError, match="FAISS cannot build"):
        resolve_index_type("IVF,SQ3x", 10)
    with pytest.raises(InvalidInputError, match="at least 1"):  # FAISS would abort the process on these
        resolve_index_type("IVF0,SQ8", 10)


@pytest.mark.parametrize("built", TYPES, indirect=True)
def test_each_type_is_tuned_to_the_recall_target_and_records_it(built, passages):
    params = built.manifest.index_params
    assert built.manifest.index_type == resolve_index_type(params["requested"], STORED)
    assert params["recall_at_10"] >= 0.95 and params["vectors"] == STORED
    if "IVF" in built.manifest.index_type:
        assert set(params["search"]) == {"nprobe"} and params["tuning_queries"] >= 100
        assert params["tuned_on"] == "held-out documents"
    elif "HNSW" in built.manifest.index_type:
        assert set(params["search"]) == {"efSearch"}
    # passages the collection has never seen, as queries: the tuning sample's 0.95 is an estimate, and another
    # sample of 150 queries lands within its sampling error (one standard error is about 0.006)
    held_out = passages[1][STORED:]
    assert recall_at_k(search_ids(built, held_out), exact_top10(built, held_out)) >= 0.94


@pytest.mark.parametrize("built", TYPES, indirect=True)
def test_deletes_never_return_adds_are_found_and_reopen_replays(built, passages):
    texts, vectors = passages
    queries = vectors[:50]  # stored passages: each one's own top hit is itself until deleted
    doomed = [f"d{i}" for i in range(0, 50, 2)]
    doomed_ids = {h.passage_id for hits in built.search(queries[::2], 1) for h in hits}
    built.delete(doomed)
    fill(built, texts[STORED:], vectors[STORED:], first=STORED)  # added after the build: searchable at once

    def check(collection: Collection, deleted: int = len(doomed)) -> None:
        found = search_ids(collection, queries, k=20)
        assert not doomed_ids & set(found.ravel().tolist())
        assert collection.index_size == collection.count_passages() == STORED + HELD_OUT - deleted
        hits = collection.search(vectors[STORED : STORED + 20], 1)
        assert [h[0].document_id for h in hits] == [f"d{i}" for i in range(STORED, STORED + 20)]
        filtered = collection.search(queries, 10, where={"group": 3})
        assert all(h.metadata["group"] == 3 for hits in filtered for h in hits)

    check(built)
    built.checkpoint()
    path, index_type, params = built.path, built.manifest.index_type, built.manifest.index_params
    built.close()
    with Collection.open(path) as reopened:  # from the checkpoint (tombstones included), nothing to replay
        assert (reopened.manifest.index_type, reopened.manifest.index_params) == (index_type, params)
        check(reopened)
        reopened.delete(["d1"])  # committed, not checkpointed: the next open replays it
    with Collection.open(path) as replayed:
        assert "d1" not in {h.document_id for h in replayed.search(vectors[1:2], 5)[0]}
        check(replayed, deleted=len(doomed) + 1)


@pytest.mark.parametrize("built", ["IVF,SQ8", "HNSW32"], indirect=True)
def test_filters_on_approximate_indexes_are_exact_for_small_sets(built, passages):
    queries = passages[1][STORED:]
    where = {"group": {"$in": [1, 2]}}  # 240 passages: answered exactly from their stored vectors
    allowed = [f"d{i}" for i in range(STORED) if i % 10 in (1, 2)]
    scores = [[h.document_id for h in hits] for hits in built.search(queries, 10, where)]
    ids = {i: n for n, i in enumerate(allowed)}
    texts, vectors = passages
    exact = np.argsort(-(queries @ vectors[[int(d[1:]) for d in allowed]].T), axis=1, kind="stable")[:, :10]
    assert [[allowed[j] for j in row] for row in exact] == scores
    assert all(d in ids for row in scores for d in row)


def test_hnsw_deletes_are_tombstones_until_optimize(tmp_path, passages, manifest):
    texts, vectors = passages
    with Collection.create(tmp_path / "c", manifest) as collection:
        fill(collection, texts[:600], vectors[:600])
        collection.optimize("HNSW32")
        collection.delete([f"d{i}" for i in range(200)])
        info = collection.info()
        assert info["index_tombstones"] == 200 and info["index_vectors"] == 400
        assert "HNSW graph" in info["optimize_advised"]
        report = collection.optimize()  # repeats the last request
        assert report["requested"] == "HNSW32" and collection.info()["index_tombstones"] == 0


def test_optimize_from_the_cli_and_info_shows_it(tmp_path, passages, manifest):
    texts, vectors = passages
    with Collection.create(collection_dir(tmp_path, "c"), manifest) as collection:
        fill(collection, texts[:800], vectors[:800])
    runner = CliRunner()
    result = runner.invoke(main, ["optimize", "--data-dir", str(tmp_path), "--collection", "c", "--index", "IVF,SQ8"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["index_type"] == "IVF113,SQ8"
    info = json.loads(runner.invoke(main, ["info", "--data-dir", str(tmp_path), "--collection", "c"]).output)[0]
    assert info["index_type"] == "IVF113,SQ8" and info["index_params"]["search"]["nprobe"] >= 1
    assert info["index_params"]["recall_at_10"] >= 0.95 and info["optimize_advised"] is None
    queries = write_jsonl(tmp_path / "queries.jsonl", read_jsonl(DATA / "msmarco" / "queries.jsonl"))
    args = [
        "optimize",
        "--data-dir",
        str(tmp_path),
        "--collection",
        "c",
        "--index",
        "HNSW32",
        "--queries",
        str(queries),
    ]
    result = runner.invoke(main, args)  # tuned on real queries, encoded by the collection's own model
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tuned_on"] == "given queries" and report["tuning_queries"] == 43
    assert report["recall_at_10"] >= 0.95
    bad = runner.invoke(main, ["optimize", "--data-dir", str(tmp_path), "--collection", "c", "--index", "LSH"])
    assert bad.exit_code == 2 and "unknown index type" in bad.output


def test_a_writer_adopts_an_index_another_process_installed(tmp_path, passages, manifest):
    texts, vectors = passages
    path = tmp_path / "c"
    with Collection.create(path, manifest) as first:
        fill(first, texts[:600], vectors[:600])
        with Collection.open(path) as second:  # stands for another process: its own connections and index
            second.optimize("HNSW32")
        fill(first, texts[600:610], vectors[600:610], first=600)  # the write adopts the new index first
        first.checkpoint()
        assert first.manifest.index_type == "IDMap2,HNSW32"
    with Collection.open(path) as reopened:
        assert reopened.manifest.index_type == "IDMap2,HNSW32" and reopened.index_size == 610


def test_an_index_file_of_another_type_than_the_manifest_is_rebuilt(tmp_path, passages, manifest):
    texts, vectors = passages
    path = tmp_path / "c"
    with Collection.create(path, manifest) as collection:
        fill(collection, texts[:300], vectors[:300])
        collection.optimize("HNSW32")
    # as if optimize crashed after writing index.faiss but before the manifest recorded the new type
    conn = sqlite3.connect(path / "collection.db")
    conn.execute("UPDATE manifest SET index_type = ?, index_params = '{}'", [INDEX_TYPE])
    conn.commit()
    conn.close()
    with Collection.open(path) as reopened:
        assert reopened.manifest.index_type == INDEX_TYPE and reopened._index.exact
        assert reopened.search(vectors[:1], 1)[0][0].document_id == "d0"


def small_collection(tmp_path, passages, manifest, n: int) -> None:
    texts, vectors = passages
    with Collection.create(collection_dir(tmp_path, "c"), manifest) as collection:
        fill(collection, texts[:n], vectors[:n])


@pytest.mark.parametrize("requested", ["IVF,SQ8", "HNSW32", "IVF,PQ48"])
def test_too_small_for_an_approximate_index_optimize_keeps_exact_search_and_says_why(
    tmp_path, passages, manifest, requested
):
    small_collection(tmp_path, passages, manifest, 20)
    runner = CliRunner()
    common = ["--data-dir", str(tmp_path), "--collection", "c"]
    optimized = runner.invoke(main, ["optimize", *common, "--index", requested])
    assert optimized.exit_code == 0, optimized.output
    report = json.loads(optimized.stdout)
    assert report["index_type"] == INDEX_TYPE and report["requested"] == requested
    assert "20 vectors are too few to train and tune" in report["fallback"], report
    assert "recall_note" not in report  # no --recall given: nothing to report about it
    found = runner.invoke(main, ["search", "what is the capital of france", *common, "-k", "10", "--json"])
    assert found.exit_code == 0, found.output
    assert len(json.loads(found.stdout)["results"]) == 10
    info = json.loads(runner.invoke(main, ["info", *common]).stdout)[0]
    assert info["index_type"] == INDEX_TYPE and info["index_params"]["fallback"] == report["fallback"]
    assert info["optimize_advised"] is None


def test_a_recall_target_an_exact_index_cannot_use_is_reported(tmp_path, passages, manifest):
    small_collection(tmp_path, passages, manifest, 20)
    common = ["--data-dir", str(tmp_path), "--collection", "c", "--recall", "0.9"]
    for requested in ("IVF,SQ8", "Flat"):
        result = CliRunner().invoke(main, ["optimize", *common, "--index", requested])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["recall_target"] == 0.9
        assert report["recall_note"] == "recall target 0.9 does not apply: IDMap2,Flat searches exactly"


def test_an_exact_fallback_becomes_the_requested_index_once_the_collection_grows(tmp_path, passages, manifest):
    texts, vectors = passages
    with Collection.create(tmp_path / "c", manifest) as collection:
        fill(collection, texts[:20], vectors[:20])
        assert collection.optimize("IVF,SQ8")["index_type"] == INDEX_TYPE
        fill(collection, texts[20:STORED], vectors[20:STORED], first=20)
        assert (
            collection.info()["optimize_advised"]
            == f"{STORED} passages: IVF,SQ8 now means IVF126,SQ8, not {INDEX_TYPE}"
        )
        report = collection.optimize()  # the request was kept
        assert report["index_type"] == "IVF126,SQ8" and "fallback" not in report
        assert report["recall_at_10"] >= 0.95


@pytest.mark.parametrize("built", ["IVF,SQ8", "HNSW32"], indirect=True)
def test_a_shrunk_collection_still_returns_every_hit_up_to_k(built, passages):
    texts, vectors = passages
    built.delete([f"d{i}" for i in range(25, STORED)])  # the index was trained and tuned for 1000
    queries = vectors[STORED:]
    found = search_ids(built, queries, k=10)
    assert (found >= 0).sum(axis=1).tolist() == [10] * len(queries)
    assert set(found.ravel().tolist()) <= set(range(1, 26))  # passage ids of d0..d24
    filtered = built.search(queries, 10, where={"group": {"$in": [1, 2, 3]}})  # 9 of the 25 left
    assert [len(hits) for hits in filtered] == [9] * len(queries)
    info = built.info()
    assert info["exact_fallback_searches"] > 0
    requested, index_type = built.manifest.index_params["requested"], built.manifest.index_type
    assert info["optimize_advised"] == f"25 passages: {requested} now means {INDEX_TYPE}, not {index_type}"


@pytest.mark.parametrize("built", ["IVF,SQ8"], indirect=True)
def test_a_shrunk_collection_whose_index_file_is_lost_opens_and_searches_exactly(built, passages):
    built.delete([f"d{i}" for i in range(50, STORED)])  # 50 left: fewer than the 126 lists to train
    built.checkpoint()
    path = built.path
    built.close()
    (path / "index.faiss").unlink()
    with Collection.open(path) as reopened:
        assert reopened.manifest.index_type == "IVF126,SQ8" and reopened._index.exact
        found = search_ids(reopened, passages[1][STORED:], k=10)
        assert (found == exact_top10(reopened, passages[1][STORED:])).all()
        assert reopened.info()["optimize_advised"] == "50 passages: IVF,SQ8 now means IDMap2,Flat, not IVF126,SQ8"
        assert reopened.optimize()["index_type"] == INDEX_TYPE


@pytest.mark.parametrize("built", ["IVF,SQ8"], indirect=True)
def test_exact_answers_to_short_searches_are_counted_in_the_metrics(built, tmp_path):
    built.delete([f"d{i}" for i in range(25, STORED)])
    built.checkpoint()
    built.close()
    with RunningServer(server_settings(tmp_path)) as running:
        found = httpx.post(f"{running.url}/collections/c/search", json={"query": "what is a vector index", "k": 10})
        metrics = httpx.get(f"{running.url}/metrics").text
    assert found.status_code == 200 and len(found.json()["results"]) == 10
    assert 'stella_exact_fallback_searches_total{collection="c"} 1.0' in metrics
