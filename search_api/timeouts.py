"""Deadlines for slow clients: uvicorn closes idle keep-alive connections, but has no limit on how long a client
takes to send a request's headers or body, so a few hundred connections that dribble a byte now and then hold
the server's sockets (slowloris). :func:`uvicorn_options` gives uvicorn an HTTP protocol that closes them.

    uvicorn.run(app, host="127.0.0.1", port=8000, **uvicorn_options(settings.server))
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from indexer.settings import ServerSettings

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with two deadlines per request: ``header_timeout`` seconds from the
    connection (or the request's first byte, on a kept-alive connection) to the end of its headers, and
    ``body_timeout`` seconds from there to the end of its body. A connection past either is closed; one still
    sending headers is first told 408. Subclassed with the values by :func:`uvicorn_options`."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout, self._headers_too_slow)  # also a connection that never sends a byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a new request on a kept-alive connection
            self._arm(self.header_timeout, self._headers_too_slow)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._arm(self.body_timeout, self.transport.close)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, seconds: float, expire) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        if self.transport.is_closing():
            return
        # part of a request came and no earlier response is being written: say why the connection ends
        if self.scope is not None and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def uvicorn_options(server: ServerSettings) -> dict:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` that apply ``server.header_timeout_s`` and
    ``server.body_timeout_s``.

    >>> uvicorn_options(ServerSettings(header_timeout_s=5))["http"].header_timeout
    5.0
    """
    protocol = type(
        "DeadlineHttpProtocol",
        (DeadlineHttpProtocol,),
        {"header_timeout": server.header_timeout_s, "body_timeout": server.body_timeout_s},
    )
    return {"http": protocol}
