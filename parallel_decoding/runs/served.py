"""``generate.py --engine vllm|openai``: the rows decoded on a stock serving engine through the completions method
(``parallel_decoding.completions``: each stage an ordinary completion request), with the same comparison rules as
the project's own engine.

- **One engine for both modes.** The client (vLLM in-process, or an OpenAI-compatible server) serves every request
  of both modes, with the run's settings; ``normal_attention`` / ``parallel_attention`` name it.
- **Order.** At ``--batch_size 1`` row i runs its modes in ``mode_order(i)``; with N > 1 the rows go N at a time,
  all in flight, batch k in ``mode_order(k)`` (as ``runs/batching.py`` does).
- **A level prefix cache for each mode.** The engine's prefix cache is emptied before each mode's pass, so the
  mode that runs second does not skip the prefill the first one paid for; a server that cannot empty it gets each
  prompt cached (untimed) before each mode's pass instead, so both skip the same prefill.
- **Seeds.** With ``--do_sample`` each mode of each row samples with the seed ``mode_seed(seed, row, mode)``.
- **Warm-up.** One untimed answer per mode before the first timed row (the engine's first requests pay for
  allocations and, on a GPU, graph captures).

The client lives on one asyncio loop for the whole run (vLLM's async engine is bound to the loop it starts on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from parallel_decoding.cli import UsageError, one_line

from .comparison import mode_error, mode_order, mode_seed, new_result, record_answer
from .throughput import batch_columns

ENGINES = ("transformers", "vllm", "openai")
API_KEY_ENV = "OPENAI_API_KEY"
T = TypeVar("T")


def add_flags(p: argparse.ArgumentParser) -> None:
    """--engine and its flags (docs/generate.md: "Serving engines")."""
    group = p.add_argument_group("serving engine (docs/generate.md)")
    group.add_argument(
        "--engine",
        default="transformers",
        choices=ENGINES,
        help="transformers: the project's engine; vllm: vLLM in this process; openai: an OpenAI-compatible server "
        "that takes token-id prompts and returns token ids (e.g. vLLM's own)",
    )
    group.add_argument("--base_url", default=None, help="with --engine openai: the server, e.g. http://HOST:8000/v1")
    group.add_argument(
        "--api_key", default=None, help=f"with --engine openai: the server's key (default: ${API_KEY_ENV}, if set)"
    )
    group.add_argument(
        "--served_model",
        default=None,
        help="with --engine openai: the model's name on the server (default: the one model it lists)",
    )
    group.add_argument(
        "--engine_args",
        default=None,
        help="with --engine vllm: vLLM engine arguments as one JSON object, e.g. '{\"tensor_parallel_size\": 2}'",
    )


def check_engine_choice(args: argparse.Namespace, key_flag: str) -> None:
    """--engine_args read into a dict; --base_url, ``key_flag`` (the upstream server's key: --api_key here,
    --engine_api_key for the chat server, whose --api_key is its own) and --served_model only with --engine openai,
    the key from the environment when not given."""
    args.engine_args = parse_engine_args(args.engine_args, args.engine)
    if args.engine != "openai":
        for flag in ("base_url", key_flag, "served_model"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} is only used with --engine openai")
    elif args.base_url is None:
        raise UsageError("--engine openai needs --base_url (the server's address, e.g. http://127.0.0.1:8000/v1)")
    elif getattr(args, key_flag) is None:
        setattr(args, key_flag, os.environ.get(API_KEY_ENV) or None)


def check_flags(args: argparse.Namespace) -> None:
    """The serving-engine flags alone, and the project-engine flags a serving engine has no use for; reads
    --engine_args into a dict and --api_key from the environment."""
    check_engine_choice(args, "api_key")
    if args.engine != "transformers":
        refuse_project_engine_flags(args)


def parse_engine_args(text: str | None, engine: str) -> dict[str, Any]:
    if text is None:
        return {}
    if engine != "vllm":
        raise UsageError("--engine_args is only used with --engine vllm")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--engine_args does not parse as JSON ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(
            f'--engine_args must be a JSON object of vLLM engine arguments, e.g. {{"dtype": "float32"}}, got {text!r}'
        )
    return value


def refuse_project_engine_flags(args: argparse.Namespace) -> None:
    """Flags of the project's engine that a serving engine decides itself (its own parallelism, cache, kernels)."""
    scale = "pass vLLM's tensor_parallel_size / pipeline_parallel_size / data_parallel_size in --engine_args"
    refused = {
        "tp": (args.tp, scale),
        "data_parallel": (args.data_parallel, scale),
        "device_map": (args.device_map is not None, scale),
        "compile": (args.compile != "auto", "the serving engine compiles (or not) by its own arguments"),
        "kv_capacity": (args.kv_capacity is not None, "the serving engine sizes its own KV cache"),
        "attn_implementation": (args.attn_implementation != "sdpa", "the serving engine picks its own kernels"),
        "normal_stock_flash_attn": (args.normal_stock_flash_attn, "the serving engine picks its own kernels"),
        "device": (args.device is not None, "the serving engine places the model by its own arguments"),
    }
    for flag, (given, why) in refused.items():
        if given:
            raise UsageError(f"--{flag} is not used with --engine {args.engine}: {why}")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the engine adds to a row's settings: its name, and vLLM's arguments (they may change the answers); a
    server's dtype is its own, not --dtype's. Nothing for the project's engine: its rows read as before (a row
    without these keys was made on it, so a resume on another engine differs in ``engine`` and is refused)."""
    if args.engine == "transformers":
        return {}
    recorded: dict[str, Any] = {"engine": args.engine, "engine_args": dict(args.engine_args) or None}
    if args.engine == "openai":
        recorded["dtype"] = None
    return recorded


# The project's engine's settings, which its rows leave out (they read as rows did before --engine existed): a key
# absent from a row's settings, or from the run's, means these values.
ENGINE_DEFAULTS = {"engine": "transformers", "engine_args": None}


# --- the run's engine -------------------------------------------------------------------------------------------


class Session:
    """The run's completion client and the event loop it lives on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.client: Any = None
        self.warm_instead = False  # the engine cannot empty its prefix cache: prompts are cached for both modes

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    def close(self) -> None:
        try:
            if self.client is not None:
                self.run(self.client.aclose())
        finally:
            self.client = None
            self.loop.close()


def load(run: Any) -> None:
    """The tokenizer and model config from --model_path (the method tokenizes locally), and the client: vLLM
    started in this process, or the server checked. What cannot start is one UsageError line."""
    from transformers import AutoConfig, AutoTokenizer

    args = run.args
    try:
        run.tokenizer = AutoTokenizer.from_pretrained(run.model_path, trust_remote_code=args.trust_remote_code)
        run.config = AutoConfig.from_pretrained(run.model_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load the tokenizer of {run.model_path}: {one_line(e)}") from None
    engine_args = dict(args.engine_args)
    if args.engine == "vllm":
        engine_args.setdefault("dtype", str(run.dtype).removeprefix("torch."))
        engine_args.setdefault("seed", args.seed)
    run.session = Session()
    run.session.client = run.session.run(
        start_client(
            args.engine, run.model_path, engine_args, run.tokenizer, args.base_url, args.api_key, args.served_model
        )
    )


async def start_client(
    engine: str,
    model_path: str,
    engine_args: dict[str, Any],
    tokenizer: Any,
    base_url: str | None = None,
    api_key: str | None = None,
    served_model: str | None = None,
) -> Any:
    """The completion client of ``engine``, made on the running loop (vLLM's async engine binds to it); what keeps
    it from starting (vLLM not installed, an unknown engine argument, nothing at --base_url, a server without token
    ids, an engine that fails to start) is one UsageError line. ``served_model``: the name an OpenAI server serves
    the model under (None: the one model it lists, whatever path it was started with)."""
    from parallel_decoding.completions.factory import make_client, model_stop_token_ids

    try:
        if engine == "openai":  # (the factory names the model by its path; a server may list it under another)
            from parallel_decoding.completions.openai_client import OpenAIClient

            stop_ids = model_stop_token_ids(model_path, tokenizer)
            client = OpenAIClient(base_url or "", served_model, stop_ids, api_key=api_key)
            await client.complete(probe_request(tokenizer))  # a server that returns no token ids cannot run the method
            return client
        return make_client(engine, model_path, engine_args, tokenizer=tokenizer)
    except Exception as e:  # an engine's start fails in its own types (ImportError, ValueError, httpx, vLLM's)
        raise UsageError(f"--engine {engine}: {one_line(e).split(': ', 1)[-1]}") from None


def probe_request(tokenizer: Any) -> Any:
    from parallel_decoding.completions.interface import CompletionRequest, Sampling

    ids = tokenizer.encode("Hello", add_special_tokens=False) or [0]
    return CompletionRequest(list(ids), 1, frozenset(), Sampling())


def close(run: Any) -> None:
    session = getattr(run, "session", None)
    if session is not None:
        session.close()


def describe(run: Any) -> str:
    """The log's line on where the rows are decoded."""
    if run.args.engine == "openai":
        return f"engine: an OpenAI-compatible server at {run.args.base_url} (tokenizer from {run.model_path})"
    extra = f" with {json.dumps(run.args.engine_args)}" if run.args.engine_args else ""
    return f"engine: vLLM in this process{extra} ({str(run.dtype).removeprefix('torch.')} unless --engine_args says)"


# --- the rows ---------------------------------------------------------------------------------------------------


def generation(args: argparse.Namespace, row_index: int, mode: str) -> dict[str, Any]:
    """The generation settings of one mode of one row (the same as the project's engine gets, plus its seed)."""
    gen: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        gen.update(temperature=args.temperature, top_p=args.top_p, seed=mode_seed(args.seed, row_index, mode))
    return gen


async def answer(run: Any, mode: str, row_index: int, prompt_ids: list[int]) -> dict[str, Any]:
    """One mode's answer to one row, as normal_decode / parallel_decode return it."""
    from ..completions.method import normal_generate, parallel_generate

    decode = parallel_generate if mode == "parallel" else normal_generate
    return await decode(run.session.client, run.tokenizer, prompt_ids, generation(run.args, row_index, mode))


async def level_the_prefix_cache(run: Any, prompt_ids: list[list[int]]) -> None:
    """Empty the engine's prefix cache before a mode's pass; a server that cannot (vLLM's serves the reset only in
    its development mode) gets each prompt cached instead, untimed, so that both modes skip the same prefill."""
    from parallel_decoding.completions.interface import CompletionRequest, Sampling

    unavailable: tuple[type[Exception], ...] = ()
    if run.args.engine == "openai":  # (the HTTP client's module, only where it is used)
        from parallel_decoding.completions.openai_client import PrefixCacheResetUnavailable

        unavailable = (PrefixCacheResetUnavailable,)
    if not run.session.warm_instead:
        try:
            await run.session.client.reset_prefix_cache()
            return
        except unavailable as e:
            run.log(f"{one_line(e).split(': ', 1)[-1]}: each prompt is cached before each mode's pass instead")
            run.session.warm_instead = True
    prefill = [CompletionRequest(ids, 1, frozenset(), Sampling()) for ids in prompt_ids]
    await asyncio.gather(*(run.session.client.complete(request) for request in prefill))


async def mode_pass(run: Any, mode: str, indices: list[int], prompts: dict[int, str]) -> tuple[list, float]:
    """Every row of ``indices`` in one mode, all in flight, on a level prefix cache: (their answers or the
    exceptions they failed with, in order; the pass's wall time)."""
    from ..engine.decode import chat_prompt_ids

    prompt_ids = [chat_prompt_ids(run.tokenizer, prompts[i]) for i in indices]
    await level_the_prefix_cache(run, prompt_ids)
    start = time.perf_counter()
    outcomes = await asyncio.gather(
        *(answer(run, mode, i, ids) for i, ids in zip(indices, prompt_ids)), return_exceptions=True
    )
    seconds = time.perf_counter() - start
    for out in outcomes:
        if isinstance(out, BaseException) and not isinstance(out, Exception):  # Ctrl-C, cancellation: not a row's
            raise out
    return list(outcomes), seconds


async def decode_batch(run: Any, order: tuple, indices: list[int], prompts: dict, batch_id: int | None) -> list:
    """The result rows of one batch (one row at --batch_size 1): each mode over all of its rows, in ``order``; a
    row's mode that failed is recorded in its `error`, the rest still run. ``batch_id`` None: no batch columns."""
    results = {i: new_result(run.rows[i], prompts[i], order) for i in indices}
    errors: dict[int, list[str]] = {i: [] for i in indices}
    for mode in order:
        outcomes, seconds = await mode_pass(run, mode, indices, prompts)
        tokens = sum(out["length"] for out in outcomes if isinstance(out, dict))
        for i, out in zip(indices, outcomes):
            results[i][f"{mode}_attention"] = run.session.client.name
            if batch_id is not None:
                time_column, tokens_column = batch_columns(mode)
                results[i].update({"batch": batch_id, time_column: seconds, tokens_column: tokens})
            if isinstance(out, Exception):
                errors[i].append(mode_error(mode, out))
            else:
                record_answer(results[i], mode, out)
    for i in indices:
        results[i]["error"] = "; ".join(errors[i]) if errors[i] else None
    return [results[i] for i in indices]


def warm_up(run: Any, indices: list[int], prompts: dict[int, str]) -> None:
    """One untimed pass per mode over the first batch's rows."""
    for mode in run.modes:
        outcomes, _ = run.session.run(mode_pass(run, mode, indices, prompts))
        failed = [out for out in outcomes if isinstance(out, Exception)]
        if failed:
            run.log(f"warm-up ({mode}): {len(failed)} of {len(outcomes)} requests failed, e.g. {one_line(failed[0])}")


def decode_batches(run: Any, rank_rows: list[int], prompts: dict[int, str], first_id: int) -> Iterator[tuple]:
    """Yield (row indices, their result rows): one row at a time, or --batch_size rows in flight per mode (batch
    ids from ``first_id`` on)."""
    size = run.args.batch_size
    if rank_rows:
        warm_up(run, rank_rows[:size], prompts)
    for k, start in enumerate(range(0, len(rank_rows), size)):
        indices = rank_rows[start : start + size]
        order = mode_order(indices[0] if size == 1 else k, run.modes)
        batch_id = None if size == 1 else first_id + k
        yield indices, run.session.run(decode_batch(run, order, indices, prompts, batch_id))
