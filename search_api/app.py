"""The FastAPI application: ``create_app(settings)`` builds it; ``stella-search serve`` runs it under uvicorn.

Every endpoint that encodes or searches is a plain ``def``, so FastAPI runs it in its thread pool and the
event loop never blocks on the model or FAISS.

    uvicorn --factory search_api.app:app_from_env     # settings from STELLA_SEARCH_* variables
"""

from __future__ import annotations

import hmac
import importlib.resources
import logging
import sqlite3
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.settings import Settings, load_settings
from search_api import schemas
from search_api.metrics import Metrics
from search_api.service import SearchService
from storage.disk import storage_error
from storage.errors import (
    ConflictError,
    CorruptCollectionError,
    InsufficientStorageError,
    InvalidInputError,
    ModelLoadingError,
    ModelUnavailableError,
    NotFoundError,
    PayloadTooLargeError,
    ShardUnavailableError,
    StellaSearchError,
    StorageUnavailableError,
)

log = logging.getLogger(__name__)
SEARCH_PAGE = Path(__file__).with_name("static") / "index.html"
# Swagger UI and ReDoc as the fastapi-offline package ships them: /docs and /redoc work without internet
DOCS_ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))
DOCS_ASSETS_URL = "/docs-assets"
# The HTML pages may load from this server only: the browser refuses anything else (ReDoc's menu, for one, asks a
# CDN for its logo); inline code and styles are the pages' own, blob: workers ReDoc's search index.
SAME_ORIGIN_ONLY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:"
)

# One mapping from domain exceptions to status codes; the first matching class wins.
STATUS_BY_ERROR: list[tuple[type[StellaSearchError], int]] = [
    (PayloadTooLargeError, 413),
    (InvalidInputError, 400),
    (NotFoundError, 404),
    (ConflictError, 409),
    (ModelUnavailableError, 503),
    (CorruptCollectionError, 503),
    (ShardUnavailableError, 503),
    (StorageUnavailableError, 503),
    (InsufficientStorageError, 507),
    (StellaSearchError, 400),
]

ERROR_RESPONSES = {
    400: {"model": schemas.ErrorBody, "description": "bad input; the message says what to change"},
    401: {"model": schemas.ErrorBody, "description": "missing bearer key"},
    403: {"model": schemas.ErrorBody, "description": "wrong bearer key"},
    404: {"model": schemas.ErrorBody, "description": "unknown collection or document"},
    409: {
        "model": schemas.ErrorBody,
        "description": "conflict: model/dim mismatch, existing collection, busy",
    },
    413: {"model": schemas.ErrorBody, "description": "request body or batch over the limits"},
    422: {"model": schemas.ErrorBody, "description": "body does not match the schema"},
    503: {
        "model": schemas.ErrorBody,
        "description": "model still loading or unavailable (retry); a damaged collection; a read-only data folder "
        "(writes); a failed read or write of the disk",
    },
    507: {
        "model": schemas.ErrorBody,
        "description": "a write refused for lack of space: the message names the data folder and its free space",
    },
}


class _Unauthorized(Exception):
    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check_key(request: Request, accepted: list[str]) -> None:
    token = _bearer(request)
    if token is None:
        raise _Unauthorized(401, "this endpoint needs 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in accepted):
        raise _Unauthorized(403, "the bearer key is not valid for this endpoint")


def require_write(request: Request) -> None:
    key = request.app.state.settings.server.api_key
    if key:
        _check_key(request, [key])


def require_read(request: Request) -> None:
    server = request.app.state.settings.server
    if server.read_api_key:
        _check_key(request, [k for k in (server.read_api_key, server.api_key) if k])


def get_service(request: Request) -> SearchService:
    return request.app.state.service


Service = Annotated[SearchService, Depends(get_service)]


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, by Content-Length or while streaming."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _message(self) -> str:
        return f"request body is over the {self.limit}-byte limit (server.max_body_bytes); send fewer documents"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # FastAPI re-raises an HTTPException met while reading the body
                    raise HTTPException(status_code=413, detail=self._message())
            return message

        await self.app(scope, counting_receive, send)


class RequestMetrics:
    """ASGI middleware: latency per method, route template and status (plain ASGI: no per-request task)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(scope["method"], route, status, time.perf_counter() - started)


def create_app(
    settings: Settings | None = None, load_in_background: bool = True, service_factory=SearchService
) -> FastAPI:
    """The application for ``settings`` (defaults from the environment); collections under settings.data_dir.

    ``service_factory(settings, observe_encode=..., observe_batch_size=...)`` makes the object behind the
    endpoints: the single-machine :class:`SearchService`, or the Ray Serve one of ``search_api.cluster``.
    """
    settings = settings or load_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = service_factory(
            settings, observe_encode=metrics.observe_encode, observe_batch_size=metrics.observe_batch_size
        )
        service.start(background=load_in_background)
        app.state.service = service
        metrics.bind(service)
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="stella-search",
        version="0.1.0",
        summary="Vector search over Stella v5 (or MiniLM) embeddings: FAISS index, SQLite metadata.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own pages load their scripts from a CDN: served from DOCS_ASSETS below
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, limit=settings.server.max_body_bytes)
    if settings.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(StellaSearchError)
    async def domain_error(request: Request, exc: StellaSearchError):
        status = next(code for cls, code in STATUS_BY_ERROR if isinstance(exc, cls))
        headers = {"Retry-After": "2"} if isinstance(exc, (ModelLoadingError, ShardUnavailableError)) else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint {request.method} {request.url.path}; the API is listed at /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; the API is listed at /docs"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{where}: {err['msg']}")
        return JSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=422)

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def storage_failure(request: Request, exc: Exception):
        """A failed read or write of the disk that no layer below named: its domain error (503, 507), never a 500."""
        error = storage_error(exc, settings.data_dir)
        if error is None:
            return await unexpected(request, exc)
        log.warning("%s %s: %s (%s)", request.method, request.url.path, error, exc)
        return await domain_error(request, error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)

    read = APIRouter(dependencies=[Depends(require_read)], responses=ERROR_RESPONSES)
    write = APIRouter(dependencies=[Depends(require_write)], responses=ERROR_RESPONSES)

    @read.post("/collections/{collection}/search", response_model=schemas.SearchResponse, tags=["search"])
    def search(collection: str, body: schemas.SearchRequest, service: Service):
        """Top-k passages (or documents, with group_by) for one query, best first."""
        return service.search(collection, body)

    @read.post("/collections/{collection}/search/batch", response_model=schemas.BatchSearchResponse, tags=["search"])
    def search_batch(collection: str, body: schemas.BatchSearchRequest, service: Service):
        """Several queries encoded in one batch; one response per query, in order."""
        return service.search_batch(collection, body)

    @read.post("/collections/{collection}/similar", response_model=schemas.SearchResponse, tags=["search"])
    def similar(collection: str, body: schemas.SimilarRequest, service: Service):
        """More like this: the nearest passages or documents to a stored document (its own vectors) or a text."""
        return service.similar(collection, body)

    @read.get("/collections", response_model=list[schemas.CollectionInfo], tags=["collections"])
    def list_collections(service: Service):
        """Every collection with its model, dimension and counts."""
        return service.collections()

    @read.get(
        "/collections/{collection}/documents/{document_id:path}",
        response_model=schemas.DocumentOut,
        tags=["documents"],
    )
    def get_document(collection: str, document_id: str, service: Service):
        """A stored document with its passages."""
        return service.get(collection, document_id)

    @write.post("/collections", response_model=schemas.CollectionInfo, status_code=201, tags=["collections"])
    def create_collection(body: schemas.CollectionCreate, service: Service):
        """Create an empty collection with its model, dimension and prompt type (fixed from then on)."""
        return service.create_collection(body)

    @write.delete("/collections/{collection}", response_model=schemas.Deleted, tags=["collections"])
    def delete_collection(collection: str, service: Service):
        """Delete a collection and its files."""
        service.delete_collection(collection)
        return schemas.Deleted(deleted=collection)

    @write.post("/collections/{collection}/documents", response_model=schemas.UpsertResponse, tags=["documents"])
    def upsert(collection: str, body: schemas.UpsertRequest, service: Service):
        """Insert or replace documents; answers once they are committed and searchable."""
        return service.upsert(collection, body.documents)

    @write.post("/collections/{collection}/documents/delete", response_model=schemas.DeleteResponse, tags=["documents"])
    def delete_documents(collection: str, body: schemas.DeleteRequest, service: Service):
        """Delete documents by id and/or metadata filter, in one transaction."""
        return service.delete_many(collection, body)

    @write.delete(
        "/collections/{collection}/documents/{document_id:path}",
        response_model=schemas.Deleted,
        tags=["documents"],
    )
    def delete_document(collection: str, document_id: str, service: Service):
        """Delete a document and its passages."""
        service.delete(collection, document_id)
        return schemas.Deleted(deleted=document_id)

    @write.post(
        "/collections/{collection}/snapshots", response_model=schemas.SnapshotInfo, status_code=201, tags=["snapshots"]
    )
    def take_snapshot(collection: str, service: Service):
        """A consistent copy of the collection (SQLite backup API + index checkpoint), taken while serving."""
        return service.take_snapshot(collection)

    @read.get("/snapshots", response_model=list[schemas.SnapshotInfo], tags=["snapshots"])
    def list_snapshots(service: Service):
        """Snapshots under the server's snapshot directory."""
        return service.snapshots()

    @write.post("/collections/restore", response_model=schemas.CollectionInfo, status_code=201, tags=["snapshots"])
    def restore(body: schemas.RestoreRequest, service: Service):
        """Verify a snapshot and serve it as a new collection."""
        return service.restore(body)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def search_page() -> HTMLResponse:
        """The search page: plain HTML and JavaScript, no external assets."""
        return HTMLResponse(
            SEARCH_PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": SAME_ORIGIN_ONLY}
        )

    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        """Swagger UI over /openapi.json, every asset from this server."""
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters={"validatorUrl": None},  # else a badge image from validator.swagger.io
        )
        page.headers["Content-Security-Policy"] = SAME_ORIGIN_ONLY
        return page

    @app.get("/redoc", response_class=HTMLResponse, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        """ReDoc over /openapi.json, every asset from this server (no web fonts)."""
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = SAME_ORIGIN_ONLY
        return page

    @app.get("/health", response_model=schemas.Health, tags=["operations"])
    def health(service: Service):
        """Liveness (always 200): each collection's counts and encoder state, the default model, device, GPU
        memory on CUDA."""
        return service.health()

    @app.get(
        "/ready",
        response_model=schemas.Readiness,
        tags=["operations"],
        responses={503: {"model": schemas.Readiness, "description": "not ready: loading, or a model unavailable"}},
    )
    def ready(service: Service):
        """200 once every served collection can be searched and written to; 503 before (with Retry-After while
        its encoders load). With no collection served: once the default model is loaded or known unavailable
        (said in default_model)."""
        readiness = service.readiness()
        if readiness.ready:
            return readiness
        headers = {"Retry-After": "2"} if readiness.status == "loading" else None
        return JSONResponse(readiness.model_dump(mode="json"), status_code=503, headers=headers)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["operations"])
    def prometheus_metrics() -> Response:
        """Prometheus text format: request latency per route, encode time and texts, index sizes, GPU memory."""
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    app.include_router(read)
    app.include_router(write)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory``: settings from the environment only."""
    return create_app(load_settings())
