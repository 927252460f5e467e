"""The disk under a data folder: its free space against the reserve that keeps maintenance possible, whether it can
be written, and which domain error a failed read or write (of the operating system or of SQLite) stands for.

A write needs room for itself, and must leave room for what keeps the collections working after it: a checkpoint or
an ``optimize`` writes a new index file beside the old one, a WAL checkpoint copies the WAL into the database. So a
write is refused (:class:`InsufficientStorageError`, HTTP 507) unless the filesystem of the data folder keeps::

    free >= reserve + sum over its collections of (2 x index file + WAL) + 2 x the write's estimated size

(a write lands in the WAL first and in the database at the next WAL checkpoint), before the disk is so full that
one of those would fail half-way. ``reserve`` is the setting ``storage.reserve_bytes``.

>>> require_space(Path("data"), reserve_bytes=64 << 20, write_bytes=3 << 20)   # raises when short
>>> storage_error(OSError(errno.ENOSPC, "No space left on device"), Path("data"))
InsufficientStorageError('the data folder data is out of space (12.0 MiB free): No space left on device ...')
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from storage.errors import (
    CollectionBusyError,
    CorruptCollectionError,
    InsufficientStorageError,
    StellaSearchError,
    StorageUnavailableError,
)

MIB = 1 << 20
# What the index files do not show yet: the vectors a collection gains between two index checkpoints (the API
# checkpoints every 10,000 passages: 40 MiB at 1,024 dimensions), and SQLite's temporary files.
DEFAULT_RESERVE_BYTES = 64 * MIB
INDEX_FILE = "index.faiss"
WAL_SUFFIX = "-wal"
OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}
NO_PERMISSION = {errno.EACCES, errno.EPERM}
# Failed I/O, and files or folders removed or replaced underneath
IO_FAILURES = {errno.EIO, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ESTALE, errno.ENXIO, errno.ENODEV}
# Primary SQLite result codes by their message (sqlite3_errstr), for Python 3.10 where exceptions carry no code.
SQLITE_CODE_BY_MESSAGE = {
    "database or disk is full": "SQLITE_FULL",
    "attempt to write a readonly database": "SQLITE_READONLY",
    "access permission denied": "SQLITE_PERM",
    "disk I/O error": "SQLITE_IOERR",
    "unable to open database file": "SQLITE_CANTOPEN",
    "file is not a database": "SQLITE_NOTADB",
    "database disk image is malformed": "SQLITE_CORRUPT",
    "database is locked": "SQLITE_BUSY",
    "database table is locked": "SQLITE_LOCKED",
}


def mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"


def free_bytes(path: Path | str) -> int:
    """Bytes an unprivileged process can still write on the filesystem of ``path`` (or of its nearest existing
    parent, for a folder not made yet)."""
    path = Path(path)
    while True:
        try:
            return shutil.disk_usage(path).free
        except FileNotFoundError:
            if path.absolute() == path.absolute().parent:
                raise
            path = path.absolute().parent


def _needs(folder: str, depth: int) -> int:
    """Twice each index file and each WAL in ``folder``, and in its folders ``depth`` levels down (a data folder:
    its collections and their shards; hidden folders, such as snapshots and creations in progress, are not served)."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:  # removed meanwhile
        return 0
    for entry in entries:
        try:
            if entry.name == INDEX_FILE:
                total += 2 * entry.stat().st_size
            elif entry.name.endswith(WAL_SUFFIX):
                total += entry.stat().st_size
            elif depth and not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                total += _needs(entry.path, depth - 1)
        except OSError:
            continue
    return total


def maintenance_bytes(data_dir: Path | str) -> int:
    """What the collections under ``data_dir`` need free to checkpoint and optimize: twice each index file (the new
    file is written beside the old one) and each WAL (a WAL checkpoint copies it into the database)."""
    return _needs(os.fspath(data_dir), depth=2)


def estimated_write_bytes(text_chars: int, vectors: int, dim: int) -> int:
    """About what a write adds to a database: its text three times (the document, its passages and their full-text
    index) and its float32 passage vectors."""
    return 3 * text_chars + 4 * vectors * dim


@dataclass(frozen=True)
class Space:
    """The free space of a data folder's filesystem against what must stay free (see the module docstring)."""

    data_dir: Path
    free: int
    required: int
    reserve: int

    @property
    def short(self) -> bool:
        return self.free < self.required

    def describe(self) -> str:
        return (
            f"the data folder {self.data_dir} has {mib(self.free)} free; {mib(self.required)} must stay free "
            f"(storage.reserve_bytes {mib(self.reserve)}, twice the index files and the WALs for checkpoints and "
            "optimize, and twice the write)"
        )


def space(data_dir: Path | str, reserve_bytes: int, write_bytes: int = 0) -> Space:
    """The free space of ``data_dir`` against what a write of ``write_bytes`` must leave free."""
    data_dir = Path(data_dir)
    required = reserve_bytes + maintenance_bytes(data_dir) + 2 * write_bytes
    return Space(data_dir, free_bytes(data_dir), required, reserve_bytes)


def require_space(data_dir: Path | str, reserve_bytes: int, write_bytes: int = 0) -> None:
    """Refuse (InsufficientStorageError) a write of about ``write_bytes`` that would leave less than the reserve.

    >>> require_space(Path("data"), reserve_bytes=1 << 50)
    Traceback (most recent call last):
    storage.errors.InsufficientStorageError: not enough free space for this write: the data folder data has ...
    """
    found = space(data_dir, reserve_bytes, write_bytes)
    if found.short:
        raise InsufficientStorageError(
            f"not enough free space for this write: {found.describe()}. Nothing was written: free space on that "
            "filesystem (or lower storage.reserve_bytes) and retry."
        )


def require_room(destination: Path | str, needed: int, what: str, data_dir: Path | str, reserve_bytes: int) -> None:
    """Refuse (InsufficientStorageError) to write ``needed`` bytes of ``what`` under ``destination`` (a snapshot, a
    restored collection) where they do not fit, beside the data folder's reserve on the same filesystem."""
    destination, data_dir = Path(destination), Path(data_dir)
    required = needed
    if _device(destination) == _device(data_dir):
        required += reserve_bytes + maintenance_bytes(data_dir)
    free = free_bytes(destination)
    if free < required:
        raise InsufficientStorageError(
            f"not enough free space for {what}: {destination} has {mib(free)} free and it needs {mib(needed)}"
            + (
                f", beside the {mib(required - needed)} the data folder {data_dir} keeps free"
                if required > needed
                else ""
            )
            + ". Nothing was written: free space there and retry."
        )


def _device(path: Path) -> int:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.stat().st_dev


def writable(folder: Path, files: Iterable[Path] = ()) -> bool:
    """Whether this process can create files in ``folder`` and write each of ``files`` that exists."""
    return os.access(folder, os.W_OK) and all(os.access(f, os.W_OK) for f in files if f.exists())


def read_only_error(folder: Path) -> StorageUnavailableError:
    return StorageUnavailableError(
        f"the data folder is read-only ({folder} cannot be written by the server): searches are answered, writes "
        "are refused until it is writable again (its permissions, owner or mount)"
    )


def _sqlite_code(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        return name
    return SQLITE_CODE_BY_MESSAGE.get(str(exc), "")


def storage_error(exc: BaseException, data_dir: Path | str) -> StellaSearchError | None:
    """The domain error that a failed read or write ``exc`` in ``data_dir`` stands for; None when ``exc`` is not a
    storage failure (a busy database, a programming error).

    Out of space (ENOSPC, a disk quota, a file over the size limit, SQLITE_FULL) is an InsufficientStorageError;
    a read-only folder or file (EROFS, SQLITE_READONLY), a permission (EACCES, EPERM) and failed I/O (EIO, a file
    removed underneath, SQLITE_IOERR, SQLITE_CANTOPEN) a StorageUnavailableError; an unreadable database
    (SQLITE_NOTADB, SQLITE_CORRUPT) a CorruptCollectionError; a lock held elsewhere (SQLITE_BUSY) a
    CollectionBusyError.
    """
    data_dir = Path(data_dir)
    if isinstance(exc, StellaSearchError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code, detail = _sqlite_code(exc), f"SQLite: {exc}"
        if code.startswith("SQLITE_FULL"):
            return _out_of_space(data_dir, detail)
        if code.startswith(("SQLITE_READONLY", "SQLITE_PERM")):
            return read_only_error(data_dir)
        if code.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")):
            # SQLite reports ENOSPC met outside a plain write (growing the WAL index, an fsync) as an I/O error
            return _out_of_space(data_dir, detail) if free_bytes(data_dir) < MIB else _io_error(data_dir, detail)
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return CollectionBusyError(f"a collection database in {data_dir} is locked elsewhere ({exc}); retry")
        if code.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            return CorruptCollectionError(
                f"a collection database in {data_dir} cannot be read ({exc}); it was left untouched. Restore it from "
                "a snapshot or move it aside and re-ingest."
            )
        return None
    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    detail = f"{exc.strerror or exc}{where}"
    if exc.errno in OUT_OF_SPACE:
        return _out_of_space(data_dir, detail)
    if exc.errno == errno.EFBIG:
        return InsufficientStorageError(
            f"a file in the data folder {data_dir} reached the largest size allowed to it: {detail} (the process's "
            "file size limit, ulimit -f, or the filesystem's); nothing more can be written to it until that limit "
            "is raised"
        )
    if exc.errno == errno.EROFS:
        return read_only_error(Path(exc.filename).parent if exc.filename else data_dir)
    if exc.errno in NO_PERMISSION:
        return StorageUnavailableError(
            f"the server has no permission to use a file of the data folder {data_dir}: {detail}. Give the server's "
            "user access to it (its permissions or owner) and retry."
        )
    if exc.errno in IO_FAILURES:
        return _io_error(data_dir, detail)
    return None


def _out_of_space(data_dir: Path, detail: str) -> InsufficientStorageError:
    return InsufficientStorageError(
        f"the data folder {data_dir} is out of space ({mib(free_bytes(data_dir))} free): {detail}. Free space on "
        "its filesystem and retry."
    )


def _io_error(data_dir: Path, detail: str) -> StorageUnavailableError:
    return StorageUnavailableError(
        f"reading or writing the data folder {data_dir} failed: {detail}. Check the disk (the kernel log) and that "
        "no file of the collection was moved or removed; a restart re-opens each collection from its files."
    )


def folder_bytes(folder: Path | str) -> int:
    """The size of the files directly in ``folder``: what copying a collection or a snapshot writes, at most."""
    return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())


def index_bytes_at_most(vectors: int, dim: int) -> int:
    """An upper bound of an index file over ``vectors`` vectors of ``dim`` (what ``optimize`` writes): each vector
    in float32 with its id, and up to 64 four-byte links of an HNSW32 graph, with room to spare."""
    return vectors * (4 * dim + 512)
