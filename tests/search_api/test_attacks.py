"""Attacks on a served collection, each reproduced through a real server on 127.0.0.1 (and the CLI where it has
the same operation): every one was a 500, an escape from the data folder or an outage before its fix.

Attacks on the keys and the connections of a served collection, through a real server on 127.0.0.1: what each
key guards, what a caller without one sees, the key checked before any body is read, the start-up refusals of
``stella-search serve``, and connections that send their headers or body too slowly.

Snapshots are untrusted input: a tampered, linked or racing restore is a 400 or 409 naming the problem, never a
500, never a file read from outside the snapshot, never a collection moved aside unasked; snapshots can be deleted
and are pruned by the retention. Through a real server with keys set, and through the CLI.

Inputs an attack run sent to a served collection: each must be a clear 400 (or a CLI error), never a 500, and
nothing one document stores may make later reads fail.

Storage faults as the API and the CLI answer them: a damaged collection, a read-only data folder, free space below
the reserve, a disk that refuses a write (a file size limit), files removed or replaced underneath. Searches go on,
writes get 507 or 503 with the reason (never a 500), the answer matches what is stored, and nothing is lost.

A read-only folder is made with chmod. Root writes through any permission, so as root the server runs without the
capabilities that override file permissions (as an ordinary user does); a real out-of-space error comes from
RLIMIT_FSIZE, which any user can set on a process they start.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import resource
import select
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import search_api.service
from search_api.batching import QueryBatcher
from search_api.cli import main
from storage.collection import Collection, Document, Passage
from storage.disk import storage_error
from storage.errors import (
    CollectionBusyError,
    CorruptCollectionError,
    InsufficientStorageError,
    StorageUnavailableError,
)
from storage.snapshots import take_snapshot
from tests.helpers.data import DATA, ingest_records, read_jsonl, server_settings, write_jsonl
from tests.helpers.processes import free_port, wait_until_ready
from tests.helpers.server import RunningServer

# == Keys and transport ==============================================================================================

STELLA = str(Path(sys.executable).parent / "stella-search")
DOCUMENTS = [
    {"id": "faiss", "text": "FAISS searches dense vectors for their nearest neighbours."},
    {"id": "sqlite", "text": "SQLite keeps the passages and their metadata in one file."},
]
READ, WRITE = {"Authorization": "Bearer r"}, {"Authorization": "Bearer w"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("attacks-auth")
    ingest_records(root, DOCUMENTS, "secret-docs")
    return root / "data"


@pytest.fixture(scope="module")
def keyed(data_dir):
    """Both keys set; short timeouts, so that the slow-connection tests end soon."""
    settings = server_settings(data_dir, api_key="w", read_api_key="r", header_timeout_s=1.0, body_timeout_s=1.0)
    with RunningServer(settings) as running:
        yield running


def serve(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.Popen:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.Popen(
        [STELLA, "serve", "--data-dir", str(tmp_path / "empty"), *args],
        env=environ,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def refused_start(args: list[str], env: dict[str, str], tmp_path: Path, port: int) -> tuple[int, str]:
    """Exit status and stderr of a ``stella-search serve`` on ``port`` expected to refuse to start; one that
    answers on the port instead is stopped and fails the test."""
    server = serve([*args, "--port", str(port)], env, tmp_path)
    while server.poll() is None:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health")
        except httpx.TransportError:
            time.sleep(0.2)
            continue
        server.terminate()
        pytest.fail(f"stella-search serve {' '.join(args)} started instead of refusing:\n{server.communicate()[1]}")
    return server.returncode, server.stderr.read()


def closed_by_server(port: int, first: bytes, drip: bytes, drips: int = 100, every: float = 0.2) -> bytes:
    """Send ``first``, then ``drip`` every ``every`` seconds, until the server closes the connection; what the
    server sent. Fails if the connection is still open after all the drips."""
    received = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(first)
        for _ in range(drips):
            readable, _, _ = select.select([sock], [], [], every)
            try:
                if readable:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return received
                    received += chunk
                elif drip:
                    sock.sendall(drip)
            except (BrokenPipeError, ConnectionResetError):
                return received
    pytest.fail(f"the server kept a connection open through {drips} drips of {drip!r}; it sent {received!r}")


def raw_response(port: int, request: bytes) -> bytes:
    """The status line and headers the server answers to ``request``, read without sending anything more."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection without an answer: {answer!r}"
            answer += chunk
    return answer


def test_writes_need_the_write_key_and_the_read_key_is_not_one(keyed):
    for method, path, body in [
        ("DELETE", "/collections/secret-docs", None),
        ("POST", "/collections", {"name": "planted", "model": "minilm"}),
        ("POST", "/collections/secret-docs/documents", {"documents": [{"id": "x", "text": "planted"}]}),
    ]:
        anonymous = httpx.request(method, f"{keyed.url}{path}", json=body)
        assert anonymous.status_code == 401, anonymous.text
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert anonymous.json()["detail"] == "this endpoint needs 'Authorization: Bearer <key>'"
        reader = httpx.request(method, f"{keyed.url}{path}", json=body, headers=READ)
        assert reader.status_code == 403 and reader.json()["detail"] == "the bearer key is not valid for this endpoint"
    names = [c["name"] for c in httpx.get(f"{keyed.url}/collections", headers=READ).json()]
    assert names == ["secret-docs"]
    assert httpx.get(f"{keyed.url}/collections/secret-docs/documents/faiss", headers=READ).json()["id"] == "faiss"


def test_a_read_key_without_a_write_key_is_refused_at_start(tmp_path):
    status, stderr = refused_start([], {"STELLA_SEARCH_SERVER__READ_API_KEY": "r"}, tmp_path, free_port())
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: server.read_api_key is set"), stderr
    assert "server.api_key" in lines[0] and "server.allow_open_writes" in lines[0]


def test_a_non_loopback_host_without_a_write_key_is_refused_unless_open_writes_are_allowed(tmp_path):
    port = free_port()
    status, stderr = refused_start(["--host", "0.0.0.0"], {}, tmp_path, port)
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: server.host 0.0.0.0 is reachable"), stderr
    assert "server.allow_open_writes" in lines[0]

    # allowed on purpose: it serves, says so as a warning, and applies the header timeout of its settings
    env = {"STELLA_SEARCH_SERVER__ALLOW_OPEN_WRITES": "true", "STELLA_SEARCH_SERVER__HEADER_TIMEOUT_S": "1"}
    server = serve(["--host", "0.0.0.0", "--port", str(port)], env, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert closed_by_server(port, b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n").startswith(
            b"HTTP/1.1 408"
        )
        assert closed_by_server(port, b"", b"") == b""  # a connection that never sends a byte
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    warnings = [line for line in stderr.splitlines() if " WARNING " in line and "server.allow_open_writes" in line]
    assert len(warnings) == 1 and "server.host 0.0.0.0 is reachable from other machines" in warnings[0], stderr
    assert "auth: writes need no key; reads need no key" in stderr


def test_health_ready_and_metrics_show_nothing_stored_to_a_caller_without_a_key(keyed):
    health = httpx.get(f"{keyed.url}/health")
    assert health.status_code == 200 and set(health.json()) == {"status"}
    ready = httpx.get(f"{keyed.url}/ready")
    assert ready.status_code in (200, 503) and set(ready.json()) == {"ready", "status"}
    metrics = httpx.get(f"{keyed.url}/metrics")
    assert metrics.status_code == 401 and metrics.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{keyed.url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 403
    # the pages and the API's description hold no data and stay open
    for path in ("/", "/docs", "/redoc", "/openapi.json"):
        page = httpx.get(f"{keyed.url}{path}")
        assert page.status_code == 200 and "secret-docs" not in page.text, path
    for key in (READ, WRITE):
        assert "secret-docs" in httpx.get(f"{keyed.url}/health", headers=key).json()["collections"]
        assert "secret-docs" in httpx.get(f"{keyed.url}/ready", headers=key).json()["collections"]
        assert 'collection="secret-docs"' in httpx.get(f"{keyed.url}/metrics", headers=key).text


def test_open_metrics_lets_a_scraper_in_without_a_key_and_nothing_else(data_dir):
    settings = server_settings(data_dir, api_key="w", read_api_key="r", open_metrics=True)
    with RunningServer(settings) as running:
        assert 'collection="secret-docs"' in httpx.get(f"{running.url}/metrics").text
        assert set(httpx.get(f"{running.url}/health").json()) == {"status"}
        assert httpx.get(f"{running.url}/collections").status_code == 401


def test_the_key_is_checked_before_the_body_is_read(keyed):
    not_json = httpx.post(
        f"{keyed.url}/collections/secret-docs/documents",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert not_json.status_code == 401, not_json.text
    # a 14 MB body announced and never sent is answered at once: nothing waits for it, buffers or parses it
    for key, status in ((b"", b"401"), (b"Authorization: Bearer r\r\n", b"403")):
        head = raw_response(
            keyed.port,
            b"POST /collections/secret-docs/documents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + key
            + b"Content-Length: 14000000\r\n\r\n",
        )
        assert head.startswith(b"HTTP/1.1 " + status), head


def test_connections_that_send_headers_or_a_body_too_slowly_are_closed(keyed):
    headers = closed_by_server(
        keyed.port, b"POST /collections/secret-docs/search HTTP/1.1\r\nHost: x\r\n", b"X-A: b\r\n"
    )
    assert headers.startswith(b"HTTP/1.1 408 Request Timeout"), headers
    assert closed_by_server(keyed.port, b"", b"") == b""  # connected, never a byte
    body = closed_by_server(
        keyed.port,
        b"POST /collections/secret-docs/search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer r\r\n"
        b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{",
        b" ",
    )
    assert body == b"", body  # the application was still waiting for the body: nothing was answered


def test_requests_at_a_normal_pace_are_unaffected_by_the_timeouts(keyed):
    with httpx.Client(base_url=keyed.url, headers=READ) as client:
        first = client.post("/collections/secret-docs/search", json={"query": "nearest neighbour vectors", "k": 1})
        time.sleep(1.5)  # idle on a kept-alive connection for longer than the header timeout
        second = client.post("/collections/secret-docs/search", json={"query": "metadata in one file", "k": 1})
    assert first.json()["results"][0]["id"] == "faiss" and second.json()["results"][0]["id"] == "sqlite"
    # a request whose headers and body come in pieces, each within the timeouts
    body = b'{"query": "nearest neighbour vectors", "k": 1}'
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=60) as sock:
        for piece in (
            b"POST /collections/secret-docs/search HTTP/1.1\r\nHost: x\r\n",
            b"Authorization: Bearer r\r\nContent-Type: application/json\r\n",
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body),
            body[:10],
            body[10:],
        ):
            sock.sendall(piece)
            time.sleep(0.2)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b'"id":"faiss"' in answer, answer


def test_allow_headers_and_body_types_follow_the_openapi_document(keyed):
    """What a schemathesis run with every check found in the API layer, one request each."""
    spec = httpx.get(f"{keyed.url}/openapi.json").json()
    for path, allowed in [
        ("/collections/secret-docs/documents/faiss", "DELETE, GET"),
        ("/collections/secret-docs/documents/delete", "POST"),
        ("/collections/restore", "POST"),
        ("/collections", "GET, POST"),
    ]:
        answer = httpx.request("OPTIONS", f"{keyed.url}{path}", headers=READ)
        assert answer.status_code == 405 and answer.headers["allow"] == allowed, (path, answer.headers)
    search = f"{keyed.url}/collections/secret-docs/search"
    for wrong in ({"offset": False}, {"k": "3"}, {"k": 2.5}, {"alpha": True}):
        refused = httpx.post(search, json={"query": "vectors", **wrong}, headers=READ)
        assert refused.status_code == 422 and next(iter(wrong)) in refused.json()["detail"], (wrong, refused.text)
    whole = httpx.post(search, json={"query": "vectors", "k": 1.0}, headers=READ)  # JSON Schema's integer
    assert whole.status_code == 200 and len(whole.json()["results"]) == 1
    refusal = spec["paths"]["/metrics"]["get"]["responses"]["401"]["content"]
    assert list(refusal) == ["application/json"]
    assert httpx.get(f"{keyed.url}/metrics").headers["content-type"] == "application/json"
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/health"]["get"]


# == Snapshots are untrusted input ===================================================================================

WRITE_KEY, READ_KEY = "snapshot-tests-write-key", "snapshot-tests-read-key"
AS_WRITER = {"Authorization": f"Bearer {WRITE_KEY}"}
AS_READER = {"Authorization": f"Bearer {READ_KEY}"}
GOOD = "default-good"
SNAPSHOT_DOCUMENTS = 12
FILES = ("collection.db", "index.faiss", "index.json")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A data folder with the collection ``default`` (MiniLM) and its snapshot GOOD in .snapshots."""
    root = tmp_path_factory.mktemp("template")
    ingest_records(root, read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=SNAPSHOT_DOCUMENTS))
    with Collection.open(root / "data" / "default") as collection:
        take_snapshot(collection, root / "data" / ".snapshots" / GOOD)
    return root / "data"


def copy_of(template: Path, where: Path) -> Path:
    shutil.copytree(template, where, symlinks=True)
    return where


@pytest.fixture(scope="module")
def served(template, tmp_path_factory):
    """A server with a write key and a read key over a copy of the template: (server, its data folder)."""
    data = copy_of(template, tmp_path_factory.mktemp("served") / "data")
    with RunningServer(server_settings(data, api_key=WRITE_KEY, read_api_key=READ_KEY)) as server:
        yield server, data


def restore(server, snapshot: str, collection: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/collections/restore",
        json={"snapshot": snapshot, "collection": collection},
        headers=AS_WRITER,
        timeout=120,
    )


def listing(server) -> dict[str, dict]:
    response = httpx.get(f"{server.url}/snapshots", headers=AS_READER, timeout=60)
    assert response.status_code == 200, response.text
    return {s["snapshot"]: s for s in response.json()}


def folder_digest(folder: Path) -> dict:
    """Each entry of ``folder`` as it is on disk, links as links (what a failed restore must leave alone)."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_symlink():
            out[path.name] = ("link", os.readlink(path))
        elif path.is_file():
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[path.name] = "folder"
    return out


def rehash(snapshot: Path) -> None:
    """Make snapshot.json's checksums match the files again, as someone tampering on purpose would."""
    info = json.loads((snapshot / "snapshot.json").read_text())
    for name in FILES:
        if (snapshot / name).is_file():
            info["files"][name] = hashlib.sha256((snapshot / name).read_bytes()).hexdigest()
    (snapshot / "snapshot.json").write_text(json.dumps(info))


def edit_manifest(snapshot: Path, change) -> None:
    info = json.loads((snapshot / "snapshot.json").read_text())
    change(info)
    (snapshot / "snapshot.json").write_text(json.dumps(info))


def run_sql(statement: str):
    def tamper(snapshot: Path) -> None:
        conn = sqlite3.connect(snapshot / "collection.db")
        conn.execute("PRAGMA journal_mode=DELETE")  # the change lands in collection.db itself, not a -wal beside it
        conn.executescript(statement)
        conn.close()
        rehash(snapshot)

    return tamper


def write_bytes(name: str, data):
    def tamper(snapshot: Path) -> None:
        (snapshot / name).write_bytes(data(snapshot / name))
        rehash(snapshot)

    return tamper


def database_is_a_folder(snapshot: Path) -> None:
    (snapshot / "collection.db").unlink()
    (snapshot / "collection.db").mkdir()


def set_counts(snapshot: Path) -> None:
    edit_manifest(snapshot, lambda info: info.update(documents=info["documents"] + 1))


def forged_index(snapshot: Path) -> None:
    """Random bytes as index.faiss with index.json's checksum of it and snapshot.json's made to match."""
    (snapshot / "index.faiss").write_bytes(os.urandom(512))
    stamp = json.loads((snapshot / "index.json").read_text())
    stamp["sha256"] = hashlib.sha256((snapshot / "index.faiss").read_bytes()).hexdigest()
    (snapshot / "index.json").write_text(json.dumps(stamp))
    rehash(snapshot)


# (what was done to the snapshot, what the 400 must say)
TAMPERED = {
    "not-json": (lambda s: (s / "snapshot.json").write_text("{not json"), "snapshot.json is not JSON"),
    "no-files-key": (lambda s: edit_manifest(s, lambda i: i.pop("files")), "snapshot.json has no 'files'"),
    "random-database": (write_bytes("collection.db", lambda p: os.urandom(p.stat().st_size)), "not a database"),
    "truncated-database": (write_bytes("collection.db", lambda p: p.read_bytes()[:4096]), "collection.db"),
    "documents-dropped": (run_sql("DROP TABLE documents"), "no table 'documents'"),
    "dim-changed": (run_sql("UPDATE manifest SET dim = 768"), "expected 3072 bytes (dim 768)"),
    "database-is-a-folder": (database_is_a_folder, "collection.db is not a regular file"),
    "bad-checksum": (lambda s: (s / "index.faiss").write_bytes(b"\0" * 64), "index.faiss fails its checksum"),
    "missing-file": (lambda s: (s / "index.json").unlink(), "index.json is missing"),
    "wrong-counts": (set_counts, "snapshot.json records"),
    "vector-one-byte": (run_sql("UPDATE passages SET vector = x'00'"), "1-byte blob, expected 1536 bytes"),
    "metadata-not-json": (run_sql("UPDATE documents SET metadata = 'not json'"), "malformed id, title, text or meta"),
    "index-not-faiss": (forged_index, "index.faiss is not a FAISS index"),
    "trigger-planted": (
        run_sql("CREATE TRIGGER wipe AFTER INSERT ON passages BEGIN DELETE FROM documents; END"),
        "trigger 'wipe' that is not one of a collection's own",
    ),
    "trigger-replaced": (
        run_sql(
            "DROP TRIGGER passages_fts_delete; "
            "CREATE TRIGGER passages_fts_delete AFTER DELETE ON passages BEGIN DELETE FROM documents; END"
        ),
        "trigger 'passages_fts_delete' that is not one of a collection's own",
    ),
}


def plant(data: Path, name: str, tamper) -> Path:
    snapshot = data / ".snapshots" / name
    shutil.copytree(data / ".snapshots" / GOOD, snapshot)
    tamper(snapshot)
    return snapshot


# -- a good snapshot ---------------------------------------------------------------------------------------------


def test_a_good_snapshot_restores_and_serves_similar(served):
    server, data = served
    response = restore(server, GOOD, "good-copy")
    assert response.status_code == 201, response.text
    assert response.json()["documents"] == SNAPSHOT_DOCUMENTS
    first = read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=1)[0]["_id"]
    similar = httpx.post(
        f"{server.url}/collections/good-copy/similar", json={"id": first, "k": 3}, headers=AS_READER, timeout=60
    )
    assert similar.status_code == 200, similar.text
    assert similar.json()["results"]
    assert listing(server)[GOOD]["state"] == "ok"


# -- tampered snapshots: 400 naming the problem, nothing installed, nothing changed ------------------------------


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_snapshot_is_a_400_naming_the_problem(served, case):
    server, data = served
    tamper, message = TAMPERED[case]
    snapshot = plant(data, f"tampered-{case}", tamper)
    before = folder_digest(snapshot)
    response = restore(server, snapshot.name, f"from-{case}")
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"] and snapshot.name in response.json()["detail"]
    assert not (data / f"from-{case}").exists()
    assert not [p for p in data.iterdir() if p.name.startswith(".restore-")]
    assert folder_digest(snapshot) == before  # the snapshot was only read
    names = {c["name"] for c in httpx.get(f"{server.url}/collections", headers=AS_READER).json()}
    assert f"from-{case}" not in names


def test_the_listing_shows_broken_snapshots_with_the_reason_beside_the_good(served, tmp_path):
    server, data = served
    outside = copy_of(data / ".snapshots" / GOOD, tmp_path / "elsewhere")
    plant(data, "broken-not-json", TAMPERED["not-json"][0])
    plant(data, "broken-no-files", TAMPERED["no-files-key"][0])
    plant(data, "broken-database-folder", database_is_a_folder)
    plant(data, "broken-missing-file", TAMPERED["missing-file"][0])
    os.symlink(outside, data / ".snapshots" / "broken-linked")
    shown = listing(server)
    assert shown[GOOD]["state"] == "ok" and shown[GOOD]["documents"] == SNAPSHOT_DOCUMENTS
    expected = {
        "broken-not-json": "snapshot.json is not JSON",
        "broken-no-files": "has no 'files'",
        "broken-database-folder": "collection.db is not a regular file",
        "broken-missing-file": "index.json is missing",
        "broken-linked": "symbolic link",
    }
    for name, reason in expected.items():
        assert shown[name]["state"] == "broken" and reason in shown[name]["reason"], shown[name]


# -- reading outside the snapshot --------------------------------------------------------------------------------


def traversal(outside: Path):
    """A files entry that climbs out of the snapshot to ``outside``, with that file's true checksum."""

    def tamper(snapshot: Path) -> None:
        relative = os.path.relpath(outside, snapshot)
        digest = hashlib.sha256(outside.read_bytes()).hexdigest()
        edit_manifest(snapshot, lambda info: info["files"].update({relative: digest}))

    return tamper


def absolute(outside: Path):
    def tamper(snapshot: Path) -> None:
        digest = hashlib.sha256(outside.read_bytes()).hexdigest()
        edit_manifest(snapshot, lambda info: info["files"].update({str(outside): digest}))

    return tamper


def linked_file(name: str):
    """``name`` replaced by a link to the same content elsewhere: checksums still match."""

    def tamper(snapshot: Path) -> None:
        target = snapshot.parent.parent.parent / f"outside-{snapshot.name}-{name}"
        shutil.copy(snapshot / name, target)
        (snapshot / name).unlink()
        os.symlink(target, snapshot / name)

    return tamper


def extra_file(snapshot: Path) -> None:
    (snapshot / "collection.db-wal").write_bytes(b"")
    edit_manifest(snapshot, lambda info: info["files"].update({"collection.db-wal": hashlib.sha256(b"").hexdigest()}))


@pytest.mark.parametrize(
    "case, message",
    [
        ("traversal", "which is not a snapshot file"),
        ("absolute", "which is not a snapshot file"),
        ("linked-index-json", "index.json is a symbolic link"),
        ("linked-database", "collection.db is a symbolic link"),
        ("unexpected-name", "'collection.db-wal', which is not a snapshot file"),
    ],
)
def test_nothing_is_read_from_outside_the_snapshot(served, tmp_path, case, message):
    server, data = served
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of any snapshot")
    tamper = {
        "traversal": traversal(outside),
        "absolute": absolute(outside),
        "linked-index-json": linked_file("index.json"),
        "linked-database": linked_file("collection.db"),
        "unexpected-name": extra_file,
    }[case]
    snapshot = plant(data, f"outside-{case}", tamper)
    response = restore(server, snapshot.name, f"outside-{case}")
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]
    assert not (data / f"outside-{case}").exists()


def test_a_snapshot_folder_that_is_a_link_is_refused(served, tmp_path):
    server, data = served
    outside = copy_of(data / ".snapshots" / GOOD, tmp_path / "a-snapshot-elsewhere")
    os.symlink(outside, data / ".snapshots" / "linked-folder")
    response = restore(server, "linked-folder", "from-linked-folder")
    assert response.status_code == 400 and "symbolic link" in response.json()["detail"], response.text
    assert not (data / "from-linked-folder").exists()


def test_names_are_matched_whole(served):
    server, data = served
    newline_snapshot = restore(server, f"{GOOD}\n", "newline-snapshot")
    assert newline_snapshot.status_code == 400 and "invalid snapshot name" in newline_snapshot.json()["detail"]
    newline_collection = restore(server, GOOD, "newline\n")
    assert newline_collection.status_code == 400 and "invalid collection name" in newline_collection.json()["detail"]
    assert not (data / "newline\n").exists()


# -- concurrent restores ------------------------------------------------------------------------------------------


def restore_at_once(server, collection: str, times: int = 4) -> list[int]:
    start = threading.Barrier(times)
    statuses: list[int] = []

    def one() -> None:
        start.wait()
        statuses.append(restore(server, GOOD, collection).status_code)

    threads = [threading.Thread(target=one) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(statuses)


def test_concurrent_restores_into_one_name_one_wins_the_others_409(served):
    server, data = served
    assert restore_at_once(server, "racing") == [201, 409, 409, 409]
    assert not [p.name for p in data.iterdir() if p.name.startswith((".replaced-", ".restore-"))]
    info = httpx.get(f"{server.url}/collections", headers=AS_READER).json()
    assert {c["name"]: c["documents"] for c in info}["racing"] == SNAPSHOT_DOCUMENTS


def test_concurrent_restores_over_a_served_collection_move_nothing(served):
    server, data = served
    before = folder_digest(data / "default")
    assert restore_at_once(server, "default") == [409, 409, 409, 409]
    assert not [p.name for p in data.iterdir() if p.name.startswith((".replaced-", ".restore-"))]
    assert {n: folder_digest(data / "default")[n] for n in FILES} == {n: before[n] for n in FILES}


# -- the CLI --------------------------------------------------------------------------------------------------------


def test_cli_restore_into_an_existing_collection_is_one_line_and_moves_nothing(template, tmp_path):
    data = copy_of(template, tmp_path / "data")
    before = folder_digest(data / "default")
    result = CliRunner().invoke(main, ["restore", str(data / ".snapshots" / GOOD), "--data-dir", str(data)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and "already exists" in result.output
    assert folder_digest(data / "default") == before
    assert not [p.name for p in data.iterdir() if p.name.startswith((".replaced-", ".restore-"))]


@pytest.mark.parametrize("case", ["not-json", "no-files-key", "random-database", "vector-one-byte"])
def test_cli_restore_of_a_tampered_snapshot_is_one_line_exit_2(template, tmp_path, case):
    data = copy_of(template, tmp_path / "data")
    snapshot = plant(data, f"tampered-{case}", TAMPERED[case][0])
    result = CliRunner().invoke(main, ["restore", str(snapshot), "--data-dir", str(data), "--collection", "copy"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0, result.output
    assert TAMPERED[case][1] in result.output
    assert not (data / "copy").exists()


# -- deleting ----------------------------------------------------------------------------------------------------


def test_delete_snapshot_needs_the_write_key_and_removes_it(served):
    server, data = served
    plant(data, "to-delete", lambda s: None)
    url = f"{server.url}/snapshots/to-delete"
    assert httpx.delete(url).status_code == 401
    assert httpx.delete(url, headers=AS_READER).status_code == 403
    deleted = httpx.delete(url, headers=AS_WRITER)
    assert deleted.status_code == 200 and deleted.json() == {"deleted": "to-delete"}
    assert "to-delete" not in listing(server) and not (data / ".snapshots" / "to-delete").exists()
    assert httpx.delete(url, headers=AS_WRITER).status_code == 404
    assert not [p.name for p in (data / ".snapshots").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["%2E%2E", f"{GOOD}%0A", ".hidden", "-leading-dash"])
def test_delete_refuses_names_that_are_not_snapshot_names(served, name):
    server, data = served
    response = httpx.delete(f"{server.url}/snapshots/{name}", headers=AS_WRITER)
    assert response.status_code == 400 and "invalid snapshot name" in response.json()["detail"], response.text
    assert (data / ".snapshots" / GOOD / "snapshot.json").exists()


def test_delete_never_follows_a_link_out_of_the_snapshot_folder(served, tmp_path):
    server, data = served
    outside = copy_of(data / ".snapshots" / GOOD, tmp_path / "kept-elsewhere")
    os.symlink(outside, data / ".snapshots" / "link-to-elsewhere")
    kept_file = tmp_path / "kept.txt"
    kept_file.write_text("outside the snapshot folder")
    inner = plant(data, "with-inner-link", lambda s: os.symlink(kept_file, s / "notes"))
    assert httpx.delete(f"{server.url}/snapshots/link-to-elsewhere", headers=AS_WRITER).status_code == 200
    assert httpx.delete(f"{server.url}/snapshots/with-inner-link", headers=AS_WRITER).status_code == 200
    assert not os.path.lexists(data / ".snapshots" / "link-to-elsewhere") and not inner.exists()
    assert sorted(p.name for p in outside.iterdir()) == sorted([*FILES, "snapshot.json"])
    assert kept_file.read_text() == "outside the snapshot folder"


# -- retention ----------------------------------------------------------------------------------------------------


def test_the_api_keeps_the_newest_five_snapshots_per_collection_by_default(template, tmp_path):
    data = copy_of(template, tmp_path / "data")
    plant(data, "default-broken", TAMPERED["not-json"][0])
    plant(data, "other-1", lambda s: edit_manifest(s, lambda info: info.update(collection="other")))
    with RunningServer(server_settings(data, api_key=WRITE_KEY, read_api_key=READ_KEY)) as server:
        taken = []
        for _ in range(6):
            response = httpx.post(f"{server.url}/collections/default/snapshots", headers=AS_WRITER, timeout=60)
            assert response.status_code == 201, response.text
            taken.append(response.json()["snapshot"])
        shown = listing(server)
    kept = {name for name, s in shown.items() if s["state"] == "ok" and s["collection"] == "default"}
    assert kept == set(taken[-5:])  # GOOD and the first one taken are gone: they were the oldest
    assert shown["default-broken"]["state"] == "broken" and shown["other-1"]["collection"] == "other"


def test_cli_snapshot_applies_the_retention_and_prune_applies_it_alone(template, tmp_path):
    data = copy_of(template, tmp_path / "data")
    root = data / ".snapshots"
    runner = CliRunner()
    taken = []
    for _ in range(3):
        result = runner.invoke(main, ["snapshot", "--data-dir", str(data)], env={"STELLA_SEARCH_SNAPSHOT_KEEP": "2"})
        assert result.exit_code == 0, result.output
        taken.append(Path(json.loads(result.output)["snapshot"]).name)
    assert sorted(p.name for p in root.iterdir()) == sorted(taken[-2:])
    pruned = runner.invoke(
        main, ["snapshot", "--prune", "--data-dir", str(data)], env={"STELLA_SEARCH_SNAPSHOT_KEEP": "1"}
    )
    assert pruned.exit_code == 0, pruned.output
    assert json.loads(pruned.output)["deleted"] == [taken[-2]]
    assert [p.name for p in root.iterdir()] == [taken[-1]]
    keep_all = runner.invoke(
        main, ["snapshot", "--prune", "--data-dir", str(data)], env={"STELLA_SEARCH_SNAPSHOT_KEEP": "0"}
    )
    assert keep_all.exit_code == 0 and json.loads(keep_all.output)["deleted"] == []


# == Inputs that must be 400, and one request that must not take the server down =====================================

SURROGATE = "\\ud800"  # as a JSON escape: json.loads gives a str with a lone surrogate, which has no UTF-8 form


def nested(levels: int) -> dict:
    """Metadata whose innermost object sits ``levels`` objects deep."""
    metadata: dict = {"leaf": 1}
    for _ in range(levels - 1):
        metadata = {"a": metadata}
    return metadata


def post_raw(server, path: str, body: str) -> httpx.Response:
    """``body`` sent as written: JSON escapes such as ``\\ud800`` reach the server's JSON parser untouched."""
    return httpx.post(
        f"{server.url}{path}", content=body.encode(), headers={"content-type": "application/json"}, timeout=120
    )


# -- metadata nesting and size ---------------------------------------------------------------------------------


def test_deeply_nested_metadata_is_a_400_naming_the_limit(dbpedia20_server):
    for levels in (33, 256):
        response = httpx.post(
            f"{dbpedia20_server.url}/collections/default/documents",
            json={"documents": [{"id": f"deep-{levels}", "text": "an airline", "metadata": nested(levels)}]},
            timeout=120,
        )
        assert response.status_code == 400, response.text
        assert f"nested {levels} levels deep" in response.json()["detail"]
        assert "ingest.max_metadata_depth" in response.json()["detail"]
    at_limit = {"documents": [{"id": "deep-32", "text": "an airline", "metadata": nested(32)}]}
    assert (
        httpx.post(f"{dbpedia20_server.url}/collections/default/documents", json=at_limit, timeout=120).status_code
        == 200
    )
    document = httpx.get(f"{dbpedia20_server.url}/collections/default/documents/deep-32").json()
    assert document["metadata"] == nested(32)
    search = httpx.post(
        f"{dbpedia20_server.url}/collections/default/search", json={"query": "an airline", "k": 30}, timeout=60
    )
    assert search.status_code == 200 and "deep-32" in [hit["id"] for hit in search.json()["results"]]


def test_metadata_over_the_size_limit_is_a_400(dbpedia20_server):
    body = {"documents": [{"id": "big", "text": "big metadata", "metadata": {"blob": "x" * 70_000}}]}
    response = httpx.post(f"{dbpedia20_server.url}/collections/default/documents", json=body, timeout=120)
    assert response.status_code == 400, response.text
    assert "ingest.max_metadata_bytes" in response.json()["detail"]
    assert httpx.get(f"{dbpedia20_server.url}/collections/default/documents/big").status_code == 404


def test_a_stored_document_with_deep_metadata_does_not_poison_reads(tmp_path):
    """A document written before writes were limited (here through the storage API, which copies what it is
    given) is still returned, with a marker, by GET and by every search that finds it."""
    records = read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=5)
    ingest_records(tmp_path, records)
    with Collection.open(tmp_path / "data" / "default") as collection:
        vector = collection.passage_vectors(records[0]["_id"])[:1]
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
def test_a_lone_surrogate_anywhere_in_a_body_is_a_400(dbpedia20_server, case):
    path, body = SURROGATE_BODIES[case]
    response = post_raw(dbpedia20_server, path, body % SURROGATE)
    assert response.status_code == 400, response.text
    assert "surrogate" in response.json()["detail"] or "invalid" in response.json()["detail"]
    assert (
        httpx.get(f"{dbpedia20_server.url}/collections/default/documents/x").status_code == 404
    )  # nothing was written


def test_a_surrogate_escape_in_a_jsonl_file_is_refused_naming_the_line(tmp_path):
    good = json.dumps({"_id": "a", "text": "fine"})
    for bad in ('{"_id": "b", "text": "x%s"}', '{"_id": "b%s", "text": "x"}', '{"_id": "b", "text": "x", "k": "%s"}'):
        path = tmp_path / "s.jsonl"
        path.write_text(f"{good}\n{bad % SURROGATE}\n", encoding="utf-8")
        result = CliRunner().invoke(main, ["ingest", str(path), "--data-dir", str(tmp_path / "d"), "--model", "minilm"])
        assert result.exit_code == 2, result.output
        assert "s.jsonl line 2" in result.output and "surrogate" in result.output
    assert not (tmp_path / "d" / "default").exists()


def test_cli_arguments_that_are_not_utf8_are_one_line_errors(dbpedia20):
    """Bytes that are not UTF-8 in argv reach Python as lone surrogates (surrogateescape)."""
    base = ["--data-dir", str(dbpedia20)]
    for arguments in (
        ["search", "caf\udce9", *base],
        ["search", "airline", "--filter", json.dumps({"lang": "x"}).replace("x", SURROGATE), *base],
        ["delete", "--id", "caf\udce9", *base],
    ):
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 2, (arguments, result.output, result.exception)
        assert "surrogate" in result.output


# -- names that must match in full -----------------------------------------------------------------------------


def test_names_with_a_trailing_newline_are_refused(dbpedia20_server, dbpedia20, tmp_path):
    created = httpx.post(
        f"{dbpedia20_server.url}/collections", json={"name": "default\n", "model": "minilm"}, timeout=120
    )
    assert created.status_code == 400, created.text
    assert "invalid collection name" in created.json()["detail"]
    assert sorted(p.name for p in dbpedia20.iterdir() if not p.name.startswith(".")) == ["default"]
    field = httpx.post(
        f"{dbpedia20_server.url}/collections/default/search", json={"query": "a", "filter": {"lang\n": "en"}}
    )
    assert field.status_code == 400 and "invalid metadata field name" in field.json()["detail"]
    restored = httpx.post(
        f"{dbpedia20_server.url}/collections/restore", json={"snapshot": "x\n", "collection": "fresh"}
    )
    assert restored.status_code == 400 and "invalid snapshot name" in restored.json()["detail"]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "fine"}])
    result = CliRunner().invoke(
        main, ["ingest", str(corpus), "--data-dir", str(dbpedia20), "--collection", "default\n"]
    )
    assert result.exit_code == 2 and "invalid collection name" in result.output
    result = CliRunner().invoke(main, ["index-field", "lang\n", "--data-dir", str(dbpedia20)])
    assert result.exit_code == 2 and "invalid metadata field name" in result.output


# -- one request must not take the server down -----------------------------------------------------------------


def test_too_many_shards_are_refused_naming_the_setting(dbpedia20_server, tmp_path):
    response = httpx.post(f"{dbpedia20_server.url}/collections", json={"name": "wide", "model": "minilm", "shards": 65})
    assert response.status_code == 400, response.text
    assert "server.max_shards" in response.json()["detail"]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "fine"}])
    result = CliRunner().invoke(main, ["ingest", str(corpus), "--data-dir", str(tmp_path / "d"), "--shards", "65"])
    assert result.exit_code == 2 and "server.max_shards" in result.output
    assert not (tmp_path / "d" / "default").exists()


def test_a_batch_too_large_to_answer_is_a_413_before_any_work(dbpedia20_server):
    queries = [f"airline {i}" for i in range(256)]
    response = httpx.post(
        f"{dbpedia20_server.url}/collections/default/search/batch", json={"queries": queries, "k": 1000}, timeout=120
    )
    assert response.status_code == 413, response.text[:300]
    assert (
        "server.max_response_hits" in response.json()["detail"] and "256 queries x k=1000" in response.json()["detail"]
    )
    grouped = {"query": "airline", "k": 1000, "group_by": "document", "passages_per_document": 20}
    assert httpx.post(f"{dbpedia20_server.url}/collections/default/search", json=grouped, timeout=60).status_code == 200
    two = {"queries": ["airline", "ship"], "k": 1000, "group_by": "document", "passages_per_document": 20}
    response = httpx.post(f"{dbpedia20_server.url}/collections/default/search/batch", json=two, timeout=60)
    assert response.status_code == 413 and "passages_per_document" in response.json()["detail"]
    within = {"queries": queries[:20], "k": 1000}
    assert (
        httpx.post(f"{dbpedia20_server.url}/collections/default/search/batch", json=within, timeout=120).status_code
        == 200
    )


def test_encoders_no_collection_uses_are_released_and_bounded(tmp_path):
    records = read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=10)
    ingest_records(tmp_path, records)
    documents = [{"id": r["_id"], "text": r["text"]} for r in records]

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
        wait_until_ready(url, process, tmp_path / "server.log")
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


# == Storage faults ==================================================================================================

NEW = [{"id": "raft", "text": "Raft elects a leader and replicates a log across servers."}]
HUGE_RESERVE = 1 << 60
# capabilities that let root write where permissions say no: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
PERMISSION_OVERRIDES = (1, 2, 3)
PR_CAPBSET_DROP = 24


@pytest.fixture(scope="module")
def fault_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    ingest_records(root, DOCUMENTS, "docs")
    return root / "data"


@pytest.fixture
def fault_data(fault_base, tmp_path) -> Path:
    shutil.copytree(fault_base, tmp_path / "data")
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


def test_damaged_collections_are_listed_unavailable_and_the_others_served(fault_base, fault_data):
    shutil.copytree(fault_data / "docs", fault_data / "garbage")
    (fault_data / "garbage" / "collection.db").write_bytes(os.urandom(64 * 1024))
    shutil.copytree(fault_data / "docs", fault_data / "wrongdim")
    conn = sqlite3.connect(fault_data / "wrongdim" / "collection.db")
    conn.execute("UPDATE manifest SET dim = 768")
    conn.commit()
    conn.close()
    with RunningServer(server_settings(fault_data)) as running:
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
        shutil.copyfile(fault_base / "docs" / "collection.db", fault_data / "garbage" / "collection.db")
        assert search(running.url, collection="garbage").json()["results"][0]["id"] == "faiss"
        assert "garbage" not in (httpx.get(f"{running.url}/health").json()["error"] or "")
    assert integrity(fault_data / "wrongdim") == "ok"  # left untouched for the operator


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
def serving(fault_data: Path, log: Path, preexec_fn=None, timeout: float = 180):
    """``stella-search serve`` over ``data`` in its own process; yields (url, process) once /ready is 200."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                STELLA,
                "serve",
                "--data-dir",
                str(fault_data),
                "--port",
                str(port),
                "--model",
                "minilm",
                "--device",
                "cpu",
            ],
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


def test_a_read_only_data_folder_serves_searches_and_refuses_writes_with_503(fault_data, tmp_path):
    preexec_fn = as_ordinary_user()
    set_writable(fault_data, False)
    try:
        with serving(fault_data, tmp_path / "serve.log", preexec_fn) as (url, _):
            assert search(url).json()["results"][0]["id"] == "faiss"
            assert_read_only_answer(upsert(url, NEW))
            assert_read_only_answer(httpx.delete(f"{url}/collections/docs/documents/faiss"))
            assert_read_only_answer(httpx.post(f"{url}/collections", json={"name": "more", "model": "minilm"}))
            health = httpx.get(f"{url}/health").json()
            assert health["status"] == "degraded" and health["storage"]["writable"] is False
            assert "the data folder is read-only" in health["error"] and "restore" not in health["error"].lower()

            set_writable(fault_data, True)  # fixed while serving: writes are accepted again, no restart
            assert upsert(url, NEW).status_code == 200
            assert search(url, "leader election log replication").json()["results"][0]["id"] == "raft"
            assert httpx.get(f"{url}/health").json()["status"] == "ok"

            set_writable(fault_data, False)  # made read-only while serving
            assert_read_only_answer(upsert(url, [{"id": "late", "text": "Written while read-only."}]))
            assert search(url, "leader election log replication").json()["results"][0]["id"] == "raft"
            assert httpx.get(f"{url}/health").json()["status"] == "degraded"
    finally:
        set_writable(fault_data, True)
    assert stored_ids(fault_data / "docs") == {"faiss", "sqlite", "raft"}
    assert integrity(fault_data / "docs") == "ok"


# -- the free-space reserve -----------------------------------------------------------------------------------


def test_writes_below_the_reserve_answer_507_and_health_follows_the_free_space(fault_data):
    settings = server_settings(fault_data)
    settings.storage.reserve_bytes = HUGE_RESERVE
    with RunningServer(settings) as running:
        url = running.url
        answer = upsert(url, NEW)
        assert answer.status_code == 507, answer.text
        detail = answer.json()["detail"]
        assert f"the data folder {fault_data} has " in detail and " MiB free" in detail and "reserve" in detail
        assert httpx.get(f"{url}/collections/docs/documents/raft").status_code == 404  # nothing was written
        created = httpx.post(f"{url}/collections", json={"name": "more", "model": "minilm"})
        assert created.status_code == 507 and not (fault_data / "more").exists(), created.text
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
    assert stored_ids(fault_data / "docs") == {"faiss", "raft"}
    assert stray_files(fault_data) == []


def cli(*args: str, reserve: int | None = None):
    env = {"STELLA_SEARCH_STORAGE__RESERVE_BYTES": str(reserve)} if reserve is not None else {}
    return CliRunner().invoke(main, list(args), env=env)


def assert_refused_for_space(result, fault_data: Path) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.stdout
    last = result.stderr.strip().splitlines()[-1]  # after the model's loading bar, where a command loads it
    assert last.startswith("error: not enough free space for ") and "Traceback" not in result.stderr, result.stderr
    assert str(fault_data) in last and " MiB free" in last, last


def test_cli_commands_below_the_reserve_fail_in_one_line_and_leave_nothing_behind(fault_data, tmp_path):
    corpus = write_jsonl(tmp_path / "new.jsonl", NEW)
    snapshots = tmp_path / "snapshots"
    taken = cli("snapshot", "--data-dir", str(fault_data), "--collection", "docs", "--out", str(snapshots / "one"))
    assert taken.exit_code == 0, taken.output
    manifest = Collection.read_manifest(fault_data / "docs")
    before = sorted(str(p) for p in fault_data.rglob("*"))

    commands = [
        ["ingest", str(corpus), "--data-dir", str(fault_data), "--collection", "fresh", "--model", "minilm"],
        ["ingest", str(corpus), "--data-dir", str(fault_data), "--collection", "docs", "--model", "minilm"],
        ["snapshot", "--data-dir", str(fault_data), "--collection", "docs", "--out", str(snapshots / "two")],
        ["restore", str(snapshots / "one"), "--data-dir", str(fault_data), "--collection", "copy"],
        ["optimize", "--data-dir", str(fault_data), "--collection", "docs", "--index", "HNSW32"],
    ]
    for command in commands:
        assert_refused_for_space(cli(*command, reserve=HUGE_RESERVE), fault_data)
    assert not (fault_data / "fresh").exists() and not (fault_data / "copy").exists()
    assert not (snapshots / "two").exists() and stray_files(tmp_path) == []
    assert stored_ids(fault_data / "docs") == {"faiss", "sqlite"}
    assert Collection.read_manifest(fault_data / "docs").index_type == manifest.index_type
    assert sorted(str(p) for p in fault_data.rglob("*")) == before


# -- the disk refuses a write ---------------------------------------------------------------------------------


def test_a_failed_index_checkpoint_after_the_commit_still_answers_success(fault_data, monkeypatch):
    """The index file cannot be replaced (a folder stands in its place), so every checkpoint fails after SQLite
    committed: the write is answered as stored, and the checkpoint is tried again later."""
    monkeypatch.setattr(search_api.service, "CHECKPOINT_AFTER_PASSAGES", 1)
    index = fault_data / "docs" / "index.faiss"
    with RunningServer(server_settings(fault_data)) as running:
        index.unlink()
        (index / "in-the-way").mkdir(parents=True)
        answer = upsert(running.url, NEW)
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{running.url}/collections/docs/documents/raft").status_code == 200
        assert stray_files(fault_data) == []
        shutil.rmtree(index)
        assert upsert(running.url, [{"id": "late", "text": "Checkpointed once the way is clear."}]).status_code == 200
        assert index.is_file()  # the checkpoint was written at the next write
    assert stored_ids(fault_data / "docs") == {"faiss", "sqlite", "raft", "late"}


def test_a_database_file_removed_underneath_refuses_writes_with_503_until_it_is_back(fault_data):
    database = fault_data / "docs" / "collection.db"
    with RunningServer(server_settings(fault_data)) as running:
        url = running.url
        database.rename(database.with_name("moved-aside.db"))
        answer = upsert(url, NEW)
        assert answer.status_code == 503 and "collection.db was removed while collection docs was open" in answer.text
        assert "collection.db was removed" in httpx.get(f"{url}/health").json()["error"]
        database.with_name("moved-aside.db").rename(database)
        assert upsert(url, NEW).status_code == 200
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert stored_ids(fault_data / "docs") == {"faiss", "sqlite", "raft"}


def test_a_file_size_limit_answers_507_or_503_never_500_and_loses_no_acknowledged_write(fault_data, tmp_path):
    """RLIMIT_FSIZE makes the OS refuse to grow any file of the server past a size (EFBIG, or a short write that
    SQLite reports as a full disk): upserts go on until it bites, then raising the limit lets them through again."""
    limit = (fault_data / "docs" / "collection.db").stat().st_size + 256 * 1024

    def limited():  # root too: no capability lifts RLIMIT_FSIZE
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    acknowledged, refused = set(), []
    with serving(fault_data, tmp_path / "serve.log", limited) as (url, process):
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
    assert (acknowledged | {"faiss", "sqlite", "raft"}) <= stored_ids(fault_data / "docs")
    assert integrity(fault_data / "docs") == "ok"
    assert stray_files(fault_data) == []
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
