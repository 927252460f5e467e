"""Serving on Ray Serve: the same FastAPI app as the ingress, an encoder deployment, one deployment per shard.

    stella-search serve --data-dir DIR --ray auto [--shard-replicas 2] [--encoder-replicas 1]

Deployments (one Serve application, ``stella-search``):

- ``gateway``: the FastAPI app of ``search_api.app`` (HTTP API, search page, Python client unchanged), running
  a :class:`ClusterSearchService`: it encodes a query once on the encoder deployment, asks every shard for its
  top m (filters applied in the shard) and merges, so the global top-k equals the unsharded answer; hybrid
  fusion and grouping run on the merged lists. Writes are chunked here, encoded on the encoder deployment and
  committed by the shard that owns each document.
- ``encoder-<n>``: one per model/head/prompt type in use; a GPU per replica where the cluster has GPUs.
- ``<collection>--shard-<i>``: one per shard (an unsharded collection is one shard), each replica holding the
  shard's Collection (FAISS + SQLite). A replica is placed on a node offering the custom resource
  ``stella:<collection>/shard-<i>`` when the cluster declares one (node-local disks); otherwise anywhere
  (a shared filesystem).

A shard call that meets a dead replica is retried (Serve restarts replicas and routes to live ones); when the
shard stays unreachable the request fails with a 503 that says so, never with a partial result. Writes are
idempotent (the same upsert stores the same content; deletes by id or filter repeat harmlessly), so retrying
them cannot duplicate anything, and a write is acknowledged only after the owning shard committed it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np

from indexer.distributed import connect, import_ray
from indexer.encoder import encoder_precision_key
from indexer.settings import Settings
from search_api import schemas
from search_api.service import SearchService
from storage.collection import Collection, Manifest, collection_dir, list_collections
from storage.errors import (
    InvalidInputError,
    ModelLoadingError,
    ModelUnavailableError,
    ShardUnavailableError,
    StellaSearchError,
)
from storage.sharding import ShardedCollection, is_sharded, read_layout, shard_name

log = logging.getLogger(__name__)

APP_NAME = "stella-search"
CALL_ATTEMPTS = 6  # a replica restart takes a few seconds; retries back off 0.25, 0.5, 1, 2, 4 s
CALL_TIMEOUT_S = 60.0
INDEX_SIZE_TTL_S = 1.0  # the shard sizes bound how deep a search may page; a second-old bound is enough


def shard_paths(data_dir: Path, name: str) -> list[Path]:
    """The directories of a collection's shards (one for an unsharded collection)."""
    path = collection_dir(data_dir, name)
    if is_sharded(path):
        return [path / d for d in read_layout(path)["directories"]]
    return [path]


def encoder_key(manifest: Manifest) -> str:
    precision = encoder_precision_key(manifest.precision)
    return f"{manifest.model}|{manifest.dim}|{manifest.prompt_type}|{manifest.max_length}|{precision}"


# -- deployments (classes; turned into Serve deployments in ``build_application``) --------------------------


class ShardServer:
    """One shard's Collection behind a Serve deployment; blocking work runs in threads, off the replica loop."""

    def __init__(self, path: str):
        self.collection = Collection.open(path)

    async def call(self, method: str, *args, **kwargs):
        target = getattr(self.collection, method)
        if not callable(target):
            return target
        return await asyncio.to_thread(target, *args, **kwargs)

    async def health(self) -> dict:
        """The shard's counts, and the node and replica answering (where the shard lives)."""
        from ray import serve
        from ray.runtime_context import get_runtime_context

        counts = await asyncio.to_thread(self.collection.health)
        return {
            **counts,
            "node": get_runtime_context().get_node_id(),
            "replica": serve.get_replica_context().replica_tag,
        }


class EncoderServer:
    """The encoder of one model/head/prompt type behind a Serve deployment."""

    def __init__(self, settings: Settings, manifest: dict):
        from indexer.pipeline import encoder_for_manifest

        self.encoder = encoder_for_manifest(Manifest(**manifest), settings)

    def describe(self) -> dict:
        from indexer.models import model_folder

        e = self.encoder
        return {
            "profile": e.profile.name,
            "head": e.head.label,
            "prompt_type": e.prompt_type,
            "device": e.device,
            "dim": e.dim,
            "max_seq_length": e.max_seq_length,
            "passage_prompt": e.passage_prompt,
            "folder": str(model_folder(e.profile)),
        }

    async def encode(self, texts: list[str], queries: bool) -> np.ndarray:
        method = self.encoder.encode_queries if queries else self.encoder.encode_passages
        return await asyncio.to_thread(method, texts)


# -- the gateway's view of the deployments ------------------------------------------------------------------


# Shard methods that change the shard: repeating one whose first attempt may have run must be harmless
WRITES = frozenset({"write", "delete", "index_field", "checkpoint", "optimize"})
REPEATABLE_WRITES = frozenset({"write", "checkpoint"})  # a rewrite stores the same content; a re-delete counts 0


def _call(handle, label: str, method: str, *args, write: bool = False, repeatable: bool = True, **kwargs):
    """``method`` on a deployment, retried while replicas restart; domain errors come back as themselves.

    Reads are retried on any sign of a dead, restarting or overloaded replica, and on timeouts (cancelled first).
    Writes are retried only when the request cannot have run (no replica took it, or back-pressure), or when it
    is ``repeatable``; a timed-out write is cancelled and never repeated.
    """
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    not_dispatched = (serve_errors.BackPressureError, serve_errors.DeploymentUnavailableError)
    replica_lost = (ray_errors.RayActorError, ray_errors.ActorUnavailableError, serve_errors.RequestCancelledError)
    timed_out = (ray_errors.GetTimeoutError, TimeoutError)
    retry_on = not_dispatched + replica_lost + timed_out if not write else not_dispatched
    if write and repeatable:
        retry_on += replica_lost
    delay = 0.25
    last: Exception | None = None
    for attempt in range(CALL_ATTEMPTS):
        response = getattr(handle, method).remote(*args, **kwargs)
        try:
            return response.result(timeout_s=CALL_TIMEOUT_S)
        except ray_errors.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, StellaSearchError):
                raise cause from None
            last = cause if isinstance(cause, Exception) else exc
        except (*not_dispatched, *replica_lost, *timed_out) as exc:
            last = exc
        if isinstance(last, timed_out):
            response.cancel()
        if not isinstance(last, retry_on):
            break
        if attempt < CALL_ATTEMPTS - 1:
            log.warning("%s.%s failed (%s); retrying in %.2fs", label, method, type(last).__name__, delay)
            time.sleep(delay)
            delay *= 2
    if not isinstance(last, (*not_dispatched, *replica_lost, *timed_out)):
        raise last
    outcome = (
        "the write may have been applied in part; repeating the request is safe"
        if write
        else "no partial result was returned"
    )
    raise ShardUnavailableError(
        f"{label} did not answer ({type(last).__name__}, {attempt + 1} attempt(s)); {outcome}. Retry in a few "
        "seconds; GET /health shows the shards."
    )


class RemoteShard:
    """A shard served by a Serve deployment, with the methods of a local :class:`Collection`."""

    def __init__(self, handle, label: str, manifest: Manifest):
        self._handle = handle
        self.label = label
        self.manifest = manifest
        self._size = (0.0, 0)

    def _remote(self, method: str, *args, **kwargs):
        if method in WRITES:
            self._size = (0.0, 0)  # the next search re-reads the shard's size
            return _call(
                self._handle,
                self.label,
                "call",
                method,
                *args,
                write=True,
                repeatable=method in REPEATABLE_WRITES,
                **kwargs,
            )
        return _call(self._handle, self.label, "call", method, *args, **kwargs)

    @property
    def index_size(self) -> int:
        at, size = self._size
        if time.monotonic() - at > INDEX_SIZE_TTL_S:
            size = self._remote("index_size")
            self._size = (time.monotonic(), size)
        return size

    @property
    def on_gpu(self) -> bool:
        return self._remote("on_gpu")

    def health(self) -> dict:
        return _call(self._handle, self.label, "health")

    def writing(self, wait: float = 60.0):
        # each shard write takes the shard's own writer lock inside the replica; none is held across calls
        return nullcontext()

    def close(self) -> None:
        """The replica owns its collection; the gateway has nothing to close."""

    def retire(self) -> None:
        """Deleting a served collection goes through the CLI and a redeploy, never through a replica."""

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self._remote(method, *args, **kwargs)


class RemoteEncoder:
    """The encoder deployment with the attributes of a local :class:`indexer.encoder.Encoder` that the
    service, retriever and ingest pipeline use; the tokenizer (for chunking upserts) loads here on first use."""

    def __init__(self, handle, label: str):
        from types import SimpleNamespace

        self._handle = handle
        self.label = label
        info = _call(handle, label, "describe")
        self.profile = SimpleNamespace(name=info["profile"])
        self.head = SimpleNamespace(label=info["head"])
        self.prompt_type = info["prompt_type"]
        self.device = info["device"]
        self.dim = info["dim"]
        self.max_seq_length = info["max_seq_length"]
        self.passage_prompt = info["passage_prompt"]
        self.stats = SimpleNamespace(seconds=0.0)
        self._folder = info["folder"]
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()

    @property
    def tokenizer(self):
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._folder)
            return self._tokenizer

    @property
    def chunk_tokenizer(self):
        return self.tokenizer  # only chunking tokenises here: the encoder deployment tokenises for the model

    def _encode(self, texts: list[str], queries: bool) -> np.ndarray:
        started = time.perf_counter()
        vectors = _call(self._handle, self.label, "encode", list(texts), queries)
        self.stats.seconds += time.perf_counter() - started
        return vectors

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, True)

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, False)

    def prefetch_passages(self, texts: list[str]) -> None:
        """Nothing to start here: the encoder replicas tokenise what they are sent."""


class ClusterSearchService(SearchService):
    """The HTTP service over Serve deployments: same API and answers as the single-machine service."""

    def __init__(self, settings: Settings, topology: dict, encoders: dict, shards: dict, **observers):
        super().__init__(settings, **observers)
        self._topology = topology
        self._encoder_handles = encoders
        self._shard_handles = shards
        self._remote_encoders: dict[str, RemoteEncoder] = {}

    def start(self, background: bool = True) -> None:
        for name, spec in self._topology["collections"].items():
            manifest = Manifest(**spec["manifest"])
            handles = self._shard_handles[name]
            remote = [RemoteShard(h, f"shard {i} of collection {name}", manifest) for i, h in enumerate(handles)]
            self._collections[name] = ShardedCollection(collection_dir(self.data_dir, name), manifest, remote)
        if background:
            threading.Thread(target=self._connect_encoders, name="encoder-connect", daemon=True).start()
        else:
            self._connect_encoders()

    def _connect_encoders(self) -> None:
        try:
            for key, handle in self._encoder_handles.items():
                self._remote_encoders[key] = RemoteEncoder(handle, f"encoder {key}")
            with self._lock:
                self._encoders.update(self._remote_encoders)
        except Exception as exc:
            log.exception("the encoder deployment did not come up")
            self._load_error = exc
        finally:
            self._ready.set()

    def _encoder_for(self, collection, wait: bool = True):
        if wait and not self._ready.is_set():
            raise ModelLoadingError("the encoder deployment is still starting; retry in a few seconds")
        encoder = self._remote_encoders.get(encoder_key(collection.manifest))
        if encoder is None:
            raise ModelUnavailableError(
                f"the encoder deployment for collection {collection.name} did not come up ({self._load_error}); "
                "see the Serve logs, then redeploy"
            )
        return encoder

    def _writer_for(self, collection, wait: bool = True):
        return self._encoder_for(collection, wait)  # the deployment encodes passages too

    def _encoder_state(self, collection) -> schemas.CollectionState:
        if not self._ready.is_set():
            return schemas.CollectionState(state="loading", writes="loading")
        if encoder_key(collection.manifest) in self._remote_encoders:
            return schemas.CollectionState(state="ready", writes="ready")
        reason = f"the encoder deployment did not come up ({self._load_error}); see the Serve logs, then redeploy"
        return schemas.CollectionState(state="unavailable", writes="unavailable", reason=reason)

    def _open_new(self, name, path):
        """The deployments serve the collections of the topology they were built with: one created since is
        served after a redeploy (``stella-search serve --ray``), never opened on the gateway."""
        return None

    def _refuse(self, what: str):
        raise InvalidInputError(
            f"{what} is not available while serving on Ray: run it with the CLI on the data directory "
            "(stella-search ingest/snapshot/restore), then redeploy with `stella-search serve --ray`"
        )

    def create_collection(self, request):
        self._refuse("creating a collection")

    def delete_collection(self, name: str) -> None:
        self._refuse("deleting a collection")

    def take_snapshot(self, name: str):
        self._refuse("taking a snapshot")

    def restore(self, request):
        self._refuse("restoring a snapshot")


# -- deployment ---------------------------------------------------------------------------------------------


def plan(settings: Settings) -> dict:
    """What to deploy: every collection under the data dir, its shards and its encoder."""
    collections = {}
    for name in list_collections(settings.data_dir):
        paths = shard_paths(settings.data_dir, name)
        manifest = Collection.read_manifest(paths[0])  # the index itself loads in the shard's replica
        collections[name] = {
            "manifest": asdict(manifest),
            "shards": [str(p) for p in paths],
            "encoder": encoder_key(manifest),
        }
    if not collections:
        raise InvalidInputError(
            f"no collection under {settings.data_dir}: ingest one first (stella-search ingest ... --ray ADDRESS)"
        )
    return {"collections": collections}


def build_application(settings: Settings, shard_replicas: int = 1, encoder_replicas: int = 1):
    """The Serve application for the collections under ``settings.data_dir``."""
    import_ray()
    import ray
    from ray import serve

    from search_api.app import create_app

    topology = plan(settings)
    resources = ray.cluster_resources()
    gpu = 1 if resources.get("GPU", 0) >= 1 else 0
    encoder_deployment = serve.deployment(EncoderServer)
    shard_deployment = serve.deployment(ShardServer)
    encoders = {}
    for i, key in enumerate(sorted({c["encoder"] for c in topology["collections"].values()})):
        manifest = next(c["manifest"] for c in topology["collections"].values() if c["encoder"] == key)
        encoders[key] = encoder_deployment.options(
            name=f"encoder-{i}",
            num_replicas=encoder_replicas,
            ray_actor_options={"num_gpus": gpu, "num_cpus": 0 if gpu else settings.ray.encoder_cpus},
            max_ongoing_requests=64,
        ).bind(settings, manifest)
    shards = {}
    for name, spec in topology["collections"].items():
        shards[name] = []
        for i, path in enumerate(spec["shards"]):
            placement = f"stella:{name}/{shard_name(i)}"
            options = {"num_cpus": settings.ray.shard_cpus}
            if placement in resources:
                options["resources"] = {placement: 0.01}
            shards[name].append(
                shard_deployment.options(
                    name=f"{name}--{shard_name(i)}",
                    num_replicas=shard_replicas,
                    ray_actor_options=options,
                    max_ongoing_requests=32,
                ).bind(path)
            )

    @serve.ingress()
    class Gateway:
        def __init__(self, settings: Settings, topology: dict, encoders: dict, shards: dict):
            self.settings = settings
            self.service_args = (topology, encoders, shards)

        def __serve_build_asgi_app__(self):
            def service_factory(settings, **observers):
                return ClusterSearchService(settings, *self.service_args, **observers)

            return create_app(self.settings, service_factory=service_factory)

    gateway = serve.deployment(
        Gateway, name="gateway", ray_actor_options={"num_cpus": settings.ray.gateway_cpus}, max_ongoing_requests=64
    )
    return gateway.bind(settings, topology, encoders, shards)


def serve_on_ray(
    settings: Settings,
    address: str = "auto",
    shard_replicas: int = 1,
    encoder_replicas: int = 1,
    blocking: bool = True,
) -> str:
    """Deploy the collections under ``settings.data_dir`` on the Ray cluster at ``address``; returns the URL."""
    from search_api.auth import open_writes_warning

    if warning := open_writes_warning(settings.server):  # refuses here, before anything is deployed
        log.warning(warning)
    connect(address)
    from ray import serve

    serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
    application = build_application(settings, shard_replicas, encoder_replicas)
    serve.run(application, name=APP_NAME, route_prefix="/")
    url = f"http://{settings.server.host}:{settings.server.port}"
    log.info("serving %s on Ray Serve at %s", settings.data_dir, url)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(APP_NAME)
    return url
