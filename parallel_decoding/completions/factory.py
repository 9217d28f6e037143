"""``make_client``: the completion client of an engine, by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.decode import stop_token_ids_of
from .interface import CompletionClient

ENGINES = ("transformers", "vllm", "openai")


def model_stop_token_ids(model_path: str | Path, tokenizer=None) -> frozenset[int]:
    """The model's stop ids (``engine.decode.stop_token_ids``) read from its directory, without loading weights."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # a model without generation_config.json
        generation_config = None
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_path)
    return stop_token_ids_of((generation_config, AutoConfig.from_pretrained(model_path)), tokenizer)


def make_client(
    engine: str,
    model_path: str | Path | None = None,
    engine_args: dict[str, Any] | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    model=None,
    tokenizer=None,
    served_model: str | None = None,
    vllm_backend: str = "async",
) -> CompletionClient:
    """The completion client of ``engine``:

    - ``"transformers"``: this project's decoder on ``model`` (a loaded model; with ``tokenizer``);
    - ``"vllm"``: vLLM in this process on ``model_path``, with ``engine_args`` (vLLM's own names) and
      ``vllm_backend`` ("async" or "offline", see ``vllm_client``); call it under ``if __name__ == "__main__":``;
    - ``"openai"``: the OpenAI-compatible server at ``base_url`` (``api_key`` optional), serving ``served_model``
      (default: the one model the server lists).

    ``model_path`` (the model's directory) gives the vLLM and OpenAI clients the model's stop ids.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    if engine == "transformers":
        if model is None or tokenizer is None:
            raise ValueError("the transformers engine needs a loaded model and its tokenizer")
        from .transformers_client import TransformersClient

        return TransformersClient(model, tokenizer)
    if model_path is None:
        raise ValueError(f"the {engine} engine needs the model's directory (its stop ids and tokenizer)")
    stop_ids = model_stop_token_ids(model_path, tokenizer)
    if engine == "vllm":
        from .vllm_client import VllmClient

        return VllmClient(str(model_path), stop_ids, dict(engine_args or {}), backend=vllm_backend)
    if engine_args:
        raise ValueError("engine_args are for the vllm engine; an OpenAI-compatible server is configured where it runs")
    if not base_url:
        raise ValueError("the openai engine needs base_url")
    from .openai_client import OpenAIClient

    return OpenAIClient(base_url, served_model, stop_ids, api_key=api_key)
