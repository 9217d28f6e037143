"""How a decoder talks to a stock Hugging Face causal LM: one forward call, the cache, the model checks.

Version differences of transformers are absorbed here and nowhere else: 5.24 names the cache argument ``cache``
(older 5.x: ``past_key_values``); ``Cache.crop`` takes a negative count of tokens to drop on every 5.x release, so
that is the form used. Neither 5.17 nor 5.24 gives Qwen2 or Llama a ``cache_position`` argument; a model that takes
one (older releases, other families) derives it from the cache's length when none is passed, so every call here
passes it explicitly (:func:`takes_cache_position`): a compiled pass must not read the length.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

_FORWARD_PARAMS: dict[type, frozenset[str]] = {}  # a model class -> the parameters of its forward (a pure memo)


def _forward_params(model: PreTrainedModel) -> frozenset[str]:
    model_cls = type(model)
    if model_cls not in _FORWARD_PARAMS:
        _FORWARD_PARAMS[model_cls] = frozenset(inspect.signature(model_cls.forward).parameters)
    return _FORWARD_PARAMS[model_cls]


def takes_cache_position(model: PreTrainedModel) -> bool:
    return "cache_position" in _forward_params(model)


def cache_argument(model: PreTrainedModel) -> str:
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def check_model(model: PreTrainedModel) -> None:
    """The engine needs explicit positions and rotary embeddings: branch positions restart after the prefix."""
    params = _forward_params(model)
    if "position_ids" not in params:
        raise ValueError(
            f"{type(model).__name__}.forward takes no position_ids; parallel decoding needs a RoPE decoder"
        )
    config = model.config.get_text_config()
    has_rope = any(hasattr(config, a) for a in ("rope_theta", "rope_parameters", "rope_scaling")) or any(
        "rotary" in type(m).__name__.lower() for m in model.modules()
    )
    if not has_rope:
        raise ValueError(
            f"{type(model).__name__} has no rotary position embedding; parallel decoding needs a RoPE decoder"
        )


def context_length(model: PreTrainedModel) -> int:
    return int(model.config.get_text_config().max_position_embeddings)


def new_cache(model: PreTrainedModel) -> DynamicCache:
    return DynamicCache(config=model.config)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` slots of the cache."""
    excess = cache.get_seq_length() - length
    if excess < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} tokens to {length}")
    if excess:
        cache.crop(-excess)


def forward(
    model: PreTrainedModel,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    logits_to_keep: int | torch.Tensor = 1,
    attention_mask: torch.Tensor | None = None,
    **attention_kwargs: torch.Tensor,
) -> torch.Tensor:
    """Append ``input_ids`` (1, T) at ``position_ids`` (1, T) to ``cache``; returns the kept logits (T', V).

    ``attention_mask`` is None (plain causal) or a (1, 1, T, K) additive mask that transformers passes through
    unchanged. ``attention_kwargs`` (branch ids for the project's kernel) reach the attention function.
    """
    kwargs: dict[str, Any] = {cache_argument(model): cache}
    if takes_cache_position(model):
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
