"""Sharded collections on one machine: placement, exact merged search, writes at the owning shard, CLI and HTTP."""

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from search_api.cli import main
from search_api.client import SearchClient
from search_api.retrieval import Retriever, SearchOptions
from storage.collection import Collection, Document, Manifest, Passage
from storage.sharding import PASSAGE_ID_BITS, ShardedCollection, open_collection, reshard, shard_of
from tests.helpers.data import DATA, read_jsonl, server_settings, write_jsonl
from tests.helpers.server import RunningServer

DIM = 32
MANIFEST = Manifest(model="test", model_id="test/model", revision="r1", dim=DIM, head="native")


def _corpus(n_docs: int, seed: int = 0):
    """Documents with 1-3 passages each, unit vectors, and a metadata field to filter on."""
    rng = np.random.default_rng(seed)
    documents, passages = [], []
    for d in range(n_docs):
        doc_id = f"doc-{d}"
        documents.append(Document(doc_id, None, f"document {d} text", {"group": d % 5, "even": d % 2 == 0}))
        for ordinal in range(1 + d % 3):
            passages.append(Passage(doc_id, ordinal, f"passage {ordinal} of document {d}", 0, 10))
    vectors = rng.standard_normal((len(passages), DIM)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return documents, passages, vectors


@pytest.fixture
def pair(tmp_path):
    """The same corpus in a 1-shard and a 3-shard collection."""
    documents, passages, vectors = _corpus(400)
    one = Collection.create(tmp_path / "one", MANIFEST)
    three = ShardedCollection.create(tmp_path / "three", MANIFEST, shards=3)
    one.write(documents, passages, vectors)
    three.write(documents, passages, vectors)
    yield one, three
    one.close()
    three.close()


def test_placement_is_a_stable_hash_of_the_document_id():
    # fixed values: placement must never change between processes, machines or releases
    assert [shard_of(f"doc-{i}", 3) for i in range(8)] == [1, 1, 2, 2, 2, 1, 2, 1]
    assert shard_of("", 7) == 0
    counts = np.bincount([shard_of(f"id-{i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 900  # balanced within 10%


def test_documents_live_wholly_in_their_shard_and_passage_ids_never_collide(pair):
    _, three = pair
    ids_seen = set()
    for index, shard in enumerate(three.shards):
        for documents, _passages, _vectors in shard.iter_documents():
            assert {shard_of(d.id, 3) for d in documents} == {index}
        with shard.connection() as db:
            rows = db.execute("SELECT id FROM passages").fetchall()
        ids = {r[0] for r in rows}
        assert all(index << PASSAGE_ID_BITS < i < (index + 1) << PASSAGE_ID_BITS for i in ids)
        ids_seen |= ids
    assert len(ids_seen) == three.count_passages() == len(_corpus(400)[1])


def test_merged_search_equals_unsharded_search_with_and_without_filters(pair):
    one, three = pair
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((20, DIM)).astype("float32")
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for where in (None, {"group": {"$in": [1, 3]}}, {"even": True, "group": {"$gte": 2}}):
        expected = one.search(queries, k=10, where=where)
        found = three.search(queries, k=10, where=where)
        for want, got in zip(expected, found):
            assert [h.document_id for h in got] == [h.document_id for h in want]
            assert [h.ordinal for h in got] == [h.ordinal for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-6)


def test_grouped_similar_search_equals_unsharded(pair):
    one, three = pair
    for doc_id in ("doc-7", "doc-120", "doc-399"):
        options = SearchOptions(query="", k=8, group_by="document", passages_per_document=2, offset=3)
        want = Retriever(one, None).similar(options, document_id=doc_id)
        got = Retriever(three, None).similar(options, document_id=doc_id)
        assert [(r.hit.document_id, [p.ordinal for p in r.passages]) for r in got] == [
            (r.hit.document_id, [p.ordinal for p in r.passages]) for r in want
        ]


def test_writes_and_deletes_reach_the_owning_shard_only(pair):
    _, three = pair
    documents, passages, vectors = _corpus(3, seed=5)
    renamed = {d.id: f"new-{i}" for i, d in enumerate(documents)}
    new = [Document(renamed[d.id], None, d.text + " new", d.metadata) for d in documents]
    moved = [Passage(renamed[p.document_id], p.ordinal, p.text, p.start, p.end) for p in passages]
    three.write(new, moved, vectors)
    for doc in new:
        owner = shard_of(doc.id, 3)
        for index, shard in enumerate(three.shards):
            assert (doc.id in shard.content_hashes([doc.id])) == (index == owner)
    before = [s.count_documents() for s in three.shards]
    assert three.delete(["new-0", "missing"]) == 1
    after = [s.count_documents() for s in three.shards]
    assert [b - a for b, a in zip(before, after)] == [int(i == shard_of("new-0", 3)) for i in range(3)]
    deleted = three.delete(where={"group": 4})
    assert deleted == 80 and three.search(vectors[:1], k=500, where={"group": 4})[0] == []


def test_optimize_rebuilds_every_shard_and_deletes_keep_working(pair):
    _, three = pair
    report = three.optimize("HNSW32", recall=0.95)
    assert [r["index_type"] for r in report["shards"]] == ["IDMap2,HNSW32"] * 3
    assert all(r["recall_at_10"] >= 0.95 for r in report["shards"])
    query = np.asarray(three.passage_vectors("doc-5")[:1])
    assert three.search(query, 1)[0][0].document_id == "doc-5"
    three.delete(["doc-5"])
    assert "doc-5" not in {h.document_id for h in three.search(query, 20)[0]}


def test_reshard_copies_stored_vectors_without_reencoding(pair, tmp_path):
    one, three = pair
    with reshard(three, tmp_path / "five", 5) as five:
        assert [len(five.shards), five.count_documents(), five.count_passages()] == [5, 400, one.count_passages()]
        query = np.asarray(one.passage_vectors("doc-11")[:1])
        assert [h.document_id for h in five.search(query, 10)[0]] == [h.document_id for h in one.search(query, 10)[0]]
    with reshard(one, tmp_path / "back", 2) as back:
        assert back.all_document_states() == one.all_document_states()
    one.optimize("HNSW32")
    with reshard(one, tmp_path / "hnsw", 2) as hnsw:  # the copy gets the source's index type, tuned per shard
        assert [s.manifest.index_type for s in hnsw.shards] == ["IDMap2,HNSW32"] * 2
        assert hnsw.search(query, 1)[0][0].document_id == "doc-11"


CORPUS = read_jsonl(DATA / "scifact" / "corpus.jsonl", limit=60)


def test_cli_creates_shows_and_refuses_to_reshape_a_sharded_collection(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    runner = CliRunner()
    common = ["--data-dir", str(tmp_path / "data"), "--collection", "sci"]
    result = runner.invoke(main, ["ingest", str(corpus), *common, "--model", "minilm", "--shards", "3"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(main, ["info", *common]).stdout)[0]
    assert info["shards"] == 3 and info["documents"] == 60
    assert sum(s["documents"] for s in info["shard_details"]) == 60
    assert len(info["shard_details"]) == 3 and all(s["documents"] > 0 for s in info["shard_details"])
    again = runner.invoke(main, ["ingest", str(corpus), *common, "--model", "minilm", "--shards", "2"])
    assert again.exit_code == 2 and "has 3 shard(s)" in again.output
    for shard in ("shard-000", "shard-001", "shard-002"):  # the ingest checkpointed every shard's index
        stamp = json.loads((tmp_path / "data" / "sci" / shard / "index.json").read_text())
        with Collection.open(tmp_path / "data" / "sci" / shard) as opened:
            assert stamp["max_passage_id"] == opened._high_water_marks()[0] and stamp["ntotal"] > 0
    everything = '{"no_such_field": {"$exists": false}}'
    deleted = runner.invoke(main, ["delete", *common, "--filter", everything, "--id", CORPUS[1]["_id"]])
    assert deleted.exit_code == 0 and "deleted 60 documents" in deleted.stdout, deleted.output
    snapshot = runner.invoke(main, ["snapshot", *common])
    assert snapshot.exit_code == 2 and "snapshot each shard" in snapshot.output and "shard-000" in snapshot.output
    found = runner.invoke(main, ["search", CORPUS[0]["title"], *common, "-k", "1", "--json"])
    assert json.loads(found.stdout)["results"] == []


def test_http_creates_a_sharded_collection_and_serves_it(tmp_path, minilm):
    settings = server_settings(tmp_path / "data")
    with RunningServer(settings) as running, SearchClient(running.url, retries=0) as client:
        created = httpx.post(
            f"{running.url}/collections", json={"name": "docs", "model": "minilm", "shards": 3}, timeout=60
        )
        assert created.status_code == 201 and created.json()["shards"] == 3
        docs = [
            {"id": r["_id"], "title": r["title"], "text": r["text"], "metadata": {"n": i}}
            for i, r in enumerate(CORPUS[:30])
        ]
        assert client.upsert(docs, collection="docs").added == 30
        hit = client.search(CORPUS[4]["title"], k=1, collection="docs").results[0]
        assert hit.id == CORPUS[4]["_id"] and hit.metadata == {"n": 4}
        health = client.health().collections["docs"]
        assert health["documents"] == 30 and [s["shard"] for s in health["shards"]] == [
            "shard-000",
            "shard-001",
            "shard-002",
        ]
        metrics = httpx.get(f"{running.url}/metrics").text
        assert 'stella_shard_passages{collection="docs",shard="shard-001"}' in metrics
        bad = httpx.post(f"{running.url}/collections", json={"name": "x", "model": "minilm", "shards": 0})
        assert bad.status_code == 422
    with open_collection(tmp_path / "data" / "docs") as reopened:
        assert isinstance(reopened, ShardedCollection) and reopened.count_documents() == 30


def _run_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=os.environ
    )


def test_ray_options_without_the_extra_name_it(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS[:3])
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what an install without the [ray] extra looks like
        "from search_api.cli import main\n"
        f"main(['ingest', {str(corpus)!r}, '--data-dir', 'data', '--model', 'minilm', '--ray', 'auto'])"
    )
    result = _run_python(code, tmp_path)
    assert result.returncode == 2
    assert "--ray needs Ray: pip install 'stella-search[ray]'" in result.stderr
    assert not (tmp_path / "data").exists()


def test_single_machine_use_never_imports_ray(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS[:5])
    code = (
        "import sys\n"
        "from search_api.cli import main\n"
        "for argv in (['ingest', 'corpus.jsonl', '--data-dir', 'data', '--model', 'minilm', '--shards', '2'],\n"
        "             ['search', 'cells', '--data-dir', 'data', '-k', '2']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        "print('ray imported' if 'ray' in sys.modules else 'no ray')"
    )
    result = _run_python(code, tmp_path)
    assert corpus.exists() and result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("no ray")
