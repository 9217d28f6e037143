"""An OpenAI-compatible HTTP server over the batch engine: ``python -m parallel_decoding.serve``.

- ``protocol``: the chat-completions request, checked (one :class:`~protocol.APIError` per bad field), and the
  OpenAI response, chunk and error shapes;
- ``text``: incremental detokenization of a stream, so the concatenated deltas are the answer;
- ``worker``: the thread that owns the :class:`~parallel_decoding.engine.batch.Engine` and steps it (continuous
  batching); the HTTP side hands it jobs and gets tokens and results back on its event loop;
- ``metrics``: the Prometheus counters and histograms of ``GET /metrics``;
- ``app``: the FastAPI routes; ``server``: the model, the engine and uvicorn; ``__main__``: the command line.

The server knows the model only through the Engine API (and its tokenizer, for text).
"""
