"""The checks every request passes before a route sees it (an ASGI middleware around the app's routes):

- headers: at most MAX_HEADERS of them and MAX_HEADER_BYTES in all (431); h11 also bounds a head it receives in
  pieces (``connections``).
- ``Host``: a server bound to loopback answers only requests addressed to a loopback name (``localhost``,
  ``127.x.x.x``, ``[::1]``, any port), so a page on another name that resolves to 127.0.0.1 (DNS rebinding) cannot
  reach it; 403.
- ``Origin``: a browser's cross-origin request is refused (403) unless its origin is in ``--allowed_origins``;
  an allowed one gets CORS headers and its preflight (``OPTIONS``) an answer.
- ``Content-Type`` of a POST must be JSON (415): a browser's "simple request" (``text/plain``, no preflight)
  cannot reach a route.
- The body: at most ``--max_body_bytes`` (413, from ``Content-Length`` before anything is read, or as soon as a
  body without one grows past it), read within ``--body_timeout`` seconds (408); the route gets it whole.
- Any exception escaping the app becomes a JSON 500 (or, once the answer has started, is only logged).

Every refusal is an OpenAI-style error object, counted in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .protocol import APIError

log = logging.getLogger("parallel_decoding.serve")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
PREFLIGHT_MAX_AGE_S = 600
MAX_HEADERS = 100  # header lines of one request
MAX_HEADER_BYTES = 16 * 1024  # their names and values together
JSON_TYPES = ("application/json",)


@dataclass(frozen=True)
class RequestLimits:
    """What the guard enforces (``server.add_flags`` sets them from the command line)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    allowed_origins: frozenset[str] = frozenset()
    loopback_only: bool = True  # refuse a Host that is not a loopback name (set when bound to loopback)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an address or name to bind to, or a ``Host`` header's name) is this machine only."""
    name = host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name of a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class BodyRefused(Exception):
    """The body was not read whole: the error to answer with (the connection is then closed)."""

    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


class ClientLeft(Exception):
    """The client closed the connection while sending its body."""


class RequestGuard:
    """The middleware (see the module docstring); ``on_error`` counts each error answer it sends."""

    def __init__(self, app: ASGIApp, limits: RequestLimits, on_error: Callable[[APIError], None]):
        self.app, self.limits, self.on_error = app, limits, on_error

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        headers = _headers(scope)
        origin = headers.get("origin")

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if origin is not None:  # only an allowed origin gets this far
                    message["headers"] = [*message.get("headers", []), *_cors_headers(origin)]
            await send(message)

        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await self._answer(refusal, send)
                return
            if scope["method"] == "OPTIONS" and origin is not None:
                await _preflight(send_tracked)
                return
            if scope["method"] == "POST":
                body = await self._read_body(headers, receive)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_tracked)
        except ClientLeft:
            return
        except BodyRefused as refused:
            await self._answer(refused.error, send, close=True)
        except Exception:
            log.exception("an unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            error = APIError(500, "the server failed to answer this request", type="server_error")
            if started:
                self.on_error(error)  # the answer is under way: its end is what the client sees
            else:
                await self._answer(error, send)

    def _refusal(self, scope: MutableMapping[str, Any], headers: dict[str, str]) -> APIError | None:
        raw = scope.get("headers", [])
        if len(raw) > MAX_HEADERS or sum(len(k) + len(v) for k, v in raw) > MAX_HEADER_BYTES:
            return APIError(
                431,
                f"the request has more than {MAX_HEADERS} headers or {MAX_HEADER_BYTES} bytes of them",
                code="headers_too_large",
            )
        host = headers.get("host")
        if self.limits.loopback_only and host is not None and not is_loopback_host(host_name(host)):
            return APIError(
                403,
                "this server answers only requests addressed to localhost (the Host header names another host)",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and origin not in self.limits.allowed_origins:
            return APIError(
                403,
                f"requests from the origin {origin!r} are not allowed (the server's --allowed_origins)",
                code="origin_not_allowed",
            )
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type not in JSON_TYPES:
                shown = repr(media_type) if media_type else "none"
                return APIError(
                    415,
                    f"the request body must be JSON (Content-Type: application/json), got {shown}",
                    code="unsupported_media_type",
                )
        return None

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        """The whole body, bounded in size and time; :class:`BodyRefused` or :class:`ClientLeft` otherwise."""
        limit = self.limits.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise BodyRefused(APIError(400, "the Content-Length header is not a number"))
            if int(declared) > limit:
                raise BodyRefused(_too_large(limit))
        try:
            # wait_for, not asyncio.timeout: the project supports Python 3.10
            return await asyncio.wait_for(_receive_body(receive, limit), self.limits.body_timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            raise BodyRefused(
                APIError(
                    408,
                    f"the request body did not arrive within {self.limits.body_timeout:g} s",
                    code="request_timeout",
                )
            ) from None

    async def _answer(self, error: APIError, send: Send, close: bool = False) -> None:
        """An error answer; ``close`` when the body was not read, so the connection cannot carry another request."""
        self.on_error(error)
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in error.headers.items()]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is larger than {limit} bytes (the server's --max_body_bytes)", code="body_too_large"
    )


def _headers(scope: MutableMapping[str, Any]) -> dict[str, str]:
    """The request's headers by lower-case name (latin-1, as HTTP sends them); a repeated one keeps its first."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over the body read here once, then the connection's own events (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin")]


async def _preflight(send: Send) -> None:
    headers = [
        (b"access-control-allow-methods", b"GET, POST"),
        (b"access-control-allow-headers", b"authorization, content-type"),
        (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _receive_body(receive: Receive, limit: int) -> bytes:
    """The body's chunks until the last, refused as soon as they pass ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyRefused(_too_large(limit))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
