"""The FastAPI application: ``create_app(settings)`` builds it; ``stella-search serve`` runs it under uvicorn.

Every endpoint that encodes or searches is a plain ``def``, so FastAPI runs it in its thread pool and the
event loop never blocks on the model or FAISS.

    uvicorn --factory search_api.app:app_from_env     # settings from STELLA_SEARCH_* variables
"""

from __future__ import annotations

import importlib.resources
import logging
import sqlite3
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from indexer.settings import Settings, load_settings
from search_api import schemas
from search_api.auth import Access, BearerKeys, access_summary, may_see_details, needed_keys, open_writes_warning
from search_api.metrics import Metrics
from search_api.service import SearchService
from storage.collection import COLLECTION_NAME
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

BEARER = "bearer"  # the OpenAPI security scheme of the keyed routes
KEY_RESPONSES = {
    401: {"model": schemas.ErrorBody, "description": "missing bearer key"},
    403: {"model": schemas.ErrorBody, "description": "wrong bearer key"},
}
ERROR_RESPONSES = {
    400: {"model": schemas.ErrorBody, "description": "bad input; the message says what to change"},
    **KEY_RESPONSES,
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


class Routes:
    """Declares routes on ``app`` that need ``access`` and records each in ``table`` (route name -> Access), the
    one table the :class:`BearerKeys` middleware reads; a route that needs a key under ``settings`` says so in the
    OpenAPI document.

    >>> read = Routes(app, Access.READ, table, settings, responses=ERROR_RESPONSES)
    >>> @read.get("/collections")
    ... def list_collections(): ...
    """

    def __init__(self, app: FastAPI, access: Access, table: dict[str, Access], settings: Settings, **defaults):
        self.app, self.access, self.table, self.defaults = app, access, table, defaults
        self.keyed = bool(needed_keys(access, settings.server))

    def get(self, path: str, **options):
        return self._route("GET", path, options)

    def post(self, path: str, **options):
        return self._route("POST", path, options)

    def delete(self, path: str, **options):
        return self._route("DELETE", path, options)

    def _route(self, method: str, path: str, options: dict):
        options = {
            **self.defaults,
            **options,
            "responses": {**self.defaults.get("responses", {}), **options.get("responses", {})},
        }
        if self.keyed:
            options["openapi_extra"] = {"security": [{BEARER: []}]}

        def declare(endpoint):
            name = options.get("name", endpoint.__name__)
            if name in self.table:
                raise ValueError(f"two routes are named {name!r}: the access table needs unique names")
            self.table[name] = self.access
            return self.app.api_route(path, methods=[method], **options)(endpoint)

        return declare


def get_service(request: Request) -> SearchService:
    return request.app.state.service


Service = Annotated[SearchService, Depends(get_service)]
# storage's name rule, stated in the OpenAPI document; the service still answers a name against it with 400 and the rule
CollectionName = Annotated[
    str,
    PathParameter(
        description="1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        json_schema_extra={"pattern": COLLECTION_NAME.pattern},
    ),
]


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
    warning = open_writes_warning(settings.server)  # raises where writes would be open by accident
    log.info(access_summary(settings.server))
    if warning:
        log.warning(warning)
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
    access: dict[str, Access] = {"openapi": Access.OPEN, "docs-assets": Access.OPEN}
    # outside BodyLimit: the key is checked before the body is read; inside CORS: refusals carry its headers
    app.add_middleware(BearerKeys, router=app.router, access=access, server=settings.server)
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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail, headers = exc.detail, exc.headers
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint {request.method} {request.url.path}; the API is listed at /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; the API is listed at /docs"
            if allowed := _allowed_methods(app.router.routes, request.scope):
                headers = {**(headers or {}), "Allow": allowed}
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{where}: {err['msg']}")
        # strings that are not valid Unicode (pydantic's own check on constrained strings, ours on the rest) are
        # bad input like any other 400, not a mismatch with the schema
        unicode = all(err["type"] in (schemas.INVALID_UNICODE, "string_unicode") for err in exc.errors())
        status = 400 if unicode else 422
        return JSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=status)

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

    read = Routes(app, Access.READ, access, settings, responses=ERROR_RESPONSES)
    write = Routes(app, Access.WRITE, access, settings, responses=ERROR_RESPONSES)
    public = Routes(app, Access.OPEN, access, settings, include_in_schema=False)
    probe = Routes(app, Access.PROBE, access, settings, tags=["operations"])
    # the refusals are JSON on a text/plain route: named with their media type, where a model would take the route's
    json_error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    key_refusals = {
        status: {"description": r["description"], "content": json_error} for status, r in KEY_RESPONSES.items()
    }
    scraped = Routes(app, Access.METRICS, access, settings, tags=["operations"], responses=key_refusals)

    @read.post("/collections/{collection}/search", response_model=schemas.SearchResponse, tags=["search"])
    def search(collection: CollectionName, body: schemas.SearchRequest, service: Service):
        """Top-k passages (or documents, with group_by) for one query, best first."""
        return service.search(collection, body)

    @read.post("/collections/{collection}/search/batch", response_model=schemas.BatchSearchResponse, tags=["search"])
    def search_batch(collection: CollectionName, body: schemas.BatchSearchRequest, service: Service):
        """Several queries encoded in one batch; one response per query, in order."""
        return service.search_batch(collection, body)

    @read.post("/collections/{collection}/similar", response_model=schemas.SearchResponse, tags=["search"])
    def similar(collection: CollectionName, body: schemas.SimilarRequest, service: Service):
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
    def get_document(collection: CollectionName, document_id: str, service: Service):
        """A stored document with its passages."""
        return service.get(collection, document_id)

    @write.post("/collections", response_model=schemas.CollectionInfo, status_code=201, tags=["collections"])
    def create_collection(body: schemas.CollectionCreate, service: Service):
        """Create an empty collection with its model, dimension and prompt type (fixed from then on)."""
        return service.create_collection(body)

    @write.delete("/collections/{collection}", response_model=schemas.Deleted, tags=["collections"])
    def delete_collection(collection: CollectionName, service: Service):
        """Delete a collection and its files."""
        service.delete_collection(collection)
        return schemas.Deleted(deleted=collection)

    @write.post("/collections/{collection}/documents", response_model=schemas.UpsertResponse, tags=["documents"])
    def upsert(collection: CollectionName, body: schemas.UpsertRequest, service: Service):
        """Insert or replace documents; answers once they are committed and searchable."""
        return service.upsert(collection, body.documents)

    @write.post("/collections/{collection}/documents/delete", response_model=schemas.DeleteResponse, tags=["documents"])
    def delete_documents(collection: CollectionName, body: schemas.DeleteRequest, service: Service):
        """Delete documents by id and/or metadata filter, in one transaction."""
        return service.delete_many(collection, body)

    @write.delete(
        "/collections/{collection}/documents/{document_id:path}",
        response_model=schemas.Deleted,
        tags=["documents"],
    )
    def delete_document(collection: CollectionName, document_id: str, service: Service):
        """Delete a document and its passages."""
        service.delete(collection, document_id)
        return schemas.Deleted(deleted=document_id)

    @write.post(
        "/collections/{collection}/snapshots", response_model=schemas.SnapshotInfo, status_code=201, tags=["snapshots"]
    )
    def take_snapshot(collection: CollectionName, service: Service):
        """A consistent copy of the collection (SQLite backup API + index checkpoint), taken while serving."""
        return service.take_snapshot(collection)

    @read.get("/snapshots", response_model=list[schemas.SnapshotInfo], tags=["snapshots"])
    def list_snapshots(service: Service):
        """Snapshots under the server's snapshot directory; a broken one is listed with the reason."""
        return service.snapshots()

    @write.delete("/snapshots/{snapshot}", response_model=schemas.Deleted, tags=["snapshots"])
    def delete_snapshot(snapshot: str, service: Service):
        """Delete a snapshot (a symbolic link by its name is removed, never followed)."""
        service.delete_snapshot(snapshot)
        return schemas.Deleted(deleted=snapshot)

    @write.post("/collections/restore", response_model=schemas.CollectionInfo, status_code=201, tags=["snapshots"])
    def restore(body: schemas.RestoreRequest, service: Service):
        """Verify a snapshot and serve it as a new collection."""
        return service.restore(body)

    @public.get("/", response_class=HTMLResponse)
    def search_page() -> HTMLResponse:
        """The search page: plain HTML and JavaScript, no external assets."""
        return HTMLResponse(
            SEARCH_PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": SAME_ORIGIN_ONLY}
        )

    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    @public.get("/docs", response_class=HTMLResponse)
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

    @public.get("/redoc", response_class=HTMLResponse)
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

    @probe.get("/health", response_model=schemas.Health)
    def health(request: Request, service: Service):
        """Liveness (always 200): each collection's counts and encoder state, the default model, device, GPU
        memory on CUDA. Once a key is set, a caller without one gets the status only."""
        health = service.health()
        if may_see_details(request.scope["headers"], settings.server):
            return health
        return JSONResponse({"status": health.status})

    @probe.get(
        "/ready",
        response_model=schemas.Readiness,
        responses={503: {"model": schemas.Readiness, "description": "not ready: loading, or a model unavailable"}},
    )
    def ready(request: Request, service: Service):
        """200 once every served collection can be searched and written to; 503 before (with Retry-After while
        its encoders load). With no collection served: once the default model is loaded or known unavailable
        (said in default_model). Once a key is set, a caller without one gets ready and status only."""
        readiness = service.readiness()
        status = 200 if readiness.ready else 503
        headers = {"Retry-After": "2"} if readiness.status == "loading" else None
        if may_see_details(request.scope["headers"], settings.server):
            body = readiness.model_dump(mode="json")
        else:
            body = {"ready": readiness.ready, "status": readiness.status}
        return JSONResponse(body, status_code=status, headers=headers)

    @scraped.get("/metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> Response:
        """Prometheus text format: request latency per route, encode time and texts, index sizes, GPU memory."""
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    missing = [route.name for route in app.router.routes if route.name not in access]
    if missing:
        raise RuntimeError(f"routes without an entry in the access table: {missing}")
    _document_bearer(app)
    return app


def _allowed_methods(routes: list, scope: dict) -> str | None:
    """``Allow`` of a 405: every method of the path the request names, taken from the most specific route path
    that matches it (a literal segment before a parameter: /collections/restore, not /collections/{collection}),
    as the OpenAPI document lists them; Starlette's names the first matching route's methods only. None where no
    API route matches (the static files)."""
    matching = [route for route in routes if isinstance(route, APIRoute) and route.matches(scope)[0] is not Match.NONE]
    if not matching:
        return None
    best = min(matching, key=lambda route: (len(route.param_convertors), -len(route.path)))
    return ", ".join(sorted({method for route in matching if route.path == best.path for method in route.methods}))


def _document_bearer(app: FastAPI) -> None:
    """The OpenAPI document names the bearer scheme that the keyed routes' ``security`` refers to."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            components = generate().setdefault("components", {})
            components.setdefault("securitySchemes", {})[BEARER] = {"type": "http", "scheme": "bearer"}
        return app.openapi_schema

    app.openapi = openapi


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory``: settings from the environment only."""
    return create_app(load_settings())
