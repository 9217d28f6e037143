"""What ``model.generate``'s settings mean for parallel decoding: which it honours, which it refuses.

Parallel decoding honours the length (``max_new_tokens`` / ``max_length``), greedy or sampled decoding
(``do_sample``, ``temperature``, ``top_k``, ``top_p``), ``pad_token_id`` (to pad the returned rows),
``return_dict_in_generate``, and logits processors (applied where ``parallel_decode`` applies them: the sequential
parts). Any other setting that would change what is decoded or returned raises a ``ValueError`` naming it, never a
silent ignore. transformers' cache and compile settings (``use_cache``, ``cache_implementation``,
``compile_config``, ...) do not change the tokens and do not apply: the engine keeps its own KV cache, and
``compile=`` is this method's own switch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from transformers import (
    GenerationConfig,
    LogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    PreTrainedModel,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

# Generation-config fields parallel decoding cannot honour, each with the values that leave decoding as it is (a
# model's own generation_config.json may set one: then the user must set it back, as the error says).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "constraints": (None,),
    "force_words_ids": (None,),
    "penalty_alpha": (None, 0.0),
    "dola_layers": (None,),
    "num_return_sequences": (None, 1),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "use_mtp": (None, False),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "min_new_tokens": (None, 0),  # before min_length: transformers' preparation turns it into a min_length
    "min_length": (None, 0),
    "stop_strings": (None,),
    "max_time": (None,),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "min_p": (None,),
    "top_h": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "token_healing": (None, False),
}

# Model inputs transformers' own preparation adds before it calls a callable ``custom_generate``; the engine makes
# its own positions and cache from the prompt, so these carry nothing it needs.
PREPARED_MODEL_INPUTS = frozenset(
    {"position_ids", "cache", "past_key_values", "cache_position", "logits_to_keep", "use_cache"}
)

UNSUPPORTED = "is not supported by parallel decoding"


@dataclass
class DecodeSettings:
    """The settings every row is decoded with: the engine's (``engine.decode.GenerationConfig``) and the rest."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    pad_token_id: int | None
    return_dict: bool

    def engine_settings(self) -> dict[str, Any]:
        """What ``engine.decode.GenerationConfig`` takes; a greedy run leaves the sampling settings alone, as
        transformers' greedy search does."""
        settings: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            settings.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return settings


def refuse_unsupported_config(config: GenerationConfig) -> None:
    """A ValueError naming the first setting of ``config`` that parallel decoding cannot honour."""
    for name, neutral in NEUTRAL_VALUES.items():
        value = getattr(config, name, None)
        if not any(value is n or (n is not None and value == n) for n in neutral):
            allowed = " or ".join(repr(n) for n in neutral)
            raise ValueError(f"{name}={value!r} {UNSUPPORTED} (leave it unset or set it to {allowed})")


def refuse_changed_eos(config: GenerationConfig, model: PreTrainedModel) -> None:
    """The engine stops at the model's and the tokenizer's EOS ids; another ``eos_token_id`` cannot be honoured."""
    if _id_set(config.eos_token_id) != _id_set(getattr(model.generation_config, "eos_token_id", None)):
        raise ValueError(
            f"eos_token_id={config.eos_token_id!r} {UNSUPPORTED}: it stops at the model's own EOS ids "
            f"({model.generation_config.eos_token_id!r}); leave eos_token_id unset"
        )


def _id_set(ids: int | list[int] | None) -> frozenset[int]:
    if ids is None:
        return frozenset()
    return frozenset([ids] if isinstance(ids, int) else ids)


def decode_settings(config: GenerationConfig, prompt_width: int, pad_token_id: int | None) -> DecodeSettings:
    """The settings of ``config`` (already checked) for prompts ``prompt_width`` columns wide; ``max_new_tokens``
    wins over ``max_length``, which counts the prompt's columns, as in ``generate``."""
    if config.max_new_tokens is not None:
        max_new_tokens = config.max_new_tokens
    else:
        max_new_tokens = (config.max_length or 0) - prompt_width
    if max_new_tokens < 1:
        raise ValueError(
            f"no room for new tokens: max_new_tokens={config.max_new_tokens!r}, max_length={config.max_length!r} "
            f"for a prompt of {prompt_width} columns"
        )
    return DecodeSettings(
        max_new_tokens=max_new_tokens,
        do_sample=bool(config.do_sample),
        temperature=1.0 if config.temperature is None else float(config.temperature),
        top_k=int(config.top_k or 0),
        top_p=1.0 if config.top_p is None else float(config.top_p),
        pad_token_id=_pad_token_id(config, pad_token_id),
        return_dict=bool(config.return_dict_in_generate),
    )


def _pad_token_id(config: GenerationConfig, tokenizer_pad: int | None) -> int | None:
    """The id that pads the returned rows: the config's, else its first EOS (as ``generate`` does), else the
    tokenizer's."""
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    eos = config.eos_token_id
    if eos is not None:
        return int(eos if isinstance(eos, int) else eos[0])
    return tokenizer_pad


def refuse_generate_arguments(**arguments: Any) -> None:
    """``generate``'s own arguments that parallel decoding cannot honour: a ValueError naming the first one set."""
    for name, value in arguments.items():
        if _is_set(value):
            raise ValueError(f"{name} {UNSUPPORTED}")


def _is_set(value: Any) -> bool:
    """None, False and an empty list (an empty ``StoppingCriteriaList``) ask for nothing."""
    return not (value is None or value is False or (isinstance(value, list) and not value))


def refuse_model_inputs(model_kwargs: dict[str, Any], prepared: bool) -> None:
    """Model inputs besides the prompt and its mask: a ValueError naming them (after transformers' preparation,
    the inputs it adds itself are expected and carry nothing new)."""
    extra = sorted(set(model_kwargs) - (PREPARED_MODEL_INPUTS if prepared else frozenset()))
    if extra:
        raise ValueError(f"{', '.join(extra)} {UNSUPPORTED} (it decodes from input_ids and attention_mask alone)")


def user_processors(prepared: Iterable[LogitsProcessor], config: GenerationConfig) -> list[LogitsProcessor]:
    """The user's logits processors in the list transformers prepared: the sampling warpers it appended from the
    config (temperature, top-k, top-p, in that order) come off, since the engine's sampler applies those settings
    to every stage, branches included."""
    processors = list(prepared)
    for processor in processors:
        if isinstance(processor, PrefixConstrainedLogitsProcessor):
            raise ValueError(f"prefix_allowed_tokens_fn {UNSUPPORTED}")
    warpers = _config_warper_types(config) if config.do_sample else []
    tail = processors[len(processors) - len(warpers) :] if warpers else []
    if [type(p) for p in tail] != warpers:
        raise RuntimeError(
            f"transformers prepared {[type(p).__name__ for p in processors]}, not ending in the sampling warpers "
            f"{[w.__name__ for w in warpers]} of the settings; this transformers release is not supported"
        )
    return processors[: len(processors) - len(warpers)]


def _config_warper_types(config: GenerationConfig) -> list[type]:
    warpers: list[type] = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper)
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper)
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper)
    return warpers


def refuse_user_stopping_criteria(prepared: Iterable[StoppingCriteria]) -> None:
    """transformers' prepared criteria stop at ``max_length`` and EOS, which the engine honours itself; any other
    criterion (the user's own) cannot be honoured."""
    for criterion in prepared:
        if not isinstance(criterion, (MaxLengthCriteria, EosTokenCriteria)):
            raise ValueError(f"stopping_criteria ({type(criterion).__name__}) {UNSUPPORTED}")
