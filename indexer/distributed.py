"""Ingest on a Ray cluster: Ray Data reads and chunks the sources in parallel, an actor pool encodes, the
driver commits through the collection's writer with the guarantees of local ingest.

The flow is the local pipeline's, spread out:

    files --(read, one task per file)--> documents --(classify against the stored states, chunk, encode:
    actor pool, one model load per actor, a GPU each where the cluster has them)--> batches of whole documents
    --(driver: one transaction per batch, routed to the owning shard)--> the collection

Inputs are validated whole before anything is written (as locally); documents already committed with the same
title and text are skipped by the actors without encoding, so re-running adds nothing and an interrupted run
resumes; metadata-only changes update the rows. The driver holds the collection's writer lock for the run.

Needs the ``[ray]`` extra; nothing here is imported by single-machine use.

>>> ingest_paths_on_ray([Path("corpus.jsonl")], Path("data"), "docs", settings, address="auto", workers=4)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from indexer.chunking import Chunker, text_to_encode
from indexer.encoder import Encoder
from indexer.pipeline import IngestReport, encoder_for_manifest, prepare_collection
from indexer.settings import Settings
from indexer.sources import check_sources, read_documents
from storage.collection import Document, Manifest, Passage, content_hash, metadata_to_json
from storage.errors import InvalidInputError, StellaSearchError
from storage.inputs import MetadataLimits

log = logging.getLogger(__name__)

RAY_PIN = "ray[data,serve]==2.60.0"
ENCODE_BATCH_DOCUMENTS = 64  # documents per actor call: small enough to keep every actor busy


def import_ray():
    """``ray``, or an error naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] and [serve] parts of the extra)
        import ray.serve  # noqa: F401
    except ImportError:
        raise InvalidInputError(f"--ray needs Ray: pip install 'stella-search[ray]' (installs {RAY_PIN})") from None
    return ray


def connect(address: str):
    """Join the Ray cluster at ``address`` ('auto': the one this machine belongs to); once per process."""
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise InvalidInputError(
                f"no Ray cluster at {address!r} ({exc}); start one with `ray start --head`, or give its address"
            ) from None
    return ray


def _metadata_digest(metadata_json: str) -> str:
    return hashlib.sha256(metadata_json.encode()).hexdigest()[:16]


def _read_file(row: dict) -> list[dict]:
    """Ray Data flat_map: the documents of one input file or folder (already validated by the driver)."""
    return [
        {
            "id": doc.id,
            "title": doc.title or "",
            "has_title": doc.title is not None,
            "text": doc.text,
            "metadata": metadata_to_json(doc.id, doc.metadata),
        }
        for doc in read_documents(Path(row["path"]), MetadataLimits(row["metadata_depth"], row["metadata_bytes"]))
    ]


class EncodeDocuments:
    """Ray Data actor: classify documents against the stored states, chunk the changed ones and encode them.

    One model load per actor. Returns one row per document: its kind (``new``, ``replace``, ``metadata``,
    ``unchanged``), its passages as JSON and their vectors as float32 bytes.
    """

    def __init__(self, settings: Settings, model: str | None, manifest: dict, states: dict):
        self.encoder = encoder_for_manifest(Manifest(**manifest), settings, model)
        self.chunker = Chunker(
            self.encoder.chunk_tokenizer,
            self.encoder.max_seq_length,
            settings.ingest.chunk_overlap,
            self.encoder.passage_prompt,
        )
        self.states = states

    def __call__(self, batch: dict) -> dict:
        kinds, passages_json, vectors_blob = [], [], []
        texts: list[str] = []
        spans: list[tuple[int, int]] = []
        for doc_id, title, has_title, text, metadata in zip(
            batch["id"], batch["title"], batch["has_title"], batch["text"], batch["metadata"]
        ):
            title = str(title) if has_title else None
            state = self.states.get(doc_id)
            if state is not None and state[0] == content_hash(title, text):
                kinds.append("unchanged" if state[1] == _metadata_digest(metadata) else "metadata")
                passages_json.append("[]")
                spans.append((len(texts), len(texts)))
                continue
            kinds.append("new" if state is None else "replace")
            [(title_to_encode, passages)] = self.chunker.split_for_encoding([Document(doc_id, title, text, {})])
            passages_json.append(json.dumps([[p.ordinal, p.text, p.start, p.end] for p in passages]))
            spans.append((len(texts), len(texts) + len(passages)))
            texts.extend(text_to_encode(title_to_encode, p.text) for p in passages)
        vectors = self.encoder.encode_passages(texts) if texts else np.zeros((0, self.encoder.dim), "float32")
        vectors = np.ascontiguousarray(vectors, dtype="float32")
        vectors_blob = [vectors[a:b].tobytes() for a, b in spans]
        return {**batch, "kind": np.array(kinds), "passages": np.array(passages_json), "vectors": vectors_blob}


def _manifest_on_cluster(ray, settings: Settings, model: str | None, dim: int | None) -> Manifest:
    """The manifest a new collection gets, from the model loaded on a cluster worker (not in the driver)."""

    @ray.remote(num_gpus=_gpus_per_actor(ray))
    def describe() -> dict:
        return asdict(Encoder.load(model, settings, dim=dim).manifest())

    return Manifest(**ray.get(describe.remote()))


def _gpus_per_actor(ray) -> int:
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def _check_workers(ray, workers: int | None, gpus: int, settings: Settings) -> int:
    """The actor count, checked against the cluster: an ask Ray cannot place would wait forever, silently."""
    resources = ray.cluster_resources()
    if gpus:
        available = int(resources.get("GPU", 0))
        workers = workers or available
        if workers > available:
            raise InvalidInputError(f"--workers {workers} needs {workers} GPUs; the cluster has {available}")
        return workers
    cpus = resources.get("CPU", 0)
    per_actor = max(settings.ray.encoder_cpus, 0.01)
    fits = int((cpus - 0.25) // per_actor)  # a quarter CPU stays free for the read tasks
    if fits < 1:
        raise InvalidInputError(f"the cluster has {cpus:g} CPUs: not enough for one encoder actor ({per_actor:g})")
    workers = workers or min(2, fits)
    if workers > fits:
        raise InvalidInputError(
            f"--workers {workers} needs {workers * per_actor:g} CPUs plus some for reading; the cluster has "
            f"{cpus:g} (ray.encoder_cpus = {per_actor:g} per actor): use --workers {fits} or fewer"
        )
    return workers


def _unwrap(exc: BaseException) -> BaseException:
    """The domain error a Ray task or actor raised, without Ray's wrapping and remote traceback."""
    seen = exc
    for _ in range(8):  # Ray Data wraps a UDF error in UserCodeException, itself a RayTaskError's cause
        if isinstance(seen, StellaSearchError):
            return seen
        nested = getattr(seen, "cause", None) or seen.__cause__
        if nested is None:
            break
        seen = nested
    return exc


def ingest_paths_on_ray(
    paths: Sequence[Path],
    data_dir: Path,
    name: str,
    settings: Settings,
    model: str | None = None,
    dim: int | None = None,
    wait: float = 0.0,
    shards: int | None = None,
    address: str = "auto",
    workers: int | None = None,
    strict: bool = False,
) -> IngestReport:
    """Ingest ``paths`` into collection ``name`` on the Ray cluster at ``address``, with ``workers`` encoder
    actors (default: one per GPU, else 2). Same result and guarantees as :func:`indexer.pipeline.ingest_paths`.
    """
    limits = settings.ingest.metadata_limits()
    sources = check_sources(paths, strict, limits)
    ray = connect(address)
    started = time.perf_counter()
    collection, _ = prepare_collection(
        data_dir, name, lambda: _manifest_on_cluster(ray, settings, model, dim), dim, shards
    )
    gpus = _gpus_per_actor(ray)
    workers = _check_workers(ray, workers, gpus, settings)
    report = IngestReport(documents_skipped=sources.skipped, skipped=sources.first_skipped)
    with collection, collection.writing(wait):
        states = {
            doc_id: (digest, _metadata_digest(metadata))
            for doc_id, (digest, metadata) in collection.all_document_states().items()
        }
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # commits in input order, like local ingest
        context.enable_progress_bars = False
        dataset = (
            ray.data.from_items(
                [
                    {"path": str(Path(p).resolve()), "metadata_depth": limits.depth, "metadata_bytes": limits.bytes}
                    for p in paths
                ]
            )
            .flat_map(_read_file, num_cpus=0.25)  # light next to encoding: never starve the actor pool
            .map_batches(
                EncodeDocuments,
                batch_size=ENCODE_BATCH_DOCUMENTS,
                batch_format="numpy",
                fn_constructor_kwargs={
                    "settings": settings,
                    "model": model,
                    "manifest": asdict(collection.manifest),
                    "states": states,
                },
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_gpus=gpus,
                num_cpus=0 if gpus else settings.ray.encoder_cpus,
            )
        )
        try:
            for batch in dataset.iter_batches(batch_size=settings.ingest.commit_documents, batch_format="numpy"):
                _commit(collection, batch, report)
                log.info(
                    "ingest on ray: %d/%d documents, %d passages written",
                    report.documents_seen,
                    sources.documents,
                    report.passages_written,
                )
        except Exception as exc:
            unwrapped = _unwrap(exc)
            if unwrapped is exc:
                raise
            raise unwrapped from None
        collection.checkpoint()
        report.seconds = time.perf_counter() - started
        report.collection = {"documents": collection.count_documents(), "passages": collection.count_passages()}
    return report


def _commit(collection, batch: dict, report: IngestReport) -> None:
    """One transaction (per shard) for a batch of whole documents returned by the actors."""
    documents: list[Document] = []
    passages: list[Passage] = []
    vectors: list[np.ndarray] = []
    for doc_id, title, has_title, text, metadata, kind, passages_json, blob in zip(
        batch["id"],
        batch["title"],
        batch["has_title"],
        batch["text"],
        batch["metadata"],
        batch["kind"],
        batch["passages"],
        batch["vectors"],
    ):
        report.documents_seen += 1
        if kind == "unchanged":
            report.documents_unchanged += 1
            continue
        documents.append(Document(str(doc_id), str(title) if has_title else None, str(text), json.loads(metadata)))
        if kind == "metadata":
            report.metadata_updated += 1
            continue
        report.documents_added += kind == "new"
        report.documents_replaced += kind == "replace"
        passages += [Passage(str(doc_id), o, t, s, e) for o, t, s, e in json.loads(passages_json)]
        vectors.append(np.frombuffer(blob, dtype="float32").reshape(-1, collection.manifest.dim))
    if documents:
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, collection.manifest.dim), "float32")
        result = collection.write(documents, passages, stacked)
        report.passages_written += result.passages_added
        report.passages_removed += result.passages_removed
