"""Attacks on the keys and the connections of a served collection, through a real server on 127.0.0.1: what each
key guards, what a caller without one sees, the key checked before any body is read, the start-up refusals of
``stella-search serve``, and connections that send their headers or body too slowly."""

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from indexer.pipeline import ingest_paths

from conftest import cpu_settings, server_settings, write_jsonl
from server import RunningServer, free_port

STELLA = str(Path(sys.executable).parent / "stella-search")
DOCUMENTS = [
    {"id": "faiss", "text": "FAISS searches dense vectors for their nearest neighbours."},
    {"id": "sqlite", "text": "SQLite keeps the passages and their metadata in one file."},
]
READ, WRITE = {"Authorization": "Bearer r"}, {"Authorization": "Bearer w"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("attacks-auth")
    corpus = write_jsonl(root / "docs.jsonl", DOCUMENTS)
    ingest_paths([corpus], root / "data", "secret-docs", cpu_settings(), model="minilm")
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
