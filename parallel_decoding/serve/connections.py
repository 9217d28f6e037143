"""uvicorn's h11 connection with two changes: a connection must send a whole request head within the idle timeout
(uvicorn times out only a kept-alive connection between requests, so one that never sends, or sends half a head,
stays open for good), and a request h11 cannot parse (malformed, or a head over ``h11_max_incomplete_event_size``
bytes) is answered with an OpenAI-style JSON error rather than text.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 16 * 1024  # a request head (request line and headers) larger than this is refused


class GuardedH11Protocol(H11Protocol):
    """See the module docstring; the head deadline is uvicorn's ``timeout_keep_alive``."""

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole head arrived: the request's own time starts
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        error = {
            "error": {
                "message": f"invalid HTTP request (malformed, or a head over {MAX_HEAD_BYTES} bytes)",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_http_request",
            }
        }
        body = json.dumps(error).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _await_head(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
