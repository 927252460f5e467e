"""A collection: one directory holding a SQLite database (documents, passages, their vectors) and a FAISS index.

SQLite is the source of truth. Each passage row carries its vector, written in the same transaction as the
row, so an acknowledged write is durable the moment SQLite commits (WAL, ``synchronous=FULL``). The FAISS file
is a checkpoint stamped with the last passage id and deletion sequence it contains; opening a collection loads
the checkpoint, replays what SQLite has that is newer, and rebuilds from SQLite when the file is missing or
fails its checksum. Passage ids come from ``AUTOINCREMENT`` and are never reused.

>>> manifest = Manifest(model="minilm", model_id="sentence-transformers/all-MiniLM-L6-v2", revision="0.1.0",
...                     dim=384, head="native", prompt_type="s2p", max_length=256)
>>> collection = Collection.create(tmp_path / "default", manifest)
>>> collection.write([Document("d1", "Title", "Some text.")], [Passage("d1", 0, "Some text.", 0, 10)], vectors)
>>> collection.search(query_vectors, k=10)[0][0].document_id
'd1'
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sqlite_utils

from storage.disk import read_only_error, storage_error, writable
from storage.errors import (
    CollectionBusyError,
    CollectionExistsError,
    CorruptCollectionError,
    InvalidInputError,
    ModelMismatchError,
    NotFoundError,
    StorageUnavailableError,
)
from storage.filters import KEY, compile_filter
from storage.inputs import READABLE_METADATA_DEPTH, MetadataLimits, json_depth, lone_surrogate
from storage.locking import ReadWriteLock, WriterLock
from storage.vector_index import (
    AUTO,
    DEFAULT_RECALL,
    INDEX_TYPE,
    MIN_TUNING_QUERIES,
    TRAIN_POINTS_PER_LIST,
    Stamp,
    VectorIndex,
    exact_fallback,
    exact_search,
    import_faiss,
    index_family,
    resolve_index_type,
    top_k,
    training_minimum,
    tune,
)

log = logging.getLogger(__name__)

DB_FILE = "collection.db"
SHARDS_FILE = "shards.json"  # marks a sharded collection's directory (storage.sharding)
LOCK_FILE = "write.lock"
SCHEMA_VERSION = 2  # 2: passages_fts (FTS5, BM25) kept in step with passages by triggers
FTS_SCHEMA = [
    # porter stemming over unicode61 tokens: the usual English BM25 setup
    "CREATE VIRTUAL TABLE passages_fts USING fts5(title, text, tokenize = 'porter unicode61 remove_diacritics 2')",
    """CREATE TRIGGER passages_fts_insert AFTER INSERT ON passages BEGIN
         INSERT INTO passages_fts(rowid, title, text)
         VALUES (new.id, (SELECT title FROM documents WHERE id = new.document_id), new.text);
       END""",
    """CREATE TRIGGER passages_fts_delete AFTER DELETE ON passages BEGIN
         DELETE FROM passages_fts WHERE rowid = old.id;
       END""",
]
TOKEN = re.compile(r"\w+")
# metadata fields indexed on demand (index_field): one row per scalar value or list element, kept by triggers
_FIELD_PATH = "'$.\"' || f.field || '\"'"
_INDEX_ROWS = f"""SELECT f.field, j.value, j.type, json_type(new.metadata, {_FIELD_PATH}) = 'array', new.id
       FROM indexed_fields f, json_each(new.metadata, {_FIELD_PATH}) j
       WHERE json_type(new.metadata, {_FIELD_PATH}) != 'object' AND j.type NOT IN ('object', 'array', 'null')"""
METADATA_INDEX_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS indexed_fields (field TEXT PRIMARY KEY)",
    """CREATE TABLE IF NOT EXISTS metadata_index (
         field TEXT NOT NULL, value, kind TEXT NOT NULL, from_list INTEGER NOT NULL, document_id TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS metadata_index_lookup ON metadata_index(field, value)",
    "CREATE INDEX IF NOT EXISTS metadata_index_document ON metadata_index(document_id)",
    f"""CREATE TRIGGER IF NOT EXISTS metadata_index_insert AFTER INSERT ON documents BEGIN
         INSERT INTO metadata_index (field, value, kind, from_list, document_id) {_INDEX_ROWS};
       END""",
    f"""CREATE TRIGGER IF NOT EXISTS metadata_index_update AFTER UPDATE OF metadata ON documents BEGIN
         DELETE FROM metadata_index WHERE document_id = old.id;
         INSERT INTO metadata_index (field, value, kind, from_list, document_id) {_INDEX_ROWS};
       END""",
    """CREATE TRIGGER IF NOT EXISTS metadata_index_delete AFTER DELETE ON documents BEGIN
         DELETE FROM metadata_index WHERE document_id = old.id;
       END""",
]
STORAGE_VERSION = "0.1.0"
_SQL_CHUNK = 900  # stay under SQLite's bound-parameter limit on old builds
_READ_CHUNK = 4096  # rows per read while (re)building an index
# A filter matching at most this many passages is answered exactly from their stored vectors when the index is
# approximate: a few thousand rows read from SQLite cost milliseconds, and small filtered sets are where
# selector-filtered IVF/HNSW search loses recall.
EXACT_FILTER_MAX = 4096
TUNING_QUERIES = 1000  # held-out passages per tuning run: recall@10 to about +-0.01
# SQLite connections a collection keeps open between operations (each holds 2 file descriptors, plus 1 per database
# for the shared WAL index); while more operations run at once, more are opened and closed as they end
IDLE_CONNECTIONS = 4
TUNING_K = 10
_READ_ATTEMPTS = 20


def _operation(method):
    """Run a Collection method on a connection borrowed for the calling thread (``Collection.connection``)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.connection():
            return method(self, *args, **kwargs)

    return run


def content_hash(title: str | None, text: str) -> str:
    """The hash that decides whether a document must be re-encoded (title and text are what gets encoded)."""
    return hashlib.sha256(f"{title or ''}\x1f{text}".encode()).hexdigest()


# full matches only: with re.match a trailing "\n" would pass "$" and name a second folder
COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def collection_dir(data_dir: Path | str, name: str) -> Path:
    """Where collection ``name`` lives under ``data_dir``; the name must be a safe directory name."""
    if not COLLECTION_NAME.fullmatch(name or ""):
        raise InvalidInputError(
            f"invalid collection name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit"
        )
    return Path(data_dir) / name


def is_collection(path: Path | str) -> bool:
    """Whether ``path`` holds a collection (ordinary or sharded; creation renames it into place whole)."""
    return (Path(path) / DB_FILE).exists() or (Path(path) / SHARDS_FILE).exists()


def list_collections(data_dir: Path | str) -> list[str]:
    """Names of the collections under ``data_dir`` (not the hidden folders of a creation, restore or replaced
    collection in progress or kept aside)."""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if COLLECTION_NAME.fullmatch(p.name) and is_collection(p))


def _metadata_json(metadata: dict) -> str:
    return json.dumps(metadata, sort_keys=True, ensure_ascii=False, allow_nan=False)


# keys of the object returned in place of stored metadata too deep to return; '$' keys cannot be user metadata
UNREADABLE_METADATA = "$unreadable"
STORED_METADATA_JSON = "$stored_json"


def metadata_to_json(document_id: str, metadata, limits: MetadataLimits | None = None) -> str:
    """The stored form of a document's metadata, or an InvalidInputError saying what is wrong with it.

    ``limits`` are checked for new documents (the API, file ingest); copies of stored rows pass None.
    """
    where = f"document {document_id!r}"
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"{where}: metadata must be an object, not {type(metadata).__name__}")
    for key in metadata:
        if not isinstance(key, str) or not key or key.startswith("$"):
            raise InvalidInputError(
                f"{where}: metadata key {key!r} is not allowed: keys must be non-empty strings not starting "
                "with '$' (reserved for filter operators)"
            )
    if limits is not None and (depth := json_depth(metadata)) > limits.depth:
        raise InvalidInputError(
            f"{where}: metadata is nested {depth} levels deep (objects and lists); the limit is {limits.depth} "
            "(ingest.max_metadata_depth): flatten it"
        )
    if problem := lone_surrogate(metadata, "metadata"):
        raise InvalidInputError(f"{where}: {problem}; send valid Unicode")
    try:
        stored = _metadata_json(metadata)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: metadata must be plain JSON without NaN or Infinity ({exc})") from None
    except RecursionError:
        raise InvalidInputError(f"{where}: metadata is nested too deeply to store; flatten it") from None
    if limits is not None and (size := len(stored.encode())) > limits.bytes:
        raise InvalidInputError(
            f"{where}: metadata is {size} bytes as JSON; the limit is {limits.bytes} (ingest.max_metadata_bytes): "
            "keep large values in the document's text or elsewhere"
        )
    return stored


def stored_metadata(stored: str) -> dict:
    """A stored metadata column as returned by reads. Metadata nested deeper than READABLE_METADATA_DEPTH (written
    before writes were limited) comes back as ``{"$unreadable": why, "$stored_json": its JSON text}``, so that no
    stored document can make a read or a search fail.

    >>> stored_metadata('{"year": 2017}')
    {'year': 2017}
    """
    try:
        metadata = json.loads(stored)
    except RecursionError:  # deeper than the JSON decoder goes
        depth = None
    else:
        if stored.count("{") + stored.count("[") <= READABLE_METADATA_DEPTH:  # the usual case, without a walk
            return metadata
        depth = json_depth(metadata)
        if depth <= READABLE_METADATA_DEPTH:
            return metadata
    levels = f"{depth} levels" if depth is not None else "too"
    return {
        UNREADABLE_METADATA: f"this metadata is nested {levels} deep, over the {READABLE_METADATA_DEPTH} a response "
        f"carries; it is kept as stored, as JSON text in {STORED_METADATA_JSON!r}: upsert the document with "
        "flatter metadata",
        STORED_METADATA_JSON: stored,
    }


def _json_dict(value) -> dict:
    """A JSON object column as a dict (None or missing: empty)."""
    if isinstance(value, dict):
        return value
    return json.loads(value) if value else {}


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None where it does not exist."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _disagreement(stored: np.ndarray, held: np.ndarray, index: str) -> dict[str, list[int]]:
    """Passage ids of ``stored`` that ``index`` lacks, and those it holds that are not stored or are held twice."""
    values, counts = np.unique(held, return_counts=True)
    extra = np.union1d(np.setdiff1d(values, stored), values[counts > 1])
    return {f"missing_from_{index}": np.setdiff1d(stored, held).tolist(), f"extra_in_{index}": extra.tolist()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Manifest:
    """What a collection's vectors are: which model, revision, head and dimension produced them, and how."""

    model: str
    model_id: str
    revision: str | None
    dim: int
    head: str
    prompt_type: str = "s2p"
    max_length: int = 512
    normalized: bool = True
    # how the passage vectors were computed: fp32, bf16 or fp16 (torch on CUDA), or int8-<recipe key>
    precision: str = "fp32"
    index_type: str = INDEX_TYPE  # FAISS factory string of the current index
    # how the index was chosen and tuned: requested (auto or a type), search (nprobe / efSearch),
    # recall_at_10 at tuning, recall_target, tuning_queries, vectors, build_seconds, built_at
    index_params: dict = field(default_factory=dict)
    created_by: str = f"stella-search {STORAGE_VERSION}"
    created_at: str = field(default_factory=_now)
    schema_version: int = SCHEMA_VERSION

    def describe(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return f"model {self.model} ({self.model_id}{revision}), head {self.head}, dim {self.dim}"

    def vectors_compatible_with(self, other: Manifest) -> bool:
        """True when vectors from ``other`` may share this collection's index."""
        return (self.model_id, self.revision, self.head, self.dim, self.normalized) == (
            other.model_id,
            other.revision,
            other.head,
            other.dim,
            other.normalized,
        )


@dataclass
class Document:
    id: str
    title: str | None
    text: str
    metadata: dict = field(default_factory=dict)


@dataclass
class Passage:
    """A slice ``text[start:end]`` of its document; ``ordinal`` orders the passages of one document."""

    document_id: str
    ordinal: int
    text: str
    start: int
    end: int


@dataclass
class Hit:
    passage_id: int
    score: float
    document_id: str
    ordinal: int
    text: str
    start: int
    end: int
    title: str | None
    metadata: dict


@dataclass
class WriteResult:
    documents: int
    passages_added: int
    passages_removed: int


class Collection:
    """Documents, passages and vectors of one collection directory, searchable by vector.

    Use ``Collection.create`` for a new directory and ``Collection.open`` for an existing one. At most
    ``idle_connections`` SQLite connections stay open between operations (see ``connection``).
    """

    def __init__(
        self, path: Path, manifest: Manifest, use_gpu: bool | None = None, idle_connections: int = IDLE_CONNECTIONS
    ):
        self.path = Path(path)
        self.manifest = manifest
        self._idle_connections = idle_connections
        self._idle: list[sqlite_utils.Database] = []
        self._borrowed: dict[int, list] = {}  # thread id -> [its connection, nesting depth]
        self._connections_lock = threading.Lock()
        self._closed = False
        self._view = ReadWriteLock()  # searches read the index; replays change it
        self._apply_lock = threading.Lock()  # one replay or checkpoint at a time
        self._writer = WriterLock(self.path / LOCK_FILE, self.path.name)
        self._use_gpu = use_gpu
        self._index: VectorIndex
        self.exact_fallback_searches = 0  # approximate searches that came back short and were answered exactly
        self._stamp: Stamp
        self._db_identity: tuple[int, int] | None = None  # (device, inode) of the database file opened

    # -- opening -------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path | str,
        manifest: Manifest,
        use_gpu: bool | None = None,
        first_passage_id: int = 1,
        idle_connections: int = IDLE_CONNECTIONS,
    ) -> Collection:
        """Create an empty collection directory; refuses a directory that already holds one.

        ``first_passage_id`` is where passage ids start (the shards of a sharded collection use disjoint ranges).

        The collection is built in a staging directory and renamed into place, so no other process can open a
        half-created one, and of two processes creating the same collection exactly one wins
        (the other gets :class:`CollectionExistsError` and can open the winner's).
        """
        path = Path(path)
        if is_collection(path):
            raise CollectionExistsError(f"a collection already exists at {path}; open it instead")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.creating-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            cls._initialise(staging, manifest, first_passage_id)
            os.rename(staging, path)  # atomic; fails when another process renamed its copy first
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if (path / DB_FILE).exists():
                raise CollectionExistsError(f"a collection already exists at {path}; open it instead") from exc
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls.open(path, use_gpu=use_gpu, idle_connections=idle_connections)

    @classmethod
    def _initialise(cls, path: Path, manifest: Manifest, first_passage_id: int = 1) -> None:
        sqlite3.connect(path / DB_FILE).close()  # the one place a database file is created
        collection = cls(path, manifest, use_gpu=False)
        with collection.connection() as db, db.atomic():
            db.execute(
                """CREATE TABLE documents (
                    id TEXT PRIMARY KEY, title TEXT, text TEXT NOT NULL, metadata TEXT NOT NULL,
                    content_hash TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)"""
            )
            db.execute(
                """CREATE TABLE passages (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
                    ordinal INTEGER NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
                    vector BLOB NOT NULL)"""
            )
            db.execute("CREATE INDEX passages_by_document ON passages(document_id, ordinal)")
            db.execute("CREATE TABLE deletions (seq INTEGER PRIMARY KEY AUTOINCREMENT, passage_id INTEGER NOT NULL)")
            for statement in FTS_SCHEMA:
                db.execute(statement)
            db["manifest"].insert(asdict(manifest))
            if first_passage_id > 1:
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('passages', ?)", [first_passage_id - 1])
        collection._index = VectorIndex.empty(manifest.dim, use_gpu=False)
        collection._stamp = Stamp(max_passage_id=first_passage_id - 1, deletion_seq=0, ntotal=0, dim=manifest.dim)
        collection.checkpoint()
        collection.close()

    @classmethod
    def open(
        cls, path: Path | str, use_gpu: bool | None = None, idle_connections: int = IDLE_CONNECTIONS
    ) -> Collection:
        """Open an existing collection, bringing its FAISS index up to date with SQLite."""
        probe = cls._probe(Path(path), use_gpu, idle_connections)
        probe._migrate()
        probe._load_index()
        return probe

    @classmethod
    def read_manifest(cls, path: Path | str) -> Manifest:
        """An existing collection's manifest, without loading its index."""
        probe = cls._probe(Path(path), use_gpu=False)
        probe.close()
        return probe.manifest

    @classmethod
    def _probe(cls, path: Path, use_gpu: bool | None, idle_connections: int = IDLE_CONNECTIONS) -> Collection:
        """The collection object with its manifest read from SQLite; nothing else loaded yet."""
        if not (path / DB_FILE).exists():
            raise NotFoundError(f"no collection at {path} (no {DB_FILE}); create one by ingesting into it")
        probe = cls(path, manifest=None, use_gpu=use_gpu, idle_connections=idle_connections)  # type: ignore[arg-type]
        try:
            with probe.connection() as db:
                rows = list(db["manifest"].rows)
                stored_bytes = db.execute("SELECT length(vector) FROM passages LIMIT 1").fetchone()
        except sqlite3.DatabaseError as exc:
            probe.close()
            error = storage_error(exc, path)
            if error is not None and not isinstance(error, CorruptCollectionError):
                raise error from exc  # a full or failing disk, a permission, a lock held elsewhere: not the file
            raise CorruptCollectionError(
                f"{path / DB_FILE} cannot be read as a collection database ({exc}); it was left untouched. "
                "Restore it from a snapshot or move it aside and re-ingest."
            ) from exc
        if len(rows) != 1:
            probe.close()
            raise CorruptCollectionError(f"{path / DB_FILE} has {len(rows)} manifest rows, expected 1")
        probe._db_identity = _identity(path / DB_FILE)
        known = {f.name for f in fields(Manifest)}
        stored = {k: v for k, v in rows[0].items() if k in known}
        stored.update(normalized=bool(stored["normalized"]), index_params=_json_dict(stored.get("index_params")))
        probe.manifest = Manifest(**stored)
        if stored_bytes is not None and stored_bytes[0] != 4 * probe.manifest.dim:
            probe.close()
            raise CorruptCollectionError(
                f"{path / DB_FILE} holds {stored_bytes[0]}-byte passage vectors, but its manifest says "
                f"{probe.manifest.dim} dimensions ({4 * probe.manifest.dim} bytes); it was left untouched. Restore it "
                "from a snapshot or move it aside and re-ingest."
            )
        return probe

    @classmethod
    def open_or_create(cls, path: Path | str, manifest: Manifest, use_gpu: bool | None = None) -> Collection:
        """Open the collection at ``path`` if it exists (its vectors must be compatible), else create it."""
        if (Path(path) / DB_FILE).exists():
            collection = cls.open(path, use_gpu=use_gpu)
            collection.require_compatible(manifest)
            return collection
        return cls.create(path, manifest, use_gpu=use_gpu)

    def require_compatible(self, manifest: Manifest) -> None:
        if not self.manifest.vectors_compatible_with(manifest):
            raise ModelMismatchError(
                f"collection {self.path.name} was built with {self.manifest.describe()}; "
                f"refusing {manifest.describe()}. Vectors of different models or heads cannot share an index: "
                "use the collection's own model, or ingest into a new collection."
            )

    def _load_index(self) -> None:
        loaded = VectorIndex.load(
            self.path,
            self.manifest.dim,
            use_gpu=self._use_gpu,
            index_type=self.manifest.index_type,
            search_params=self.manifest.index_params.get("search"),
        )
        if loaded is None:
            self._rebuild_index()
            return
        with self._view.write():
            self._index, self._stamp = loaded
        self._replay()
        if self._index.ntotal != self.count_passages():
            log.warning(
                "index of %s holds %d vectors but SQLite has %d passages; rebuilding from SQLite",
                self.path,
                self._index.ntotal,
                self.count_passages(),
            )
            self._rebuild_index()

    def _rebuild_index(self) -> None:
        """Rebuild the manifest's index type from SQLite with its recorded search parameters (no re-tuning); an exact
        index while the collection has shrunk below what that type needs to be trained (``optimize`` then says so)."""
        index_type = self.manifest.index_type
        if self.count_passages() < training_minimum(index_type, self.dim):
            log.warning("%s has too few passages to train %s: searching exactly until optimized", self.path, index_type)
            index_type = INDEX_TYPE
        index, stamp, report = self._build_index(index_type)
        with self._view.write():
            self._index, self._stamp = index, stamp
        log.info(
            "rebuilt index of %s (%s) from SQLite: %d vectors in %.2fs",
            self.path,
            index_type,
            index.ntotal,
            report["build_seconds"],
        )
        self.checkpoint()

    @_operation
    def _build_index(
        self, index_type: str, recall_target: float | None = None, queries: np.ndarray | None = None
    ) -> tuple[VectorIndex, Stamp, dict]:
        """An index of ``index_type`` over every vector in SQLite, read in one snapshot; with its stamp and a report.

        Types that need training are trained on a random sample of the stored vectors. With ``recall_target``
        the search parameters are tuned (:func:`storage.vector_index.tune`) against exact top-10 lists that are
        accumulated while the vectors stream in. The tuning queries are ``queries`` when given (real queries:
        the best proxy), else up to ``TUNING_QUERIES`` stored passages whose whole document is held out of their
        results: a passage's overlapping neighbours from its own document are near-copies that any index finds,
        which would flatter it. Without a target the manifest's recorded parameters are kept.
        """
        started = time.perf_counter()
        faiss = import_faiss()
        rng = np.random.default_rng(0)
        same_type = index_type == self.manifest.index_type
        params = dict(self.manifest.index_params.get("search", {})) if same_type else {}
        db = self._db
        with db.atomic():  # one read snapshot for rows and stamp
            max_id, max_seq = self._high_water_marks()
            ids = np.fromiter(
                (r[0] for r in db.execute("SELECT id FROM passages WHERE id <= ? ORDER BY id", [max_id])), "int64"
            )
            probe = faiss.index_factory(self.dim, index_type, faiss.METRIC_INNER_PRODUCT)
            training = None
            if not probe.is_trained:
                ivf = faiss.try_extract_index_ivf(probe)
                wanted = TRAIN_POINTS_PER_LIST * ivf.nlist if ivf is not None else 65_536
                training = self._vectors_by_id(np.sort(rng.choice(ids, min(len(ids), wanted), replace=False)))
            index = VectorIndex.create(index_type, self.dim, training, params, use_gpu=self._use_gpu)
            tuning = recall_target is not None and index_family(index_type) != "flat"
            held_out: dict[str, int] = {}  # document id -> tuning query number
            if tuning and queries is None:
                query_ids = np.sort(
                    rng.choice(ids, min(TUNING_QUERIES, max(MIN_TUNING_QUERIES, len(ids) // 10), len(ids)), False)
                )
                queries = self._vectors_by_id(query_ids)
                query_docs = self._document_ids(query_ids)
                held_out = {doc: n for n, doc in enumerate(query_docs)}
                query_codes = np.array([held_out[d] for d in query_docs])
                excluded: list[list[int]] = [[] for _ in query_docs]
            if tuning:
                exact = faiss.ResultHeap(len(queries), TUNING_K, keep_max=True)
            last = 0
            while True:
                rows = db.execute(
                    "SELECT id, vector, document_id FROM passages WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                    [last, max_id, _READ_CHUNK],
                ).fetchall()
                if not rows:
                    break
                vectors, chunk_ids = self._vectors([r[1] for r in rows]), np.array([r[0] for r in rows])
                index.add(vectors, chunk_ids)
                if tuning:
                    scores = queries @ vectors.T
                    if held_out:
                        codes = np.array([held_out.get(r[2], -1) for r in rows])
                        same = query_codes[:, None] == codes[None, :]
                        scores[same] = -np.inf
                        for query, column in zip(*np.nonzero(same)):
                            excluded[query].append(int(chunk_ids[column]))
                    best, found = top_k(scores, chunk_ids, TUNING_K)
                    if best.shape[1] < TUNING_K:  # a last chunk shorter than k
                        pad = TUNING_K - best.shape[1]
                        best = np.pad(best, ((0, 0), (0, pad)), constant_values=-np.inf)
                        found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
                    exact.add_result(np.ascontiguousarray(best, "float32"), np.ascontiguousarray(found, "int64"))
                last = rows[-1][0]
        report: dict = {"search": params}
        if tuning:
            exact.finalize()
            blocked = [np.array(e, dtype="int64") for e in excluded] if held_out else None
            search, recall = tune(index, queries, exact.I, recall_target, blocked)
            report = {
                "search": search,
                "recall_at_10": round(recall, 4),
                "recall_target": recall_target,
                "tuned_on": "held-out documents" if held_out else "given queries",
                "tuning_queries": len(queries),
            }
        elif index_family(index_type) == "flat":
            report = {"search": {}, "recall_at_10": 1.0}
        report.update(
            vectors=index.ntotal,
            build_seconds=round(time.perf_counter() - started, 2),
            built_at=_now(),
        )
        return index, index.stamp(max_id, max_seq), report

    @_operation
    def _document_ids(self, ids: np.ndarray) -> list[str]:
        """The document id of each of passages ``ids``, in that order."""
        found: dict[int, str] = {}
        id_list = [int(i) for i in ids]
        for i in range(0, len(id_list), _SQL_CHUNK):
            chunk = id_list[i : i + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT id, document_id FROM passages WHERE id IN ({marks})"
            found.update(self._db.execute(sql, chunk).fetchall())
        return [found[i] for i in id_list]

    @_operation
    def _vectors_by_id(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of passages ``ids``, in that order (every id must exist)."""
        found: dict[int, bytes] = {}
        id_list = [int(i) for i in ids]
        for i in range(0, len(id_list), _SQL_CHUNK):
            chunk = id_list[i : i + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT id, vector FROM passages WHERE id IN ({marks})", chunk).fetchall())
        return self._vectors([found[i] for i in id_list]) if id_list else np.empty((0, self.dim), "float32")

    @_operation
    def _high_water_marks(self) -> tuple[int, int]:
        seqs = dict(self._db.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
        return int(seqs.get("passages", 0)), int(seqs.get("deletions", 0))

    @_operation
    def _replay(self) -> None:
        """Bring the in-memory index up to SQLite: newer deletions, then newer passages.

        Idempotent and keyed on the stamp, so a writer mirroring its own commit and a reader catching up with
        another process's commits can never apply the same change twice.
        """
        with self._apply_lock:
            db = self._db
            with db.atomic():
                max_id, max_seq = self._high_water_marks()
                if (max_id, max_seq) == (self._stamp.max_passage_id, self._stamp.deletion_seq):
                    return
                deleted = [
                    r[0]
                    for r in db.execute(
                        "SELECT passage_id FROM deletions WHERE seq > ? AND seq <= ?",
                        [self._stamp.deletion_seq, max_seq],
                    )
                ]
                rows = db.execute(
                    "SELECT id, vector FROM passages WHERE id > ? AND id <= ? ORDER BY id",
                    [self._stamp.max_passage_id, max_id],
                ).fetchall()
            with self._view.write():
                self._index.remove(deleted)
                if rows:
                    self._index.add(self._vectors([r[1] for r in rows]), np.array([r[0] for r in rows]))
                self._stamp = self._index.stamp(max_id, max_seq)

    def checkpoint(self) -> bool:
        """Write the FAISS index to disk, stamped with what it contains; whether it was written.

        Under the writer lock, so two processes never interleave the two files; skipped when another process
        is writing, and given up with a warning when the disk refuses it (out of space, read-only, an I/O error):
        the checkpoint only saves replay time, SQLite already holds everything, and a later one writes it.
        """
        try:
            with self._writer.hold(wait=0):
                self._follow_index_change()
                with self._apply_lock:
                    self._stamp = self._index.save(self.path, self._stamp)
        except CollectionBusyError:
            log.debug("checkpoint of %s skipped: another process is writing it", self.path)
            return False
        except (OSError, sqlite3.Error) as exc:
            error = storage_error(exc, self.path.parent)
            if error is None:
                raise
            log.warning(
                "index checkpoint of %s not written (SQLite holds every vector; a later checkpoint writes it): %s",
                self.path,
                error,
            )
            return False
        return True

    @_operation
    def _follow_index_change(self) -> None:
        """Adopt the index another process's ``optimize`` installed: its manifest row no longer matches ours.

        Called under the writer lock, so this process never checkpoints its old index over the new file.
        """
        row = next(self._db["manifest"].rows)
        index_type, params = row["index_type"], _json_dict(row.get("index_params"))
        if (index_type, params) == (self.manifest.index_type, self.manifest.index_params):
            return
        log.info("collection %s was re-indexed as %s by another process; loading it", self.name, index_type)
        self.manifest = replace(self.manifest, index_type=index_type, index_params=params)
        self._load_index()

    def checkpoint_to(self, directory: Path) -> None:
        """Write the index and its stamp into another directory (a snapshot being taken)."""
        with self._apply_lock:
            self._index.save(Path(directory), self._stamp)

    # -- SQLite plumbing -------------------------------------------------------------------------------------

    @property
    def _db(self) -> sqlite_utils.Database:
        """The database of the operation this thread is running (in an ``@_operation`` method or ``connection()``)."""
        borrowed = self._borrowed.get(threading.get_ident())
        if borrowed is None:
            raise RuntimeError("Collection._db outside an operation: use 'with collection.connection() as db'")
        return borrowed[0]

    @contextmanager
    def connection(self) -> Iterator[sqlite_utils.Database]:
        """The SQLite database for one operation of the calling thread (every ``@_operation`` method; a snapshot's
        backup): nested operations of one thread share it, and so its transaction; other threads get others.

        Never waits: an idle connection is reused or a new one opened; at the end it goes back to the idle ones, or
        is closed where ``idle_connections`` are idle already. So the open connections are the idle ones plus the
        operations running at that moment, not one per thread that ever read the collection (a server's thread
        pools times its shards ran out of file descriptors).

        >>> with collection.connection() as db:
        ...     db.execute("SELECT count(*) FROM documents").fetchone()
        (500,)
        """
        thread = threading.get_ident()
        with self._connections_lock:
            borrowed = self._borrowed.get(thread)
            if borrowed is None:
                if self._closed:
                    raise NotFoundError(f"collection {self.path.name} was closed or deleted")
                idle = self._idle.pop() if self._idle else None
                if idle is not None and idle.read_only and self.writable:
                    idle.conn.close()  # writable again: a read-only connection would miss other writers' WAL
                    idle = None
                borrowed = self._borrowed[thread] = [idle, 0]
            borrowed[1] += 1
        try:
            if borrowed[0] is None:
                borrowed[0] = self._connect()
            yield borrowed[0]
        finally:
            db = None
            with self._connections_lock:
                borrowed[1] -= 1
                if borrowed[1] == 0:
                    del self._borrowed[thread]  # the thread it was borrowed by, wherever a generator is closed
                    db = borrowed[0]
                    reusable = db is not None and not self._closed and not db.conn.in_transaction
                    if reusable and len(self._idle) < self._idle_connections:
                        self._idle.append(db)
                        db = None
            if db is not None:
                db.conn.close()

    def _connect(self) -> sqlite_utils.Database:
        read_only = not self.writable
        if read_only:
            conn = self._connect_read_only()
        else:
            # mode=rw: a database file removed underneath is an error, not a new empty database
            uri = (self.path / DB_FILE).absolute().as_uri() + "?mode=rw"
            conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        db = sqlite_utils.Database(conn)
        db.read_only = read_only  # a connection of a read-only folder is not reused once it is writable
        return db

    def _connect_read_only(self) -> sqlite3.Connection:
        """A connection to the database of a folder this process cannot write: through its WAL where one is
        left, else as an immutable file (SQLite cannot open a WAL database read-only without its -wal and -shm
        files, which a clean shutdown removes, and nothing can change it while nothing can write the folder)."""
        db_file = (self.path / DB_FILE).absolute()
        with_wal = all(Path(f"{db_file}{suffix}").exists() for suffix in ("-wal", "-shm"))
        uri = db_file.as_uri() + ("?mode=ro" if with_wal else "?immutable=1")
        return sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)

    def check_files(self) -> None:
        """Refuse (StorageUnavailableError) when the database file opened was removed or replaced since: a write
        would land in a file that is no longer in the data folder."""
        if self._db_identity is None or _identity(self.path / DB_FILE) == self._db_identity:
            return
        what = "removed" if not (self.path / DB_FILE).exists() else "replaced"
        raise StorageUnavailableError(
            f"{self.path / DB_FILE} was {what} while collection {self.name} was open: writes are refused so that none "
            "lands in a file that is no longer in the data folder; restart the server to serve what is there now"
        )

    @property
    def writable(self) -> bool:
        """Whether this process can write the collection's folder and database (False: a read-only data folder,
        whose searches are answered and writes refused)."""
        return writable(self.path, [self.path / DB_FILE])

    def retire(self) -> None:
        """Refuse new reads and writes; requests already running finish on their open connections."""
        self._closed = True

    def close(self) -> None:
        """Close the idle connections; those of operations still running close as each ends."""
        with self._connections_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for db in idle:
            db.conn.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def writing(self, wait: float = 60.0) -> Iterator[None]:
        """Hold the collection's writer lock across several writes (an ingest run), waiting up to ``wait`` s.

        Other processes' writers wait or fail with a message naming the holder; searches are not blocked. A folder
        this process cannot write refuses it (StorageUnavailableError: the data folder is read-only).
        """
        self.check_files()
        if not self.writable:
            raise read_only_error(self.path)
        with self._writer.hold(wait):
            self._follow_index_change()
            self._replay()
            yield

    def _vectors(self, blobs: Sequence[bytes]) -> np.ndarray:
        return np.frombuffer(b"".join(blobs), dtype="float32").reshape(len(blobs), self.dim)

    # -- reading ---------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def index_size(self) -> int:
        return self._index.ntotal

    @property
    def on_gpu(self) -> bool:
        return self._index.on_gpu

    @_operation
    def count_documents(self) -> int:
        return self._db["documents"].count

    @_operation
    def count_passages(self) -> int:
        return self._db["passages"].count

    def content_hashes(self, ids: Sequence[str]) -> dict[str, str]:
        """Stored content hash of each of ``ids`` that exists."""
        return {doc_id: state[0] for doc_id, state in self.document_states(ids).items()}

    @_operation
    def document_states(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``{id: (content hash, metadata JSON)}`` of each of ``ids`` that exists: what decides re-ingest work."""
        out: dict[str, tuple[str, str]] = {}
        for i in range(0, len(ids), _SQL_CHUNK):
            chunk = list(ids[i : i + _SQL_CHUNK])
            marks = ",".join("?" * len(chunk))
            for doc_id, digest, metadata in self._db.execute(
                f"SELECT id, content_hash, metadata FROM documents WHERE id IN ({marks})", chunk
            ):
                out[doc_id] = (digest, metadata)
        return out

    @_operation
    def all_document_states(self) -> dict[str, tuple[str, str]]:
        """``document_states`` of every stored document (what a distributed ingest classifies against)."""
        return {r[0]: (r[1], r[2]) for r in self._db.execute("SELECT id, content_hash, metadata FROM documents")}

    @staticmethod
    def is_unchanged(doc: Document, state: tuple[str, str] | None) -> tuple[bool, bool]:
        """(content unchanged, metadata unchanged) of ``doc`` against its stored state."""
        if state is None:
            return False, False
        return state[0] == content_hash(doc.title, doc.text), state[1] == metadata_to_json(doc.id, doc.metadata)

    @_operation
    def get(self, document_id: str) -> tuple[Document, list[Passage]]:
        """A document and its passages, in order."""
        db = self._db
        with db.atomic():  # the document and its passages from one snapshot
            rows = list(db["documents"].rows_where("id = ?", [document_id]))
            if not rows:
                raise NotFoundError(f"no document with id {document_id!r} in collection {self.name}")
            row = rows[0]
            passages = [
                Passage(document_id, r["ordinal"], r["text"], r["start"], r["end"])
                for r in db["passages"].rows_where(
                    "document_id = ?", [document_id], order_by="ordinal", select='ordinal, text, start, "end"'
                )
            ]
        return Document(row["id"], row["title"], row["text"], stored_metadata(row["metadata"])), passages

    @_operation
    def _migrate(self) -> None:
        """Bring an older collection up to SCHEMA_VERSION (v1 -> v2: build the FTS5 index from its passages)."""
        if self.manifest.schema_version >= SCHEMA_VERSION:
            return
        with self._writer.hold():  # no replay: the index is not loaded yet
            db = self._db
            current = db.execute("SELECT schema_version FROM manifest").fetchone()[0]
            if current >= SCHEMA_VERSION:  # another process migrated it while this one waited
                self.manifest = Manifest(**{**asdict(self.manifest), "schema_version": current})
                return
            with db.atomic():
                for statement in FTS_SCHEMA:
                    db.execute(statement)
                db.execute(
                    """INSERT INTO passages_fts(rowid, title, text)
                       SELECT p.id, d.title, p.text FROM passages p JOIN documents d ON d.id = p.document_id"""
                )
                db.execute("UPDATE manifest SET schema_version = ?", [SCHEMA_VERSION])
        log.info("migrated %s to schema %d (lexical index built)", self.path, SCHEMA_VERSION)
        self.manifest = Manifest(**{**asdict(self.manifest), "schema_version": SCHEMA_VERSION})

    @_operation
    def indexed_fields(self) -> frozenset[str]:
        """Metadata fields with an index (``index_field``); filters on them use it."""
        if not self._db["indexed_fields"].exists():
            return frozenset()
        return frozenset(r[0] for r in self._db.execute("SELECT field FROM indexed_fields"))

    @_operation
    def index_field(self, field_name: str) -> int:
        """Index a metadata field so filters on it need not scan every document; returns the rows indexed.

        The index is kept in step with every write by SQLite triggers, whichever process writes.
        """
        if not KEY.fullmatch(field_name):
            raise InvalidInputError(f"invalid metadata field name {field_name!r}: use letters, digits, '_' and '-'")
        with self.writing():
            db = self._db
            with db.atomic():
                for statement in METADATA_INDEX_SCHEMA:
                    db.execute(statement)
                if db.execute("SELECT 1 FROM indexed_fields WHERE field = ?", [field_name]).fetchone():
                    return 0
                db.execute("INSERT INTO indexed_fields (field) VALUES (?)", [field_name])
                path = f'$."{field_name}"'
                cursor = db.execute(
                    """INSERT INTO metadata_index (field, value, kind, from_list, document_id)
                       SELECT ?, j.value, j.type, json_type(d.metadata, ?) = 'array', d.id
                       FROM documents d, json_each(d.metadata, ?) j
                       WHERE json_type(d.metadata, ?) != 'object' AND j.type NOT IN ('object', 'array', 'null')""",
                    [field_name, path, path, path],
                )
                return cursor.rowcount

    @_operation
    def _allowed_ids(self, where: dict) -> np.ndarray:
        """Passage ids whose document matches the metadata filter ``where`` (parameterised SQL)."""
        sql, params = compile_filter(where, self.indexed_fields())
        rows = self._db.execute(
            f"SELECT p.id FROM passages p JOIN documents ON documents.id = p.document_id WHERE {sql}", params
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype="int64", count=len(rows))

    @_operation
    def search_lexical(self, query: str, k: int = 10, where: dict | None = None) -> list[Hit]:
        """Top-k passages by BM25 (FTS5) over title and text; any query word may match. Score: -bm25."""
        words = TOKEN.findall(query)
        if not words:
            return []
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in dict.fromkeys(words))
        sql = "SELECT rowid, -bm25(passages_fts) AS score FROM passages_fts WHERE passages_fts MATCH ?"
        params: list = [match]
        if where is not None:
            filter_sql, filter_params = compile_filter(where, self.indexed_fields())
            sql += (
                " AND rowid IN (SELECT p.id FROM passages p JOIN documents ON documents.id = p.document_id"
                f" WHERE {filter_sql})"
            )
            params += filter_params
        sql += " ORDER BY bm25(passages_fts) LIMIT ?"
        params.append(int(k))
        db = self._db
        with db.atomic():
            ranked = db.execute(sql, params).fetchall()
            rows = self._passage_rows({r[0] for r in ranked})
        return [self._hit(rows[pid], float(score)) for pid, score in ranked if pid in rows]

    @_operation
    def passage_vectors(self, document_id: str) -> np.ndarray:
        """The stored vectors of a document's passages (no re-encoding), in passage order."""
        blobs = [
            r[0]
            for r in self._db.execute(
                "SELECT vector FROM passages WHERE document_id = ? ORDER BY ordinal", [document_id]
            )
        ]
        if not blobs:
            raise NotFoundError(f"no document with id {document_id!r} in collection {self.name}")
        return self._vectors(blobs)

    @_operation
    def search(self, query_vectors: np.ndarray, k: int = 10, where: dict | None = None) -> list[list[Hit]]:
        """Top-k passages per query vector, best first, from one consistent state of the collection.

        The rows are read in the SQLite snapshot whose high-water marks equal the index's stamp, so a
        concurrent write is either wholly visible or not at all.
        """
        query_vectors = self._check_vectors(np.atleast_2d(query_vectors), "query vectors")
        for _ in range(_READ_ATTEMPTS):
            db = self._db
            with db.atomic():
                marks = self._high_water_marks()
                allowed = self._allowed_ids(where) if where is not None else None
                with self._view.read():
                    current = marks == (self._stamp.max_passage_id, self._stamp.deletion_seq)
                    approximate = not self._index.exact
                    exact_subset = allowed is not None and 0 < len(allowed) <= EXACT_FILTER_MAX and approximate
                    searchable = self._index.ntotal if allowed is None else len(allowed)
                    if current and not exact_subset:
                        scores, ids = self._index.search(query_vectors, k, allowed)
                if current:
                    if exact_subset:  # same snapshot as the filter: exact over the matches' stored vectors
                        scores, ids = top_k(query_vectors @ self._vectors_by_id(allowed).T, allowed, k)
                    elif approximate:
                        scores, ids = self._complete_short(query_vectors, k, allowed, searchable, marks[0], scores, ids)
                    rows = self._passage_rows({int(i) for i in ids.ravel() if i >= 0})
                    return [
                        [self._hit(rows[int(i)], float(s)) for s, i in zip(qs, qi) if int(i) in rows]
                        for qs, qi in zip(scores, ids)
                    ]
            self._replay()
        raise CollectionBusyError(f"collection {self.name} changed on every read attempt; retry the search")

    def _complete_short(self, queries, k, allowed, searchable, max_id, scores, ids) -> tuple[np.ndarray, np.ndarray]:
        """Answer exactly, from the stored vectors of the same snapshot, the queries an approximate index found fewer
        than min(k, searchable) hits for (an index trained for another size, a shrunk collection, a narrow filter):
        a search never returns fewer hits than exist."""
        short = (ids >= 0).sum(axis=1) < min(k, searchable)
        if not short.any():
            return scores, ids
        blocks = self._stored_vectors(max_id, allowed)
        exact_scores, exact_ids = exact_search(queries[short], blocks, min(k, searchable))
        width = max(ids.shape[1], exact_ids.shape[1])
        scores = np.pad(scores, ((0, 0), (0, width - scores.shape[1])), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])), constant_values=-1)
        scores[short, : exact_scores.shape[1]], ids[short, : exact_ids.shape[1]] = exact_scores, exact_ids
        if self.exact_fallback_searches == 0:
            log.warning(
                "%s: the %s index found fewer than k of the %d passages it could; answered exactly (%s)",
                self.name,
                self.manifest.index_type,
                searchable,
                self.optimize_advice() or "optimize retrains it",
            )
        self.exact_fallback_searches += int(short.sum())
        return scores, ids

    def _stored_vectors(
        self, max_id: int, allowed: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(vectors, passage ids) blocks of the stored vectors up to ``max_id``, of ``allowed`` ids only when given."""
        last = 0
        with self.connection() as db:
            while True:
                rows = db.execute(
                    "SELECT id, vector FROM passages WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                    [last, max_id, _READ_CHUNK],
                ).fetchall()
                if not rows:
                    return
                ids = np.array([r[0] for r in rows], dtype="int64")
                keep = np.isin(ids, allowed) if allowed is not None else np.ones(len(ids), bool)
                yield self._vectors([r[1] for r, kept in zip(rows, keep) if kept]), ids[keep]
                last = rows[-1][0]

    @_operation
    def _passage_rows(self, ids: set[int]) -> dict[int, dict]:
        rows: dict[int, dict] = {}
        id_list = sorted(ids)
        for i in range(0, len(id_list), _SQL_CHUNK):
            chunk = id_list[i : i + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for row in self._db.query(
                f"""SELECT p.id, p.document_id, p.ordinal, p.text, p.start, p."end", d.title, d.metadata
                    FROM passages p JOIN documents d ON d.id = p.document_id WHERE p.id IN ({marks})""",
                chunk,
            ):
                rows[row["id"]] = row
        return rows

    @staticmethod
    def _hit(row: dict, score: float) -> Hit:
        return Hit(
            passage_id=row["id"],
            score=score,
            document_id=row["document_id"],
            ordinal=row["ordinal"],
            text=row["text"],
            start=row["start"],
            end=row["end"],
            title=row["title"],
            metadata=stored_metadata(row["metadata"]),
        )

    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ModelMismatchError(
                f"{what} have shape {vectors.shape}, but collection {self.name} holds {self.dim}-dim vectors "
                f"({self.manifest.describe()})"
            )
        if not np.isfinite(vectors).all():
            raise InvalidInputError(f"{what} contain NaN or infinite values")
        return np.ascontiguousarray(vectors, dtype="float32")

    # -- writing ---------------------------------------------------------------------------------------------

    @_operation
    def write(self, documents: Sequence[Document], passages: Sequence[Passage], vectors: np.ndarray) -> WriteResult:
        """Upsert ``documents`` in one transaction.

        A document with passages in ``passages`` gets exactly those (its old ones are removed); a document
        with none must already exist with the same title and text, and only its metadata is updated.
        ``vectors[i]`` is the vector of ``passages[i]``. Either everything is written or nothing is.
        """
        ids = [d.id for d in documents]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidInputError(f"document ids must be unique within one write; repeated: {dupes[:5]}")
        vectors = np.asarray(vectors, dtype="float32").reshape(len(passages), -1) if len(passages) else vectors
        if len(passages):
            vectors = self._check_vectors(vectors, "passage vectors")
        with_passages = {p.document_id for p in passages}
        if unknown := with_passages - set(ids):
            raise InvalidInputError(f"passages refer to documents not in this write: {sorted(unknown)[:5]}")
        metadata_json = {doc.id: metadata_to_json(doc.id, doc.metadata) for doc in documents}
        now = _now()
        with self.writing():
            db = self._db
            stored = self.content_hashes(ids)
            for doc in documents:
                if doc.id not in with_passages and stored.get(doc.id) != content_hash(doc.title, doc.text):
                    raise InvalidInputError(f"document {doc.id!r} has new content but no passages to index")
            removed: list[int] = []
            new_ids: list[int] = []
            with db.atomic():
                replaced = [i for i in ids if i in with_passages and i in stored]
                for i in range(0, len(replaced), _SQL_CHUNK):
                    chunk = replaced[i : i + _SQL_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    removed += [
                        r[0] for r in db.execute(f"SELECT id FROM passages WHERE document_id IN ({marks})", chunk)
                    ]
                    db.execute(f"DELETE FROM passages WHERE document_id IN ({marks})", chunk)
                db.conn.executemany("INSERT INTO deletions (passage_id) VALUES (?)", [(p,) for p in removed])
                db.conn.executemany(
                    """INSERT INTO documents (id, title, text, metadata, content_hash, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(id) DO UPDATE SET title = excluded.title, text = excluded.text,
                         metadata = excluded.metadata, content_hash = excluded.content_hash,
                         updated_at = excluded.updated_at""",
                    [
                        (d.id, d.title, d.text, metadata_json[d.id], content_hash(d.title, d.text), now, now)
                        for d in documents
                    ],
                )
                for passage, vector in zip(passages, vectors):
                    cursor = db.conn.execute(
                        'INSERT INTO passages (document_id, ordinal, text, start, "end", vector) '
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            passage.document_id,
                            passage.ordinal,
                            passage.text,
                            passage.start,
                            passage.end,
                            vector.tobytes(),
                        ),
                    )
                    new_ids.append(cursor.lastrowid)
            self._replay()
        return WriteResult(len(documents), len(new_ids), len(removed))

    @_operation
    def delete(self, document_ids: Sequence[str] = (), where: dict | None = None) -> int:
        """Delete documents by id and/or by metadata filter (see ``storage.filters``) in one transaction.

        Returns how many documents existed and were deleted.
        """
        document_ids = list(dict.fromkeys(document_ids))
        condition = compile_filter(where, self.indexed_fields()) if where is not None else None
        with self.writing():
            db = self._db
            with db.atomic():
                existing = list(self.content_hashes(document_ids))
                if condition is not None:
                    sql, params = condition
                    matched = [r[0] for r in db.execute(f"SELECT id FROM documents WHERE {sql}", params)]
                    existing = list(dict.fromkeys(existing + matched))
                removed: list[int] = []
                for i in range(0, len(existing), _SQL_CHUNK):
                    chunk = existing[i : i + _SQL_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    removed += [
                        r[0] for r in db.execute(f"SELECT id FROM passages WHERE document_id IN ({marks})", chunk)
                    ]
                    db.execute(f"DELETE FROM passages WHERE document_id IN ({marks})", chunk)
                    db.execute(f"DELETE FROM documents WHERE id IN ({marks})", chunk)
                db.conn.executemany("INSERT INTO deletions (passage_id) VALUES (?)", [(p,) for p in removed])
            self._replay()
        return len(existing)

    def iter_documents(self, batch: int = 512) -> Iterator[tuple[list[Document], list[Passage], np.ndarray]]:
        """Every document with its passages and stored vectors, ``batch`` documents at a time, from one snapshot."""
        with self.connection() as db, db.atomic():
            last = ""
            while True:
                rows = db.execute(
                    "SELECT id, title, text, metadata FROM documents WHERE id > ? ORDER BY id LIMIT ?", [last, batch]
                ).fetchall()
                if not rows:
                    return
                documents = [Document(r[0], r[1], r[2], json.loads(r[3])) for r in rows]
                marks = ",".join("?" * len(rows))
                stored = db.execute(
                    f'SELECT document_id, ordinal, text, start, "end", vector FROM passages '
                    f"WHERE document_id IN ({marks}) ORDER BY document_id, ordinal",
                    [r[0] for r in rows],
                ).fetchall()
                passages = [Passage(r[0], r[1], r[2], r[3], r[4]) for r in stored]
                vectors = self._vectors([r[5] for r in stored]) if stored else np.zeros((0, self.dim), "float32")
                yield documents, passages, vectors
                last = rows[-1][0]

    @_operation
    def verify(self) -> dict[str, list[int]]:
        """Where the vector index and the full-text index disagree with SQLite's passages, read in one snapshot: the
        passage ids each index lacks and those it holds beyond them (twice-held ids count as extra). All empty when
        the collection is consistent.

        >>> collection.verify()
        {'missing_from_vector_index': [], 'extra_in_vector_index': [], 'missing_from_text_index': [], ...}
        """
        for _ in range(_READ_ATTEMPTS):
            db = self._db
            with db.atomic():
                marks = self._high_water_marks()
                stored = np.fromiter((r[0] for r in db.execute("SELECT id FROM passages")), "int64")
                in_text = np.fromiter((r[0] for r in db.execute("SELECT rowid FROM passages_fts")), "int64")
                with self._view.read():
                    if marks == (self._stamp.max_passage_id, self._stamp.deletion_seq):
                        in_vectors = self._index.ids()
                        return {
                            **_disagreement(stored, in_vectors, "vector_index"),
                            **_disagreement(stored, in_text, "text_index"),
                        }
            self._replay()
        raise CollectionBusyError(f"collection {self.name} changed on every read attempt; retry the check")

    def health(self) -> dict:
        """Counts and placement, as shown by ``/health``."""
        return {
            "index_vectors": self.index_size,
            "passages": self.count_passages(),
            "documents": self.count_documents(),
            "index_on_gpu": self.on_gpu,
            "exact_fallback_searches": self.exact_fallback_searches,
        }

    @_operation
    def optimize(
        self,
        index: str | None = None,
        recall: float | None = None,
        wait: float = 60.0,
        queries: np.ndarray | None = None,
    ) -> dict:
        """Rebuild the vector index from SQLite as ``index`` and tune it to ``recall``@10 (default
        ``DEFAULT_RECALL``) against exact search.

        Tuning queries are ``queries`` (vectors of real queries, when there are some) or else held-out stored
        passages with their documents held out (see ``_build_index``).

        ``index`` is ``auto``, ``Flat``, ``HNSW32`` or an IVF factory string (see
        :func:`storage.vector_index.resolve_index_type`); None repeats the collection's last request (``auto``
        at first). Runs under the writer lock while searches go on against the old index; the new index file is
        written next to the old and renamed over it, then the manifest records type, search parameters and the
        measured recall (that commit is what makes it the collection's index), then searches switch to it.

        Too few passages to train and tune an approximate type (:func:`storage.vector_index.exact_fallback`) get an
        exact index, and the report's ``fallback`` says why; a ``recall`` given for an exact index is reported as
        not applying (``recall_note``), never silently dropped. ``requested`` is kept, so a later ``optimize`` of the
        grown collection builds it.

        >>> collection.optimize("HNSW32")["search"]
        {'efSearch': 24}
        """
        if recall is not None and not 0 < recall <= 1:
            raise InvalidInputError(f"recall target must be in (0, 1], not {recall}")
        if queries is not None:
            queries = self._check_vectors(np.atleast_2d(queries), "tuning queries")
        with self.writing(wait):
            requested = (index or self.manifest.index_params.get("requested") or AUTO).strip()
            passages = self.count_passages()
            index_type = resolve_index_type(requested, passages, self.dim)
            fallback = exact_fallback(index_type, passages, self.dim)
            if fallback:
                log.warning("optimizing %s: %s", self.name, fallback)
                index_type = INDEX_TYPE
            built, stamp, report = self._build_index(index_type, recall or DEFAULT_RECALL, queries)
            params = {"requested": requested, **report}
            if fallback:
                params["fallback"] = fallback
            if recall is not None and index_family(index_type) == "flat":
                params["recall_target"] = recall
                params["recall_note"] = f"recall target {recall} does not apply: {index_type} searches exactly"
                log.warning("optimizing %s: %s", self.name, params["recall_note"])
            with self._apply_lock:
                stamp = built.save(self.path, stamp)
                db = self._db
                with db.atomic():
                    if "index_params" not in db["manifest"].columns_dict:
                        db.execute("ALTER TABLE manifest ADD COLUMN index_params TEXT")
                    db.execute("UPDATE manifest SET index_type = ?, index_params = ?", [index_type, json.dumps(params)])
                with self._view.write():
                    self._index, self._stamp = built, stamp
                    self.manifest = replace(self.manifest, index_type=index_type, index_params=params)
                    self.exact_fallback_searches = 0
        log.info("optimized %s: %s, %s", self.name, index_type, params)
        return {"name": self.name, "index_type": index_type, **params}

    def optimize_advice(self) -> str | None:
        """Why ``optimize`` would help now (outgrown index, many tombstones), or None."""
        params = self.manifest.index_params
        passages = self.count_passages()
        wanted = resolve_index_type(params.get("requested") or AUTO, passages, self.dim)
        if exact_fallback(wanted, passages, self.dim):
            wanted = INDEX_TYPE
        current = self.manifest.index_type
        if index_family(wanted) != index_family(current):
            return f"{passages} passages: {params.get('requested') or AUTO} now means {wanted}, not {current}"
        if self._index.exact and index_family(current) != "flat":
            return f"{passages} passages are too few to train {current}: searching exactly until it is rebuilt"
        if index_family(current) == "ivf" and passages > 4 * max(1, params.get("vectors", passages)):
            return f"{passages} passages, over 4x the {params.get('vectors')} the lists were trained for"
        if self._index.tombstones > 0.2 * max(1, self.index_size):
            return f"{self._index.tombstones} deleted vectors still in the HNSW graph (excluded at search time)"
        if self.exact_fallback_searches:
            return f"{self.exact_fallback_searches} searches found fewer than k hits in {current}; answered exactly"
        return None

    def info(self) -> dict:
        """Manifest and counts, as shown by ``stella-search info``."""
        return {
            "name": self.name,
            "path": str(self.path),
            **asdict(self.manifest),
            "documents": self.count_documents(),
            "passages": self.count_passages(),
            "index_vectors": self.index_size,
            "index_tombstones": self._index.tombstones,
            "optimize_advised": self.optimize_advice(),
            "indexed_fields": sorted(self.indexed_fields()),
            "index_on_gpu": self.on_gpu,
            "exact_fallback_searches": self.exact_fallback_searches,
        }
