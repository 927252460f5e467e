"""Scale-out on a real multi-node Ray cluster built inside the test on 127.0.0.1 (CPU only, torn down after).

Three nodes: a head and two workers, each worker offering the custom resources that pin shard replicas to it,
as node-local disks would in a real cluster. The collections sit in tmp_path, which every node can read here.
"""

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from indexer.distributed import ingest_paths_on_ray
from indexer.evaluation import BeirDataset, evaluate, run_queries
from indexer.pipeline import ingest_paths
from search_api.client import SearchAPIError, SearchClient
from storage.collection import Collection
from storage.sharding import open_collection, reshard, shard_of
from tests.helpers.data import DATA, cpu_settings, read_jsonl, slice_dataset, write_jsonl
from tests.helpers.processes import free_port

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

SCIFACT = DATA / "scifact"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    common = {"object_store_memory": 150 * 1024 * 1024}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, **common},
    )
    cluster.add_node(num_cpus=2, resources={"stella:sci3/shard-001": 1}, **common)
    cluster.add_node(num_cpus=2, resources={"stella:sci3/shard-002": 1}, **common)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield cluster
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def _settings(data_dir, **ray_settings):
    settings = cpu_settings()
    settings.data_dir = data_dir
    settings.server.host = "127.0.0.1"
    settings.server.port = free_port()
    for key, value in ray_settings.items():
        setattr(settings.ray, key, value)
    return settings


def _stored(collection) -> dict:
    """{(document id, ordinal): (passage text, vector)} of every passage."""
    out = {}
    for _documents, passages, vectors in collection.iter_documents():
        for passage, vector in zip(passages, vectors):
            out[(passage.document_id, passage.ordinal)] = (passage.text, vector)
    return out


def test_distributed_ingest_equals_local_ingest_and_resumes(cluster, tmp_path):
    records = read_jsonl(SCIFACT / "corpus.jsonl", limit=60)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    half = write_jsonl(tmp_path / "half.jsonl", records[:25])
    # fp32: int8 activations are quantised per batch, so int8 vectors depend on which passages share a batch,
    # and local and Ray ingest batch differently
    settings = cpu_settings(backend="torch")
    ingest_paths([corpus], tmp_path / "local", "sci", settings, model="minilm")
    # an interrupted run is one that committed some documents: only the others are encoded on the rerun
    ingest_paths([half], tmp_path / "ray", "sci", settings, model="minilm", shards=3)
    report = ingest_paths_on_ray([corpus], tmp_path / "ray", "sci", settings, model="minilm", address="auto", workers=2)
    assert (report.documents_unchanged, report.documents_added) == (25, 35)
    again = ingest_paths_on_ray([corpus], tmp_path / "ray", "sci", settings, model="minilm", workers=2)
    assert (again.documents_unchanged, again.passages_written) == (60, 0)
    with open_collection(tmp_path / "local" / "sci") as local, open_collection(tmp_path / "ray" / "sci") as remote:
        want, got = _stored(local), _stored(remote)
        assert want.keys() == got.keys() and len(want) > 60  # long abstracts are split into several passages
        for key, (text, vector) in want.items():
            assert got[key][0] == text
            np.testing.assert_allclose(got[key][1], vector, atol=1e-5)
        assert [s.count_documents() for s in remote.shards] == [
            sum(shard_of(r["_id"], 3) == i for r in records) for i in range(3)
        ]


def test_distributed_ingest_takes_title_only_records_and_skips_empty_ones_as_local_ingest_does(cluster, tmp_path):
    records = [
        *read_jsonl(SCIFACT / "corpus.jsonl", limit=6),
        {"_id": "title-only", "title": "Photosynthesis in green plants", "text": ""},
        {"_id": "empty", "title": "", "text": "  "},
        {"_id": "blank-text", "title": "The eruption of Mount Vesuvius", "text": " "},
    ]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    settings = cpu_settings(backend="torch")
    local = ingest_paths([corpus], tmp_path / "local", "c", settings, model="minilm")
    report = ingest_paths_on_ray([corpus], tmp_path / "ray", "c", settings, model="minilm", workers=1)
    skipped = [f"{corpus} line 8 (document 'empty')"]
    for each in (local, report):
        assert (each.documents_added, each.documents_skipped, each.skipped) == (8, 1, skipped)
    with open_collection(tmp_path / "local" / "c") as one, open_collection(tmp_path / "ray" / "c") as other:
        want, got = _stored(one), _stored(other)
        assert want.keys() == got.keys() and got[("title-only", 0)][0] == got[("blank-text", 0)][0] == ""
        for key, (text, vector) in want.items():
            assert got[key][0] == text
            np.testing.assert_allclose(got[key][1], vector, atol=1e-5)
        assert other.get("blank-text")[0].text == ""
    again = ingest_paths_on_ray([corpus], tmp_path / "ray", "c", settings, model="minilm", workers=1)
    assert (again.documents_unchanged, again.passages_written) == (8, 0)


@pytest.fixture(scope="module")
def scifact(tmp_path_factory) -> Path:
    """A scifact slice: its first 50 queries, every document judged for them and 250 others (about 310
    documents; the whole set's ingest took most of this module's time on 2 cores)."""
    out = tmp_path_factory.mktemp("scifact") / "scifact"
    slice_dataset("scifact", out, queries=50, extra_docs=250)
    return out


@pytest.fixture(scope="module")
def served(cluster, scifact, tmp_path_factory):
    """The scifact slice as one shard and as three (the same stored vectors), served on Ray Serve."""
    from search_api.cluster import serve_on_ray

    root = tmp_path_factory.mktemp("served")
    # int8 passages (nDCG@10 within 0.001 of fp32 on scifact) keep the ingest short; both collections hold the
    # same vectors, which is what the comparison needs
    fast = cpu_settings(backend="onnx-int8")
    ingest_paths([scifact / "corpus.jsonl"], root / "data", "sci1", fast, model="minilm")
    with Collection.open(root / "data" / "sci1") as one:
        reshard(one, root / "data" / "sci3", 3).close()
    settings = _settings(root / "data", shard_cpus=0.25, gateway_cpus=0.25, encoder_cpus=1.0)
    url = serve_on_ray(settings, "auto", blocking=False)
    with SearchClient(url, retries=3, timeout=300) as client:
        deadline = time.monotonic() + 120
        while client.health().status != "ok" and time.monotonic() < deadline:
            time.sleep(1)
        yield url, root / "data", client


def _replicas(deployment: str) -> list:
    return [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"] and f"#{deployment}#" in a["name"]
    ]


def test_shards_are_placed_on_the_nodes_that_offer_them(served, scifact):
    _, _, client = served
    shards = {s["shard"]: s for s in client.health().collections["sci3"]["shards"]}
    assert shards["shard-001"]["node"] != shards["shard-002"]["node"]
    assert (
        0
        < shards["shard-001"]["documents"] + shards["shard-002"]["documents"]
        < len(read_jsonl(scifact / "corpus.jsonl"))
    )


def test_three_shards_answer_exactly_as_one_through_http(served, scifact):
    url, _, client = served
    dataset = BeirDataset.load(scifact)
    runs, top10 = {}, {}
    for name in ("sci1", "sci3"):

        def search(queries, k, name=name):
            responses = client.search_batch(queries, k=k, collection=name, group_by="document")
            return [[(h.id, h.score) for h in r.results] for r in responses]

        runs[name] = run_queries(dataset, search, 10, batch=16)  # nDCG@10 needs the top 10
        top10[name] = {q: list(docs)[:10] for q, docs in runs[name].items()}
    assert top10["sci3"] == top10["sci1"]
    one, three = evaluate(dataset, runs["sci1"]), evaluate(dataset, runs["sci3"])
    assert abs(one["ndcg@10"] - three["ndcg@10"]) <= 0.001
    assert one["ndcg@10"] > 0.6  # the embedded model scores 0.6451 on the whole set (published), more on a slice
    health = client.health().collections["sci3"]
    assert len(health["shards"]) == 3 and health["documents"] == len(read_jsonl(scifact / "corpus.jsonl"))
    metrics = httpx.get(f"{url}/metrics", timeout=120).text
    assert 'stella_shard_index_vectors{collection="sci3",shard="shard-002"}' in metrics


def test_upserts_and_deletes_reach_the_owning_shard(served):
    url, data_dir, client = served
    docs = [
        {"id": f"ray-doc-{i}", "text": f"A note about protein folding number {i}.", "metadata": {"n": i}}
        for i in range(12)
    ]
    assert client.upsert(docs, collection="sci3").added == 12
    for doc in docs:
        owner = shard_of(doc["id"], 3)
        for index in range(3):
            with Collection.open(data_dir / "sci3" / f"shard-{index:03d}") as shard:
                assert (doc["id"] in shard.content_hashes([doc["id"]])) == (index == owner)
    assert client.delete_many(collection="sci3", filter={"n": {"$gte": 6}}).deleted == 6
    assert client.get("ray-doc-3", collection="sci3").id == "ray-doc-3"
    with pytest.raises(SearchAPIError) as missing:
        client.get("ray-doc-7", collection="sci3")
    assert missing.value.status_code == 404
    refused = httpx.post(f"{url}/collections", json={"name": "new", "model": "minilm"})
    assert refused.status_code == 400 and "not available while serving on Ray" in refused.json()["detail"]


def test_a_killed_shard_replica_loses_no_acknowledged_write(served):
    url, _, client = served
    query = "cancer cells"
    expected = [h.id for h in client.search(query, k=10, collection="sci1").results]
    acknowledged: list[str] = []
    failures: list[tuple[int, str]] = []
    wrong: list[list[str]] = []
    crashed: list[BaseException] = []
    searches = [0]
    stop = threading.Event()

    def guarded(body):
        def run(*args):
            try:
                body(*args)
            except BaseException as exc:  # a thread's error must fail the test, not end the thread quietly
                crashed.append(exc)

        return run

    @guarded
    def writer(worker: int):
        with SearchClient(url, retries=0, timeout=60) as own:
            i = 0
            while not stop.is_set():
                doc_id = f"kill-{worker}-{i}"
                try:
                    own.upsert([{"id": doc_id, "text": f"crash test document {worker} {i}"}], collection="sci3")
                    acknowledged.append(doc_id)
                except SearchAPIError as exc:
                    failures.append((exc.status_code, exc.detail))
                i += 1

    @guarded
    def reader():
        with SearchClient(url, retries=0, timeout=60) as own:
            while not stop.is_set():
                try:
                    found = [h.id for h in own.search(query, k=10, collection="sci3").results]
                except SearchAPIError as exc:
                    failures.append((exc.status_code, exc.detail))
                    continue
                searches[0] += 1
                if found != expected:  # a partial (missing shard) answer would differ from the whole one
                    wrong.append(found)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(3)
    (replica,) = _replicas("sci3--shard-001")
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    time.sleep(12)  # bounded: Serve notices the death and starts a new replica within this window
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not crashed and not wrong, (crashed, wrong[:2])
    assert acknowledged and searches[0] > 0
    assert all(status == 503 and "did not answer" in detail for status, detail in failures), failures[:3]
    for doc_id in acknowledged:
        assert client.get(doc_id, collection="sci3").id == doc_id
    new_replicas = _replicas("sci3--shard-001")
    assert new_replicas and new_replicas[0]["name"] != replica["name"]
