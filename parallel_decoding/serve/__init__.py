"""An OpenAI-compatible HTTP server over the batch engine: ``python -m parallel_decoding.serve``.

- ``protocol``: the chat-completions request, checked (one :class:`~protocol.APIError` per bad field), and the
  OpenAI response, chunk and error shapes;
- ``text``: incremental detokenization of a stream, so the concatenated deltas are the answer;
- ``engines``: the one engine interface the worker drives (``ServingEngine``), with the project's batch engine
  behind it and the completions method on vLLM or an OpenAI-compatible server (``--engine vllm|openai``);
- ``worker``: the thread that owns the engine and steps it (continuous batching); the HTTP side hands it jobs and
  gets tokens and results back on its event loop;
- ``metrics``: the Prometheus counters and histograms of ``GET /metrics``;
- ``guard``: the checks before any route (host, origin, content type, a bounded body, JSON for any failure);
  ``connections``: uvicorn's h11 connection with a deadline for a request head and JSON for a malformed one;
- ``app``: the FastAPI routes; ``server``: the model, the engine and uvicorn; ``__main__``: the command line.

The server knows the model only through the ServingEngine interface (and its tokenizer, for text).
"""
