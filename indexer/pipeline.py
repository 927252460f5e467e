"""The ingest pipeline: documents -> passages -> vectors -> one committed write per batch of documents.

Unchanged documents (same title and text) are not re-encoded; a metadata-only change updates the row; changed
documents get their passages replaced atomically. Records with neither title nor text are skipped and named in
the report (``strict`` refuses them instead).

>>> report = ingest_paths([Path("corpus.jsonl")], Path("data"), "default", load_settings(cli=...))
>>> report.passages_written
5000
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

from indexer.chunking import Chunker, text_to_encode
from indexer.encoder import Encoder, OnnxQueryEncoder, backend_for_precision
from indexer.models import resolve_profile
from indexer.settings import Settings
from indexer.sources import check_sources, read_documents
from storage.collection import Collection, Document, Manifest, Passage, collection_dir
from storage.disk import estimated_write_bytes, require_space
from storage.errors import CollectionExistsError, InvalidInputError, ModelMismatchError, NotFoundError
from storage.sharding import ShardedCollection, create_collection, open_collection

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    documents_seen: int = 0
    # records with neither title nor text, left out; the first few as "file line N (document 'id')"
    documents_skipped: int = 0
    skipped: list[str] = field(default_factory=list)
    documents_added: int = 0
    documents_replaced: int = 0
    documents_unchanged: int = 0
    metadata_updated: int = 0
    passages_written: int = 0
    passages_removed: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    collection: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _batched(items: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def encoder_for_manifest(
    manifest: Manifest,
    settings: Settings,
    model: str | None = None,
    name: str = "the collection",
    dim: int | None = None,
) -> Encoder:
    """Load the encoder that made ``manifest``'s vectors; a different ``model`` or ``dim`` is refused
    (ModelMismatchError)."""
    _refuse_other_dim(manifest, dim, name)
    encoder_settings = settings.model_copy(deep=True)
    encoder_settings.encoder.prompt_type = manifest.prompt_type
    encoder_settings.encoder.max_length = manifest.max_length
    encoder_settings.encoder.normalize_embeddings = manifest.normalized
    profile = resolve_profile(model or manifest.model)
    encoder_settings.encoder.backend = backend_for_precision(manifest.precision, settings, profile)
    encoder = Encoder.load(model or manifest.model, encoder_settings, dim=manifest.dim)
    if not manifest.vectors_compatible_with(encoder.manifest()):
        raise ModelMismatchError(
            f"{name} was built with {manifest.describe()}; refusing {encoder.manifest().describe()}. "
            "Vectors of different models or heads cannot share an index: use the collection's own model, or "
            "ingest into a new collection."
        )
    if encoder.precision != manifest.precision:
        log.info(
            "%s holds %s passage vectors; passages written here (%s) will be %s",
            name,
            manifest.precision,
            encoder.device,
            encoder.precision,
        )
    return encoder


def _refuse_other_dim(manifest: Manifest, dim: int | None, name: str) -> None:
    if dim is not None and dim != manifest.dim:
        raise ModelMismatchError(
            f"{name} was built with {manifest.describe()}; refusing dim {dim}. Its vectors can only be searched at "
            f"their own dimension: leave --dim out, or search a collection built at dim {dim}."
        )


def encoder_for_collection(
    collection: Collection | ShardedCollection, settings: Settings, model: str | None = None, dim: int | None = None
) -> Encoder:
    """Load the encoder a collection was built with; a different ``model`` or ``dim`` is refused
    (ModelMismatchError)."""
    return encoder_for_manifest(collection.manifest, settings, model, name=f"collection {collection.name}", dim=dim)


def query_encoder_for_collection(
    collection: Collection | ShardedCollection, settings: Settings, model: str | None = None, dim: int | None = None
) -> OnnxQueryEncoder | Encoder:
    """An encoder for searching a collection, the fastest to load: the cached fp32 ONNX graph with the model's
    tokenizer where that export exists (:class:`OnnxQueryEncoder`, no torch), else the full encoder (which
    exports the graph for next time where it runs on ONNX Runtime). The same refusals as encoder_for_collection.

    >>> query_encoder_for_collection(collection, settings).encode_queries(["what is faiss?"]).shape
    (1, 384)
    """
    _refuse_other_dim(collection.manifest, dim, f"collection {collection.name}")
    encoder = OnnxQueryEncoder.for_manifest(collection.manifest, settings, model)
    return encoder or encoder_for_collection(collection, settings, model, dim)


def shard_count(collection: Collection | ShardedCollection) -> int:
    return len(collection.shards) if isinstance(collection, ShardedCollection) else 1


def prepare_collection(
    data_dir: Path,
    name: str,
    new_manifest: Callable[[], Manifest],
    dim: int | None = None,
    shards: int | None = None,
) -> tuple[Collection | ShardedCollection, bool]:
    """The collection ``name``, created with ``new_manifest()`` and ``shards`` if new, and whether it was created.

    An existing collection must have the asked ``shards`` and ``dim`` (when given).
    """
    path = collection_dir(data_dir, name)
    try:
        collection = open_collection(path)
    except NotFoundError:
        try:
            return create_collection(path, new_manifest(), shards or 1), True
        except CollectionExistsError:  # another process created it meanwhile: join it
            collection = open_collection(path)
    if shards is not None and shards != shard_count(collection):
        collection.close()
        raise InvalidInputError(
            f"collection {name} has {shard_count(collection)} shard(s); --shards {shards} only applies when a "
            "collection is created (re-shard with `stella-search reshard`)"
        )
    if dim is not None and dim != collection.manifest.dim:
        collection.close()
        raise ModelMismatchError(
            f"collection {name} was built with {collection.manifest.describe()}; refusing dim {dim}. "
            "Vectors of different dimensions cannot share an index: ingest into a new collection."
        )
    return collection, False


def open_or_create_collection(
    data_dir: Path,
    name: str,
    settings: Settings,
    model: str | None = None,
    dim: int | None = None,
    shards: int | None = None,
) -> tuple[Collection | ShardedCollection, Encoder]:
    """The collection ``name`` with its encoder; created with ``model``/``dim``/``shards`` (or the settings') if new."""
    loaded: list[Encoder] = []

    def new_manifest() -> Manifest:
        require_space(data_dir, settings.storage.reserve_bytes)
        loaded.append(Encoder.load(model, settings, dim=dim))
        return loaded[0].manifest()

    collection, created = prepare_collection(data_dir, name, new_manifest, dim, shards)
    if created:
        return collection, loaded[0]
    try:
        encoder = encoder_for_collection(collection, settings, model)
    except Exception:
        collection.close()
        raise
    return collection, encoder


def ingest_documents(
    collection: Collection | ShardedCollection,
    encoder: Encoder,
    documents: Iterable[Document],
    settings: Settings,
    total: int | None = None,
    batch_documents: int | None = None,
    checkpoint: bool = True,
    quiet: bool = False,
) -> IngestReport:
    """Encode and commit ``documents`` batch by batch; each batch is one transaction, committed in input order.

    Batches are pipelined: while one batch is encoded on a worker thread (ONNX Runtime and torch release the GIL
    while they compute), the next is read, classified against the stored documents and chunked (its text
    tokenised), and the one before is committed. A batch that repeats a document id of the batch in flight
    waits for that batch's commit first, so it is classified against what that batch wrote.

    ``batch_documents`` overrides ``ingest.commit_documents`` (the API writes a request as one transaction);
    ``checkpoint=False`` leaves the FAISS file to a later checkpoint (SQLite already holds every vector). A batch
    that would leave less free space than ``storage.reserve_bytes`` keeps for maintenance is refused before it is
    written (InsufficientStorageError; see ``storage.disk``): the batches before it stay committed.
    """
    report = IngestReport()
    started = time.perf_counter()
    encode_before = encoder.stats.seconds
    chunker = Chunker(
        encoder.chunk_tokenizer, encoder.max_seq_length, settings.ingest.chunk_overlap, encoder.passage_prompt
    )
    progress = _progress(total, quiet)

    def commit(batch: _Prepared) -> None:
        if batch.encoding is not None:
            chars = sum(len(d.text) + len(d.title or "") for d in batch.to_encode + batch.metadata_only)
            written = estimated_write_bytes(chars, len(batch.passages), collection.dim)
            require_space(collection.path.parent, settings.storage.reserve_bytes, written)
            result = collection.write(batch.to_encode + batch.metadata_only, batch.passages, batch.encoding.result())
            report.passages_written += result.passages_added
            report.passages_removed += result.passages_removed
        report.metadata_updated += len(batch.metadata_only)
        report.documents_seen += len(batch.documents)
        progress(len(batch.documents), report)

    in_flight: _Prepared | None = None

    def flush() -> None:
        nonlocal in_flight
        batch, in_flight = in_flight, None
        if batch is not None:
            commit(batch)

    with ThreadPoolExecutor(1, thread_name_prefix="ingest-encode") as encoding:
        try:
            for documents_batch in _batched(documents, batch_documents or settings.ingest.commit_documents):
                if in_flight is not None and not in_flight.ids.isdisjoint(d.id for d in documents_batch):
                    flush()
                batch = _prepare(documents_batch, collection, chunker, report)
                encoder.prefetch_passages(batch.texts)  # CUDA: tokenised while the batch in flight encodes
                if batch.to_encode or batch.metadata_only:
                    batch.encoding = encoding.submit(encoder.encode_passages, batch.texts)
                flush()
                in_flight = batch
        except BaseException:
            flush()  # reading or preparing a batch failed: the batch before it still commits, as it would have
            raise
        flush()
    if checkpoint:
        collection.checkpoint()
    progress(0, report, done=True)
    report.seconds = time.perf_counter() - started
    report.encode_seconds = encoder.stats.seconds - encode_before
    report.collection = {"documents": collection.count_documents(), "passages": collection.count_passages()}
    return report


@dataclass
class _Prepared:
    """One commit batch, classified and chunked; ``encoding`` is its passage vectors, being computed."""

    documents: list[Document]
    to_encode: list[Document]
    metadata_only: list[Document]
    passages: list[Passage]
    texts: list[str]
    encoding: Future | None = None

    @property
    def ids(self) -> set[str]:
        return {d.id for d in self.documents}


def _prepare(batch: list[Document], collection, chunker: Chunker, report: IngestReport) -> _Prepared:
    """Classify ``batch`` against the stored content hashes (new, changed, metadata-only, unchanged) and chunk
    what has to be encoded."""
    states = collection.document_states([d.id for d in batch])
    to_encode: list[Document] = []
    metadata_only: list[Document] = []
    for doc in batch:
        same_content, same_metadata = Collection.is_unchanged(doc, states.get(doc.id))
        if not same_content:
            to_encode.append(doc)
            if doc.id in states:
                report.documents_replaced += 1
            else:
                report.documents_added += 1
        elif not same_metadata:
            metadata_only.append(doc)
        else:
            report.documents_unchanged += 1
    passages: list[Passage] = []
    texts: list[str] = []
    for title, doc_passages in chunker.split_for_encoding(to_encode):
        for passage in doc_passages:
            passages.append(passage)
            texts.append(text_to_encode(title, passage.text))
    return _Prepared(batch, to_encode, metadata_only, passages, texts)


def ingest_paths(
    paths: Sequence[Path],
    data_dir: Path,
    name: str,
    settings: Settings,
    model: str | None = None,
    dim: int | None = None,
    wait: float = 0.0,
    shards: int | None = None,
    strict: bool = False,
) -> IngestReport:
    """Validate every input file, then ingest them into collection ``name`` (created if new).

    The run holds the collection's writer lock throughout: another writer waits up to ``wait`` seconds, then
    fails with a message naming the holder. Each batch commits on its own, so an interrupted run loses at most
    the batch in flight, and running it again skips every committed document without re-encoding it. Records
    with neither title nor text are skipped and counted in the report; ``strict`` refuses the whole ingest
    instead, before anything is written.
    """
    limits = settings.ingest.metadata_limits()
    sources = check_sources(paths, strict, limits)
    collection, encoder = open_or_create_collection(data_dir, name, settings, model, dim, shards)
    with collection, collection.writing(wait):
        documents = (doc for path in paths for doc in read_documents(Path(path), limits))
        report = ingest_documents(collection, encoder, documents, settings, total=sources.documents)
    report.documents_skipped, report.skipped = sources.skipped, sources.first_skipped
    return report


def _progress(total: int | None, quiet: bool = False):
    """A tqdm bar on a terminal; a log line every ~10% otherwise; nothing when quiet."""
    if quiet:
        return lambda n, report, done=False: None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="doc", desc="ingest")

        def update(n: int, report: IngestReport, done: bool = False) -> None:
            bar.update(n)
            bar.set_postfix(passages=report.passages_written, refresh=False)
            if done:
                bar.close()

        return update

    step = max(1, (total or 1000) // 10)
    state = {"next": step, "logged": -1}

    def log_line(n: int, report: IngestReport, done: bool = False) -> None:
        due = report.documents_seen >= state["next"] or (done and state["logged"] != report.documents_seen)
        if due:
            log.info(
                "ingest: %d/%s documents, %d passages written",
                report.documents_seen,
                total or "?",
                report.passages_written,
            )
            state["next"] = report.documents_seen + step
            state["logged"] = report.documents_seen

    return log_line
