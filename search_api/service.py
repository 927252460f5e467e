"""The object behind the HTTP API: open collections, their encoders, and the operations on them.

Plain blocking methods (FastAPI runs them in its thread pool, never on the event loop). Encoders are shared
between collections built with the same model, head and prompt type, and each encodes one batch at a time.

Start-up, and what ``readiness()`` (``GET /ready``) reports: a background thread loads, for each served
collection, the encoder its searches need: the cached fp32 ONNX graph with the model's tokenizer where it
exists (:class:`OnnxQueryEncoder`, about a second, no torch), else the full encoder. The server is ready when
every served collection has it: searches are answered at once, and writes are accepted. Writes need the full
encoder (passages, int8 where the collection is int8), which the same thread loads next, in the background;
a write that arrives before it has loaded waits for it, and once loaded it answers searches as well (one
fp32 graph in memory, not two). With no collection served, ready means the default model
(``encoder.model``) was loaded, so that a first ``POST /collections`` with it does not load it again, or
could not be, and the answer says why: collections of other models can still be created. A default model
that is unavailable never holds back the collections of other models; the answer names it.

Encoders are kept while a served collection uses them, at most ``server.max_loaded_encoders`` keys at a time:
loading one more releases the least recently used (a request for a collection whose encoder was released loads
it again, and waits for it; ``/ready`` still counts that collection ready). Deleting a collection releases the
encoders no other collection uses (the default model's stays), and hands their memory back to the OS.

A collection that appears on disk later (an ingest by the CLI) is served from its first request or listing;
its encoders load in the background from then on, and ``/ready`` says 503 until they have (at once where
another served collection uses the same model). A collection whose model cannot be loaded keeps ``/ready`` at
503, with the reason, until it is fixed (each request to it tries again) or deleted.

Storage faults (see ``storage.disk``): a damaged collection (its files cannot be opened as a collection) is listed
as unavailable with the reason and holds back no other from ``/ready``; its routes answer 503, and each request
tries to open it again, so a restored one is served without a restart. A read-only data folder serves searches and
answers writes 503; a write that would leave less free space than the reserve answers 507. ``/health`` says
``degraded`` while any of these lasts, or since a write the disk failed, until a write to that collection succeeds.

>>> service = SearchService(settings)
>>> service.start()                       # loads encoders in a background thread
>>> service.readiness().ready
True
>>> service.search("default", "what is faiss", k=5).results[0].id
'doc-1'
"""

from __future__ import annotations

import ctypes
import gc
import logging
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from indexer.encoder import Encoder, OnnxQueryEncoder, configure_search_threads, encoder_precision_key
from indexer.models import model_folder, resolve_profile
from indexer.pipeline import encoder_for_collection, ingest_documents
from indexer.settings import Settings, check_shards, snapshot_dir
from search_api import schemas
from search_api.batching import QueryBatcher
from search_api.retrieval import Result, Retriever, SearchOptions, check_k, check_query, check_response_size
from storage.collection import (
    DB_FILE,
    Collection,
    Document,
    collection_dir,
    is_collection,
    list_collections,
    metadata_to_json,
)
from storage.disk import (
    estimated_write_bytes,
    folder_bytes,
    read_only_error,
    require_room,
    require_space,
    space,
    storage_error,
    writable,
)
from storage.errors import (
    ConflictError,
    InsufficientStorageError,
    InvalidInputError,
    ModelLoadingError,
    NotFoundError,
    PayloadTooLargeError,
    StorageUnavailableError,
)
from storage.sharding import ShardedCollection, create_collection, open_collection, refuse_sharded
from storage.snapshots import (
    SnapshotEntry,
    delete_snapshot,
    list_snapshots,
    prune_snapshots,
    restore_snapshot,
    snapshot_name,
    snapshot_path,
    take_snapshot,
)

log = logging.getLogger(__name__)

WRITE_WAIT_S = 60.0
MODEL_PROFILES = ("stella-1.5b", "stella-400m", "minilm")
CHECKPOINT_AFTER_PASSAGES = 10_000  # FAISS file rewrite cadence for API writes; SQLite already holds every vector


class SearchService:
    def __init__(self, settings: Settings, observe_encode=None, observe_batch_size=None):
        self.settings = settings
        self.data_dir = settings.data_dir
        self._collections: dict[str, Collection] = {}
        self._deleting: set[str] = set()  # being removed: not re-opened from disk meanwhile
        self._encoders: dict[tuple, Encoder | OnnxQueryEncoder] = {}  # what searches of each encoder key use
        self._writers: dict[tuple, Encoder] = {}  # the full encoder of each key: passages for writes
        self._loads: dict[tuple, Future] = {}  # (key, "search" | "write") being loaded; others wait for it
        self._errors: dict[tuple, str] = {}  # (key, "search" | "write") that could not be loaded, and why
        self._default_model: schemas.DefaultModel | None = None
        self._default: Encoder | None = None  # the default model's encoder, where it was loaded at start
        self._default_key: tuple | None = None
        self._recent: OrderedDict[tuple, None] = OrderedDict()  # keys with an encoder loaded, least recently used first
        self._released: set[tuple] = set()  # keys of served collections released under server.max_loaded_encoders
        self._batchers: dict[tuple, QueryBatcher] = {}
        self._lock = threading.RLock()
        self._ready = threading.Event()  # the start-up load is over
        self._load_error: Exception | None = None
        self._unsaved: dict[str, int] = {}  # passages changed since the collection's last index checkpoint
        self._damaged: dict[str, str] = {}  # collections under data_dir that cannot be opened, and why
        self._faults: dict[str, str] = {}  # a collection's last write the disk failed, until one succeeds
        self._observe_encode = observe_encode or (lambda seconds, texts: None)
        self._observe_batch_size = observe_batch_size or (lambda requests: None)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self, background: bool = True) -> None:
        """Open every collection under data_dir and load their encoders (in a thread unless told otherwise)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name in list_collections(self.data_dir):
            try:
                self._collections[name] = open_collection(collection_dir(self.data_dir, name))
            except Exception as exc:  # one damaged collection does not keep the others from being served
                self._set_damaged(name, exc)
        if background:
            threading.Thread(target=self._load_all, name="encoder-loader", daemon=True).start()
        else:
            self._load_all()

    def _load_all(self) -> None:
        """Search encoders first (ready then), the default model, then the full encoders writes need."""
        with self._lock:
            collections = list(self._collections.values())
        try:
            for collection in collections:
                self._try(lambda c=collection: self._encoder_for(c, wait=False))
            self._check_default_model(load=not collections)
            with self._lock:
                devices = [e.device for e in self._encoders.values()]
            configure_search_threads(self.settings, devices[0] if devices else None)
        finally:
            self._ready.set()
        for collection in collections:
            self._try(lambda c=collection: self._writer_for(c, wait=False))

    @staticmethod
    def _try(load: Callable[[], object]) -> None:
        """Run ``load``; its failure is recorded for /health and /ready (see _once), never a crash of the loader."""
        try:
            load()
        except Exception:
            log.exception("loading an encoder failed")

    def _check_default_model(self, load: bool) -> None:
        """Whether the default model (``encoder.model``) can be used, for /health and /ready: loaded where
        ``load`` (no collection is served: it is what the first one will most likely use), else only looked for
        (its weights on disk), so that a model no collection uses takes no memory."""
        model = self.settings.encoder.model
        self._default_model = schemas.DefaultModel(model=model, state="loading")
        try:
            if load:
                self._default_encoder()
            else:
                model_folder(resolve_profile(model), download=False)
        except Exception as exc:
            log.warning("the default model %s is unavailable: %s", model, exc)
            self._default_model = schemas.DefaultModel(model=model, state="unavailable", reason=str(exc))
            if load:
                self._load_error = exc
        else:
            self._default_model = schemas.DefaultModel(model=model, state="ready", loaded=load)

    def close(self) -> None:
        with self._lock:
            for batcher in self._batchers.values():
                batcher.close()
            self._batchers.clear()
            for name, collection in self._collections.items():
                if self._unsaved.get(name):
                    self._checkpoint(collection)
                collection.close()
            self._collections.clear()

    @property
    def ready(self) -> bool:
        return self.readiness().ready

    # -- encoders ----------------------------------------------------------------------------------------

    @staticmethod
    def _key(model: str, dim: int | None, prompt_type: str, max_length: int | None, precision: str) -> tuple:
        return (model, dim, prompt_type, max_length, encoder_precision_key(precision))

    def _manifest_key(self, collection: Collection) -> tuple:
        m = collection.manifest
        return self._key(m.model, m.dim, m.prompt_type, m.max_length, m.precision)

    def _default_request(self, default: Encoder, model: str | None, dim: int | None, prompt_type: str) -> bool:
        """Whether a collection of ``model``, ``dim`` and ``prompt_type`` gets the ``default`` encoder's vectors (its
        dimension named or not: loading a second copy of it only to find the same key wasted its memory)."""
        encoder = self.settings.encoder
        asked = (model or encoder.model, dim or default.dim, prompt_type)
        return asked == (encoder.model, default.dim, encoder.prompt_type)

    def _default_encoder(self) -> Encoder:
        self._make_room(None)
        encoder = Encoder.load(self.settings.encoder.model, self.settings)
        key = self._key(
            encoder.profile.name, encoder.dim, encoder.prompt_type, encoder.max_seq_length, encoder.precision
        )
        with self._lock:
            self._default, self._default_key = self._writers.setdefault(key, encoder), key
            search = self._encoders.setdefault(key, encoder)
            self._note_loaded(key)
            return search

    # -- how many encoders stay loaded -------------------------------------------------------------------

    def _note_loaded(self, key: tuple) -> None:
        """``key`` has an encoder loaded now, and is the most recently used (under the service lock). Released, it
        stays counted ready (loaded on demand) until its full encoder is back too."""
        self._recent[key] = None
        self._recent.move_to_end(key)
        if key in self._writers:
            self._released.discard(key)

    def _used(self, key: tuple) -> None:
        with self._lock:
            if key in self._recent:
                self._recent.move_to_end(key)

    def _make_room(self, key: tuple | None) -> None:
        """Before loading an encoder for ``key`` (None: a key not known before it loads): release the least
        recently used keys until one more stays within ``server.max_loaded_encoders``. Keys still loading are
        kept (the bound is then briefly exceeded)."""
        released = []
        with self._lock:
            if key is not None and key in self._recent:
                return
            for victim in list(self._recent):
                if len(self._recent) < self.settings.server.max_loaded_encoders:
                    break
                if victim != key and not any(slot[0] == victim for slot in self._loads):
                    released.append(self._release(victim))
        self._after_release(released)

    def _release(self, key: tuple) -> QueryBatcher | None:
        """Forget ``key``'s encoders (under the service lock); requests still holding them finish with them."""
        self._encoders.pop(key, None)
        self._writers.pop(key, None)
        self._recent.pop(key, None)
        for role in ("search", "write"):
            self._errors.pop((key, role), None)
        if key == self._default_key:
            self._default = self._default_key = None
        if any(self._manifest_key(c) == key for c in self._collections.values()):
            self._released.add(key)
        log.info("released the encoder of %s", key)
        return self._batchers.pop(key, None)

    def _release_unused(self, key: tuple) -> None:
        """Release ``key``'s encoders where no served collection uses them (the default model's stay)."""
        with self._lock:
            used = key == self._default_key or any(self._manifest_key(c) == key for c in self._collections.values())
            released = [] if used or key not in self._recent else [self._release(key)]
            if not used:
                self._released.discard(key)
        self._after_release(released)

    @staticmethod
    def _after_release(batchers: list[QueryBatcher | None]) -> None:
        if not batchers:
            return
        for batcher in batchers:
            if batcher is not None:
                batcher.close()  # a request still holding it encodes on its own thread
        gc.collect()
        try:  # glibc keeps freed heap for reuse: RSS stayed ~400 MB up per released MiniLM encoder without this
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass

    def _once(self, key: tuple, role: str, load: Callable[[], object]):
        """``load()``'s result for (``key``, ``role``): the first caller loads, callers meanwhile wait for it. A
        failure is kept (for /health and /ready) until a later call, which tries again, succeeds."""
        slot = (key, role)
        with self._lock:
            future = self._loads.get(slot)
            loading = future is None
            if loading:
                future = self._loads[slot] = Future()
        if not loading:
            return future.result()
        try:
            self._make_room(key)
            result = load()
        except BaseException as exc:
            with self._lock:
                self._errors[slot] = str(exc)
                del self._loads[slot]
            future.set_exception(exc)
            raise
        with self._lock:
            self._errors.pop(slot, None)
            del self._loads[slot]
        future.set_result(result)
        return result

    def _encoder_for(self, collection: Collection, wait: bool = True) -> Encoder | OnnxQueryEncoder:
        """The encoder that searches ``collection``: the query encoder of its cached ONNX graph, or its full
        encoder (once loaded, or where there is no cached graph)."""
        if wait and not self._ready.is_set():
            raise ModelLoadingError("the model is still loading; retry in a few seconds")
        key = self._manifest_key(collection)
        with self._lock:
            loaded = self._encoders.get(key)
        if loaded is not None:
            self._used(key)
            return loaded
        return self._once(key, "search", lambda: self._load_search_encoder(collection, key))

    def _load_search_encoder(self, collection: Collection, key: tuple) -> Encoder | OnnxQueryEncoder:
        encoder = OnnxQueryEncoder.for_manifest(collection.manifest, self.settings)
        if encoder is None:
            return self._writer_for(collection, wait=False)
        with self._lock:
            encoder = self._encoders.setdefault(key, encoder)
            self._note_loaded(key)
            return encoder

    def _writer_for(self, collection: Collection, wait: bool = True) -> Encoder:
        """The full encoder of ``collection``, which writes its passages; loaded in the background after start-up,
        so a write may wait for it here."""
        if wait and not self._ready.is_set():
            raise ModelLoadingError("the model is still loading; retry in a few seconds")
        key = self._manifest_key(collection)
        with self._lock:
            loaded = self._writers.get(key)
        if loaded is not None:
            self._used(key)
            return loaded
        return self._once(key, "write", lambda: self._load_writer(collection, key))

    def _load_writer(self, collection: Collection, key: tuple) -> Encoder:
        encoder = encoder_for_collection(collection, self.settings)
        with self._lock:
            encoder = self._writers.setdefault(key, encoder)
            # searches move to it too: one fp32 graph in memory, not two
            self._encoders[key] = encoder
            if key in self._batchers:
                self._batchers[key].encoder = encoder
            self._note_loaded(key)
        return encoder

    def _load_later(self, collection: Collection) -> None:
        """Load a collection's encoders in the background (one opened after start-up)."""

        def load() -> None:
            self._try(lambda: self._encoder_for(collection, wait=False))
            self._try(lambda: self._writer_for(collection, wait=False))

        threading.Thread(target=load, name=f"encoder-loader-{collection.name}", daemon=True).start()

    def _state(self, key: tuple, role: str) -> tuple[str, str | None]:
        """``loading``, ``ready`` or ``unavailable`` (with the reason) for one encoder of ``key``."""
        with self._lock:
            if (key, role) in self._errors and (key, role) not in self._loads:
                return "unavailable", self._errors[(key, role)]
            if key in (self._encoders if role == "search" else self._writers) or key in self._released:
                return "ready", None  # released: loaded again by the next request that needs it
        return "loading", None

    def _encoder_state(self, collection: Collection) -> schemas.CollectionState:
        """Whether ``collection`` can be searched and written to (``ready``), not yet (``loading``) or not at
        all (``unavailable``: ``reason`` says why); ``writes`` tells the full encoder's own state."""
        key = self._manifest_key(collection)
        search, search_reason = self._state(key, "search")
        writes, writes_reason = self._state(key, "write")
        if not self._ready.is_set() and search != "unavailable":
            search = "loading"
        state = "unavailable" if "unavailable" in (search, writes) else search
        reason = search_reason or (f"writes: {writes_reason}" if writes_reason else None)
        return schemas.CollectionState(state=state, writes=writes, reason=reason)

    # -- collections -------------------------------------------------------------------------------------

    def collection(self, name: str) -> Collection:
        """The served collection ``name``; one that another process (the CLI's ingest or restore) created under
        data_dir since the server started is opened and served from now on. A damaged one (its files cannot be
        opened) is a StorageUnavailableError (503) with the reason, opened again at each request until it can be
        (restored, or its permissions fixed)."""
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
        try:
            opened = open_collection(path)
        except NotFoundError:  # removed meanwhile
            return None
        except Exception as exc:
            reason = self._set_damaged(name, exc)
            raise StorageUnavailableError(f"collection {name} is unavailable: {reason}") from exc
        with self._lock:
            self._damaged.pop(name, None)
            served = self._collections.setdefault(name, opened) if name not in self._deleting else None
        if served is not opened:
            opened.close()
        elif served is not None:
            log.info("serving collection %s, created since the server started", name)
            self._load_later(served)
        return served

    def _set_damaged(self, name: str, exc: Exception) -> str:
        """Record that collection ``name`` cannot be opened (for /health, /ready and its requests); the reason."""
        reason = str(storage_error(exc, self.data_dir) or exc)
        with self._lock:
            known, self._damaged[name] = self._damaged.get(name), reason
        if reason != known:  # once, not at every request that tries it again
            log.error("collection %s is not served: %s", name, reason)
        return reason

    def _damaged_now(self) -> dict[str, str]:
        """The damaged collections still on disk (one moved aside or deleted is no longer listed)."""
        with self._lock:
            damaged = dict(self._damaged)
        return {name: reason for name, reason in damaged.items() if is_collection(collection_dir(self.data_dir, name))}

    @contextmanager
    def _storage_faults(self, collection: str | None = None) -> Iterator[None]:
        """Turn a failed read or write of the disk into its domain error (507 out of space, 503 otherwise, never a
        500); with ``collection``, /health reports the failure until a write to it succeeds."""
        try:
            yield
        except (OSError, sqlite3.Error) as exc:
            error = storage_error(exc, self.data_dir)
            if error is None:
                raise
            if collection is not None and isinstance(error, (StorageUnavailableError, InsufficientStorageError)):
                with self._lock:
                    self._faults[collection] = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {error}"
            raise error from exc
        if collection is not None:
            with self._lock:
                self._faults.pop(collection, None)

    def _require_space(self, write_bytes: int = 0) -> None:
        require_space(self.data_dir, self.settings.storage.reserve_bytes, write_bytes)

    def collections(self) -> list[schemas.CollectionInfo]:
        for name in list_collections(self.data_dir):
            with self._lock:
                known = name in self._collections
            if not known:
                try:
                    self._open_new(name, collection_dir(self.data_dir, name))
                except Exception as exc:  # one unreadable collection does not hide the others (/health names it)
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
        check_shards(request.shards, self.settings.server)
        with self._lock:
            if request.name in self._collections or path.exists():
                raise ConflictError(f"collection {request.name!r} already exists")
        if request.model and request.model not in MODEL_PROFILES and not self.settings.server.allow_model_paths:
            raise InvalidInputError(
                f"model {request.model!r} is not a profile ({', '.join(MODEL_PROFILES)}); loading model folders "
                "over HTTP (with trust_remote_code) needs server.allow_model_paths: true"
            )
        if not writable(self.data_dir):
            raise read_only_error(self.data_dir)
        self._require_space()
        default = self._default  # None once released under server.max_loaded_encoders
        if default is not None and self._default_request(default, request.model, request.dim, request.prompt_type):
            encoder = default
        else:
            self._make_room(None)
            settings = self.settings.model_copy(deep=True)
            settings.encoder.prompt_type = request.prompt_type
            encoder = Encoder.load(request.model or settings.encoder.model, settings, dim=request.dim)
        with self._lock:
            if request.name in self._collections:
                raise ConflictError(f"collection {request.name!r} already exists")
            with self._storage_faults():
                collection = create_collection(path, encoder.manifest(), request.shards)
            self._collections[request.name] = collection
            key = self._manifest_key(collection)
            self._writers.setdefault(key, encoder)
            self._encoders.setdefault(key, encoder)
            self._note_loaded(key)
        return self._info(collection)

    # -- snapshots ---------------------------------------------------------------------------------------

    def take_snapshot(self, name: str) -> schemas.SnapshotInfo:
        """Snapshot a served collection into snapshot_dir, then apply the retention (``snapshot_keep``)."""
        collection = self.collection(name)
        refuse_sharded(collection.path, "snapshot")
        label = snapshot_name(name)
        root = snapshot_dir(self.settings)
        reserve = self.settings.storage.reserve_bytes
        with self._storage_faults():
            require_room(root, folder_bytes(collection.path), f"a snapshot of {name}", self.data_dir, reserve)
            info = take_snapshot(collection, root / label)
        try:
            pruned = prune_snapshots(root, self.settings.snapshot_keep, collection=name)
        except OSError as exc:  # the snapshot is taken; an old one left behind is no reason to fail the request
            log.warning("could not apply the snapshot retention to %s: %s", root, exc)
        else:
            if pruned:
                log.info("retention (snapshot_keep %d) deleted %s", self.settings.snapshot_keep, ", ".join(pruned))
        return self._snapshot_info(SnapshotEntry(label, info))

    @staticmethod
    def _snapshot_info(entry: SnapshotEntry) -> schemas.SnapshotInfo:
        if entry.info is None:
            return schemas.SnapshotInfo(snapshot=entry.name, state="broken", reason=entry.problem)
        fields = ("collection", "created_at", "documents", "passages")
        return schemas.SnapshotInfo(snapshot=entry.name, **{key: entry.info[key] for key in fields})

    def snapshots(self) -> list[schemas.SnapshotInfo]:
        """Every snapshot under snapshot_dir; a broken one is listed as such, with the reason."""
        return [self._snapshot_info(entry) for entry in list_snapshots(snapshot_dir(self.settings))]

    def delete_snapshot(self, name: str) -> None:
        delete_snapshot(snapshot_dir(self.settings), name)

    def restore(self, request: schemas.RestoreRequest) -> schemas.CollectionInfo:
        """Verify a snapshot and serve it as a new collection (never over an existing one)."""
        source = snapshot_path(snapshot_dir(self.settings), request.snapshot)
        if not (source.is_dir() or source.is_symlink()):
            raise NotFoundError(f"no snapshot named {request.snapshot!r}; GET /snapshots lists them")
        target = collection_dir(self.data_dir, request.collection)
        with self._lock:
            if request.collection in self._collections:
                raise ConflictError(
                    f"collection {request.collection!r} exists; restore into a new name (replacing a served "
                    "collection needs the CLI with the server stopped)"
                )
        if not writable(self.data_dir):
            raise read_only_error(self.data_dir)
        reserve = self.settings.storage.reserve_bytes
        with self._storage_faults():
            require_room(self.data_dir, folder_bytes(source), f"restoring {request.snapshot}", self.data_dir, reserve)
            restore_snapshot(source, target)  # slow (checksums, verification): not under the service lock
            collection = Collection.open(target)
        with self._lock:  # a request may have opened it on demand meanwhile: serve one copy
            served = self._collections.setdefault(request.collection, collection)
        if served is not collection:
            collection.close()
        else:
            self._load_later(collection)
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
                    self._faults.pop(name, None)
                # requests already running finish on their open connections (unlinked files stay readable);
                # new ones get a 404
                collection.retire()
                with self._storage_faults():
                    shutil.rmtree(collection.path)
        finally:
            with self._lock:
                self._deleting.discard(name)
        self._release_unused(self._manifest_key(collection))

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
        key = self._manifest_key(collection)
        with self._lock:
            batcher = self._batchers.get(key)
            if batcher is None and key in self._encoders:  # the key's current encoder: _load_writer may replace it
                batcher = QueryBatcher(
                    self._encoders[key],
                    server.microbatch_max,
                    server.microbatch_window_ms,
                    observe=self._observe_batch,
                )
                self._batchers[key] = batcher
        if batcher is None:  # released since: this request encodes on its own thread
            return Retriever(collection, encoder, observe_encode=self._observe_encode)
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
        check_response_size(len(batch), batch[0], self.settings.server)
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
        retriever = Retriever(  # a text is encoded as a passage: the full encoder
            collection, self._writer_for(collection) if request.text else None, observe_encode=self._observe_encode
        )
        options = self._options(request.text or "", request)
        check_response_size(1, options, self.settings.server)
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
        limits = self.settings.ingest.metadata_limits()
        for doc in documents:
            if not doc.text.strip() and not (doc.title or "").strip():
                raise InvalidInputError(f"document {doc.id!r} has empty text and no title: give it either")
            metadata_to_json(doc.id, doc.metadata, limits)
            if len(doc.text) > max_chars:
                raise PayloadTooLargeError(
                    f"document {doc.id!r} has {len(doc.text)} characters; the limit is {max_chars} "
                    "(server.max_document_chars): split it into several documents"
                )
        collection = self.collection(name)
        self._require_space(estimated_write_bytes(sum(len(d.text) + len(d.title or "") for d in documents), 0, 0))
        encoder = self._writer_for(collection)
        started = time.perf_counter()
        # classify, encode and commit under the writer lock, so a concurrent upsert of the same ids cannot change
        # what "unchanged" meant between the two; searches are not blocked by it
        with self._storage_faults(name), collection.writing(WRITE_WAIT_S):
            report = ingest_documents(
                collection,
                encoder,
                # a blank text is stored as "": the document is encoded from its title, as a file ingest does
                [Document(d.id, d.title or None, d.text if d.text.strip() else "", d.metadata) for d in documents],
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
        with self._storage_faults(name):
            deleted = collection.delete([document_id])
        if deleted == 0:
            raise NotFoundError(f"no document with id {document_id!r} in collection {name}")
        self._after_write(collection, 1)

    def delete_many(self, name: str, request: schemas.DeleteRequest) -> schemas.DeleteResponse:
        if not request.ids and request.filter is None:
            raise InvalidInputError("name the documents to delete: 'ids', a metadata 'filter', or both")
        collection = self.collection(name)
        with self._storage_faults(name):
            deleted = collection.delete(request.ids, where=request.filter)
        self._after_write(collection, deleted)
        return schemas.DeleteResponse(deleted=deleted)

    def _after_write(self, collection: Collection, changed: int) -> None:
        """Checkpoint the index file each time another CHECKPOINT_AFTER_PASSAGES passages changed. The write is
        committed: a checkpoint that fails (a full disk) is logged and tried again at the next one or at shutdown,
        and never turns the write's answer into an error."""
        with self._lock:
            before = self._unsaved.get(collection.name, 0)
            self._unsaved[collection.name] = unsaved = before + changed
        if unsaved // CHECKPOINT_AFTER_PASSAGES > before // CHECKPOINT_AFTER_PASSAGES and self._checkpoint(collection):
            with self._lock:  # passages written meanwhile may not be in the file: they stay counted
                self._unsaved[collection.name] = max(0, self._unsaved.get(collection.name, 0) - unsaved)

    @staticmethod
    def _checkpoint(collection: Collection) -> bool:
        """``collection.checkpoint()``, whose failure is logged, never raised (SQLite holds every vector)."""
        try:
            return collection.checkpoint()
        except Exception:
            log.exception("index checkpoint of %s failed; SQLite holds every vector, a later one writes it", collection)
            return False

    # -- health ------------------------------------------------------------------------------------------

    def readiness(self) -> schemas.Readiness:
        """Whether every served collection can be searched and written to (see the module's docstring). A damaged
        collection (its files cannot be opened) is listed as unavailable with the reason, and holds back no other:
        the server is ready for the collections it can serve.

        >>> service.readiness().model_dump()
        {'ready': True, 'status': 'ready', 'collections': {'default': {...}}, 'default_model': {...}}
        """
        with self._lock:
            opened = dict(self._collections)
        return self._readiness(opened, self._damaged_now())

    def _readiness(self, opened: dict[str, Collection], damaged: dict[str, str]) -> schemas.Readiness:
        states = {name: self._encoder_state(c) for name, c in opened.items()}
        if not self._ready.is_set() or any(s.state == "loading" for s in states.values()):
            status = "loading"
        elif any(s.state == "unavailable" for s in states.values()):
            status = "unavailable"
        else:
            status = "ready"
        for name, reason in damaged.items():
            states[name] = schemas.CollectionState(state="unavailable", writes="unavailable", reason=reason)
        return schemas.Readiness(
            ready=status == "ready", status=status, collections=states, default_model=self._default_model
        )

    def health(self) -> schemas.Health:
        """Liveness and the state of every part: each collection's counts and encoders, the default model, and the
        data folder's storage (``degraded``: a damaged collection, a read-only folder, free space below the reserve,
        or a write the disk failed)."""
        with self._lock:
            encoders = list(self._encoders.values())
            opened = dict(self._collections)
            loading = bool(self._loads)
        damaged = self._damaged_now()
        readiness = self._readiness(opened, damaged)
        states = readiness.collections
        device = encoders[0].device if encoders else self.settings.processing.device
        gpu = None
        if device.startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                gpu = {
                    "allocated_bytes": torch.cuda.memory_allocated(),
                    "reserved_bytes": torch.cuda.memory_reserved(),
                }
        reasons = [f"collection {name}: {states[name].reason}" for name in opened if states[name].reason]
        if not opened and self._load_error is not None:  # nothing served, and the default model failed
            reasons.append(str(self._load_error))
        storage, storage_reasons = self._storage_health(opened, damaged)
        collections = {n: {**self._counts(n, c, storage_reasons), **states[n].model_dump()} for n, c in opened.items()}
        collections.update({n: states[n].model_dump() for n in damaged})
        if reasons and not (readiness.status == "loading" or loading):
            status = "unavailable"
        elif storage_reasons:
            status = "degraded"
        elif readiness.status != "ready" or loading or any(states[n].writes != "ready" for n in opened):
            status = "loading"  # also while the full encoders load in the background after start-up
        else:
            status = "ok"
        return schemas.Health(
            status=status,
            model_loaded=bool(encoders) and self._ready.is_set(),
            models=sorted({f"{e.profile.name} ({e.head.label}, {e.prompt_type})" for e in encoders}),
            device=device,
            collections=collections,
            default_model=readiness.default_model,
            gpu_memory=gpu,
            storage=storage,
            error="; ".join(reasons + storage_reasons) or None,
        )

    def _storage_health(
        self, opened: dict[str, Collection], damaged: dict[str, str]
    ) -> tuple[schemas.StorageHealth, list[str]]:
        """The data folder's storage for /health, and what degrades it: damaged collections, a folder that cannot
        be written, free space below the reserve, a collection's last write that the disk failed."""
        reasons = [f"collection {name} cannot be opened: {reason}" for name, reason in damaged.items()]
        parts = [shard for c in opened.values() for shard in (c.shards if isinstance(c, ShardedCollection) else [c])]
        local = [part for part in parts if isinstance(part, Collection)]  # not the shards a Ray deployment serves
        folders = [self.data_dir] + [shard.path for shard in local]
        read_only = next((f for f in folders if not writable(f, [f / DB_FILE])), None)
        if read_only is not None:
            reasons.append(str(read_only_error(read_only)))
        for shard in local:
            try:
                shard.check_files()
            except StorageUnavailableError as exc:
                reasons.append(str(exc))
        found = space(self.data_dir, self.settings.storage.reserve_bytes)
        if found.short:
            reasons.append(f"{found.describe()}: writes are refused (507) until space is freed")
        with self._lock:
            faults = dict(self._faults)
        reasons += [f"collection {name}: a write failed at {fault}" for name, fault in faults.items()]
        storage = schemas.StorageHealth(
            data_dir=str(self.data_dir),
            writable=read_only is None,
            free_bytes=found.free,
            required_free_bytes=found.required,
            reserve_bytes=found.reserve,
        )
        return storage, reasons

    def _counts(self, name: str, collection: Collection, reasons: list[str]) -> dict:
        """The collection's counts for /health; a disk that fails to answer is one more reason, not a 500."""
        try:
            return _collection_health(collection)
        except (OSError, sqlite3.Error) as exc:
            error = storage_error(exc, self.data_dir)
            if error is None:
                raise
            reasons.append(f"collection {name}: {error}")
            return {"status": "unavailable"}


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
