"""How the engine talks to a stock Hugging Face causal LM: one forward call, the cache, sampling, device timing.

Version differences of transformers are absorbed here and nowhere else: 5.24 names the cache argument ``cache``
(older 5.x: ``past_key_values``) and has no ``cache_position``; ``Cache.crop`` takes a negative count of tokens to
drop on every 5.x release, so that is the form used.
"""

from __future__ import annotations

import functools
import inspect
import time

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

BRANCH_KERNEL = "branch_attention"  # name flash_attn_branch.hf.register() uses (transformers reserves "flash")


@functools.lru_cache(maxsize=None)
def _forward_params(model_cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_cls.forward).parameters)


def cache_argument(model) -> str:
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def check_model(model) -> None:
    """The engine needs explicit positions and rotary embeddings: branch positions restart after the prefix."""
    params = _forward_params(type(model))
    if "position_ids" not in params:
        raise ValueError(f"{type(model).__name__}.forward takes no position_ids; parallel decoding needs a RoPE decoder")
    config = model.config.get_text_config()
    has_rope = any(hasattr(config, a) for a in ("rope_theta", "rope_parameters", "rope_scaling")) or any(
        "rotary" in type(m).__name__.lower() for m in model.modules()
    )
    if not has_rope:
        raise ValueError(f"{type(model).__name__} has no rotary position embedding; parallel decoding needs a RoPE decoder")


def context_length(model) -> int:
    return int(model.config.get_text_config().max_position_embeddings)


def uses_branch_kernel(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == BRANCH_KERNEL


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` slots of the cache."""
    excess = cache.get_seq_length() - length
    if excess < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} tokens to {length}")
    if excess:
        cache.crop(-excess)


def forward(
    model,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    logits_to_keep: int | torch.Tensor = 1,
    attention_mask: torch.Tensor | None = None,
    **attention_kwargs,
) -> torch.Tensor:
    """Append ``input_ids`` (1, T) at ``position_ids`` (1, T) to ``cache``; returns the kept logits (T', V).

    ``attention_mask`` is None (plain causal) or a (1, 1, T, K) additive mask that transformers passes through
    unchanged. ``attention_kwargs`` (branch ids for the project's kernel) reach the attention function.
    """
    kwargs = {cache_argument(model): cache}
    if "cache_position" in _forward_params(type(model)):
        start = cache.get_seq_length()
        kwargs["cache_position"] = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **kwargs,
        **attention_kwargs,
    )
    return out.logits[0].float()  # (T', V)


def prefill(model, cache: DynamicCache, token_ids: list[int]) -> torch.Tensor:
    """Append ``token_ids`` after what the cache holds, at the following positions; returns the last logits (1, V)."""
    start = cache.get_seq_length()
    ids = torch.tensor([token_ids], device=model.device)  # (1, T)
    positions = torch.arange(start, start + len(token_ids), device=model.device)[None]  # (1, T)
    return forward(model, cache, ids, positions, logits_to_keep=1)


def decode_step(model, cache: DynamicCache, token: torch.Tensor) -> torch.Tensor:
    """One sequential step: ``token`` (1,) on the device goes into the cache; returns next logits (1, V)."""
    position = cache.get_seq_length()
    positions = torch.full((1, 1), position, device=model.device)
    return forward(model, cache, token.view(1, 1), positions, logits_to_keep=1)


class Sampler:
    """Turns logits (N, V) into tokens (N,): argmax, or temperature / top-k / top-p sampling.

    The same sampler serves normal decoding and every parallel stage, so both modes decode under one setting.
    ``generator`` (a :class:`torch.Generator` on the logits' device) is the random stream every draw comes from;
    None draws from torch's global stream.
    """

    def __init__(
        self,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.do_sample = do_sample
        self.generator = generator
        warpers = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = self.warpers(None, logits)
        probs = torch.softmax(scores, dim=-1)  # (N, V)
        return torch.multinomial(probs, num_samples=1, generator=self.generator)[:, 0]  # (N,)


greedy = Sampler()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall-clock time per stage, read after ``sync`` so device work is counted where it ran.

    ``StageTimer.for_model(model)`` waits for every CUDA device the model is on and, for a tensor-parallel model,
    for every rank (see ``distributed.timing_sync``). ``lap(stage)`` adds the time since the previous lap (or the
    start) to ``stage``: a stage can be named after its work is done, as when a sequential segment turns out to
    have been a skeleton.
    """

    def __init__(self, sync=lambda: None):
        self.sync = sync
        self.totals: dict[str, float] = {}
        sync()
        self._last = time.perf_counter()

    @classmethod
    def for_model(cls, model) -> "StageTimer":
        from .distributed import timing_sync

        return cls(timing_sync(model))

    def lap(self, stage: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[stage] = self.totals.get(stage, 0.0) + now - self._last
        self._last = now

    def get(self, stage: str) -> float:
        return self.totals.get(stage, 0.0)

    @property
    def total(self) -> float:
        return sum(self.totals.values())
