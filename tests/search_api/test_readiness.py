"""GET /ready through a real server: 503 with Retry-After while the encoders load, 200 once every served collection
can be searched and written to, and a default model that is not here holds back no collection of another model."""

import fcntl
import shutil
import time
from pathlib import Path

import httpx
import pytest

from indexer.encoder import Encoder, graph_fingerprint
from indexer.onnx_backend import graph_path
from indexer.settings import onnx_dir
from storage.collection import Collection, collection_dir
from storage.snapshots import take_snapshot
from tests.helpers.data import cpu_settings, ingest_records, server_settings
from tests.helpers.server import RunningServer

DOCUMENTS = [
    {"id": "faiss", "text": "FAISS searches dense vectors for their nearest neighbours."},
    {"id": "sqlite", "text": "SQLite keeps the passages and their metadata in one file."},
]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    ingest_records(tmp_path, DOCUMENTS, "docs")
    return tmp_path / "data"


def wait_until_ready(url: str, seconds: float = 180) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while (answer := httpx.get(f"{url}/ready")).status_code != 200:
        assert answer.status_code == 503, answer.text
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.1)
    return answer


def test_ready_is_503_with_retry_after_while_the_encoders_load_then_200(data_dir, tmp_path, minilm):
    """A start with an empty cache: the encoder waits for the export lock this test holds, so the server is
    observably still loading; the test then puts the session's finished graphs in place and lets go."""
    settings = server_settings(data_dir)
    settings.cache_dir = tmp_path / "empty-cache"
    fingerprint = graph_fingerprint(minilm.profile, minilm.head.label, True, minilm.max_seq_length)
    graphs = [
        (graph_path(onnx_dir(settings), fingerprint, int8), graph_path(onnx_dir(cpu_settings()), fingerprint, int8))
        for int8 in (None, minilm.int8)
    ]
    lock = graphs[0][0].with_name(graphs[0][0].name + ".lock")  # what an exporting process holds
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with RunningServer(settings, load_in_background=True) as running:
            answer = httpx.get(f"{running.url}/ready")
            assert answer.status_code == 503 and int(answer.headers["Retry-After"]) > 0
            assert answer.json()["ready"] is False and answer.json()["collections"]["docs"]["state"] == "loading"
            health = httpx.get(f"{running.url}/health")
            assert health.status_code == 200 and health.json()["status"] == "loading"
            search = httpx.post(f"{running.url}/collections/docs/search", json={"query": "nearest vectors"})
            assert search.status_code == 503 and "Retry-After" in search.headers
            for target, finished in graphs:
                shutil.copyfile(finished, target)
            fcntl.flock(held, fcntl.LOCK_UN)
            answer = wait_until_ready(running.url)
            assert answer.json()["ready"] is True and answer.json()["collections"]["docs"]["state"] == "ready"
            search = httpx.post(f"{running.url}/collections/docs/search", json={"query": "nearest vectors", "k": 1})
            assert search.status_code == 200 and search.json()["results"][0]["id"] == "faiss"


def test_collections_of_another_model_get_ready_when_the_default_model_is_not_here(data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(data_dir.parent / "empty-hub-cache"))
    settings = server_settings(data_dir)
    settings.encoder.model = "stella-1.5b"  # the default, whose weights are not on this machine
    with RunningServer(settings, load_in_background=True) as running:
        ready = wait_until_ready(running.url).json()
        assert ready["collections"]["docs"]["state"] == "ready"
        default = ready["default_model"]
        assert default["model"] == "stella-1.5b" and default["state"] == "unavailable"
        assert "stella_en_1.5B_v5" in default["reason"]
        assert httpx.get(f"{running.url}/health").json()["default_model"] == default
        upsert = httpx.post(
            f"{running.url}/collections/docs/documents",
            json={"documents": [{"id": "river", "text": "The Thames flows through London to the North Sea."}]},
            timeout=120,
        )
        assert upsert.status_code == 200 and upsert.json()["added"] == 1  # a write waits for the full encoder
        search = httpx.post(f"{running.url}/collections/docs/search", json={"query": "a river in London", "k": 1})
        assert search.json()["results"][0]["id"] == "river"
        health = httpx.get(f"{running.url}/health").json()
        assert health["status"] == "ok" and health["collections"]["docs"]["writes"] == "ready"


def test_with_no_collection_ready_means_the_default_model_loaded_or_said_unavailable(tmp_path, monkeypatch):
    with RunningServer(server_settings(tmp_path / "minilm"), load_in_background=True) as running:
        default = wait_until_ready(running.url).json()["default_model"]
        assert default == {"model": "minilm", "state": "ready", "loaded": True, "reason": None}
        created = httpx.post(f"{running.url}/collections", json={"name": "new"}, timeout=120)
        assert created.status_code == 201 and created.json()["model"] == "minilm"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    settings = server_settings(tmp_path / "stella")
    settings.encoder.model = "stella-1.5b"
    with RunningServer(settings, load_in_background=True) as running:
        ready = wait_until_ready(running.url).json()
        assert ready["collections"] == {} and ready["default_model"]["state"] == "unavailable"
        health = httpx.get(f"{running.url}/health").json()
        assert health["status"] == "unavailable" and "stella_en_1.5B_v5" in health["error"]


@pytest.fixture(scope="module")
def minilm_256():
    """The embedded model cut to 256 dimensions: collections of another encoder key than the 384-dim ones."""
    return Encoder.load("minilm", cpu_settings(), dim=256)


def test_a_collection_of_another_key_created_on_disk_later_loads_its_encoders_and_gets_ready(data_dir, minilm_256):
    with RunningServer(server_settings(data_dir), load_in_background=True) as running:
        wait_until_ready(running.url)
        Collection.create(collection_dir(data_dir, "later"), minilm_256.manifest()).close()
        assert "later" in [c["name"] for c in httpx.get(f"{running.url}/collections").json()]
        ready = wait_until_ready(running.url).json()
        assert ready["collections"]["later"]["state"] == "ready"


def test_a_collection_restored_from_a_snapshot_loads_its_encoders_and_gets_ready(data_dir, minilm_256):
    with Collection.create(collection_dir(data_dir, "small"), minilm_256.manifest()) as small:
        take_snapshot(small, data_dir / ".snapshots" / "small-1")
    shutil.rmtree(collection_dir(data_dir, "small"))
    with RunningServer(server_settings(data_dir), load_in_background=True) as running:
        wait_until_ready(running.url)
        restored = httpx.post(f"{running.url}/collections/restore", json={"snapshot": "small-1", "collection": "s"})
        assert restored.status_code == 201, restored.text
        assert wait_until_ready(running.url).json()["collections"]["s"]["state"] == "ready"
