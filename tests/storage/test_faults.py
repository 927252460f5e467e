"""I/O faults in the manner of SQLite's own I/O-error tests: the Nth file write, sync or rename of an upsert, an
ingest, a snapshot and an optimize fails with ENOSPC (and the disk stays full until the fault is cleared) or with
EIO (once), for N = 1, 2, ... up to the calls the operation makes.

After each: the answer is a success or a clear error; a success is stored whole and an error leaves each batch
wholly written or not at all; nothing acknowledged earlier is lost (by id, and by its own text in dense and in
lexical search); the vector and full-text indexes hold exactly SQLite's passages; the collection opens; nothing
temporary is left; and the same operation succeeds once the fault is cleared (scripts/faults.py has the details).
The C shim is compiled here; no root and no special filesystem are needed.

To stay within minutes, each sweep here tries about RUNS[operation] values of N spread evenly over the calls the
operation makes (ENOSPC and EIO offset from each other, so they fail different calls), plus its last three calls,
where a write commits; an upsert makes about 40 calls, an ingest of two one-document batches about 60, a snapshot
about 150, an optimize about 25. `python scripts/faults.py` tries every N of every operation under four faults
(ENOSPC and EIO, once and persistent) and writes scripts/results/faults.json.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.collection import Collection, Document, Manifest, Passage
from tests.helpers.data import ROOT, cpu_settings
from tests.helpers.faults import OPERATIONS, SUITE_FAULTS, Bench, Shim, Sweep, compile_shim

RUNS = {"upsert": 4, "ingest": 2, "snapshot": 2, "optimize": 2}
DOCUMENTS = {"optimize": 110}  # HNSW32 needs 100 passages to be tuned; the other sweeps start from 20 documents


@pytest.fixture(scope="session")
def shim_library(tmp_path_factory) -> Path:
    try:
        return compile_shim(tmp_path_factory.mktemp("shim"))
    except RuntimeError as exc:
        pytest.fail(f"the fault-injection tests need the C shim: {exc}")


def test_without_a_compiler_the_shim_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(RuntimeError, match="no C compiler"):
        compile_shim(tmp_path)


CHILD = """
import os, sqlite3, sys
disk, elsewhere = sys.argv[1], sys.argv[2]
def attempt(what, call):
    try:
        call()
        print(what, "ok")
    except OSError as exc:
        print(what, "errno", exc.errno)
    except sqlite3.OperationalError as exc:
        print(what, "sqlite", exc)
def write(path):
    with open(path, "wb") as f:
        f.write(b"x")
attempt("outside", lambda: write(os.path.join(elsewhere, "f")))
attempt("first", lambda: write(os.path.join(disk, "a")))
attempt("second", lambda: write(os.path.join(disk, "b")))
attempt("rename", lambda: os.rename(os.path.join(disk, "a"), os.path.join(disk, "c")))
conn = sqlite3.connect(os.path.join(disk, "x.db"))
attempt("sqlite", lambda: conn.execute("CREATE TABLE t (x)"))
"""


@pytest.mark.parametrize(("at", "persistent", "expected"), [
    (2, False, ["outside ok", "first ok", "second errno 28", "rename ok", "sqlite ok"]),
    (3, True, ["outside ok", "first ok", "second ok", "rename errno 28", "sqlite sqlite database or disk is full"]),
])  # fmt: skip
def test_the_shim_fails_the_nth_call_under_its_folder_only(shim_library, tmp_path, at, persistent, expected):
    disk, elsewhere, harness = tmp_path / "disk", tmp_path / "elsewhere", tmp_path / "harness"
    for folder in (disk, elsewhere, harness):
        folder.mkdir()
    shim = Shim(shim_library, disk, harness)
    shim.arm(at, errno.ENOSPC, persistent)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(disk), str(elsewhere)], env=shim.environment(), capture_output=True, text=True
    )
    assert child.stdout.splitlines() == expected, child.stderr
    calls, fired = shim.counted()
    assert fired == at and calls > at  # SQLite's journal writes and syncs are counted too


def test_a_disarmed_shim_counts_nothing(shim_library, tmp_path):
    disk, harness = tmp_path / "disk", tmp_path / "harness"
    disk.mkdir()
    harness.mkdir()
    shim = Shim(shim_library, disk, harness)
    subprocess.run([sys.executable, "-c", CHILD, str(disk), str(tmp_path)], env=shim.environment(), check=True)
    assert shim.counted() == (0, 0) and (disk / "c").exists()


@pytest.fixture(scope="module", params=OPERATIONS)
def sweeps(request, shim_library, minilm, tmp_path_factory) -> list[Sweep]:
    operation = request.param
    bench = Bench(
        tmp_path_factory.mktemp(operation), minilm, cpu_settings(), DOCUMENTS.get(operation, 20), shim_library
    )
    return bench.run(operation, SUITE_FAULTS, runs=RUNS[operation])


def test_faults_lose_nothing_acknowledged_and_the_next_operation_succeeds(sweeps):
    for result in sweeps:
        assert result.calls >= 4 and result.errors > 0, result.summary()  # the faults were reached and mattered
        assert result.data_problems == [], "\n".join(result.data_problems[:20])
        assert result.recovery_problems == [], "\n".join(result.recovery_problems[:20])


def test_faults_are_answered_by_a_success_or_a_clear_error(sweeps):
    for result in sweeps:
        assert result.answer_problems == [], "\n".join(result.answer_problems[:20])


STORAGE_CHILD = """
import json, logging, sqlite3, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[4])
from tests.helpers.faults import Shim
from storage.collection import Collection, Document, Passage
collection_path, disk, harness, _, step = sys.argv[1:6]
shim = Shim(Path("unused"), Path(disk), Path(harness))
logging.basicConfig(level=logging.WARNING)

def arm(at, ops, persistent=False):
    shim.generation = 100 + at
    shim.arm(at, 28, persistent, ops)

def write(collection, doc_id):
    doc = Document(doc_id, None, f"text of {doc_id}")
    vector = np.random.default_rng(len(doc_id)).normal(size=(1, collection.dim)).astype("float32")
    collection.write([doc], [Passage(doc_id, 0, doc.text, 0, len(doc.text))], vector)

outcome = {}
if step == "lock-note":
    with Collection.open(collection_path) as collection:
        arm(1, "write")  # the first file write of a write is the note naming the writer-lock holder
        try:
            write(collection, "during")
            outcome["during"] = "ok"
        except OSError as exc:
            outcome["during"] = f"errno {exc.errno}"
            kept = exc  # as a server's error handling keeps it, with the frames that hold the lock file open
        shim.disarm()
        try:
            with collection.writing(wait=2):
                write(collection, "after")
            outcome["after"] = "ok"
        except Exception as exc:
            outcome["after"] = type(exc).__name__
elif step == "checkpoint":
    with Collection.open(collection_path) as collection:
        write(collection, "late")
        arm(2, "write", persistent=True)  # from the index file's write on (the first is the lock holder's note)
        collection.checkpoint()
        shim.disarm()
        outcome["checkpoint"] = "returned"
elif step == "open-full-disk":
    Path(collection_path, "index.json").unlink()  # a lost checkpoint: opening rebuilds the index from SQLite
    served = sqlite3.connect(Path(collection_path, "collection.db"))  # as a server holding it open would
    served.execute("SELECT count(*) FROM documents").fetchone()
    arm(1, "write,sync,rename", persistent=True)
    with Collection.open(collection_path) as collection:
        outcome["opened"] = collection.count_passages()
    shim.disarm()
elif step == "open-full-disk-alone":
    arm(1, "write,sync,rename", persistent=True)  # SQLite cannot even make its shared-memory file
    try:
        Collection.open(collection_path)
    except Exception as exc:
        outcome["error"] = type(exc).__name__
        outcome["says_restore"] = "Restore" in str(exc)
    shim.disarm()
print(json.dumps(outcome))
"""


@pytest.fixture
def small_collection(tmp_path):
    manifest = Manifest(model="minilm", model_id="m", revision=None, dim=8, head="native")
    path = tmp_path / "disk" / "c"
    path.parent.mkdir()
    (tmp_path / "harness").mkdir()
    with Collection.create(path, manifest) as collection:
        docs = [Document(f"d{i}", None, f"text number {i}") for i in range(5)]
        vectors = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
        collection.write(docs, [Passage(d.id, 0, d.text, 0, len(d.text)) for d in docs], vectors)
    return path


def _storage_child(shim_library, collection_path: Path, step: str) -> dict:
    import json

    tmp = collection_path.parents[1]
    shim = Shim(shim_library, tmp / "disk", tmp / "harness")
    child = subprocess.run(
        [sys.executable, "-c", STORAGE_CHILD, str(collection_path), str(tmp / "disk"), str(tmp / "harness"),
         str(ROOT), step],
        env=shim.environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.splitlines()[-1])


def _consistent(collection_path: Path) -> dict:
    with Collection.open(collection_path) as collection:
        assert not any(collection.verify().values())
        return {"documents": collection.count_documents(), "passages": collection.count_passages()}


def test_a_failed_note_of_the_lock_holder_neither_fails_the_write_nor_keeps_the_lock(shim_library, small_collection):
    outcome = _storage_child(shim_library, small_collection, "lock-note")
    assert outcome == {"during": "ok", "after": "ok"}
    assert _consistent(small_collection)["documents"] == 7


def test_a_checkpoint_the_disk_refuses_leaves_the_write_acknowledged_and_no_temporary_file(
    shim_library, small_collection
):
    assert _storage_child(shim_library, small_collection, "checkpoint") == {"checkpoint": "returned"}
    assert sorted(p.name for p in small_collection.iterdir() if p.name.endswith(".tmp")) == []
    assert _consistent(small_collection)["documents"] == 6


def test_a_collection_whose_checkpoint_is_lost_opens_on_a_full_disk(shim_library, small_collection):
    assert _storage_child(shim_library, small_collection, "open-full-disk") == {"opened": 5}
    assert _consistent(small_collection) == {"documents": 5, "passages": 5}


def test_a_full_disk_is_not_reported_as_a_damaged_collection(shim_library, small_collection):
    outcome = _storage_child(shim_library, small_collection, "open-full-disk-alone")
    # the domain error of a failing disk (503 over HTTP), never CorruptCollectionError with its advice to restore
    assert outcome == {"error": "StorageUnavailableError", "says_restore": False}
    assert _consistent(small_collection) == {"documents": 5, "passages": 5}
