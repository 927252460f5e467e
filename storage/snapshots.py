"""Consistent copies of a live collection, verified restores, and the retention of snapshots.

A snapshot is a directory: ``collection.db`` made with SQLite's online backup API, the FAISS checkpoint
(``index.faiss`` + ``index.json``) of the same state, and ``snapshot.json`` with each file's sha256 and the counts.
It is taken under the collection's writer lock, so no write can land between the two copies; searches go on.

A snapshot folder is untrusted input (anyone with file access can copy one in), so a restore reads exactly those
four regular files, never through a symbolic link, copies them into a staging folder while checking their sha256,
and verifies the copy before it is moved into place: the schema, the manifest row, SQLite's integrity check, every
row and vector, and that the FAISS checkpoint loads with the recorded count. The snapshot itself is only read.

>>> info = take_snapshot(collection, Path("backups/default-20261123T101500Z"))
>>> restore_snapshot(Path("backups/default-20261123T101500Z"), Path("data/default-restored"))
>>> prune_snapshots(Path("backups"), keep=5)
['default-20261120T101500Z']
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

import numpy as np

from storage.collection import DB_FILE, FTS_SCHEMA, METADATA_INDEX_SCHEMA, SCHEMA_VERSION, Collection, Manifest
from storage.errors import (
    ConflictError,
    InvalidInputError,
    InvalidSnapshotError,
    NotFoundError,
    StellaSearchError,
)
from storage.vector_index import VectorIndex

log = logging.getLogger(__name__)

MANIFEST = "snapshot.json"
FILES = (DB_FILE, "index.faiss", "index.json")  # what a snapshot holds besides its manifest; nothing else is read
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # always fullmatch: '$' would accept a newline
MANIFEST_MAX_BYTES = 1 << 20  # a real snapshot.json is under 1 KB
MAX_DIM = 65536
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# The tables and columns a collection is read through (Collection); a snapshot without them is refused.
REQUIRED_COLUMNS = {
    "documents": {"id", "title", "text", "metadata", "content_hash", "created_at", "updated_at"},
    "passages": {"id", "document_id", "ordinal", "text", "start", "end", "vector"},
    "deletions": {"seq", "passage_id"},
    "manifest": {"model", "model_id", "revision", "dim", "head", "normalized"},
}
FTS_TABLE = "passages_fts"  # schema 2 on; an older snapshot gets it when it is first opened
FULL_PRECISIONS = ("fp32", "bf16", "fp16")
_READ_CHUNK = 4096
Fail = Callable[[str], NoReturn]  # raises the InvalidSnapshotError of the snapshot being verified
_COPY_BLOCK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_COPY_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot_name(collection: str) -> str:
    return f"{collection}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"


def snapshot_path(root: Path, name: str) -> Path:
    """Where the snapshot ``name`` lives under ``root``; the name must be one plain folder name.

    >>> snapshot_path(Path("data/.snapshots"), "default-20261123T101500123456Z")
    PosixPath('data/.snapshots/default-20261123T101500123456Z')
    """
    if not SNAPSHOT_NAME.fullmatch(name or ""):
        raise InvalidInputError(
            f"invalid snapshot name {name!r}: 1-128 letters, digits, '_', '.' or '-', starting with a letter or "
            "digit; GET /snapshots lists them"
        )
    return Path(root) / name


# -- taking ---------------------------------------------------------------------------------------------------


def take_snapshot(collection: Collection, destination: Path, wait: float = 60.0) -> dict:
    """Copy ``collection`` into the new directory ``destination``; returns the snapshot's manifest."""
    destination = Path(destination)
    if destination.exists() or destination.is_symlink():
        raise ConflictError(f"snapshot destination {destination} already exists")
    partial = destination.with_name(f".{destination.name}.partial-{secrets.token_hex(4)}")
    partial.mkdir(parents=True)
    try:
        with collection.writing(wait), collection.connection() as source:
            target = sqlite3.connect(partial / DB_FILE)
            try:
                source.conn.backup(target)
                # a rollback journal, not WAL: the snapshot is one self-contained file, with no -wal or -shm beside it
                target.execute("PRAGMA journal_mode=DELETE")
            finally:
                target.close()
            collection.checkpoint_to(partial)
        counts = _counts(partial / DB_FILE)
        info = {
            "collection": collection.name,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": collection.manifest.describe(),
            **counts,
            "files": {name: _sha256(partial / name) for name in FILES},
        }
        (partial / MANIFEST).write_text(json.dumps(info, indent=2))
        _fsync_tree(partial)
        os.rename(partial, destination)  # never over a folder that appeared meanwhile
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise ConflictError(f"snapshot destination {destination} already exists") from exc
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("snapshot of %s written to %s (%d documents)", collection.name, destination, info["documents"])
    return info


def _counts(db_file: Path) -> dict:
    conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        return {
            "documents": conn.execute("SELECT count(*) FROM documents").fetchone()[0],
            "passages": conn.execute("SELECT count(*) FROM passages").fetchone()[0],
        }
    finally:
        conn.close()


# -- reading an untrusted snapshot ----------------------------------------------------------------------------


@contextmanager
def _snapshot_folder(snapshot: Path) -> Iterator[int]:
    """A descriptor of the folder ``snapshot`` itself, never of a symbolic link's target: its files are opened
    relative to it, so swapping the folder for a link midway changes nothing that is read."""
    try:
        fd = os.open(snapshot, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFoundError(f"no snapshot at {snapshot}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(snapshot):  # Linux says ENOTDIR for a link to a folder
            problem = "it is a symbolic link; a snapshot is read from its own folder only"
        elif exc.errno == errno.ENOTDIR:
            problem = "it is not a folder"
        else:
            problem = f"it cannot be read ({exc.strerror})"
        raise InvalidSnapshotError(snapshot.name, problem) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _open_file(folder: int, snapshot: Path, name: str) -> int:
    """A read-only descriptor of the regular file ``name`` in the open snapshot ``folder``, never through a symbolic
    link (nor a FIFO or device, which could block or never end)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
    except FileNotFoundError:
        raise InvalidSnapshotError(snapshot.name, f"{name} is missing") from None
    except OSError as exc:
        problem = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror})"
        raise InvalidSnapshotError(snapshot.name, f"{name} {problem}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidSnapshotError(snapshot.name, f"{name} is not a regular file")
    return fd


def _shown(value, limit: int = 80) -> str:
    """``repr(value)`` (an exception's message) cut to ``limit`` characters, for untrusted values in messages."""
    text = str(value) if isinstance(value, BaseException) else repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def read_manifest(snapshot: Path) -> dict:
    """``snapshot.json`` of ``snapshot``, checked for shape only (the files themselves are not read).

    >>> read_manifest(Path("data/.snapshots/default-20261123T101500123456Z"))["documents"]
    500
    """
    snapshot = Path(snapshot)
    with _snapshot_folder(snapshot) as folder, os.fdopen(_open_file(folder, snapshot, MANIFEST), "rb") as f:
        raw = f.read(MANIFEST_MAX_BYTES + 1)
    if len(raw) > MANIFEST_MAX_BYTES:
        raise InvalidSnapshotError(snapshot.name, f"{MANIFEST} is over {MANIFEST_MAX_BYTES} bytes")
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidSnapshotError(snapshot.name, f"{MANIFEST} is not JSON ({_shown(exc)})") from None
    if not isinstance(info, dict):
        raise InvalidSnapshotError(snapshot.name, f"{MANIFEST} is not a JSON object")
    for key, valid, what in (
        ("collection", lambda v: isinstance(v, str) and v, "a collection name"),
        ("created_at", lambda v: isinstance(v, str) and v, "a time"),
        ("documents", _is_count, "a count"),
        ("passages", _is_count, "a count"),
        ("files", lambda v: isinstance(v, dict), "an object of file names and sha256 checksums"),
    ):
        if key not in info:
            raise InvalidSnapshotError(snapshot.name, f"{MANIFEST} has no {key!r}")
        if not valid(info[key]):
            raise InvalidSnapshotError(snapshot.name, f"{MANIFEST}: {key!r} must be {what}, not {_shown(info[key])}")
    if "model" in info and not isinstance(info["model"], str):
        raise InvalidSnapshotError(snapshot.name, f"{MANIFEST}: 'model' must be a string")
    for name, checksum in info["files"].items():
        if name not in FILES:
            raise InvalidSnapshotError(
                snapshot.name, f"{MANIFEST} lists {_shown(name)}, which is not a snapshot file ({', '.join(FILES)})"
            )
        if not isinstance(checksum, str) or not SHA256_HEX.fullmatch(checksum):
            raise InvalidSnapshotError(snapshot.name, f"{MANIFEST}: the checksum of {name} is not a sha256")
    if missing := [name for name in FILES if name not in info["files"]]:
        raise InvalidSnapshotError(snapshot.name, f"{MANIFEST} has no checksum for {', '.join(missing)}")
    return info


def inspect_snapshot(snapshot: Path) -> dict:
    """The manifest of ``snapshot`` once its shape is right and each of its files is a regular file; the cheap
    check behind listings (checksums and contents are verified on restore)."""
    snapshot = Path(snapshot)
    info = read_manifest(snapshot)
    with _snapshot_folder(snapshot) as folder:
        for name in FILES:
            os.close(_open_file(folder, snapshot, name))
    return info


# -- restoring --------------------------------------------------------------------------------------------------


def _stage_files(snapshot: Path, info: dict, staging: Path) -> None:
    """Copy each snapshot file into ``staging`` and check the copy's sha256 against the manifest."""
    with _snapshot_folder(snapshot) as folder:
        for name in FILES:
            digest = hashlib.sha256()
            with os.fdopen(_open_file(folder, snapshot, name), "rb") as source, open(staging / name, "xb") as copy:
                for block in iter(lambda: source.read(_COPY_BLOCK), b""):
                    digest.update(block)
                    copy.write(block)
            if digest.hexdigest() != info["files"][name]:
                raise InvalidSnapshotError(snapshot.name, f"{name} fails its checksum")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _check_schema(conn: sqlite3.Connection, fail: Fail) -> None:
    """The tables and columns the collection is read through."""
    for table, needed in REQUIRED_COLUMNS.items():
        found = _columns(conn, table)
        if not found:
            fail(f"{DB_FILE} has no table {table!r}")
        if missing := needed - found:
            fail(f"{DB_FILE}: table {table!r} lacks the columns {', '.join(sorted(missing))}")


def _known_triggers() -> dict[str, str]:
    """The triggers a collection has, name -> SQL as sqlite_master keeps it, from the statements that create them."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE documents (id TEXT PRIMARY KEY, title TEXT, metadata TEXT)")
        conn.execute("CREATE TABLE passages (id INTEGER PRIMARY KEY, document_id TEXT, text TEXT)")
        for statement in FTS_SCHEMA + METADATA_INDEX_SCHEMA:
            conn.execute(statement)
        return dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall())
    finally:
        conn.close()


def _check_triggers(conn: sqlite3.Connection, fail: Fail) -> None:
    """Only the collection's own triggers (and no views): any other code in the schema would run on later writes."""
    known = _known_triggers()
    for kind, name, sql in conn.execute("SELECT type, name, sql FROM sqlite_master WHERE type IN ('trigger', 'view')"):
        if kind != "trigger" or known.get(name) != sql:
            fail(f"{DB_FILE} has a {kind} {_shown(name)} that is not one of a collection's own")


def _check_manifest_row(conn: sqlite3.Connection, fail: Fail) -> dict:
    """The one manifest row, each field of a type and range a Manifest can hold."""
    cursor = conn.execute("SELECT * FROM manifest")
    rows = cursor.fetchall()
    if len(rows) != 1:
        fail(f"{DB_FILE} has {len(rows)} manifest rows, expected 1")
    row = dict(zip([d[0] for d in cursor.description], rows[0]))
    dim = row["dim"]
    if type(dim) is not int or not 1 <= dim <= MAX_DIM:
        fail(f"{DB_FILE}: the manifest's dim {dim!r} is not a dimension (1-{MAX_DIM})")
    for key in ("model", "model_id", "head"):
        if not isinstance(row[key], str) or not row[key]:
            fail(f"{DB_FILE}: the manifest's {key} {row[key]!r} is not a name")
    if row["revision"] is not None and not isinstance(row["revision"], str):
        fail(f"{DB_FILE}: the manifest's revision {row['revision']!r} is not a string")
    if row["normalized"] not in (0, 1):
        fail(f"{DB_FILE}: the manifest's normalized {row['normalized']!r} is not 0 or 1")
    precision = row.get("precision", "fp32")
    if not isinstance(precision, str) or not (precision in FULL_PRECISIONS or precision.startswith("int8-")):
        fail(f"{DB_FILE}: the manifest's precision {precision!r} is not fp32, bf16, fp16 or int8-<recipe>")
    if not isinstance(row.get("index_type", "Flat"), str):
        fail(f"{DB_FILE}: the manifest's index_type {row['index_type']!r} is not a FAISS factory string")
    params = row.get("index_params")
    try:
        if params is not None and not isinstance(json.loads(params), dict):
            raise ValueError("not an object")
    except (TypeError, ValueError) as exc:
        fail(f"{DB_FILE}: the manifest's index_params are not a JSON object ({exc})")
    version = row.get("schema_version", 1)
    if type(version) is not int or not 1 <= version <= SCHEMA_VERSION:
        fail(f"{DB_FILE}: schema version {version!r} is not one this version reads (1-{SCHEMA_VERSION})")
    if version >= 2 and not _columns(conn, FTS_TABLE):
        fail(f"{DB_FILE} has no table {FTS_TABLE!r} (its lexical index)")
    return row


def _check_rows(conn: sqlite3.Connection, dim: int, fail: Fail) -> None:
    """Every row reads back as the types Collection expects, and every vector is ``dim`` finite float32 values
    (the stored form whatever the encoder's precision: see ``Collection._vectors``)."""
    bad = conn.execute(
        """SELECT id FROM documents WHERE typeof(id) != 'text' OR typeof(text) != 'text'
             OR (title IS NOT NULL AND typeof(title) != 'text')
             OR NOT json_valid(metadata) OR json_type(metadata) != 'object' LIMIT 1"""
    ).fetchone()
    if bad:
        fail(f"{DB_FILE}: document {bad[0]!r} has a malformed id, title, text or metadata")
    bad = conn.execute(
        """SELECT id FROM passages WHERE typeof(document_id) != 'text' OR typeof(ordinal) != 'integer'
             OR typeof(text) != 'text' OR typeof(start) != 'integer' OR typeof("end") != 'integer' LIMIT 1"""
    ).fetchone()
    if bad:
        fail(f"{DB_FILE}: passage {bad[0]} has a malformed document id, ordinal, text or offsets")
    orphan = conn.execute("PRAGMA foreign_key_check(passages)").fetchone()
    if orphan:
        fail(f"{DB_FILE}: passage {orphan[1]} belongs to no document")
    width = dim * np.dtype("float32").itemsize
    bad = conn.execute(
        "SELECT id, typeof(vector), length(vector) FROM passages WHERE typeof(vector) != 'blob' "
        "OR length(vector) != ? LIMIT 1",
        [width],
    ).fetchone()
    if bad:
        fail(f"{DB_FILE}: passage {bad[0]}'s vector is a {bad[2]}-byte {bad[1]}, expected {width} bytes (dim {dim})")
    last = -(1 << 63)
    while rows := conn.execute(
        "SELECT id, vector FROM passages WHERE id > ? ORDER BY id LIMIT ?", [last, _READ_CHUNK]
    ).fetchall():
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="float32").reshape(len(rows), dim)
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            fail(f"{DB_FILE}: passage {rows[int(np.argmin(finite))][0]}'s vector holds NaN or infinite values")
        last = rows[-1][0]


def _verify_database(snapshot: Path, info: dict, staging: Path) -> None:
    """The staged ``collection.db``: integrity, schema, manifest row, rows and vectors, counts."""

    def fail(problem: str) -> NoReturn:
        raise InvalidSnapshotError(snapshot.name, problem)

    conn = sqlite3.connect(staging / DB_FILE)
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchall()
        if [tuple(v) for v in verdict] != [("ok",)]:
            fail(f"{DB_FILE} fails SQLite's integrity check ({'; '.join(str(v[0]) for v in verdict[:3])})")
        _check_schema(conn, fail)
        _check_triggers(conn, fail)
        row = _check_manifest_row(conn, fail)
        _check_rows(conn, row["dim"], fail)
        found = {
            "documents": conn.execute("SELECT count(*) FROM documents").fetchone()[0],
            "passages": conn.execute("SELECT count(*) FROM passages").fetchone()[0],
        }
        recorded = {key: info[key] for key in found}
        if found != recorded:
            fail(f"{DB_FILE} holds {found}, but {MANIFEST} records {recorded}")
    except sqlite3.DatabaseError as exc:
        fail(f"{DB_FILE} cannot be read as a SQLite collection database ({exc})")
    finally:
        conn.close()


def _verify_index(snapshot: Path, info: dict, staging: Path, manifest: Manifest) -> None:
    """The staged FAISS checkpoint loads as the manifest's index type and dimension with the recorded count."""
    try:
        loaded = VectorIndex.load(
            staging,
            manifest.dim,
            use_gpu=False,
            index_type=manifest.index_type,
            search_params=manifest.index_params.get("search"),
        )
    except Exception as exc:  # FAISS raises RuntimeError (and others) for bytes that are not an index
        raise InvalidSnapshotError(snapshot.name, f"index.faiss is not a FAISS index ({exc})") from None
    if loaded is None:
        raise InvalidSnapshotError(
            snapshot.name,
            f"index.faiss and index.json are not a checkpoint of a {manifest.index_type} index of dim {manifest.dim} "
            "(the log says which check failed)",
        )
    index, _ = loaded
    if index.ntotal != info["passages"]:
        raise InvalidSnapshotError(
            snapshot.name, f"index.faiss holds {index.ntotal} vectors, but {MANIFEST} records {info['passages']}"
        )


def _verify_staged(snapshot: Path, info: dict, staging: Path) -> None:
    _verify_database(snapshot, info, staging)
    try:
        manifest = Collection.read_manifest(staging)
    except StellaSearchError as exc:
        raise InvalidSnapshotError(snapshot.name, str(exc)) from None
    if "model" in info and info["model"] != manifest.describe():
        raise InvalidSnapshotError(
            snapshot.name, f"{MANIFEST} says {info['model']}, but {DB_FILE}'s manifest says {manifest.describe()}"
        )
    _verify_index(snapshot, info, staging, manifest)
    try:
        with Collection.open(staging, use_gpu=False) as restored:
            found = (restored.count_documents(), restored.count_passages(), restored.index_size)
    except (StellaSearchError, sqlite3.DatabaseError) as exc:
        raise InvalidSnapshotError(snapshot.name, f"it does not open as a collection ({exc})") from None
    if found != (info["documents"], info["passages"], info["passages"]):
        raise InvalidSnapshotError(snapshot.name, "it does not reopen with its recorded counts")


@contextmanager
def _restore_lock(target: Path) -> Iterator[None]:
    """One restore into ``target`` at a time, across threads and processes; the others get a ConflictError.

    The lock file is removed when the restore ends; a restore that locked a file removed meanwhile (its inode no
    longer the path's) counts as the loser, so two restores can never both hold the lock.
    """
    path = target.parent / f".restore-{target.name}.lock"
    busy = ConflictError(f"another restore into {target.name} is in progress; wait, or restore under another name")
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(handle.fileno()).st_ino:
            raise busy
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: whoever opens the path next gets a new file


def restore_snapshot(snapshot: Path, target: Path, replace: bool = False) -> dict:
    """Verify ``snapshot`` and install it as the collection directory ``target``; returns its manifest.

    Everything is verified on a staged copy beside ``target`` before anything moves; a snapshot that fails is an
    :class:`InvalidSnapshotError` saying why. An existing ``target`` is refused unless ``replace``; then it is kept
    beside as ``.replaced-<name>-<time>``, never deleted. Of concurrent restores into one ``target`` one proceeds and
    the others get a ConflictError. The process serving ``target`` must not have it open.
    """
    snapshot, target = Path(snapshot), Path(target)
    info = read_manifest(snapshot)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _restore_lock(target):
        if (target.exists() or target.is_symlink()) and not replace:
            raise ConflictError(f"{target} already exists; restore under another name or pass replace")
        staging = target.with_name(f".restore-{target.name}-{secrets.token_hex(4)}")
        staging.mkdir()
        try:
            _stage_files(snapshot, info, staging)
            _verify_staged(snapshot, info, staging)
            _fsync_tree(staging)
            if replace and (target.exists() or target.is_symlink()):
                aside = target.with_name(f".replaced-{target.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}")
                os.rename(target, aside)
                log.info("moved the replaced collection to %s", aside)
            try:
                os.rename(staging, target)  # never over a collection another process created meanwhile
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise ConflictError(f"{target} was created by another process meanwhile; nothing restored") from exc
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return info


def verify_snapshot(snapshot: Path) -> dict:
    """Verify ``snapshot`` as a restore would (files, checksums, schema, integrity, vectors, the index) on a staged
    copy in a temporary folder, removed after; returns its manifest. An :class:`InvalidSnapshotError` says what is
    wrong. Nothing is installed."""
    snapshot = Path(snapshot)
    info = read_manifest(snapshot)
    with tempfile.TemporaryDirectory(prefix="stella-verify-") as tmp:
        _stage_files(snapshot, info, Path(tmp))
        _verify_staged(snapshot, info, Path(tmp))
    return info


# -- listing, deleting, retention -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotEntry:
    """One snapshot folder under a snapshot directory: its manifest, or why it cannot be restored."""

    name: str
    info: dict | None
    problem: str | None = None


def list_snapshots(root: Path) -> list[SnapshotEntry]:
    """Every snapshot folder under ``root`` by name, the broken ones with the reason (not hidden, not fatal)."""
    root = Path(root)
    entries = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not SNAPSHOT_NAME.fullmatch(path.name) or not (path.is_dir() or path.is_symlink()):
            continue  # a snapshot being taken or deleted is a hidden folder
        try:
            entries.append(SnapshotEntry(path.name, inspect_snapshot(path)))
        except InvalidSnapshotError as exc:
            entries.append(SnapshotEntry(path.name, None, exc.problem))
        except NotFoundError:  # deleted meanwhile
            continue
    return entries


def delete_snapshot(root: Path, name: str) -> None:
    """Delete the snapshot ``name`` under ``root``; a symbolic link by that name is removed, never followed.

    >>> delete_snapshot(Path("data/.snapshots"), "default-20261123T101500123456Z")
    """
    path = snapshot_path(root, name)
    if not (path.is_dir() or path.is_symlink()):
        raise NotFoundError(f"no snapshot named {name!r}; GET /snapshots lists them")
    doomed = path.with_name(f".{name}.deleting-{secrets.token_hex(4)}")
    try:
        os.rename(path, doomed)  # atomic: a concurrent delete or restore sees it whole or not at all
    except FileNotFoundError:
        raise NotFoundError(f"no snapshot named {name!r}; GET /snapshots lists them") from None
    if doomed.is_symlink() or not doomed.is_dir():
        doomed.unlink()
    else:
        shutil.rmtree(doomed)  # removes links inside as links (rmtree never follows them)
    log.info("deleted snapshot %s", path)


def prune_snapshots(root: Path, keep: int, collection: str | None = None) -> list[str]:
    """Delete all but the newest ``keep`` snapshots of each collection (of ``collection`` only, when given) under
    ``root``; returns the names deleted. ``keep`` 0 keeps every snapshot. Broken snapshots are neither counted nor
    deleted: they are left to the operator (``GET /snapshots`` shows why each is broken)."""
    if keep <= 0:
        return []
    by_collection: dict[str, list[SnapshotEntry]] = {}
    for entry in list_snapshots(root):
        if entry.info is not None and collection in (None, entry.info["collection"]):
            by_collection.setdefault(entry.info["collection"], []).append(entry)
    deleted = []
    for entries in by_collection.values():
        entries.sort(key=lambda e: (e.info["created_at"], e.name))
        for entry in entries[:-keep]:
            try:
                delete_snapshot(root, entry.name)
            except NotFoundError:  # deleted by another process meanwhile
                continue
            deleted.append(entry.name)
    return deleted
