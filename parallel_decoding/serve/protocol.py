"""The chat-completions protocol: a request body checked field by field, and OpenAI's response, chunk and error
shapes (plus the ``parallel_decoding`` object that says how the answer was decoded).

Extension fields of a request: ``parallel`` (default true; false = normal decoding), ``max_branches`` (the cap on
one block's branches) and ``top_k``. Fields this server cannot honour (``tools``, ``stop``, ``logprobs``, penalties,
...) are refused with a 400 when set to anything but their neutral value, rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from parallel_decoding.engine.decode import LENGTH_STOPS, StopReason

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_SEED = 2**64
MAX_INTEGER_DIGITS = 64  # a JSON integer longer than this is kept as its length only (no field takes one)

# Fields with no effect here: allowed only at the value that changes nothing.
NEUTRAL = {
    "stop": lambda v: v is None or v == [] or v == "",
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "tools": lambda v: v in (None, []),
    "functions": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": lambda v: v in (None, {}),
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
}


class APIError(Exception):
    """An error answer: HTTP ``status`` and OpenAI's ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class HugeInteger:
    """A JSON integer of more than MAX_INTEGER_DIGITS digits, kept as its digit count (Python refuses to convert
    very long ones, and no field of a request can take one); a field that gets one says so."""

    digits: int


def _integer(text: str) -> int | HugeInteger:
    return HugeInteger(len(text.lstrip("-"))) if len(text) > MAX_INTEGER_DIGITS else int(text)


def _json_body(raw: bytes):
    """The parsed body; 400 for what is not JSON, nests too deeply for the parser, or is not Unicode."""
    try:
        return json.loads(raw, parse_int=_integer)
    except json.JSONDecodeError as e:
        raise bad(f"the request body is not valid JSON (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise bad("the request body is not valid UTF-8") from None
    except RecursionError:
        raise bad("the request body nests arrays or objects too deeply") from None


@dataclass
class ChatRequest:
    """A checked chat-completions request."""

    messages: list
    prompt_ids: list[int] | None = None  # the messages in the chat template, tokenized (off the engine's thread)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    parallel: bool = True
    max_branches: int | None = None
    model: str | None = None

    @property
    def mode(self) -> str:
        return "parallel" if self.parallel else "normal"

    @property
    def sampling(self) -> bool:
        """Greedy when temperature is absent or 0, sampling otherwise."""
        return bool(self.temperature)

    def generation(self, default_max_tokens: int) -> dict:
        """The engine's generation settings (the random stream is the worker's to make, from ``seed``)."""
        gen: dict[str, Any] = {"max_new_tokens": self.max_tokens or default_max_tokens}
        if self.sampling:
            gen.update(
                do_sample=True,
                temperature=float(self.temperature or 0.0),
                top_p=1.0 if self.top_p is None else float(self.top_p),
                top_k=self.top_k or 0,
            )
        return gen


def parse_chat_request(raw: bytes, model_ids: tuple[str, ...]) -> ChatRequest:
    """The request body, checked; raises :class:`APIError` (400, or 404 for a model this server does not serve)."""
    body = _json_body(raw)
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for field, neutral in NEUTRAL.items():
        if field in body and not neutral(body[field]):
            raise bad(f"{field!r} is not supported by this server", param=field, code="unsupported_parameter")
    model = _typed(body, "model", str)
    if model is not None and model not in model_ids:
        raise APIError(
            404,
            f"The model {model!r} does not exist; this server serves {model_ids[0]!r}",
            param="model",
            code="model_not_found",
        )
    n = _typed(body, "n", int)
    if n is not None and n != 1:
        raise bad(f"only n = 1 is supported, got {n}", param="n")
    chat = ChatRequest(messages=parse_messages(body.get("messages")), model=model)
    _sampling_fields(body, chat)
    chat.stream = bool(_typed(body, "stream", bool))
    options = _typed(body, "stream_options", dict)
    if options is not None:
        chat.include_usage = bool(_typed(options, "include_usage", bool, "stream_options.include_usage"))
    parallel = _typed(body, "parallel", bool)
    chat.parallel = True if parallel is None else parallel
    chat.max_branches = _at_least(body, "max_branches", 1)
    return chat


def _sampling_fields(body: dict, chat: ChatRequest) -> None:
    tokens = [_at_least(body, name, 1) for name in ("max_completion_tokens", "max_tokens")]
    chat.max_tokens = next((t for t in tokens if t is not None), None)
    chat.temperature = _typed(body, "temperature", float)
    if chat.temperature is not None and not 0 <= chat.temperature <= 2:
        raise bad(f"temperature must be between 0 and 2, got {chat.temperature}", param="temperature")
    chat.top_p = _typed(body, "top_p", float)
    if chat.top_p is not None and not 0 < chat.top_p <= 1:
        raise bad(f"top_p must be in (0, 1], got {chat.top_p}", param="top_p")
    chat.top_k = _at_least(body, "top_k", 0)
    chat.seed = _typed(body, "seed", int)
    if chat.seed is not None and not -(2**63) <= chat.seed < MAX_SEED:
        raise bad(f"seed must be a 64-bit integer, got {chat.seed}", param="seed")


def parse_messages(messages) -> list[dict]:
    """``[{"role", "content"}]`` as the chat template takes them; content parts of type text are joined."""
    if messages is None:
        raise bad("'messages' is required", param="messages")
    if not isinstance(messages, list):
        raise bad(f"'messages' must be an array, got {_json_type(messages)}", param="messages")
    if not messages:
        raise bad("'messages' must not be empty", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object, got {_json_type(message)}", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        parsed.append({"role": ROLES[role], "content": _content(message.get("content"), f"{where}.content")})
    return parsed


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return _unicode(content, where)
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(_unicode(p["text"], f"{where}[{i}].text") for i, p in enumerate(content))
        raise bad(f"{where}: only text content parts are supported", param=where)
    raise bad(f"{where} must be a string or an array of text parts, got {_json_type(content)}", param=where)


def _unicode(text: str, where: str) -> str:
    """``text`` if it is valid Unicode: JSON's ``\\ud800`` escapes can make a lone surrogate, which no encoder
    takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(
            f"{where} is not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}",
            param=where,
        ) from None
    return text


def _typed(body: dict, name: str, kind: type, param: str | None = None):
    """``body[name]`` if it is of JSON type ``kind`` (float takes integers too; bool is no number), None if
    absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, HugeInteger):
        raise bad(f"{param or name!r} is too large: an integer of {value.digits} digits", param=param or name)
    number = kind in (int, float) and isinstance(value, bool)
    if number or not isinstance(value, (int, float) if kind is float else kind):
        expected = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object"}
        raise bad(f"{param or name!r} must be {expected[kind]}, got {_json_type(value)}", param=param or name)
    return value


def _at_least(body: dict, name: str, minimum: int) -> int | None:
    value = _typed(body, name, int)
    if value is not None and value < minimum:
        raise bad(f"{name!r} must be >= {minimum}, got {value}", param=name)
    return value


def _json_type(value) -> str:
    for kind, name in (
        (HugeInteger, "an integer"),
        (bool, "a boolean"),
        (str, "a string"),
        (int, "an integer"),
        (float, "a number"),
        (list, "an array"),
        (dict, "an object"),
    ):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


# --- answers ----------------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason(result: dict) -> str:
    """ "length" when the answer's budget ended it (max_tokens, the context, or the branches using up the budget:
    the engine's ``stop_reason``), else "stop"."""
    return "length" if result.get("stop_reason", StopReason.EOS) in LENGTH_STOPS else "stop"


def decoding_info(result: dict, chat: ChatRequest, seed: int | None) -> dict:
    """How the answer was decoded: the ``parallel_decoding`` object of a response (and of the last chunk)."""
    info = {
        "mode": chat.mode,
        "branches": [
            {"title": b["title"], "block": b["block"], "tokens": b["tokens"], "stop": b["stop"]}
            for b in result.get("branches", [])
        ],
        "blocks": result.get("num_blocks", 0),
        "steps": result.get("steps"),
        "fallback": result.get("fallback"),
        "caps": list(result.get("caps", [])),
        "cap_kinds": [str(kind) for kind in result.get("cap_kinds", [])],
        "stop_reason": str(result.get("stop_reason", StopReason.EOS)),
        "time": result.get("time"),
        "seed": seed,
    }
    for stage in ("stage1_time", "stage2_time", "stage3_time"):
        info[stage] = result.get(stage)
    return info


def usage(result: dict) -> dict:
    prompt, completion = result["prompt_tokens"], result["length"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(ident: str, model: str, result: dict, chat: ChatRequest, seed: int | None) -> dict:
    """A ``chat.completion`` object."""
    return {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["response"]},
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage(result),
        "parallel_decoding": decoding_info(result, chat, seed),
    }


def chunk_body(ident: str, model: str, delta: dict | None, finish: str | None = None, **extra) -> dict:
    """A ``chat.completion.chunk`` object (``delta`` None: the usage chunk, with no choices)."""
    chunk = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    chunk["choices"] = (
        [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    )
    chunk.update(extra)
    return chunk


def sse(data) -> bytes:
    """One server-sent event: ``data: <json>`` (or a string as it is), then a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
