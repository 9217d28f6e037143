"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own (one per server).

Counters: requests by mode and outcome (stop, length, error, cancelled), HTTP errors by status, prompt and
completion tokens by mode, forward passes, branches and fallbacks. Histograms: request latency and time to first
token by mode, the batch size (requests per forward pass), the pass's duration, branches per parallel answer.
Gauges: requests running and waiting in the engine, requests in flight (the --max_queue count).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "parallel_decoding"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
BRANCH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """Every metric of one server; thread-safe (the worker thread and the event loop both record)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = registry = CollectorRegistry()

        def counter(name, doc, labels=()):
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        def histogram(name, doc, buckets, labels=()):
            return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=registry)

        self.requests = counter("requests", "finished chat completions", ("mode", "outcome"))
        self.http_errors = counter("http_errors", "error answers", ("status",))
        self.prompt_tokens = counter("prompt_tokens", "prompt tokens of finished requests", ("mode",))
        self.completion_tokens = counter("completion_tokens", "answer tokens of finished requests", ("mode",))
        self.passes = counter("forward_passes", "packed forward passes of the engine")
        self.branches = counter("branches", "branches decoded in parallel")
        self.fallbacks = counter("fallbacks", "parallel answers decoded sequentially (no closed block)")
        self.latency = histogram("request_latency_seconds", "submission to last token", LATENCY_BUCKETS, ("mode",))
        self.first_token = histogram(
            "time_to_first_token_seconds", "submission to first streamed token", LATENCY_BUCKETS, ("mode",)
        )
        self.batch_size = histogram("batch_size", "requests in one forward pass", BATCH_BUCKETS)
        self.step_time = histogram("step_seconds", "duration of one engine step", STEP_BUCKETS)
        self.branches_per_answer = histogram("branches_per_answer", "branches of one parallel answer", BRANCH_BUCKETS)
        self.running = Gauge(f"{PREFIX}_requests_running", "requests in the engine's batch", registry=registry)
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "requests waiting for room in the engine", registry=registry)
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "requests accepted and not finished (--max_queue)", registry=registry
        )

    def finished(self, mode: str, result: dict, outcome: str, latency: float) -> None:
        self.requests.labels(mode, outcome).inc()
        self.latency.labels(mode).observe(latency)
        self.prompt_tokens.labels(mode).inc(result["prompt_tokens"])
        self.completion_tokens.labels(mode).inc(result["length"])
        if mode == "parallel":
            self.branches.inc(result.get("num_branches", 0))
            self.branches_per_answer.observe(result.get("num_branches", 0))
            if result.get("fallback"):
                self.fallbacks.inc()

    def ended(self, mode: str, outcome: str) -> None:
        """A request that ended without an answer (error, cancelled)."""
        self.requests.labels(mode, outcome).inc()

    def step(self, seconds: float, batch: int, running: int, waiting: int) -> None:
        self.passes.inc()
        self.step_time.observe(seconds)
        if batch:
            self.batch_size.observe(batch)
        self.load(running, waiting)

    def load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
