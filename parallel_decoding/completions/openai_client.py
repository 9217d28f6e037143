"""A :class:`~parallel_decoding.completions.interface.CompletionClient` on an OpenAI-compatible ``/v1/completions``
server that takes token-id prompts and returns token ids: vLLM's own server (``python -m
vllm.entrypoints.openai.api_server``), or any other that speaks the same extension.

A request is ``{"prompt": [ids], "max_tokens", "stop_token_ids", "return_token_ids": true, ...}`` and its
completion is read from ``choices[0].token_ids``. Many requests are in flight at once over one connection pool;
each has a timeout, and a 429, a 5xx or a dropped connection is retried with exponential backoff (a streamed
request only until its first tokens arrived). The client asks the server's ``/v1/models`` when it is made, so a URL
with nothing listening fails there, with the URL in the message.

``reset_prefix_cache`` posts to vLLM's ``/reset_prefix_cache``, which vLLM serves only in its development mode
(``VLLM_SERVER_DEV_MODE=1`` in the server's environment); elsewhere it raises :class:`PrefixCacheResetUnavailable`
and the caller must warm the cache for both modes instead.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2

from .interface import BAN_BIAS, LENGTH, STOP, Completion, CompletionRequest, TokenCallback, check_request

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
NO_TOKEN_IDS = (
    "the server at {url} returned no token ids (choices[0].token_ids): it must take token-id prompts and "
    "return_token_ids (vLLM >= 0.10.2 does)"
)


class CompletionServerError(RuntimeError):
    """The server could not be reached, refused a request or answered without what the method needs."""


class PrefixCacheResetUnavailable(CompletionServerError):
    """The server has no ``/reset_prefix_cache`` (vLLM serves it only with ``VLLM_SERVER_DEV_MODE=1``)."""


def api_roots(base_url: str) -> tuple[str, str]:
    """``(root, api)``: the server's root URL and its ``/v1`` URL, from a base URL given either way."""
    root = base_url.rstrip("/")
    root = root.removesuffix("/v1")
    return root, root + "/v1"


class OpenAIClient:
    """Completions from the server at ``base_url`` (``http://host:port`` or ``http://host:port/v1``).

    ``model``: the served model's name (None: the one model the server lists). ``stop_token_ids``: the model's EOS
    ids (``completions.factory.model_stop_token_ids``). ``max_in_flight`` bounds the open connections,
    ``timeout`` one request (seconds), ``retries`` the retries of one request.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str | None,
        stop_token_ids: frozenset[int],
        api_key: str | None = None,
        max_in_flight: int = 64,
        timeout: float = 600.0,
        retries: int = 4,
        backoff: float = 0.5,
    ):
        self.base_url = base_url
        self.root, self.api = api_roots(base_url)
        self.stop_token_ids = stop_token_ids
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx2.Timeout(timeout, connect=min(timeout, 10.0))
        self.limits = httpx2.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
        self.retries = retries
        self.backoff = backoff
        self.model, self.context_length = self._served_model(model)
        self._http: httpx2.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _served_model(self, model: str | None) -> tuple[str, int | None]:
        """The served model's name and context length (vLLM lists ``max_model_len``), from ``/v1/models``."""
        try:
            response = httpx2.get(f"{self.api}/models", headers=self.headers, timeout=self.timeout)
        except httpx2.TransportError as e:
            raise CompletionServerError(f"nothing is listening at {self.base_url} ({e})") from e
        if response.status_code != 200:
            raise CompletionServerError(
                f"the server at {self.base_url} answered {response.status_code} to GET /v1/models: "
                f"{response.text[:200]}"
            )
        served = {card.get("id"): card for card in response.json().get("data", [])}
        if model is None:
            if len(served) != 1:
                raise CompletionServerError(
                    f"the server at {self.base_url} serves {len(served)} models ({', '.join(map(str, served))}); "
                    "name one"
                )
            model = next(iter(served))
        if model not in served:
            raise CompletionServerError(
                f"the server at {self.base_url} does not serve {model!r}; it serves {', '.join(map(str, served))}"
            )
        length = served[model].get("max_model_len")
        return str(model), int(length) if isinstance(length, int) else None

    def _client(self) -> httpx2.AsyncClient:
        """The connection pool of the running event loop (a pool cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            self._http = httpx2.AsyncClient(headers=self.headers, timeout=self.timeout, limits=self.limits)
            self._loop = loop
        return self._http

    def body(self, request: CompletionRequest, stream: bool) -> dict[str, Any]:
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(request.prompt_ids),
            "max_tokens": request.max_tokens,
            "stop_token_ids": sorted(request.stop_token_ids),
            "return_token_ids": True,
            "skip_special_tokens": False,
            "temperature": sampling.temperature if sampling.do_sample else 0.0,
            "stream": stream,
        }
        if request.banned_token_ids:
            body["logit_bias"] = {str(token): BAN_BIAS for token in sorted(request.banned_token_ids)}
        if sampling.do_sample:
            body["top_p"] = sampling.top_p
            if sampling.top_k > 0:
                body["top_k"] = sampling.top_k
            if sampling.seed is not None:
                body["seed"] = sampling.seed
        return body

    async def complete(self, request: CompletionRequest, on_tokens: TokenCallback | None = None) -> Completion:
        check_request(request)
        body = self.body(request, stream=on_tokens is not None)
        for attempt in range(self.retries + 1):
            tokens: list[int] = []
            try:
                if on_tokens is None:
                    return await self._post(body)
                return await self._stream(body, tokens, on_tokens)
            except (httpx2.TransportError, _Retryable) as e:
                if tokens or attempt == self.retries:  # streamed tokens cannot be taken back
                    raise self._failure(e) from e
                await asyncio.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    async def _post(self, body: dict[str, Any]) -> Completion:
        response = await self._client().post(f"{self.api}/completions", json=body)
        self._check_status(response.status_code, response.text)
        return self._completion(response.json()["choices"][0], [])

    async def _stream(self, body: dict[str, Any], tokens: list[int], on_tokens: TokenCallback) -> Completion:
        finish = None
        async with self._client().stream("POST", f"{self.api}/completions", json=body) as response:
            if response.status_code != 200:
                self._check_status(response.status_code, (await response.aread()).decode(errors="replace"))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                choices = json.loads(data).get("choices") or []
                if not choices:  # a usage-only chunk
                    continue
                new = self._token_ids(choices[0])
                tokens += new
                if new:
                    on_tokens(new)
                finish = choices[0].get("finish_reason") or finish
        return Completion(tokens, LENGTH if finish == "length" else STOP)

    def _completion(self, choice: dict[str, Any], tokens: list[int]) -> Completion:
        tokens = tokens + self._token_ids(choice)
        return Completion(tokens, LENGTH if choice.get("finish_reason") == "length" else STOP)

    def _token_ids(self, choice: dict[str, Any]) -> list[int]:
        ids = choice.get("token_ids")
        if not isinstance(ids, list):
            raise CompletionServerError(NO_TOKEN_IDS.format(url=self.base_url))
        return [int(i) for i in ids]

    def _check_status(self, status: int, text: str) -> None:
        if status in RETRY_STATUSES:
            raise _Retryable(status, text)
        if status != 200:
            raise CompletionServerError(f"the server at {self.base_url} answered {status}: {text[:300]}")

    def _failure(self, error: Exception) -> CompletionServerError:
        if isinstance(error, _Retryable):
            return CompletionServerError(
                f"the server at {self.base_url} answered {error.status} after {self.retries} retries: "
                f"{error.text[:300]}"
            )
        if isinstance(error, httpx2.ConnectError):
            return CompletionServerError(f"nothing is listening at {self.base_url} ({error})")
        return CompletionServerError(f"the request to {self.base_url} failed after {self.retries} retries: {error!r}")

    async def reset_prefix_cache(self) -> None:
        response = await self._client().post(f"{self.root}/reset_prefix_cache")
        if response.status_code == 404:
            raise PrefixCacheResetUnavailable(
                f"the server at {self.base_url} has no /reset_prefix_cache (vLLM serves it with "
                "VLLM_SERVER_DEV_MODE=1); warm the prefix cache for both modes instead"
            )
        if response.status_code != 200:
            raise CompletionServerError(
                f"the server at {self.base_url} answered {response.status_code} to POST /reset_prefix_cache"
            )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


class _Retryable(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(status)
        self.status = status
        self.text = text
