"""Model shapes for the benchmark, as ``Qwen2Config`` keyword arguments: nothing is downloaded.

The numbers are those of the released Qwen2.5 checkpoints' ``config.json`` (Instruct variants: 32k context).
The small models share one 151936-row vocabulary and tie the LM head to the embedding; 7B and 14B pad the
vocabulary to 152064 rows and keep a separate LM head. Every Qwen2 attention has q/k/v biases (built into the
class, not a config field) and rotary embeddings with base 1e6.

``tiny`` is not a real model: it is the shape the tests run the benchmark at.
"""

from __future__ import annotations

_QWEN25_COMMON = dict(
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151645,
)

MODEL_CONFIGS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        _QWEN25_COMMON,
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        _QWEN25_COMMON,
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        _QWEN25_COMMON,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        _QWEN25_COMMON,
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        _QWEN25_COMMON,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    ),
}


def qwen2_config(name: str):
    """A ``Qwen2Config`` of the named shape."""
    from transformers import Qwen2Config

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    return Qwen2Config(**MODEL_CONFIGS[name])
