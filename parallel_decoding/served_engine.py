"""The method on a stock serving engine from Python, beside :class:`~parallel_decoding.engine.batch.Engine`:

    from parallel_decoding import ServedEngine

    with ServedEngine("models/tiny-qwen2-retrieval", engine="vllm", engine_args={"dtype": "float32"}) as engine:
        results = engine.generate(["Who is older, Ann (31) or Bo (29)?"], parallel=True, max_new_tokens=128)

Each answer goes through the completions method (``completions.method``): the skeleton, the branches and the merge
as ordinary completion requests to vLLM in this process (``engine="vllm"``, vLLM's engine arguments in
``engine_args``) or to an OpenAI-compatible server (``engine="openai"``, ``base_url``, ``api_key``), which batches
them. The answers are those of ``parallel_decode`` / ``normal_decode`` where the engine computes the same logits.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from .completions.factory import make_client
from .engine.batch import GENERATION_SETTINGS, request_seed


class ServedEngine:
    """Normal and parallel answers on a serving engine (see the module docstring). Build it under
    ``if __name__ == "__main__":`` in a script: vLLM starts its engine in a spawned process."""

    def __init__(
        self,
        model_path: str,
        engine: str = "vllm",
        engine_args: dict[str, Any] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.loop = asyncio.new_event_loop()
        self.client = self.loop.run_until_complete(self._start(engine, model_path, engine_args, base_url, api_key))

    async def _start(
        self,
        engine: str,
        model_path: str,
        engine_args: dict[str, Any] | None,
        base_url: str | None,
        api_key: str | None,
    ) -> Any:
        """The client, made on this engine's loop (vLLM's async engine binds to the loop it starts on)."""
        return make_client(engine, model_path, dict(engine_args or {}), base_url, api_key, tokenizer=self.tokenizer)

    def generate(self, prompts: list, parallel: bool = True, seed: int = 0, **gen: Any) -> list[dict]:
        """Every prompt's answer, in prompt order, all in flight at once, each as ``parallel_decode`` (or with
        ``parallel=False`` ``normal_decode``) returns it. A prompt is the user message or a list of chat messages;
        ``gen`` as for ``Engine.generate``; with ``do_sample`` request i samples with ``request_seed(seed, i)``."""
        unknown = set(gen) - set(GENERATION_SETTINGS)
        if unknown:
            raise TypeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        return self.loop.run_until_complete(self._generate(prompts, parallel, seed, gen))

    async def _generate(self, prompts: list, parallel: bool, seed: int, gen: dict[str, Any]) -> list[dict]:
        from .completions.method import normal_generate, parallel_generate
        from .engine.decode import chat_prompt_ids

        decode = parallel_generate if parallel else normal_generate
        answers = []
        for index, prompt in enumerate(prompts):
            settings = dict(gen, seed=request_seed(seed, index)) if gen.get("do_sample") else gen
            answers.append(decode(self.client, self.tokenizer, chat_prompt_ids(self.tokenizer, prompt), settings))
        return list(await asyncio.gather(*answers))

    def close(self) -> None:
        """Stop the engine (vLLM's processes) or close the connection to the server."""
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()

    def __enter__(self) -> ServedEngine:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
