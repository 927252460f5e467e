"""Who may call what: the bearer keys of ``server.api_key`` (writes) and ``server.read_api_key`` (reads).

Each route has one :class:`Access`; :class:`BearerKeys` checks a request's key against it before anything reads
the body, and :func:`open_writes_warning` refuses, at start-up, settings under which writes would be open by
accident.

>>> from indexer.settings import ServerSettings
>>> needed_keys(Access.WRITE, ServerSettings(api_key="w", read_api_key="r"))
['w']
>>> needed_keys(Access.READ, ServerSettings(api_key="w", read_api_key="r"))
['r', 'w']
"""

from __future__ import annotations

import enum
import hmac
import ipaddress

from starlette.responses import JSONResponse
from starlette.routing import Match, Router

from indexer.settings import ServerSettings
from storage.errors import InvalidInputError

MISSING_KEY = "this endpoint needs 'Authorization: Bearer <key>'"
WRONG_KEY = "the bearer key is not valid for this endpoint"


class Access(enum.Enum):
    """What a route needs: OPEN never a key; PROBE answers everyone, its details only with a key once keys are set;
    METRICS a key once keys are set (unless server.open_metrics); READ the read key (or the write key) where
    server.read_api_key is set; WRITE the write key where server.api_key is set."""

    OPEN = "open"
    PROBE = "probe"
    METRICS = "metrics"
    READ = "read"
    WRITE = "write"


def _any_key(server: ServerSettings) -> list[str]:
    return [key for key in (server.read_api_key, server.api_key) if key]


def needed_keys(access: Access, server: ServerSettings) -> list[str]:
    """The keys accepted on a route of ``access``; [] where it needs none (PROBE: none for its status)."""
    if access is Access.WRITE:
        return [server.api_key] if server.api_key else []
    if access is Access.READ:
        return _any_key(server) if server.read_api_key else []
    if access is Access.METRICS and not server.open_metrics:
        return _any_key(server)
    return []


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    value = next((v for name, v in headers if name == b"authorization"), b"")
    scheme, _, token = value.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


def _valid(token: bytes, accepted: list[str]) -> bool:
    # every key is compared, in constant time, so the time taken says nothing about which one nearly matched
    return any([hmac.compare_digest(token, key.encode()) for key in accepted])


def may_see_details(headers: list[tuple[bytes, bytes]], server: ServerSettings) -> bool:
    """Whether a PROBE route (/health, /ready) shows collections and models: always where no key is set, else to a
    caller with the read or the write key.

    >>> may_see_details([], ServerSettings(api_key="w"))
    False
    >>> may_see_details([(b"authorization", b"Bearer w")], ServerSettings(api_key="w"))
    True
    """
    accepted = _any_key(server)
    token = _bearer(headers)
    return not accepted or (token is not None and _valid(token, accepted))


class BearerKeys:
    """ASGI middleware: 401 (no key, with ``WWW-Authenticate: Bearer``) or 403 (a wrong key) for a request whose
    route needs a key, answered from the route and headers alone, before the body is read or parsed.

    ``access`` maps each route's name to its :class:`Access`; a request that matches no route goes on to the
    router's own 404 or 405, which read no body either.
    """

    def __init__(self, app, router: Router, access: dict[str, Access], server: ServerSettings):
        self.app, self.router, self.access, self.server = app, router, access, server

    def _route(self, scope):
        # the router's own rule: the first route that matches path and method is the one that answers
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (route := self._route(scope)) is None:
            return await self.app(scope, receive, send)
        accepted = needed_keys(self.access[route.name], self.server)
        if not accepted:
            return await self.app(scope, receive, send)
        token = _bearer(scope["headers"])
        if token is not None and _valid(token, accepted):
            return await self.app(scope, receive, send)
        scope["route"] = route  # the request metrics count the refusal under its route
        if token is None:
            refusal = JSONResponse({"detail": MISSING_KEY}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        else:
            refusal = JSONResponse({"detail": WRONG_KEY}, status_code=403)
        await refusal(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (server.host) is reachable from this machine only.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0"), is_loopback("::1")
    (True, True, False, True)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve to any address
        return False


def open_writes_warning(server: ServerSettings) -> str | None:
    """Refuses (InvalidInputError, one line naming the settings) to serve writes without a key where an operator
    would not expect it: on a host other machines reach, or with only a read key set; where
    ``server.allow_open_writes`` says it is meant, the warning to log instead. None where writes need a key or
    the server is on loopback with no key at all.

    >>> open_writes_warning(ServerSettings(host="127.0.0.1")) is None
    True
    >>> open_writes_warning(ServerSettings(host="0.0.0.0", allow_open_writes=True))
    'server.host 0.0.0.0 is reachable from other machines and server.api_key is not set: ...'
    """
    if server.api_key:
        return None
    if server.read_api_key:
        risk = "server.read_api_key is set (reads need a key)"
    elif not is_loopback(server.host):
        risk = f"server.host {server.host} is reachable from other machines"
    else:
        return None
    if not server.allow_open_writes:
        raise InvalidInputError(
            f"{risk} and server.api_key is not set, so anyone could write and delete collections: set "
            "server.api_key (STELLA_SEARCH_SERVER__API_KEY), or server.allow_open_writes: true to serve writes "
            "without a key on purpose"
        )
    return f"{risk} and server.api_key is not set: writes and deletes need no key (server.allow_open_writes: true)"


def access_summary(server: ServerSettings) -> str:
    """One start-up log line: which key each kind of endpoint needs.

    >>> access_summary(ServerSettings(api_key="w"))
    'auth: writes need server.api_key; reads need no key; /metrics needs server.api_key; ...'
    """

    def needs(accepted: list[str]) -> str:
        named = (("server.read_api_key", server.read_api_key), ("server.api_key", server.api_key))
        return " or ".join(name for name, key in named if key and key in accepted) or "no key"

    return (
        f"auth: writes need {needs(needed_keys(Access.WRITE, server))}; "
        f"reads need {needs(needed_keys(Access.READ, server))}; "
        f"/metrics needs {needs(needed_keys(Access.METRICS, server))}; "
        f"the details of /health and /ready need {needs(_any_key(server))}"
    )
