"""The skeleton processor and parser on the real Qwen2 vocabulary."""

from __future__ import annotations

import pytest
import torch

from parallel_decoding import MarkerVocab, SkeletonLogitsProcessor, parse_skeleton


@pytest.fixture(scope="module")
def markers(qwen_tokenizer):
    return MarkerVocab.from_tokenizer(qwen_tokenizer)


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def next_allowed(processor, history):
    scores = torch.zeros(1, processor.markers.vocab_size)
    out = processor(torch.tensor([history]), scores)
    return torch.isfinite(out[0])


def forced(processor, history):
    allowed = next_allowed(processor, history)
    return int(allowed.nonzero()[0]) if int(allowed.sum()) == 1 else None


def test_marker_ids_come_from_the_tokenizer(qwen_tokenizer, markers):
    assert 820 in markers.branch_ids and 5321 in markers.block_end_ids  # '####', '%%%%'
    assert markers.forced_after_colon == (28149, 198, 820)  # '......', '\n', '####'
    assert {25, 510, 5122} <= markers.colon_ids  # ':', ':\n', '：'


@pytest.mark.parametrize("title", ["####Alice Chen:", "####Budget:\n", "####预算：", "####Step 2 - cost:"])
def test_ellipsis_newline_and_marker_forced_after_the_colon(qwen_tokenizer, markers, title):
    prompt = ids(qwen_tokenizer, "<|im_start|>user\nQ<|im_end|>\n")
    processor = SkeletonLogitsProcessor(prompt_length=len(prompt), markers=markers)
    history = prompt + ids(qwen_tokenizer, "Intro sentence.\n") + ids(qwen_tokenizer, title)
    written = []
    for _ in range(3):
        token = forced(processor, history)
        written.append(token)
        history.append(token)
    assert qwen_tokenizer.decode(written) == "......\n####"
    assert forced(processor, history) is None  # the model writes the next title or %%%% itself


def test_no_marker_as_first_token_and_no_double_marker(qwen_tokenizer, markers):
    prompt = ids(qwen_tokenizer, "prompt text")
    processor = SkeletonLogitsProcessor(prompt_length=len(prompt), markers=markers)
    allowed = next_allowed(processor, prompt)
    assert not allowed[820] and not allowed[5321] and not allowed[26274]  # '####', '%%%%', ' ####'
    assert allowed[ids(qwen_tokenizer, "Let")[0]]
    after_marker = next_allowed(processor, prompt + ids(qwen_tokenizer, "Intro.\n####"))
    assert not after_marker[820] and not after_marker[ids(qwen_tokenizer, "#")[0]]
    assert after_marker[5321] and after_marker[ids(qwen_tokenizer, "Cost")[0]]


def test_free_text_is_untouched(qwen_tokenizer, markers):
    prompt = ids(qwen_tokenizer, "p")
    processor = SkeletonLogitsProcessor(prompt_length=len(prompt), markers=markers)
    history = prompt + ids(qwen_tokenizer, "Note: the ratio is 3:4 here")
    assert bool(next_allowed(processor, history).all())  # a colon outside a title forces nothing


def test_block_end_and_parse(qwen_tokenizer, markers):
    text = "We check both.\n####Alice:......\n####Bob Li:\n......\n####预算：......\n####%%%%"
    tokens = ids(qwen_tokenizer, text)
    assert markers.is_block_end(tokens[-2], tokens[-1])
    block = parse_skeleton(tokens, markers, qwen_tokenizer)
    assert block.titles == ["Alice", "Bob Li", "预算"]
    assert qwen_tokenizer.decode(tokens[: block.start]) == "We check both.\n"
    assert [qwen_tokenizer.decode(p) for p in block.branch_prefixes] == ["####Alice:", "####Bob Li:\n", "####预算："]
    assert block.closing == [820, 5321] and block.end == len(tokens)
    assert parse_skeleton(ids(qwen_tokenizer, "####A:......\n####B:"), markers, qwen_tokenizer) is None


def test_processor_validates_arguments(qwen_tokenizer, markers):
    with pytest.raises(ValueError, match="prompt_length must be >= 0"):
        SkeletonLogitsProcessor(qwen_tokenizer, prompt_length=-1)
    with pytest.raises(ValueError, match="needs a tokenizer or a MarkerVocab"):
        SkeletonLogitsProcessor()
    processor = SkeletonLogitsProcessor(prompt_length=0, markers=markers)
    with pytest.raises(ValueError, match="batch size 1"):
        processor(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, markers.vocab_size))


def test_works_inside_model_generate(qwen_tokenizer, markers):
    from conftest import tiny_decoder

    model = tiny_decoder("qwen2", vocab_size=len(qwen_tokenizer))
    prompt = torch.tensor([ids(qwen_tokenizer, "Intro.\n####Plan A:")])
    processor = SkeletonLogitsProcessor(prompt_length=0, markers=markers)
    out = model.generate(prompt, logits_processor=[processor], max_new_tokens=3, do_sample=False)
    assert qwen_tokenizer.decode(out[0, prompt.shape[1] :]) == "......\n####"
