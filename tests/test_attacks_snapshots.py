"""Snapshots are untrusted input: a tampered, linked or racing restore is a 400 or 409 naming the problem, never a
500, never a file read from outside the snapshot, never a collection moved aside unasked; snapshots can be deleted
and are pruned by the retention. Through a real server with keys set, and through the CLI."""

import hashlib
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from indexer.pipeline import ingest_paths
from search_api.cli import main
from storage.collection import Collection
from storage.snapshots import take_snapshot

from conftest import DATA, cpu_settings, read_jsonl, server_settings, write_jsonl
from server import RunningServer

WRITE_KEY, READ_KEY = "snapshot-tests-write-key", "snapshot-tests-read-key"
AS_WRITER = {"Authorization": f"Bearer {WRITE_KEY}"}
AS_READER = {"Authorization": f"Bearer {READ_KEY}"}
GOOD = "default-good"
DOCUMENTS = 12
FILES = ("collection.db", "index.faiss", "index.json")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A data folder with the collection ``default`` (MiniLM) and its snapshot GOOD in .snapshots."""
    root = tmp_path_factory.mktemp("template")
    corpus = write_jsonl(root / "c.jsonl", read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=DOCUMENTS))
    ingest_paths([corpus], root / "data", "default", cpu_settings(), model="minilm")
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
    assert response.json()["documents"] == DOCUMENTS
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
    assert shown[GOOD]["state"] == "ok" and shown[GOOD]["documents"] == DOCUMENTS
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
    assert {c["name"]: c["documents"] for c in info}["racing"] == DOCUMENTS


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
