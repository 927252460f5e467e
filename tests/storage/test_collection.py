"""The collection on disk: real SQLite files and real FAISS indexes in tmp_path."""

import hashlib
import logging
import os
import sqlite3

import numpy as np
import pytest

from storage.collection import Collection, Document, Manifest, Passage, collection_dir
from storage.errors import CorruptCollectionError, InvalidInputError, ModelMismatchError, NotFoundError

DIM = 8


def manifest(**changes):
    base = dict(model="test", model_id="test/model", revision="r1", dim=DIM, head="native", max_length=64)
    return Manifest(**{**base, **changes})


def unit(seed: int, n: int = 1) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype("float32")
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def add(collection, doc_id, seed, passages=1, metadata=None, text=None):
    text = text or f"text of {doc_id} " * passages
    doc = Document(doc_id, f"title {doc_id}", text, metadata or {})
    parts = [Passage(doc_id, i, f"{doc_id} part {i}", 0, 1) for i in range(passages)]
    return collection.write([doc], parts, unit(seed, passages))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def collection(tmp_path):
    with Collection.create(tmp_path / "c", manifest()) as c:
        yield c


def test_write_then_search_returns_the_passage_with_its_metadata(collection):
    add(collection, "a", seed=1, metadata={"lang": "en"})
    add(collection, "b", seed=2)
    hit = collection.search(unit(1), k=1)[0][0]
    assert (hit.document_id, hit.title, hit.metadata, hit.ordinal) == ("a", "title a", {"lang": "en"}, 0)
    assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_scores_are_exact_inner_products_in_rank_order(collection):
    for i in range(20):
        add(collection, f"d{i}", seed=i)
    query = unit(99)
    hits = collection.search(query, k=20)[0]
    expected = sorted(((float(unit(i)[0] @ query[0]), f"d{i}") for i in range(20)), reverse=True)
    assert [h.document_id for h in hits] == [d for _, d in expected]
    assert [h.score for h in hits] == pytest.approx([s for s, _ in expected], abs=1e-5)


def test_replacing_a_document_swaps_its_passages_and_never_reuses_ids(collection):
    add(collection, "a", seed=1, passages=3)
    old_ids = {h.passage_id for h in collection.search(unit(1), k=10)[0]}
    result = add(collection, "a", seed=5, passages=2, text="new text")
    assert (result.passages_added, result.passages_removed) == (2, 3)
    assert collection.count_passages() == collection.index_size == 2
    new_ids = {h.passage_id for h in collection.search(unit(5), k=10)[0]}
    assert not new_ids & old_ids and min(new_ids) > max(old_ids)


def test_delete_removes_rows_and_vectors(collection):
    add(collection, "a", seed=1, passages=2)
    add(collection, "b", seed=2)
    assert collection.delete(["a", "missing"]) == 1
    assert collection.count_passages() == collection.index_size == 1
    assert {h.document_id for h in collection.search(unit(1), k=10)[0]} == {"b"}
    with pytest.raises(NotFoundError, match="no document with id 'a'"):
        collection.get("a")


def test_reopen_finds_everything_including_writes_after_the_checkpoint(tmp_path):
    path = tmp_path / "c"
    with Collection.create(path, manifest()) as c:
        add(c, "a", seed=1)
        c.checkpoint()
        add(c, "b", seed=2)  # after the checkpoint: must be replayed from SQLite
        c.delete(["a"])
    with Collection.open(path) as c:
        assert c.index_size == c.count_passages() == 1
        assert c.search(unit(2), k=1)[0][0].document_id == "b"
        assert c.manifest == manifest(created_at=c.manifest.created_at)


@pytest.mark.parametrize("damage", ["delete", "corrupt", "truncate"])
def test_a_missing_or_damaged_index_file_is_rebuilt_from_sqlite(tmp_path, caplog, damage):
    path = tmp_path / "c"
    with Collection.create(path, manifest()) as c:
        for i in range(5):
            add(c, f"d{i}", seed=i)
        c.checkpoint()
    index_file = path / "index.faiss"
    if damage == "delete":
        index_file.unlink()
    elif damage == "corrupt":
        data = bytearray(index_file.read_bytes())
        data[-10] ^= 0xFF
        index_file.write_bytes(bytes(data))
    else:
        index_file.write_bytes(index_file.read_bytes()[:100])
    with caplog.at_level(logging.INFO), Collection.open(path) as c:
        assert c.index_size == 5
        assert c.search(unit(3), k=1)[0][0].document_id == "d3"
    assert "rebuilding from SQLite" in caplog.text or "rebuilt index" in caplog.text


def test_a_corrupted_sqlite_file_is_a_clear_error_and_is_not_overwritten(tmp_path):
    path = tmp_path / "c"
    Collection.create(path, manifest()).close()
    db = path / "collection.db"
    db.write_bytes(b"this is not a database" * 100)
    before = sha(db)
    with pytest.raises(CorruptCollectionError, match="left untouched"):
        Collection.open(path)
    assert sha(db) == before


def test_opening_with_another_model_or_dim_is_refused_naming_both(tmp_path):
    path = tmp_path / "c"
    Collection.create(path, manifest()).close()
    with pytest.raises(ModelMismatchError, match=r"built with model test .*dim 8.*refusing model other .*dim 16"):
        Collection.open_or_create(path, manifest(model="other", model_id="other/model", dim=16))
    with pytest.raises(ModelMismatchError, match="2_Dense_256"):
        Collection.open_or_create(path, manifest(head="2_Dense_256"))


def test_rejected_writes_change_nothing(collection):
    add(collection, "a", seed=1)
    db = collection.path / "collection.db"
    before = (sha(db), collection.count_passages(), collection.index_size)
    doc = Document("x", None, "text")
    cases = [
        ([doc, doc], [Passage("x", 0, "t", 0, 1)], unit(1)),  # duplicate ids
        ([doc], [Passage("x", 0, "t", 0, 1)], unit(1)[:, :4]),  # wrong dim
        ([doc], [Passage("x", 0, "t", 0, 1)], np.full((1, DIM), np.nan, dtype="float32")),
        ([Document("x", None, "t", {"bad": object()})], [Passage("x", 0, "t", 0, 1)], unit(1)),
        ([Document("x", None, "t", ["not", "a", "dict"])], [Passage("x", 0, "t", 0, 1)], unit(1)),
        ([doc], [], np.empty((0, DIM), dtype="float32")),  # new content but no passages
    ]
    for documents, passages, vectors in cases:
        with pytest.raises((InvalidInputError, ModelMismatchError)):
            collection.write(documents, passages, vectors)
    assert (sha(db), collection.count_passages(), collection.index_size) == before


def test_collection_names_are_checked(tmp_path):
    assert collection_dir(tmp_path, "msmarco-minilm") == tmp_path / "msmarco-minilm"
    for bad in ["../escape", "", ".hidden", "a/b", "x" * 65]:
        with pytest.raises(InvalidInputError, match="invalid collection name"):
            collection_dir(tmp_path, bad)


def test_the_faiss_thread_count_reaches_every_searching_thread():
    """OpenMP keeps its thread count per thread: the server's request threads must get the configured count,
    not one thread per core (their spinning slowed the encoder's own threads)."""
    import threading

    from storage import vector_index
    from storage.vector_index import VectorIndex, import_faiss, set_search_threads

    faiss = import_faiss()
    before, configured = faiss.omp_get_max_threads(), vector_index._search_threads
    index = VectorIndex.empty(4, use_gpu=False)
    index.add(np.eye(4, dtype="float32"), np.arange(4, dtype="int64"))
    seen = {}

    def search_in_a_new_thread(key):
        seen[key, "before"] = faiss.omp_get_max_threads()
        index.search(np.eye(1, 4, dtype="float32"), 1)
        seen[key, "after"] = faiss.omp_get_max_threads()

    try:
        set_search_threads(1)
        worker = threading.Thread(target=search_in_a_new_thread, args=("one",))
        worker.start()
        worker.join()
        assert seen["one", "after"] == 1
        if (os.cpu_count() or 1) > 1:
            assert seen["one", "before"] > 1  # what the thread had before searching: OpenMP's default
    finally:
        vector_index._search_threads = configured
        faiss.omp_set_num_threads(before)


def test_verify_finds_what_an_index_lacks_or_holds_twice(tmp_path):
    manifest = Manifest(model="minilm", model_id="m", revision=None, dim=8, head="native")
    vectors = np.random.default_rng(0).normal(size=(120, 8)).astype("float32")
    with Collection.create(tmp_path / "c", manifest) as collection:
        docs = [Document(f"d{i}", None, f"text number {i}") for i in range(120)]
        collection.write(docs, [Passage(d.id, 0, d.text, 0, len(d.text)) for d in docs], vectors)
        assert not any(collection.verify().values())
        for index_type in ("HNSW32", "IVF4,Flat", "Flat"):
            collection.optimize(index_type)
            collection.delete(["d1"])
            assert not any(collection.verify().values()), index_type
            collection._index.remove([5])
            collection._index.add(vectors[:1], np.array([7]))
            assert collection.verify()["missing_from_vector_index"] == [5]
            assert collection.verify()["extra_in_vector_index"] == [7]
        conn = sqlite3.connect(tmp_path / "c" / "collection.db")
        with conn:
            conn.execute("DELETE FROM passages_fts WHERE rowid = 9")
        conn.close()
        assert collection.verify()["missing_from_text_index"] == [9]
