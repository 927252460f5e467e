"""Python clients for the stella-search HTTP API, on httpx: ``SearchClient`` and ``AsyncSearchClient``.

Results come back as typed objects; a server error is raised as :class:`SearchAPIError` carrying the server's
status and message. Connection errors and 503 (model loading) are retried with exponential backoff; nothing
else is.

>>> with SearchClient("http://127.0.0.1:8000") as client:
...     client.upsert([{"id": "doc-1", "text": "Faiss is a library for vector search."}])
...     client.search("what is faiss", k=3).results[0].id
'doc-1'
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import httpx

from search_api import schemas

RETRYABLE_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


class SearchAPIError(Exception):
    """An error answer from the server: ``status_code`` and the server's ``detail`` message."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


def _document(doc: Any) -> dict:
    if isinstance(doc, schemas.DocumentIn):
        return doc.model_dump()
    return dict(doc)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    raise SearchAPIError(response.status_code, str(detail))


Parse = Callable[[Any], Any]


def _batch(data: Any) -> list[schemas.SearchResponse]:
    return schemas.BatchSearchResponse.model_validate(data).responses


def _collections(data: Any) -> list[schemas.CollectionInfo]:
    return [schemas.CollectionInfo.model_validate(c) for c in data]


class _Calls:
    """The API's calls, defined once for both clients: each builds its request and hands it to ``_send``, which
    ``SearchClient`` runs at once and ``AsyncSearchClient`` as a coroutine (where ``_coroutine_calls`` makes
    every call an ``async def``)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float, retries: int, backoff: float, transport):
        self.retries, self.backoff = retries, backoff
        self._options = {
            "base_url": base_url,
            "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
            "timeout": timeout,
            "transport": transport,
        }

    def _send(self, method: str, path: str, parse: Parse, **kwargs) -> Any:
        raise NotImplementedError  # SearchClient and AsyncSearchClient

    def _retry_wait(self, attempt: int, response: httpx.Response | None = None) -> float | None:
        """Seconds to wait before retrying (a connection error, or a 503), or None to stop retrying."""
        if attempt >= self.retries or (response is not None and response.status_code != 503):
            return None
        wait = _backoff(attempt, self.backoff)
        if response is not None:
            wait = max(wait, float(response.headers.get("Retry-After", 0)))
        return wait

    @staticmethod
    def _doc_path(collection: str, document_id: str) -> str:
        return f"/collections/{quote(collection, safe='')}/documents/{quote(document_id, safe='')}"

    @staticmethod
    def _path(collection: str, suffix: str = "") -> str:
        return f"/collections/{quote(collection, safe='')}{suffix}"

    def search(self, query: str, k: int = 10, collection: str = "default", **options: Any) -> schemas.SearchResponse:
        """Search; ``options``: mode, filter, fusion, alpha, group_by, passages_per_document, offset."""
        body = {"query": query, "k": k, **options}
        return self._send("POST", self._path(collection, "/search"), schemas.SearchResponse.model_validate, json=body)

    def search_batch(
        self, queries: list[str], k: int = 10, collection: str = "default", **options: Any
    ) -> list[schemas.SearchResponse]:
        """One request for many queries (the same ``options`` for each); a response per query, in order."""
        body = {"queries": list(queries), "k": k, **options}
        return self._send("POST", self._path(collection, "/search/batch"), _batch, json=body)

    def similar(
        self,
        id: str | None = None,
        text: str | None = None,
        k: int = 10,
        collection: str = "default",
        **options: Any,
    ) -> schemas.SearchResponse:
        """More like this: neighbours of a stored document (by id) or of a text."""
        body = {"id": id, "text": text, "k": k, **options}
        return self._send("POST", self._path(collection, "/similar"), schemas.SearchResponse.model_validate, json=body)

    def upsert(
        self, documents: Iterable[dict | schemas.DocumentIn], collection: str = "default"
    ) -> schemas.UpsertResponse:
        body = {"documents": [_document(d) for d in documents]}
        return self._send(
            "POST", self._path(collection, "/documents"), schemas.UpsertResponse.model_validate, json=body
        )

    def get(self, document_id: str, collection: str = "default") -> schemas.DocumentOut:
        return self._send("GET", self._doc_path(collection, document_id), schemas.DocumentOut.model_validate)

    def delete(self, document_id: str, collection: str = "default") -> schemas.Deleted:
        return self._send("DELETE", self._doc_path(collection, document_id), schemas.Deleted.model_validate)

    def delete_many(
        self, ids: Iterable[str] = (), filter: dict | None = None, collection: str = "default"
    ) -> schemas.DeleteResponse:
        """Delete documents by id and/or metadata filter in one transaction."""
        body = {"ids": list(ids), "filter": filter}
        return self._send(
            "POST", self._path(collection, "/documents/delete"), schemas.DeleteResponse.model_validate, json=body
        )

    def collections(self) -> list[schemas.CollectionInfo]:
        return self._send("GET", "/collections", _collections)

    def create_collection(
        self, name: str, model: str | None = None, dim: int | None = None, prompt_type: str = "s2p", shards: int = 1
    ) -> schemas.CollectionInfo:
        body = {"name": name, "model": model, "dim": dim, "prompt_type": prompt_type, "shards": shards}
        return self._send("POST", "/collections", schemas.CollectionInfo.model_validate, json=body)

    def delete_collection(self, name: str) -> schemas.Deleted:
        return self._send("DELETE", self._path(name), schemas.Deleted.model_validate)

    def health(self) -> schemas.Health:
        return self._send("GET", "/health", schemas.Health.model_validate)


def _backoff(attempt: int, base: float) -> float:
    return base * (2**attempt)


class SearchClient(_Calls):
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, timeout, retries, backoff, transport)
        self._http = httpx.Client(**self._options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, method: str, path: str, parse: Parse, **kwargs) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except RETRYABLE_ERRORS:
                wait = self._retry_wait(attempt)
                if wait is None:
                    raise
            else:
                wait = self._retry_wait(attempt, response)
                if wait is None:
                    _raise_for(response)
                    return parse(response.json())
            time.sleep(wait)
            attempt += 1


def _coroutine_calls(cls):
    """Each public call of ``_Calls`` as an ``async def`` of ``cls`` (so inspect, mocks and type checkers see
    coroutine functions, and nothing runs before the await), awaiting what the shared call's ``_send`` returns."""

    def as_coroutine(call):
        @functools.wraps(call)
        async def awaited(self, *args, **kwargs):
            return await call(self, *args, **kwargs)

        return awaited

    for name, call in vars(_Calls).items():
        if not name.startswith("_") and inspect.isfunction(call):
            setattr(cls, name, as_coroutine(call))
    return cls


@_coroutine_calls
class AsyncSearchClient(_Calls):
    """``SearchClient``'s calls as coroutines: ``await client.search("query")``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, timeout, retries, backoff, transport)
        self._http = httpx.AsyncClient(**self._options)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSearchClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, parse: Parse, **kwargs) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except RETRYABLE_ERRORS:
                wait = self._retry_wait(attempt)
                if wait is None:
                    raise
            else:
                wait = self._retry_wait(attempt, response)
                if wait is None:
                    _raise_for(response)
                    return parse(response.json())
            await asyncio.sleep(wait)
            attempt += 1
