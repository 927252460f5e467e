"""Consistent copies of a live collection, and verified restores.

A snapshot is a directory: ``collection.db`` made with SQLite's online backup API, the FAISS checkpoint
(``index.faiss`` + ``index.json``) of the same state, and ``snapshot.json`` with each file's sha256 and the counts.
It is taken under the collection's writer lock, so no write can land between the two copies; searches go on.
Restoring checks the checksums, SQLite's integrity check and the counts before moving the copy into place.

>>> info = take_snapshot(collection, Path("backups/default-20261123T101500Z"))
>>> restore_snapshot(Path("backups/default-20261123T101500Z"), Path("data/default-restored"))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from storage.collection import DB_FILE, Collection
from storage.errors import ConflictError, CorruptCollectionError, NotFoundError

log = logging.getLogger(__name__)

MANIFEST = "snapshot.json"
FILES = (DB_FILE, "index.faiss", "index.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
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


def take_snapshot(collection: Collection, destination: Path, wait: float = 60.0) -> dict:
    """Copy ``collection`` into the new directory ``destination``; returns the snapshot's manifest."""
    destination = Path(destination)
    if destination.exists():
        raise ConflictError(f"snapshot destination {destination} already exists")
    partial = destination.with_name(f".{destination.name}.partial-{secrets.token_hex(4)}")
    partial.mkdir(parents=True)
    try:
        with collection.writing(wait), collection.connection() as source:
            target = sqlite3.connect(partial / DB_FILE)
            try:
                source.conn.backup(target)
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
        os.replace(partial, destination)
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


def verify_snapshot(snapshot: Path) -> dict:
    """The snapshot's manifest, after checking every file's sha256 and SQLite's integrity check."""
    snapshot = Path(snapshot)
    if not (snapshot / MANIFEST).exists():
        raise NotFoundError(f"{snapshot} is not a snapshot (no {MANIFEST})")
    info = json.loads((snapshot / MANIFEST).read_text())
    for name, expected in info["files"].items():
        path = snapshot / name
        if not path.exists() or _sha256(path) != expected:
            raise CorruptCollectionError(f"snapshot {snapshot} is damaged: {name} is missing or fails its checksum")
    conn = sqlite3.connect(f"file:{snapshot / DB_FILE}?mode=ro", uri=True)
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    if verdict != "ok":
        raise CorruptCollectionError(f"snapshot {snapshot}: SQLite integrity check says {verdict!r}")
    return info


def restore_snapshot(snapshot: Path, target: Path, replace: bool = False) -> dict:
    """Verify ``snapshot`` and install it as the collection directory ``target``.

    An existing ``target`` is refused unless ``replace``; then it is kept beside as ``.replaced-<name>-<time>``,
    never deleted. The process serving ``target`` must not have it open.
    """
    snapshot, target = Path(snapshot), Path(target)
    info = verify_snapshot(snapshot)
    if target.exists() and not replace:
        raise ConflictError(f"{target} already exists; restore under another name or pass replace")
    staging = target.with_name(f".restore-{target.name}-{secrets.token_hex(4)}")
    staging.mkdir(parents=True)
    try:
        for name in FILES:
            shutil.copy2(snapshot / name, staging / name)
        _fsync_tree(staging)
        with Collection.open(staging) as restored:
            found = {"documents": restored.count_documents(), "passages": restored.count_passages()}
            if found != {"documents": info["documents"], "passages": info["passages"]} or (
                restored.index_size != info["passages"]
            ):
                raise CorruptCollectionError(f"snapshot {snapshot} does not reopen with its recorded counts")
        if target.exists():
            aside = target.with_name(f".replaced-{target.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
            os.replace(target, aside)
            log.info("moved the replaced collection to %s", aside)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info
