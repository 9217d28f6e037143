"""flash_attn_branch.hf: a stock transformers decoder runs through the kernel with branch ids as keyword arguments.

Every check compares against the eager model given the equivalent 4D mask, on random-weight Qwen2 and Llama models,
through the Triton interpreter on the CPU.
"""

import inspect
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flash-attention"))  # the working tree's copy

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from flash_attn_branch import branch_ids_for_engine_layout, branch_visibility_mask  # noqa: E402
from flash_attn_branch.hf import register  # noqa: E402

BACKEND = register()
VOCAB = 61
PREFIX_LEN = 9
TITLE_LENGTHS = [3, 2, 4]
DECODE_STEPS = [[0, 1, 2], [0, 2], [2]]  # branch 1 finishes after one token, branch 0 after two


def _model(family: str, attn_implementation: str):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    if family == "qwen2":
        config, cls = Qwen2Config(num_key_value_heads=2, **common), Qwen2ForCausalLM  # GQA 2, head dim 16
    else:
        config, cls = LlamaConfig(num_key_value_heads=1, head_dim=32, **common), LlamaForCausalLM  # GQA 4
    torch.manual_seed(0)  # same weights for both backends
    return cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32).eval()


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _engine_sequence():
    """Token ids, positions and branch ids of the engine's layout: prefix, tree-prefill block, decode steps."""
    generator = torch.Generator().manual_seed(1)
    branch = branch_ids_for_engine_layout(PREFIX_LEN, TITLE_LENGTHS, DECODE_STEPS)
    tokens = torch.randint(0, VOCAB, (branch.numel(),), generator=generator)
    seen = [0] * len(TITLE_LENGTHS)  # tokens of each branch so far: its next position is PREFIX_LEN + seen
    positions = list(range(PREFIX_LEN))
    for b in branch[PREFIX_LEN:].tolist():
        positions.append(PREFIX_LEN + seen[b])
        seen[b] += 1
    # the forward calls the engine makes: prefix, tree prefill, one per decode step
    bounds = [0, PREFIX_LEN, PREFIX_LEN + sum(TITLE_LENGTHS)]
    for step in DECODE_STEPS:
        bounds.append(bounds[-1] + len(step))
    return tokens, torch.tensor(positions), branch, bounds


def _incremental_logits(model, tokens, positions, branch, bounds, use_kernel: bool):
    """Feed the sequence chunk by chunk through a DynamicCache, as the engine does; returns all logits (T, V)."""
    cache = DynamicCache(config=model.config)
    logits = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        kwargs = {_cache_kwarg(model): cache, "use_cache": True}
        if start >= PREFIX_LEN:  # branch chunks: ids for the kernel, or the equivalent 4D mask for eager
            q_branch, k_branch = branch[start:end], branch[:end]
            if use_kernel:
                kwargs.update(q_branch=q_branch, k_branch=k_branch)
            else:
                visible = branch_visibility_mask(end - start, end, True, q_branch, k_branch)
                kwargs["attention_mask"] = torch.zeros(visible.shape).masked_fill(
                    ~visible, torch.finfo(torch.float32).min
                )[None, None]  # (1, 1, Tq, Tk)
        with torch.no_grad():
            out = model(tokens[None, start:end], position_ids=positions[None, start:end], **kwargs)
        logits.append(out.logits[0])
    return torch.cat(logits)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_branch_decoding_matches_eager_with_mask(family):
    tokens, positions, branch, bounds = _engine_sequence()
    eager = _incremental_logits(_model(family, "eager"), tokens, positions, branch, bounds, use_kernel=False)
    kernel = _incremental_logits(_model(family, BACKEND), tokens, positions, branch, bounds, use_kernel=True)
    torch.testing.assert_close(kernel, eager, atol=2e-5, rtol=1e-4)


def test_full_forward_matches_eager_and_isolates_branches():
    """One forward over the whole layout (no cache): equal to eager with the 4D mask, and changing branch 1's
    tokens leaves the logits of the prefix and of branches 0 and 2 exactly unchanged."""
    tokens, positions, branch, _ = _engine_sequence()
    model = _model("qwen2", BACKEND)
    with torch.no_grad():
        kernel = model(
            tokens[None], position_ids=positions[None], q_branch=branch, k_branch=branch, use_cache=False
        ).logits[0]
        visible = branch_visibility_mask(branch.numel(), branch.numel(), True, branch, branch)
        mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]
        eager = _model("qwen2", "eager")(
            tokens[None], position_ids=positions[None], attention_mask=mask, use_cache=False
        ).logits[0]
        torch.testing.assert_close(kernel, eager, atol=2e-5, rtol=1e-4)
        changed = tokens.clone()
        changed[branch == 1] = (changed[branch == 1] + 1) % VOCAB
        other = model(
            changed[None], position_ids=positions[None], q_branch=branch, k_branch=branch, use_cache=False
        ).logits[0]
    keep = branch != 1
    assert torch.equal(other[keep], kernel[keep])
    assert not torch.allclose(other[~keep], kernel[~keep])


def test_plain_causal_batch_matches_sdpa_and_set_attn_implementation():
    """Without branch ids the backend is causal attention; batches work; set_attn_implementation accepts the name."""
    model = _model("llama", "sdpa")
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens).logits
        model.set_attn_implementation(BACKEND)
        assert model.config._attn_implementation == BACKEND
        got = model(tokens).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_adapter_errors():
    model = _model("qwen2", BACKEND)
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    ids = torch.full((5,), -1, dtype=torch.int32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="branch ids need batch size 1, got 2"):
            model(tokens, q_branch=ids, k_branch=ids)
        with pytest.raises(ValueError, match="pass both q_branch and k_branch"):
            model(tokens[:1], q_branch=ids)
        with pytest.raises(ValueError, match=r"k_branch has 4 ids but this layer sees 5 keys"):
            model(tokens[:1], q_branch=ids, k_branch=ids[:4])
        with pytest.raises(ValueError, match="padded batches are not supported"):
            model(tokens, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]))
