"""One typed settings object, loaded from a YAML file, then environment variables, then CLI flags.

Later sources win. The YAML keys of the Stella performance guide are accepted as written there::

    encoder:
      batch_size: 16
      max_length: 512
      embedding_dimension: 1024
      normalize_embeddings: true
      prompt_type: s2p
    processing:
      device: auto
      clear_cache_interval: 25
      force_gc_interval: 50
    embedding:
      cache_embeddings: true
      cache_dir: ./embeddings_cache

Environment variables are ``STELLA_SEARCH_<SECTION>__<KEY>``, e.g. ``STELLA_SEARCH_ENCODER__BATCH_SIZE=32``;
a top-level key has no section: ``STELLA_SEARCH_CACHE_DIR``. Unknown keys, in any source, are an error that
names the key. Paths of the cache (``cache_dir``, ``encoder.onnx_dir``, ``embedding.cache_dir``) are made
absolute where they are given, against the working directory of that moment, so that a process never writes a
cache into whatever directory it later runs from.

>>> load_settings(cli={"encoder": {"model": "minilm"}}).encoder.model
'minilm'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from platformdirs import user_cache_dir
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from indexer.onnx_backend import INT8_KEEP_FP32
from storage.disk import DEFAULT_RESERVE_BYTES
from storage.errors import InvalidInputError
from storage.inputs import DEFAULT_METADATA_BYTES, DEFAULT_METADATA_DEPTH, READABLE_METADATA_DEPTH, MetadataLimits
from storage.sharding import MAX_SHARDS

ENV_PREFIX = "STELLA_SEARCH_"
# The CLI's ``--api-key`` for ``--url`` (the key a client sends), not a setting: the server's is SERVER__API_KEY.
CLIENT_KEY_VARIABLE = "STELLA_SEARCH_API_KEY"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def default_cache_dir() -> Path:
    """The platform's per-user cache folder for stella-search (``~/.cache/stella-search`` on Linux).

    >>> default_cache_dir().is_absolute()
    True
    """
    return Path(user_cache_dir("stella-search", appauthor=False))


# a path made absolute once, where it is given (settings are also copied and passed to other processes)
AbsolutePath = Annotated[Path, AfterValidator(lambda path: path.expanduser().resolve())]


COMPILE_SWITCH_WORDS = {word: "inductor" for word in ("on", "true", "yes", "1")} | {
    word: "off" for word in ("off", "false", "no", "0", "")
}


class EncoderSettings(_Section):
    model: str = Field("stella-1.5b", description="profile (stella-1.5b, stella-400m, minilm) or a model folder")
    batch_size: int = Field(16, ge=1, le=4096)
    max_length: int = Field(512, ge=16, le=32768, description="tokens per passage, capped by the model's own")
    embedding_dimension: int | None = Field(
        None, ge=1, description="MRL dimension; None means the model's default head (1024 for Stella)"
    )
    normalize_embeddings: bool = True
    prompt_type: Literal["s2p", "s2s"] = "s2p"
    backend: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto",
        description="auto: onnx-int8 on the CPU for models whose int8 quality was validated (the embedded MiniLM), "
        "else torch; onnx: ONNX Runtime on the CPU, exported locally from the model (same vectors); "
        "onnx-int8: that export with int8 weights for passages (vectors within cosine 0.99 of fp32)",
    )
    onnx_dir: AbsolutePath | None = Field(None, description="where ONNX exports are cached; None: <cache_dir>/onnx")
    max_batch_tokens: int = Field(
        4096,
        ge=0,
        description="onnx bulk encodes: length-sorted batches filled up to this many padded tokens (0: batch_size); "
        "on CUDA the budget is batch_size x the model's max length",
    )
    compile: str = Field(
        "off",
        description="torch backend: 'off', or a torch.compile backend ('inductor', ...) that compiles the "
        "transformer's forward once for every batch shape (dynamic shapes) and warms it up at load; "
        "on/true/yes mean inductor, off/false/no mean off",
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value):
        """YAML 1.1 reads a bare ``off`` as False and ``on`` as True, environment variables give strings: on, true
        and yes mean the default backend (inductor); off, false and no mean off."""
        if isinstance(value, bool):
            return "inductor" if value else "off"
        return COMPILE_SWITCH_WORDS.get(value.strip().lower(), value) if isinstance(value, str) else value

    int8_keep_fp32: list[str] = Field(
        default_factory=lambda: list(INT8_KEEP_FP32),
        description="onnx-int8: regular expressions naming the graph's MatMul nodes kept in fp32 (default: the FFN "
        "down projections of BERT and Qwen2/GTE layers, and the modules after the transformer such as the MRL "
        "head); [] quantises every one",
    )


class ProcessingSettings(_Section):
    device: str = Field("auto", description="auto (cuda:0 when available, else cpu), cpu, cuda, cuda:N")
    clear_cache_interval: int = Field(25, ge=0, description="empty the CUDA cache every N batches (0: never)")
    force_gc_interval: int = Field(50, ge=0, description="run the garbage collector every N batches (0: never)")
    faiss_threads: int | None = Field(
        None, ge=1, description="FAISS OpenMP threads; None: 1 when the encoder runs on the CPU, else all cores"
    )


class EmbeddingSettings(_Section):
    cache_embeddings: bool = Field(False, description="keep passage vectors in an on-disk cache keyed by text")
    cache_dir: AbsolutePath | None = Field(
        None, description="where cached vectors are kept; None: <cache_dir>/embeddings"
    )


class IngestSettings(_Section):
    chunk_overlap: int = Field(32, ge=0, description="tokens shared by consecutive passages of one document")
    commit_documents: int = Field(1024, ge=1, description="documents encoded and committed per transaction")
    max_metadata_depth: int = Field(
        DEFAULT_METADATA_DEPTH,
        ge=1,
        le=READABLE_METADATA_DEPTH,
        description="a document's metadata may nest this many objects and lists deep; deeper is refused, by the "
        "API (400) and by file ingest (naming the file and line). Responses cannot carry much deeper values.",
    )
    max_metadata_bytes: int = Field(
        DEFAULT_METADATA_BYTES,
        ge=64,
        description="a document's metadata may take this many bytes as JSON; larger is refused, by the API (400) "
        "and by file ingest. Every search hit carries its document's metadata, so this bounds a hit's size.",
    )

    def metadata_limits(self) -> MetadataLimits:
        """The limits new documents' metadata is checked against (storage.collection.metadata_to_json)."""
        return MetadataLimits(depth=self.max_metadata_depth, bytes=self.max_metadata_bytes)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="when set, write endpoints need 'Authorization: Bearer KEY'")
    read_api_key: str | None = Field(
        None, description="when set, search and reads need this key (or api_key); needs api_key set too"
    )
    allow_open_writes: bool = Field(
        False,
        description="serve writes without a key where that is refused by default: on a non-loopback host, or with "
        "only read_api_key set",
    )
    open_metrics: bool = Field(
        False, description="GET /metrics answers without a key when keys are set (a scraper on a private network)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="seconds a client has to send a request's headers; then the connection is closed"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="seconds a client has to send a request's body after its headers; then closed"
    )
    max_k: int = Field(1000, ge=1)
    max_query_chars: int = Field(4096, ge=1)
    max_batch_queries: int = Field(256, ge=1)
    max_documents_per_request: int = Field(1000, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_document_chars: int = Field(1_000_000, ge=1, description="longer documents are rejected with 413")
    cors_origins: list[str] = Field(default_factory=list, description="CORS is off unless origins are listed")
    allow_model_paths: bool = Field(
        False, description="POST /collections may name a model folder on the server (loaded with trust_remote_code)"
    )
    microbatch: bool = Field(True, description="encode concurrent queries together on one thread")
    microbatch_max: int = Field(64, ge=1, le=4096, description="most query texts in one micro-batch")
    microbatch_window_ms: float = Field(
        0.0, ge=0.0, le=100.0, description="extra wait for more queries; 0 takes only what is already queued"
    )
    max_response_hits: int = Field(
        20_000,
        ge=1,
        description="most results one response may carry, checked before searching: queries x k, times "
        "passages_per_document with group_by=document (each result carries its passage text and its document's "
        "title and metadata); over it is a 413. The default lets one search ask for max_k x 20 passages",
    )
    max_loaded_encoders: int = Field(
        4,
        ge=1,
        description="encoders (one per model, dimension, prompt type and precision of the served collections) "
        "kept in memory at once, each a whole model (MiniLM about 0.7 GB with its ONNX graphs, Stella-1.5B "
        "several GB); loading one more first releases the least recently used, which its collection's next "
        "request loads again (and waits for). Deleting a collection releases the encoders no other one uses",
    )
    max_shards: int = Field(
        64,
        ge=1,
        le=MAX_SHARDS,
        description="most shards a new collection may have (POST /collections, the CLI's --shards); every shard "
        "keeps a SQLite connection (3 file descriptors) and a FAISS index open, and every search asks them all",
    )


class StorageSettings(_Section):
    reserve_bytes: int = Field(
        DEFAULT_RESERVE_BYTES,
        ge=0,
        description="free space kept on the data folder's filesystem: a write (an upsert, an ingest batch, a new "
        "collection) is refused (HTTP 507, CLI exit 2) unless the free space stays at least reserve_bytes + twice each "
        "index file + each WAL (what a checkpoint, an optimize and a WAL checkpoint write beside what exists) + twice "
        "the write itself, and /health says 'degraded' below it. The default, 64 MiB, holds what the index files do "
        "not show yet: the vectors a collection gains between two index checkpoints (10,000 passages of 1,024 "
        "dimensions are 40 MiB) and SQLite's temporary files. Snapshots and restores check their own size the same "
        "way.",
    )


class RaySettings(_Section):
    """Resources per Ray Serve replica and Ray Data actor (``--ray``); logical CPUs, as Ray schedules them."""

    gateway_cpus: float = Field(0.25, ge=0, description="the HTTP ingress replica (FastAPI app, fan-out, merge)")
    shard_cpus: float = Field(0.25, ge=0, description="each shard replica (FAISS search, SQLite)")
    encoder_cpus: float = Field(1.0, ge=0, description="each encoder replica or ingest actor without a GPU")


class Settings(_Section):
    data_dir: Path = Path("data")
    cache_dir: AbsolutePath = Field(
        default_factory=default_cache_dir,
        description="ONNX exports and the embedding cache, one folder per user shared by every process "
        "(default: the platform's user cache folder, e.g. ~/.cache/stella-search; STELLA_SEARCH_CACHE_DIR)",
    )
    snapshot_dir: Path | None = Field(None, description="where snapshots go; None means <data_dir>/.snapshots")
    snapshot_keep: int = Field(
        5,
        ge=0,
        description="snapshots kept per collection in snapshot_dir: after each new one (API or CLI) the oldest "
        "beyond this many are deleted; 0 keeps all. 5 lets you step back past several bad writes while disk use "
        "stays bounded at five copies of each collection (without a limit they pile up unbounded)",
    )
    collection: str = "default"
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    processing: ProcessingSettings = Field(default_factory=ProcessingSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    ray: RaySettings = Field(default_factory=RaySettings)


def check_shards(shards: int, server: ServerSettings) -> None:
    """Refuse more shards than ``server.max_shards``: the same rule for POST /collections and the CLI.

    >>> check_shards(16, ServerSettings())
    """
    if shards > server.max_shards:
        raise InvalidInputError(
            f"{shards} shards; the limit is {server.max_shards} (server.max_shards): every shard holds open files "
            "and is asked by every search"
        )


def snapshot_dir(settings: Settings) -> Path:
    return settings.snapshot_dir or settings.data_dir / ".snapshots"


def onnx_dir(settings: Settings) -> Path:
    """Where ONNX exports are cached: ``encoder.onnx_dir``, else ``<cache_dir>/onnx``.

    >>> onnx_dir(load_settings(cli={"cache_dir": "/var/cache/stella"}, environ={}))
    PosixPath('/var/cache/stella/onnx')
    """
    return settings.encoder.onnx_dir or settings.cache_dir / "onnx"


def embedding_cache_dir(settings: Settings) -> Path:
    """Where the embedding cache keeps vectors: ``embedding.cache_dir``, else ``<cache_dir>/embeddings``."""
    return settings.embedding.cache_dir or settings.cache_dir / "embeddings"


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _from_env(environ: dict[str, str]) -> dict:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CLIENT_KEY_VARIABLE:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        value: Any = raw
        if raw.startswith("["):
            try:
                value = json.loads(raw)
            except ValueError:
                pass
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _describe_errors(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        else:
            problems.append(f"'{key}': {err['msg']}")
    return f"invalid settings ({source}): " + "; ".join(problems)


def load_settings(
    config_file: Path | str | None = None,
    cli: dict | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Settings from ``config_file`` (YAML), then ``STELLA_SEARCH_*`` variables, then ``cli`` overrides."""
    merged: dict = {}
    sources = []
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise InvalidInputError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise InvalidInputError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        merged = _merge(merged, loaded)
        sources.append(str(path))
    env = _from_env(dict(os.environ if environ is None else environ))
    if env:
        merged = _merge(merged, env)
        sources.append(f"{ENV_PREFIX}* environment variables")
    if cli:
        merged = _merge(merged, cli)
        sources.append("command-line flags")
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise InvalidInputError(_describe_errors(exc, ", ".join(sources) or "defaults")) from exc
