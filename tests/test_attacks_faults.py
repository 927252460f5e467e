"""Storage faults as the API and the CLI answer them: a damaged collection, a read-only data folder, free space below
the reserve, a disk that refuses a write (a file size limit), files removed or replaced underneath. Searches go on,
writes get 507 or 503 with the reason (never a 500), the answer matches what is stored, and nothing is lost.

A read-only folder is made with chmod. Root writes through any permission, so as root the server runs without the
capabilities that override file permissions (as an ordinary user does); a real out-of-space error comes from
RLIMIT_FSIZE, which any user can set on a process they start.
"""

import ctypes
import errno
import json
import os
import resource
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import search_api.service
from indexer.pipeline import ingest_paths
from search_api.cli import main
from storage.collection import Collection
from storage.disk import storage_error
from storage.errors import (
    CollectionBusyError,
    CorruptCollectionError,
    InsufficientStorageError,
    StorageUnavailableError,
)

from conftest import cpu_settings, server_settings, write_jsonl
from server import RunningServer, free_port

STELLA = str(Path(sys.executable).parent / "stella-search")
DOCUMENTS = [
    {"id": "faiss", "text": "FAISS searches dense vectors for their nearest neighbours."},
    {"id": "sqlite", "text": "SQLite keeps the passages and their metadata in one file."},
]
NEW = [{"id": "raft", "text": "Raft elects a leader and replicates a log across servers."}]
HUGE_RESERVE = 1 << 60
# capabilities that let root write where permissions say no: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
PERMISSION_OVERRIDES = (1, 2, 3)
PR_CAPBSET_DROP = 24


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    corpus = write_jsonl(root / "docs.jsonl", DOCUMENTS)
    ingest_paths([corpus], root / "data", "docs", cpu_settings(), model="minilm")
    return root / "data"


@pytest.fixture
def data(base, tmp_path) -> Path:
    shutil.copytree(base, tmp_path / "data")
    return tmp_path / "data"


def upsert(url: str, documents: list[dict], collection: str = "docs") -> httpx.Response:
    return httpx.post(f"{url}/collections/{collection}/documents", json={"documents": documents}, timeout=120)


def search(url: str, query: str = "nearest vectors", collection: str = "docs") -> httpx.Response:
    return httpx.post(f"{url}/collections/{collection}/search", json={"query": query, "k": 5}, timeout=60)


def stray_files(folder: Path) -> list[str]:
    """Temporary or half-written files and folders: index copies, snapshot, restore and creation staging."""
    marks = (".tmp", ".partial-", ".restore-", ".creating-")
    return sorted(str(p) for p in folder.rglob("*") if any(mark in p.name for mark in marks))


def stored_ids(collection_path: Path) -> set[str]:
    with Collection.open(collection_path) as collection:
        return {document.id for documents, _, _ in collection.iter_documents() for document in documents}


def integrity(collection_path: Path) -> str:
    conn = sqlite3.connect(collection_path / "collection.db")
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


# -- a damaged collection -------------------------------------------------------------------------------------


def test_damaged_collections_are_listed_unavailable_and_the_others_served(base, data):
    shutil.copytree(data / "docs", data / "garbage")
    (data / "garbage" / "collection.db").write_bytes(os.urandom(64 * 1024))
    shutil.copytree(data / "docs", data / "wrongdim")
    conn = sqlite3.connect(data / "wrongdim" / "collection.db")
    conn.execute("UPDATE manifest SET dim = 768")
    conn.commit()
    conn.close()
    with RunningServer(server_settings(data)) as running:
        ready = httpx.get(f"{running.url}/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
        states = ready.json()["collections"]
        assert states["docs"]["state"] == "ready"
        assert states["garbage"]["state"] == "unavailable"
        assert "cannot be read as a collection database" in states["garbage"]["reason"]
        assert states["wrongdim"]["state"] == "unavailable" and "768 dimensions" in states["wrongdim"]["reason"]
        health = httpx.get(f"{running.url}/health").json()
        assert health["status"] == "degraded"
        assert "collection garbage cannot be opened" in health["error"] and "wrongdim" in health["error"]
        assert search(running.url).json()["results"][0]["id"] == "faiss"
        for name in ("garbage", "wrongdim"):
            answers = [
                search(running.url, collection=name),
                upsert(running.url, NEW, collection=name),
                httpx.get(f"{running.url}/collections/{name}/documents/faiss"),
            ]
            for answer in answers:
                assert answer.status_code == 503, answer.text
                assert answer.json()["detail"].startswith(f"collection {name} is unavailable: ")
        # restored from a good copy: served from its next request, without a restart
        shutil.copyfile(base / "docs" / "collection.db", data / "garbage" / "collection.db")
        assert search(running.url, collection="garbage").json()["results"][0]["id"] == "faiss"
        assert "garbage" not in (httpx.get(f"{running.url}/health").json()["error"] or "")
    assert integrity(data / "wrongdim") == "ok"  # left untouched for the operator


# -- a read-only data folder ----------------------------------------------------------------------------------


def _drop_permission_overrides() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in PERMISSION_OVERRIDES:
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def as_ordinary_user():
    """preexec_fn for a process that obeys file permissions: none needed for a user, dropped overrides for root."""
    if os.geteuid() != 0:
        return None
    try:
        subprocess.run([sys.executable, "-c", ""], preexec_fn=_drop_permission_overrides, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"root here cannot give up the capabilities that override file permissions: {exc}")
    return _drop_permission_overrides


def set_writable(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        write_bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~write_bits)


@contextmanager
def serving(data: Path, log: Path, preexec_fn=None, timeout: float = 180):
    """``stella-search serve`` over ``data`` in its own process; yields (url, process) once /ready is 200."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [STELLA, "serve", "--data-dir", str(data), "--port", str(port), "--model", "minilm", "--device", "cpu"],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield url, process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def assert_read_only_answer(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    detail = answer.json()["detail"]
    assert "the data folder is read-only" in detail, detail
    assert "snapshot" not in detail and "restore" not in detail.lower(), detail


def test_a_read_only_data_folder_serves_searches_and_refuses_writes_with_503(data, tmp_path):
    preexec_fn = as_ordinary_user()
    set_writable(data, False)
    try:
        with serving(data, tmp_path / "serve.log", preexec_fn) as (url, _):
            assert search(url).json()["results"][0]["id"] == "faiss"
            assert_read_only_answer(upsert(url, NEW))
            assert_read_only_answer(httpx.delete(f"{url}/collections/docs/documents/faiss"))
            assert_read_only_answer(httpx.post(f"{url}/collections", json={"name": "more", "model": "minilm"}))
            health = httpx.get(f"{url}/health").json()
            assert health["status"] == "degraded" and health["storage"]["writable"] is False
            assert "the data folder is read-only" in health["error"] and "restore" not in health["error"].lower()

            set_writable(data, True)  # fixed while serving: writes are accepted again, no restart
            assert upsert(url, NEW).status_code == 200
            assert search(url, "leader election log replication").json()["results"][0]["id"] == "raft"
            assert httpx.get(f"{url}/health").json()["status"] == "ok"

            set_writable(data, False)  # made read-only while serving
            assert_read_only_answer(upsert(url, [{"id": "late", "text": "Written while read-only."}]))
            assert search(url, "leader election log replication").json()["results"][0]["id"] == "raft"
            assert httpx.get(f"{url}/health").json()["status"] == "degraded"
    finally:
        set_writable(data, True)
    assert stored_ids(data / "docs") == {"faiss", "sqlite", "raft"}
    assert integrity(data / "docs") == "ok"


# -- the free-space reserve -----------------------------------------------------------------------------------


def test_writes_below_the_reserve_answer_507_and_health_follows_the_free_space(data):
    settings = server_settings(data)
    settings.storage.reserve_bytes = HUGE_RESERVE
    with RunningServer(settings) as running:
        url = running.url
        answer = upsert(url, NEW)
        assert answer.status_code == 507, answer.text
        detail = answer.json()["detail"]
        assert f"the data folder {data} has " in detail and " MiB free" in detail and "reserve" in detail
        assert httpx.get(f"{url}/collections/docs/documents/raft").status_code == 404  # nothing was written
        created = httpx.post(f"{url}/collections", json={"name": "more", "model": "minilm"})
        assert created.status_code == 507 and not (data / "more").exists(), created.text
        snapshot = httpx.post(f"{url}/collections/docs/snapshots")
        assert snapshot.status_code == 507 and "a snapshot of docs" in snapshot.json()["detail"], snapshot.text
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "degraded" and "writes are refused (507)" in health["error"]
        assert health["storage"]["free_bytes"] < health["storage"]["required_free_bytes"]
        assert search(url).json()["results"][0]["id"] == "faiss"  # searches go on
        deleted = httpx.delete(f"{url}/collections/docs/documents/sqlite")  # deleting is how space is made
        assert deleted.status_code == 200, deleted.text

        settings.storage.reserve_bytes = 64 << 20  # space is back
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["error"] is None
        assert upsert(url, NEW).status_code == 200
    assert stored_ids(data / "docs") == {"faiss", "raft"}
    assert stray_files(data) == []


def cli(*args: str, reserve: int | None = None):
    env = {"STELLA_SEARCH_STORAGE__RESERVE_BYTES": str(reserve)} if reserve is not None else {}
    return CliRunner().invoke(main, list(args), env=env)


def assert_refused_for_space(result, data: Path) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.stdout
    last = result.stderr.strip().splitlines()[-1]  # after the model's loading bar, where a command loads it
    assert last.startswith("error: not enough free space for ") and "Traceback" not in result.stderr, result.stderr
    assert str(data) in last and " MiB free" in last, last


def test_cli_commands_below_the_reserve_fail_in_one_line_and_leave_nothing_behind(data, tmp_path):
    corpus = write_jsonl(tmp_path / "new.jsonl", NEW)
    snapshots = tmp_path / "snapshots"
    taken = cli("snapshot", "--data-dir", str(data), "--collection", "docs", "--out", str(snapshots / "one"))
    assert taken.exit_code == 0, taken.output
    manifest = Collection.read_manifest(data / "docs")
    before = sorted(str(p) for p in data.rglob("*"))

    commands = [
        ["ingest", str(corpus), "--data-dir", str(data), "--collection", "fresh", "--model", "minilm"],
        ["ingest", str(corpus), "--data-dir", str(data), "--collection", "docs", "--model", "minilm"],
        ["snapshot", "--data-dir", str(data), "--collection", "docs", "--out", str(snapshots / "two")],
        ["restore", str(snapshots / "one"), "--data-dir", str(data), "--collection", "copy"],
        ["optimize", "--data-dir", str(data), "--collection", "docs", "--index", "HNSW32"],
    ]
    for command in commands:
        assert_refused_for_space(cli(*command, reserve=HUGE_RESERVE), data)
    assert not (data / "fresh").exists() and not (data / "copy").exists()
    assert not (snapshots / "two").exists() and stray_files(tmp_path) == []
    assert stored_ids(data / "docs") == {"faiss", "sqlite"}
    assert Collection.read_manifest(data / "docs").index_type == manifest.index_type
    assert sorted(str(p) for p in data.rglob("*")) == before


# -- the disk refuses a write ---------------------------------------------------------------------------------


def test_a_failed_index_checkpoint_after_the_commit_still_answers_success(data, monkeypatch):
    """The index file cannot be replaced (a folder stands in its place), so every checkpoint fails after SQLite
    committed: the write is answered as stored, and the checkpoint is tried again later."""
    monkeypatch.setattr(search_api.service, "CHECKPOINT_AFTER_PASSAGES", 1)
    index = data / "docs" / "index.faiss"
    with RunningServer(server_settings(data)) as running:
        index.unlink()
        (index / "in-the-way").mkdir(parents=True)
        answer = upsert(running.url, NEW)
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{running.url}/collections/docs/documents/raft").status_code == 200
        assert stray_files(data) == []
        shutil.rmtree(index)
        assert upsert(running.url, [{"id": "late", "text": "Checkpointed once the way is clear."}]).status_code == 200
        assert index.is_file()  # the checkpoint was written at the next write
    assert stored_ids(data / "docs") == {"faiss", "sqlite", "raft", "late"}


def test_a_database_file_removed_underneath_refuses_writes_with_503_until_it_is_back(data):
    database = data / "docs" / "collection.db"
    with RunningServer(server_settings(data)) as running:
        url = running.url
        database.rename(database.with_name("moved-aside.db"))
        answer = upsert(url, NEW)
        assert answer.status_code == 503 and "collection.db was removed while collection docs was open" in answer.text
        assert "collection.db was removed" in httpx.get(f"{url}/health").json()["error"]
        database.with_name("moved-aside.db").rename(database)
        assert upsert(url, NEW).status_code == 200
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert stored_ids(data / "docs") == {"faiss", "sqlite", "raft"}


def test_a_file_size_limit_answers_507_or_503_never_500_and_loses_no_acknowledged_write(data, tmp_path):
    """RLIMIT_FSIZE makes the OS refuse to grow any file of the server past a size (EFBIG, or a short write that
    SQLite reports as a full disk): upserts go on until it bites, then raising the limit lets them through again."""
    limit = (data / "docs" / "collection.db").stat().st_size + 256 * 1024

    def limited():  # root too: no capability lifts RLIMIT_FSIZE
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    acknowledged, refused = set(), []
    with serving(data, tmp_path / "serve.log", limited) as (url, process):
        for batch in range(60):
            documents = [
                {"id": f"b{batch}-{i}", "text": f"Batch {batch} document {i}: " + "storage fault words " * 60}
                for i in range(20)
            ]
            answer = upsert(url, documents)
            assert answer.status_code in (200, 503, 507), answer.text
            if answer.status_code == 200:
                acknowledged |= {d["id"] for d in documents}
                continue
            refused.append(answer.json()["detail"])
            health = httpx.get(f"{url}/health").json()
            assert health["status"] == "degraded" and "a write failed at" in health["error"]
            assert search(url).status_code == 200
            if len(refused) == 3:
                break
        assert refused, "the file size limit never refused a write"
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        answer = upsert(url, NEW)
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert (acknowledged | {"faiss", "sqlite", "raft"}) <= stored_ids(data / "docs")
    assert integrity(data / "docs") == "ok"
    assert stray_files(data) == []
    print(json.dumps({"acknowledged": len(acknowledged), "refused": refused}, indent=2))


@pytest.mark.parametrize(
    ("failure", "expected", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "index.faiss"), InsufficientStorageError, "out of space"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), InsufficientStorageError, "out of space"),
        (OSError(errno.EFBIG, "File too large"), InsufficientStorageError, "largest size allowed"),
        (OSError(errno.EROFS, "Read-only file system"), StorageUnavailableError, "the data folder is read-only"),
        (OSError(errno.EACCES, "Permission denied", "collection.db"), StorageUnavailableError, "no permission"),
        (OSError(errno.EIO, "Input/output error"), StorageUnavailableError, "Input/output error"),
        (OSError(errno.ENOENT, "No such file or directory", "index.json"), StorageUnavailableError, "index.json"),
        (sqlite3.OperationalError("database or disk is full"), InsufficientStorageError, "out of space"),
        (sqlite3.OperationalError("attempt to write a readonly database"), StorageUnavailableError, "read-only"),
        (sqlite3.OperationalError("disk I/O error"), StorageUnavailableError, "disk I/O error"),
        (sqlite3.DatabaseError("file is not a database"), CorruptCollectionError, "Restore it from a snapshot"),
        (sqlite3.OperationalError("database is locked"), CollectionBusyError, "retry"),
        (sqlite3.OperationalError("no such table: nothing"), None, ""),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), None, ""),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_each_failure_of_the_disk_has_its_domain_error(tmp_path, failure, expected, words):
    error = storage_error(failure, tmp_path)
    if expected is None:
        assert error is None  # not a storage failure: left to surface as the bug it is
        return
    assert type(error) is expected and words in str(error), str(error)
    if expected is not CorruptCollectionError:
        assert "restore" not in str(error).lower()  # only damaged data is restored from a snapshot
