"""Sharded collections: one collection split over N ordinary collection directories by a hash of document id.

A sharded collection is a directory holding ``shards.json`` and ``shard-000`` ... ``shard-{N-1}``, each an
ordinary collection (SQLite + FAISS checkpoint) that can be opened, snapshotted or served on its own, on any node.
A document lives wholly in the shard ``shard_of(id, N)`` names (blake2b of the id, stable across processes and
machines), so grouping by document, filters and deletes are exact per shard. Passage ids stay unique across
shards: shard i numbers its passages from ``i << 40`` (its SQLite AUTOINCREMENT starts there).

A search asks every shard for its top m and keeps the global top m of the union: for dense search that is
exactly the unsharded answer (each shard's search is exact; the global top m are within the shards' top m).
Lexical scores are BM25 with each shard's own term statistics, as in any sharded engine without a global
statistics pass; hybrid fusion runs on the merged lists.

>>> sharded = ShardedCollection.create(Path("data/docs"), manifest, shards=3)
>>> sharded.write(documents, passages, vectors)        # each document goes to its shard
>>> open_collection(Path("data/docs")).search(query_vectors, k=10)
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from storage.collection import (
    IDLE_CONNECTIONS,
    SHARDS_FILE,
    Collection,
    Document,
    Hit,
    Manifest,
    Passage,
    WriteResult,
    is_collection,
)
from storage.errors import CollectionExistsError, InvalidInputError, NotFoundError, StellaSearchError
from storage.vector_index import INDEX_TYPE

MAX_SHARDS = 256
PASSAGE_ID_BITS = 40  # shard i's passage ids start at i << 40: room for a trillion passages per shard
# Threads that run one sharded collection's shard calls, shared by all its concurrent requests: each holds one
# shard's SQLite connection at a time, so they bound the connections open beyond the idle ones.
FAN_OUT_THREADS = 32
# SQLite connections a sharded collection's shards keep open between operations, all together (at least 1 each)
SHARDED_IDLE_CONNECTIONS = 64


def idle_connections_per_shard(shards: int) -> int:
    """How many idle connections each of ``shards`` shards keeps.

    >>> idle_connections_per_shard(64), idle_connections_per_shard(4)
    (1, 4)
    """
    return max(1, min(IDLE_CONNECTIONS, SHARDED_IDLE_CONNECTIONS // shards))


def shard_of(document_id: str, shards: int) -> int:
    """The shard that holds ``document_id``: stable across processes, machines and Python versions.

    >>> shard_of("doc-1", 3)
    1
    """
    digest = hashlib.blake2b(document_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def shard_name(index: int) -> str:
    return f"shard-{index:03d}"


def is_sharded(path: Path | str) -> bool:
    return (Path(path) / SHARDS_FILE).exists()


def refuse_sharded(path: Path | str, operation: str) -> None:
    """A clear error for an operation that works on one shard at a time."""
    if is_sharded(path):
        layout = read_layout(path)
        raise InvalidInputError(
            f"{Path(path).name} is sharded ({layout['shards']} shards): {operation} each shard, an ordinary "
            f"collection: --data-dir {path} --collection {layout['directories'][0]} (and the others)"
        )


def read_layout(path: Path | str) -> dict:
    """``shards.json``: the shard count, the placement rule and the shard directory names."""
    return json.loads((Path(path) / SHARDS_FILE).read_text())


def open_collection(path: Path | str, use_gpu: bool | None = None) -> Collection | ShardedCollection:
    """Open whatever collection lives at ``path``: an ordinary one, or a sharded one."""
    if is_sharded(path):
        return ShardedCollection.open(path, use_gpu=use_gpu)
    return Collection.open(path, use_gpu=use_gpu)


def create_collection(
    path: Path | str, manifest: Manifest, shards: int = 1, use_gpu: bool | None = None
) -> Collection | ShardedCollection:
    """A new collection at ``path``: ordinary for one shard, sharded for more."""
    if shards == 1:
        return Collection.create(path, manifest, use_gpu=use_gpu)
    return ShardedCollection.create(path, manifest, shards, use_gpu=use_gpu)


def merge_ranked(lists: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The k best hits of several score-ordered lists (global top-k of per-shard top-k)."""
    return heapq.nlargest(k, (hit for ranked in lists for hit in ranked), key=lambda h: h.score)


def reshard(source: Collection | ShardedCollection, target: Path | str, shards: int) -> Collection | ShardedCollection:
    """Copy ``source`` (its documents, passages and stored vectors: nothing is re-encoded) into a new collection
    of ``shards`` shards at ``target``; the source is read under its writer lock, so the copy is of one state
    (writers wait meanwhile). The copy is built with exact indexes, then each shard is optimized to the index
    type the source asked for; a failed copy is removed.

    This is how a collection gains shards: build the new layout beside the old one, then serve it.
    """
    manifest = replace(source.manifest, index_type=INDEX_TYPE, index_params={})
    created = create_collection(target, manifest, shards)
    try:
        with source.writing(), created.writing():
            for documents, passages, vectors in source.iter_documents():
                created.write(documents, passages, vectors)
            for field_name in source.indexed_fields():
                created.index_field(field_name)
            created.checkpoint()
        requested = source.manifest.index_params.get("requested")
        if requested:
            created.optimize(requested)
    except BaseException:
        created.close()
        shutil.rmtree(target, ignore_errors=True)
        raise
    return created


class ShardedCollection:
    """N shards behind the interface of one :class:`Collection` (search, write, delete, get, counts).

    ``shards`` may be local :class:`Collection` objects or anything with the same methods (the Ray Serve
    deployment proxies in ``search_api.cluster``); fan-out runs the shards concurrently.
    """

    def __init__(self, path: Path, manifest: Manifest, shards: Sequence):
        self.path = Path(path)
        self.manifest = manifest
        self.shards = list(shards)
        # reads only: nothing run on the pool takes a writer lock, so a caller holding ``writing()`` never waits
        # on its own pool; shared by concurrent searches, each of which fans out to every shard
        self._pool = ThreadPoolExecutor(
            max_workers=min(FAN_OUT_THREADS, len(self.shards)), thread_name_prefix=f"{self.path.name}-shard"
        )

    # -- opening ---------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path | str, manifest: Manifest, shards: int, use_gpu: bool | None = None):
        """Create ``shards`` empty shard collections under ``path`` (staged, then renamed into place)."""
        if not 2 <= shards <= MAX_SHARDS:
            raise InvalidInputError(f"shards is {shards}; a sharded collection has 2 to {MAX_SHARDS} shards")
        path = Path(path)
        if is_collection(path):
            raise CollectionExistsError(f"a collection already exists at {path}; open it instead")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.creating-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            for i in range(shards):
                first_id = (i << PASSAGE_ID_BITS) + 1
                Collection.create(staging / shard_name(i), manifest, use_gpu=False, first_passage_id=first_id).close()
            layout = {
                "shards": shards,
                "placement": "blake2b-64(document id) mod shards",
                "directories": [shard_name(i) for i in range(shards)],
                "manifest": asdict(manifest),
            }
            (staging / SHARDS_FILE).write_text(json.dumps(layout, indent=2))
            os.rename(staging, path)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if is_sharded(path):
                raise CollectionExistsError(f"a collection already exists at {path}; open it instead") from exc
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls.open(path, use_gpu=use_gpu)

    @classmethod
    def open(cls, path: Path | str, use_gpu: bool | None = None) -> ShardedCollection:
        path = Path(path)
        if not is_sharded(path):
            raise NotFoundError(f"no sharded collection at {path} (no {SHARDS_FILE})")
        layout = read_layout(path)
        idle = idle_connections_per_shard(len(layout["directories"]))
        shards = []
        try:
            for directory in layout["directories"]:
                shards.append(Collection.open(path / directory, use_gpu=use_gpu, idle_connections=idle))
        except Exception:
            for shard in shards:
                shard.close()
            raise
        return cls(path, shards[0].manifest, shards)

    def require_compatible(self, manifest: Manifest) -> None:
        self.shards[0].require_compatible(manifest)

    # -- fan-out plumbing ------------------------------------------------------------------------------------

    def _each(self, call: Callable) -> list:
        """``call(shard)`` on every shard concurrently; results in shard order. Never for calls that take a
        shard's writer lock (those run in the caller's thread, which may already hold it)."""
        return list(self._pool.map(call, self.shards))

    def _by_shard(self, ids: Sequence[str]) -> dict[int, list[str]]:
        owners: dict[int, list[str]] = {}
        for doc_id in ids:
            owners.setdefault(shard_of(doc_id, len(self.shards)), []).append(doc_id)
        return owners

    def owner(self, document_id: str):
        return self.shards[shard_of(document_id, len(self.shards))]

    # -- reading ---------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def index_size(self) -> int:
        return sum(self._each(lambda s: s.index_size))

    @property
    def on_gpu(self) -> bool:
        return all(self._each(lambda s: s.on_gpu))

    def count_documents(self) -> int:
        return sum(self._each(lambda s: s.count_documents()))

    def count_passages(self) -> int:
        return sum(self._each(lambda s: s.count_passages()))

    def document_states(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        for shard, owned in self._by_shard(ids).items():
            out.update(self.shards[shard].document_states(owned))
        return out

    def all_document_states(self) -> dict[str, tuple[str, str]]:
        states: dict[str, tuple[str, str]] = {}
        for part in self._each(lambda s: s.all_document_states()):
            states.update(part)
        return states

    def content_hashes(self, ids: Sequence[str]) -> dict[str, str]:
        return {doc_id: state[0] for doc_id, state in self.document_states(ids).items()}

    def get(self, document_id: str) -> tuple[Document, list[Passage]]:
        return self.owner(document_id).get(document_id)

    def passage_vectors(self, document_id: str) -> np.ndarray:
        return self.owner(document_id).passage_vectors(document_id)

    def search(self, query_vectors: np.ndarray, k: int = 10, where: dict | None = None) -> list[list[Hit]]:
        """Per query, the global top-k: every shard's top-k (filter applied in the shard), merged by score."""
        per_shard = self._each(lambda s: s.search(query_vectors, k, where))
        return [merge_ranked([found[q] for found in per_shard], k) for q in range(len(np.atleast_2d(query_vectors)))]

    def search_lexical(self, query: str, k: int = 10, where: dict | None = None) -> list[Hit]:
        return merge_ranked(self._each(lambda s: s.search_lexical(query, k, where)), k)

    def iter_documents(self, batch: int = 512) -> Iterator[tuple[list[Document], list[Passage], np.ndarray]]:
        for shard in self.shards:
            yield from shard.iter_documents(batch)

    def indexed_fields(self) -> frozenset[str]:
        return self.shards[0].indexed_fields()

    def shard_health(self) -> list[dict]:
        """Each shard's counts with its directory name; a shard that does not answer says so instead."""

        def health(shard) -> dict:
            try:
                return {"status": "ok", **shard.health()}
            except StellaSearchError as exc:
                return {"status": "unavailable", "error": str(exc)}

        layout = [shard_name(i) for i in range(len(self.shards))]
        return [{"shard": name, **h} for name, h in zip(layout, self._each(health))]

    def shard_infos(self) -> list[dict]:
        return self._each(lambda s: s.info())

    def info(self) -> dict:
        shards = self.shard_infos()
        return {
            "name": self.name,
            "path": str(self.path),
            **asdict(self.manifest),
            "shards": len(shards),
            "placement": "blake2b-64(document id) mod shards",
            "documents": sum(s["documents"] for s in shards),
            "passages": sum(s["passages"] for s in shards),
            "index_vectors": sum(s["index_vectors"] for s in shards),
            "indexed_fields": sorted(self.indexed_fields()),
            "index_on_gpu": all(s["index_on_gpu"] for s in shards),
            "shard_details": [
                {
                    k: s.get(k)
                    for k in (
                        "path",
                        "documents",
                        "passages",
                        "index_vectors",
                        "index_type",
                        "index_params",
                        "index_tombstones",
                        "optimize_advised",
                        "index_on_gpu",
                    )
                }
                for s in shards
            ],
        }

    # -- writing ---------------------------------------------------------------------------------------------

    @contextmanager
    def writing(self, wait: float = 60.0) -> Iterator[None]:
        """Hold every shard's writer lock (in shard order, so two sharded writers cannot deadlock)."""
        with ExitStack() as stack:
            for shard in self.shards:
                stack.enter_context(shard.writing(wait))
            yield

    def write(self, documents: Sequence[Document], passages: Sequence[Passage], vectors: np.ndarray) -> WriteResult:
        """Each document with its passages and vectors to its own shard; each shard's part is one transaction."""
        ids = [d.id for d in documents]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidInputError(f"document ids must be unique within one write; repeated: {dupes[:5]}")
        n = len(self.shards)
        parts: dict[int, tuple[list[Document], list[Passage], list[int]]] = {}
        for doc in documents:
            parts.setdefault(shard_of(doc.id, n), ([], [], []))[0].append(doc)
        for row, passage in enumerate(passages):
            owner = shard_of(passage.document_id, n)
            if owner not in parts:
                raise InvalidInputError(f"passages refer to documents not in this write: {passage.document_id!r}")
            parts[owner][1].append(passage)
            parts[owner][2].append(row)
        vectors = np.asarray(vectors, dtype="float32")
        if len(vectors) != len(passages):
            raise InvalidInputError(f"{len(passages)} passages but {len(vectors)} vectors; give one vector per passage")
        total = WriteResult(0, 0, 0)
        for shard, (docs, shard_passages, rows) in sorted(parts.items()):
            result = self.shards[shard].write(docs, shard_passages, vectors[rows] if rows else vectors[:0])
            total = WriteResult(
                total.documents + result.documents,
                total.passages_added + result.passages_added,
                total.passages_removed + result.passages_removed,
            )
        return total

    def delete(self, document_ids: Sequence[str] = (), where: dict | None = None) -> int:
        """Delete by id (each id at its owner) and/or by filter (on every shard)."""
        if where is not None:
            owned = self._by_shard(document_ids)
            return sum(shard.delete(owned.get(i, []), where=where) for i, shard in enumerate(self.shards))
        return sum(self.shards[shard].delete(owned) for shard, owned in self._by_shard(document_ids).items())

    def index_field(self, field_name: str) -> int:
        return sum(shard.index_field(field_name) for shard in self.shards)

    def optimize(
        self,
        index: str | None = None,
        recall: float | None = None,
        wait: float = 60.0,
        queries: np.ndarray | None = None,
    ) -> dict:
        """``Collection.optimize`` on each shard in turn (one index build in memory at a time)."""
        reports = [shard.optimize(index, recall=recall, wait=wait, queries=queries) for shard in self.shards]
        return {"name": self.name, "shards": reports}

    def checkpoint(self) -> bool:
        # in this thread: it may hold every shard's writer lock already
        return all([shard.checkpoint() for shard in self.shards])

    def retire(self) -> None:
        self._each(lambda s: s.retire())

    def close(self) -> None:
        self._each(lambda s: s.close())
        self._pool.shutdown(wait=False)

    def __enter__(self) -> ShardedCollection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
