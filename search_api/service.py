"""The object behind the HTTP API: open collections, their encoders, and the operations on them.

Plain blocking methods (FastAPI runs them in its thread pool, never on the event loop). Encoders are shared
between collections built with the same model, head and prompt type, and each encodes one batch at a time.

>>> service = SearchService(settings)
>>> service.start()                       # loads encoders in a background thread
>>> service.search("default", "what is faiss", k=5).results[0].id
'doc-1'
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path

from indexer.encoder import Encoder, configure_search_threads, encoder_precision_key
from indexer.pipeline import encoder_for_collection, ingest_documents
from indexer.settings import Settings, snapshot_dir
from search_api import schemas
from search_api.batching import QueryBatcher
from search_api.retrieval import Result, Retriever, SearchOptions, check_k, check_query
from storage.collection import (
    Collection,
    Document,
    collection_dir,
    is_collection,
    list_collections,
    metadata_to_json,
)
from storage.errors import (
    ConflictError,
    InvalidInputError,
    ModelLoadingError,
    NotFoundError,
    PayloadTooLargeError,
)
from storage.sharding import ShardedCollection, create_collection, open_collection, refuse_sharded
from storage.snapshots import restore_snapshot, snapshot_name, take_snapshot

log = logging.getLogger(__name__)

WRITE_WAIT_S = 60.0
MODEL_PROFILES = ("stella-1.5b", "stella-400m", "minilm")
SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CHECKPOINT_AFTER_PASSAGES = 10_000  # FAISS file rewrite cadence for API writes; SQLite already holds every vector


class SearchService:
    def __init__(self, settings: Settings, observe_encode=None, observe_batch_size=None):
        self.settings = settings
        self.data_dir = settings.data_dir
        self._collections: dict[str, Collection] = {}
        self._deleting: set[str] = set()  # being removed: not re-opened from disk meanwhile
        self._encoders: dict[tuple, Encoder] = {}
        self._batchers: dict[int, QueryBatcher] = {}
        self._lock = threading.RLock()
        self._ready = threading.Event()
        self._load_error: Exception | None = None
        self._unsaved: dict[str, int] = {}
        self._observe_encode = observe_encode or (lambda seconds, texts: None)
        self._observe_batch_size = observe_batch_size or (lambda requests: None)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self, background: bool = True) -> None:
        """Open every collection under data_dir and load their encoders (in a thread unless told otherwise)."""
        configure_search_threads(self.settings)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name in list_collections(self.data_dir):
            self._collections[name] = open_collection(collection_dir(self.data_dir, name))
        if background:
            threading.Thread(target=self._load_all, name="encoder-loader", daemon=True).start()
        else:
            self._load_all()

    def _load_all(self) -> None:
        try:
            for collection in list(self._collections.values()):
                self._encoder_for(collection, wait=False)
            if not self._collections:
                self._default_encoder()
        except Exception as exc:  # surfaced through /health and 503s, never a crash of the server
            log.exception("loading the encoder failed")
            self._load_error = exc
        finally:
            self._ready.set()

    def close(self) -> None:
        with self._lock:
            for batcher in self._batchers.values():
                batcher.close()
            self._batchers.clear()
            for name, collection in self._collections.items():
                if self._unsaved.get(name):
                    collection.checkpoint()
                collection.close()
            self._collections.clear()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._load_error is None

    # -- encoders ----------------------------------------------------------------------------------------

    @staticmethod
    def _key(model: str, dim: int | None, prompt_type: str, max_length: int | None, precision: str) -> tuple:
        return (model, dim, prompt_type, max_length, encoder_precision_key(precision))

    def _default_encoder(self) -> Encoder:
        encoder = Encoder.load(self.settings.encoder.model, self.settings)
        key = self._key(
            encoder.profile.name, encoder.dim, encoder.prompt_type, encoder.max_seq_length, encoder.precision
        )
        with self._lock:
            return self._encoders.setdefault(key, encoder)

    def _encoder_for(self, collection: Collection, wait: bool = True) -> Encoder:
        if wait and not self._ready.is_set():
            raise ModelLoadingError("the model is still loading; retry in a few seconds")
        m = collection.manifest
        key = self._key(m.model, m.dim, m.prompt_type, m.max_length, m.precision)
        with self._lock:
            loaded = self._encoders.get(key)
        if loaded is None:
            encoder = encoder_for_collection(collection, self.settings)
            with self._lock:
                loaded = self._encoders.setdefault(key, encoder)
        return loaded

    # -- collections -------------------------------------------------------------------------------------

    def collection(self, name: str) -> Collection:
        """The served collection ``name``; one that another process (the CLI's ingest or restore) created under
        data_dir since the server started is opened and served from now on."""
        path = collection_dir(self.data_dir, name)  # a malformed name is a 400, not a 404
        with self._lock:
            collection = self._collections.get(name)
        if collection is None:
            collection = self._open_new(name, path)
        if collection is None:
            raise NotFoundError(f"no collection named {name!r}; GET /collections lists them")
        return collection

    def _open_new(self, name: str, path: Path) -> Collection | None:
        """Open a collection that appeared under data_dir after start, or None if there is none. Opening (loading
        its index) happens outside the service lock, so other requests go on; of two requests opening it at
        once, one's copy is served and the other's closed."""
        with self._lock:
            if name in self._deleting or not is_collection(path):
                return None
        opened = open_collection(path)
        with self._lock:
            served = self._collections.setdefault(name, opened) if name not in self._deleting else None
        if served is not opened:
            opened.close()
        else:
            log.info("serving collection %s, created since the server started", name)
        return served

    def collections(self) -> list[schemas.CollectionInfo]:
        for name in list_collections(self.data_dir):
            with self._lock:
                known = name in self._collections
            if not known:
                try:
                    self._open_new(name, collection_dir(self.data_dir, name))
                except Exception as exc:  # one unreadable collection does not hide the others
                    log.warning("not listing collection %s, which could not be opened: %s", name, exc)
        with self._lock:
            opened = list(self._collections.values())
        return [self._info(c) for c in opened]

    @staticmethod
    def _info(c: Collection) -> schemas.CollectionInfo:
        m = c.manifest
        return schemas.CollectionInfo(
            name=c.name,
            model=m.model,
            model_id=m.model_id,
            revision=m.revision,
            dim=m.dim,
            head=m.head,
            prompt_type=m.prompt_type,
            documents=c.count_documents(),
            passages=c.count_passages(),
            shards=len(c.shards) if isinstance(c, ShardedCollection) else 1,
        )

    def create_collection(self, request: schemas.CollectionCreate) -> schemas.CollectionInfo:
        path = collection_dir(self.data_dir, request.name)
        with self._lock:
            if request.name in self._collections or path.exists():
                raise ConflictError(f"collection {request.name!r} already exists")
        if request.model and request.model not in MODEL_PROFILES and not self.settings.server.allow_model_paths:
            raise InvalidInputError(
                f"model {request.model!r} is not a profile ({', '.join(MODEL_PROFILES)}); loading model folders "
                "over HTTP (with trust_remote_code) needs server.allow_model_paths: true"
            )
        settings = self.settings.model_copy(deep=True)
        settings.encoder.prompt_type = request.prompt_type
        encoder = Encoder.load(request.model or settings.encoder.model, settings, dim=request.dim)
        with self._lock:
            if request.name in self._collections:
                raise ConflictError(f"collection {request.name!r} already exists")
            collection = create_collection(path, encoder.manifest(), request.shards)
            self._collections[request.name] = collection
            m = collection.manifest
            self._encoders.setdefault(self._key(m.model, m.dim, m.prompt_type, m.max_length, m.precision), encoder)
        return self._info(collection)

    # -- snapshots ---------------------------------------------------------------------------------------

    def take_snapshot(self, name: str) -> schemas.SnapshotInfo:
        collection = self.collection(name)
        refuse_sharded(collection.path, "snapshot")
        label = snapshot_name(name)
        info = take_snapshot(collection, snapshot_dir(self.settings) / label)
        return schemas.SnapshotInfo(
            snapshot=label,
            collection=name,
            created_at=info["created_at"],
            documents=info["documents"],
            passages=info["passages"],
        )

    def snapshots(self) -> list[schemas.SnapshotInfo]:
        root = snapshot_dir(self.settings)
        out = []
        for path in sorted(root.iterdir()) if root.is_dir() else []:
            if (path / "snapshot.json").exists():
                info = json.loads((path / "snapshot.json").read_text())
                out.append(
                    schemas.SnapshotInfo(
                        snapshot=path.name,
                        collection=info["collection"],
                        created_at=info["created_at"],
                        documents=info["documents"],
                        passages=info["passages"],
                    )
                )
        return out

    def restore(self, request: schemas.RestoreRequest) -> schemas.CollectionInfo:
        if not SNAPSHOT_NAME.match(request.snapshot):
            raise InvalidInputError(f"invalid snapshot name {request.snapshot!r}; GET /snapshots lists them")
        source = snapshot_dir(self.settings) / request.snapshot
        if not source.is_dir():
            raise NotFoundError(f"no snapshot named {request.snapshot!r}; GET /snapshots lists them")
        target = collection_dir(self.data_dir, request.collection)
        with self._lock:
            if request.collection in self._collections:
                raise ConflictError(
                    f"collection {request.collection!r} exists; restore into a new name (replacing a served "
                    "collection needs the CLI with the server stopped)"
                )
        restore_snapshot(source, target)  # slow (checksums, integrity check): not under the service lock
        collection = Collection.open(target)
        with self._lock:  # a request may have opened it on demand meanwhile: serve one copy
            served = self._collections.setdefault(request.collection, collection)
        if served is not collection:
            collection.close()
        return self._info(served)

    def delete_collection(self, name: str) -> None:
        collection = self.collection(name)
        with self._lock:
            if name in self._deleting or self._collections.get(name) is not collection:
                raise ConflictError(f"collection {name!r} is being deleted by another request")
            self._deleting.add(name)
        try:
            # the writer lock before unlisting: a 409 (another writer held it too long) leaves it served as it was
            with collection.writing(WRITE_WAIT_S):
                with self._lock:
                    del self._collections[name]
                    self._unsaved.pop(name, None)
                # requests already running finish on their open connections (unlinked files stay readable);
                # new ones get a 404
                collection.retire()
                shutil.rmtree(collection.path)
        finally:
            with self._lock:
                self._deleting.discard(name)

    # -- search ------------------------------------------------------------------------------------------

    def _options(self, query: str, options: schemas.SearchOptionsIn) -> SearchOptions:
        check_k(options.k, self.settings.server)
        fields = options.model_dump(include=set(SearchOptions.__dataclass_fields__) - {"query"})
        return SearchOptions(query=query, **fields)

    def _retriever(self, collection: Collection, mode: str) -> Retriever:
        if mode == "lexical":
            return Retriever(collection, None)
        encoder = self._encoder_for(collection)
        server = self.settings.server
        if not server.microbatch:
            return Retriever(collection, encoder, observe_encode=self._observe_encode)
        with self._lock:
            batcher = self._batchers.get(id(encoder))
            if batcher is None:
                batcher = QueryBatcher(
                    encoder, server.microbatch_max, server.microbatch_window_ms, observe=self._observe_batch
                )
                self._batchers[id(encoder)] = batcher
        return Retriever(collection, batcher)

    def _observe_batch(self, seconds: float, texts: int, requests: int) -> None:
        self._observe_encode(seconds, texts)
        self._observe_batch_size(requests)

    def search(self, name: str, request: schemas.SearchRequest) -> schemas.SearchResponse:
        batch = schemas.BatchSearchRequest(queries=[request.query], **request.model_dump(exclude={"query"}))
        return self.search_batch(name, batch).responses[0]

    def search_batch(self, name: str, request: schemas.BatchSearchRequest) -> schemas.BatchSearchResponse:
        if len(request.queries) > self.settings.server.max_batch_queries:
            raise InvalidInputError(
                f"{len(request.queries)} queries in one batch; the limit is {self.settings.server.max_batch_queries}"
            )
        for query in request.queries:
            check_query(query, self.settings.server)
        batch = [self._options(q, request) for q in request.queries]
        collection = self.collection(name)
        retriever = self._retriever(collection, request.mode)
        started = time.perf_counter()
        found = retriever.search_many(batch)
        took_ms = (time.perf_counter() - started) * 1000
        responses = [
            schemas.SearchResponse(results=[_hit(r) for r in results], took_ms=round(took_ms / len(batch), 3))
            for results in found
        ]
        return schemas.BatchSearchResponse(responses=responses, took_ms=round(took_ms, 3))

    def similar(self, name: str, request: schemas.SimilarRequest) -> schemas.SearchResponse:
        if (request.id is None) == (request.text is None):
            raise InvalidInputError("give exactly one of 'id' (a stored document) or 'text'")
        if request.text is not None:
            check_query(request.text, self.settings.server)
        collection = self.collection(name)
        retriever = Retriever(
            collection, self._encoder_for(collection) if request.text else None, observe_encode=self._observe_encode
        )
        options = self._options(request.text or "", request)
        started = time.perf_counter()
        results = retriever.similar(options, document_id=request.id)
        took_ms = (time.perf_counter() - started) * 1000
        return schemas.SearchResponse(results=[_hit(r) for r in results], took_ms=round(took_ms, 3))

    # -- documents ---------------------------------------------------------------------------------------

    def upsert(self, name: str, documents: list[schemas.DocumentIn]) -> schemas.UpsertResponse:
        limit = self.settings.server.max_documents_per_request
        if len(documents) > limit:
            raise PayloadTooLargeError(f"{len(documents)} documents in one request; the limit is {limit}")
        ids = [d.id for d in documents]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidInputError(f"document ids must be unique within a request; repeated: {repeated[:5]}")
        max_chars = self.settings.server.max_document_chars
        for doc in documents:
            if not doc.text.strip():
                raise InvalidInputError(f"document {doc.id!r} has empty text")
            metadata_to_json(doc.id, doc.metadata)
            if len(doc.text) > max_chars:
                raise PayloadTooLargeError(
                    f"document {doc.id!r} has {len(doc.text)} characters; the limit is {max_chars} "
                    "(server.max_document_chars): split it into several documents"
                )
        collection = self.collection(name)
        encoder = self._encoder_for(collection)
        started = time.perf_counter()
        # classify, encode and commit under the writer lock, so a concurrent upsert of the same ids cannot change
        # what "unchanged" meant between the two; searches are not blocked by it
        with collection.writing(WRITE_WAIT_S):
            report = ingest_documents(
                collection,
                encoder,
                [Document(d.id, d.title or None, d.text, d.metadata) for d in documents],
                self.settings,
                batch_documents=len(documents),
                checkpoint=False,
                quiet=True,
            )
        self._observe_encode(report.encode_seconds, report.passages_written)
        self._after_write(collection, report.passages_written + report.passages_removed)
        return schemas.UpsertResponse(
            documents=report.documents_seen,
            added=report.documents_added,
            replaced=report.documents_replaced,
            unchanged=report.documents_unchanged,
            metadata_updated=report.metadata_updated,
            passages_written=report.passages_written,
            passages_removed=report.passages_removed,
            took_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    def get(self, name: str, document_id: str) -> schemas.DocumentOut:
        document, passages = self.collection(name).get(document_id)
        return schemas.DocumentOut(
            id=document.id,
            title=document.title,
            text=document.text,
            metadata=document.metadata,
            passages=[schemas.PassageOut(ordinal=p.ordinal, text=p.text, start=p.start, end=p.end) for p in passages],
        )

    def delete(self, name: str, document_id: str) -> None:
        collection = self.collection(name)
        if collection.delete([document_id]) == 0:
            raise NotFoundError(f"no document with id {document_id!r} in collection {name}")
        self._after_write(collection, 1)

    def delete_many(self, name: str, request: schemas.DeleteRequest) -> schemas.DeleteResponse:
        if not request.ids and request.filter is None:
            raise InvalidInputError("name the documents to delete: 'ids', a metadata 'filter', or both")
        collection = self.collection(name)
        deleted = collection.delete(request.ids, where=request.filter)
        self._after_write(collection, deleted)
        return schemas.DeleteResponse(deleted=deleted)

    def _after_write(self, collection: Collection, changed: int) -> None:
        with self._lock:
            self._unsaved[collection.name] = self._unsaved.get(collection.name, 0) + changed
            due = self._unsaved[collection.name] >= CHECKPOINT_AFTER_PASSAGES
            if due:
                self._unsaved[collection.name] = 0
        if due:
            collection.checkpoint()

    # -- health ------------------------------------------------------------------------------------------

    def health(self) -> schemas.Health:
        import torch

        with self._lock:
            encoders = list(self._encoders.values())
            opened = dict(self._collections)
        device = encoders[0].device if encoders else self.settings.processing.device
        gpu = None
        if device.startswith("cuda") and torch.cuda.is_available():
            gpu = {
                "allocated_bytes": torch.cuda.memory_allocated(),
                "reserved_bytes": torch.cuda.memory_reserved(),
            }
        status = "ok" if self.ready else "unavailable" if self._load_error else "loading"
        return schemas.Health(
            status=status,
            model_loaded=bool(encoders) and self._ready.is_set(),
            models=sorted({f"{e.profile.name} ({e.head.label}, {e.prompt_type})" for e in encoders}),
            device=device,
            collections={n: _collection_health(c) for n, c in opened.items()},
            gpu_memory=gpu,
            error=str(self._load_error) if self._load_error else None,
        )


def _collection_health(c: Collection | ShardedCollection) -> dict:
    if isinstance(c, ShardedCollection):
        shards = c.shard_health()
        up = [s for s in shards if s["status"] == "ok"]
        return {
            "status": "ok" if len(up) == len(shards) else "degraded",
            "index_vectors": sum(s["index_vectors"] for s in up),
            "passages": sum(s["passages"] for s in up),
            "documents": sum(s["documents"] for s in up),
            "index_on_gpu": bool(up) and all(s["index_on_gpu"] for s in up),
            "shards": shards,
        }
    return c.health()


def _hit(result: Result) -> schemas.Hit:
    h = result.hit
    passages = None
    if len(result.passages) > 1:
        passages = [
            schemas.PassageHit(passage_id=p.passage_id, score=p.score, ordinal=p.ordinal, text=p.text)
            for p in result.passages
        ]
    return schemas.Hit(
        id=h.document_id,
        passage_id=h.passage_id,
        score=result.score,
        title=h.title,
        text=h.text,
        metadata=h.metadata,
        passages=passages,
    )
