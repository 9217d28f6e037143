"""Parallel decoding through transformers' ``model.generate(..., custom_generate=...)``: the repository's
``custom_generate/`` directory (in place, and copied alone as a Hub upload would hold it) and the callable form
give exactly ``parallel_decode``'s answer (greedy, float32, the embedded model), for one prompt and for a
left-padded batch; a streamer gets the answer; what cannot be honoured is a ValueError naming it.

Runs under both ends of the supported transformers range (5.17 and 5.24).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, StoppingCriteria, TextStreamer

from parallel_decoding import build_prompt, load_dataset, normal_decode, parallel_decode
from parallel_decoding.integrations import ParallelGenerateOutput, parallel_generate
from parallel_decoding.tasks import read_format_prompt

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "tiny-qwen2-retrieval"
MAX_NEW_TOKENS = 80  # room for the embedded model's whole answer (a 4-branch block and the final line)


@pytest.fixture(scope="module")
def tiny():
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL, padding_side="left")
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts():
    """Three retrieval prompts as generate.py builds them; their chat-templated lengths differ (padding)."""
    own_format = read_format_prompt(MODEL / "format_prompt.txt")
    rows = load_dataset("retrieval", str(REPO / "data" / "retrieval_4.jsonl"))[:3]
    return [build_prompt("retrieval", row, own_format) for row in rows]


@pytest.fixture(scope="module")
def references(tiny, prompts):
    model, tokenizer = tiny
    return [parallel_decode(model, tokenizer, prompt, max_new_tokens=MAX_NEW_TOKENS) for prompt in prompts]


def _encode(tokenizer, prompts):
    chats = [[{"role": "user", "content": prompt}] for prompt in prompts]
    return tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )


def _answers(tokenizer, sequences, prompt_width):
    return tokenizer.batch_decode(sequences[:, prompt_width:], skip_special_tokens=True)


def _assert_rows_equal_references(tokenizer, inputs, sequences, references):
    """Each row is its prompt as given (left padding kept), its answer, then pad ids, as generate lays them out."""
    width = inputs["input_ids"].shape[1]
    assert torch.equal(sequences[:, :width], inputs["input_ids"])
    assert _answers(tokenizer, sequences, width) == [reference["response"] for reference in references]
    for row, reference in zip(sequences, references):
        tail = row[width + reference["length"] :]
        assert torch.equal(tail, torch.full_like(tail, tokenizer.pad_token_id))
    assert sequences.shape[1] == width + max(reference["length"] for reference in references)


def test_the_directory_decodes_a_left_padded_batch_as_parallel_decode(tiny, prompts, references):
    model, tokenizer = tiny
    inputs = _encode(tokenizer, prompts)
    assert (inputs["attention_mask"] == 0).any()  # the batch is padded
    out = model.generate(
        **inputs,
        custom_generate=str(REPO),
        trust_remote_code=True,
        tokenizer=tokenizer,
        max_new_tokens=MAX_NEW_TOKENS,
        return_dict_in_generate=True,
    )
    assert isinstance(out, ParallelGenerateOutput)
    _assert_rows_equal_references(tokenizer, inputs, out.sequences, references)
    assert out.num_branches == [r["num_branches"] for r in references] and all(n > 1 for n in out.num_branches)
    assert out.num_blocks == [r["num_blocks"] for r in references]
    assert out.branches == [r["branches"] for r in references]
    assert out.fallback == [r["fallback"] for r in references] and out.caps == [r["caps"] for r in references]
    assert [set(times) for times in out.stage_times] == [{"stage1", "stage2", "stage3"}] * 3
    assert [report["response"] for report in out.reports] == [r["response"] for r in references]


class _Captured(TextStreamer):
    """A TextStreamer that keeps the text it would print."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text, self.ended = "", False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        self.ended = self.ended or stream_end


def test_a_copy_of_the_directory_decodes_one_prompt_and_streams_it(tiny, prompts, references, tmp_path):
    """The directory alone, where a Hub upload would put it; the installed package does the work."""
    model, tokenizer = tiny
    shutil.copytree(REPO / "custom_generate", tmp_path / "custom_generate")
    inputs = _encode(tokenizer, prompts[1:2])
    streamer = _Captured(tokenizer)
    sequences = model.generate(
        inputs["input_ids"],
        custom_generate=str(tmp_path),
        trust_remote_code=True,
        tokenizer=tokenizer,
        max_new_tokens=MAX_NEW_TOKENS,
        streamer=streamer,
    )
    _assert_rows_equal_references(tokenizer, inputs, sequences, references[1:2])
    assert streamer.ended and streamer.text == references[1]["response"]


def test_the_callable_form_decodes_a_left_padded_batch_as_parallel_decode(tiny, prompts, references):
    model, tokenizer = tiny
    inputs = _encode(tokenizer, prompts[:2])
    assert (inputs["attention_mask"] == 0).any()
    sequences = model.generate(
        **inputs,
        custom_generate=functools.partial(parallel_generate, tokenizer=tokenizer),
        max_new_tokens=MAX_NEW_TOKENS,
    )
    _assert_rows_equal_references(tokenizer, inputs, sequences, references[:2])


def test_the_callable_form_takes_sampling_settings(tiny, prompts, references):
    """top_k=1 sampling draws the argmax: the greedy answer, after transformers built its warpers from the
    settings (the engine's sampler applies them instead, branches included)."""
    model, tokenizer = tiny
    inputs = _encode(tokenizer, prompts[2:3])
    sequences = model.generate(
        **inputs,
        custom_generate=functools.partial(parallel_generate, tokenizer=tokenizer),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=True,
        temperature=0.7,
        top_k=1,
        top_p=0.9,
    )
    _assert_rows_equal_references(tokenizer, inputs, sequences, references[2:3])


class _Ban(LogitsProcessor):
    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        scores[:, self.token_id] = float("-inf")
        return scores


@pytest.mark.parametrize("form", ["directory", "callable"])
def test_normal_decoding_with_a_logits_processor_through_the_same_path(tiny, prompts, form):
    model, tokenizer = tiny
    banned = tokenizer.encode("Let", add_special_tokens=False)[0]  # the answer's usual first token
    reference = normal_decode(model, tokenizer, prompts[0], logits_processor=[_Ban(banned)], max_new_tokens=12)
    inputs = _encode(tokenizer, prompts[:1])
    if form == "directory":
        method = {"custom_generate": str(REPO), "trust_remote_code": True, "tokenizer": tokenizer}
    else:
        method = {"custom_generate": functools.partial(parallel_generate, tokenizer=tokenizer)}
    sequences = model.generate(**inputs, **method, logits_processor=[_Ban(banned)], max_new_tokens=12, parallel=False)
    assert _answers(tokenizer, sequences, inputs["input_ids"].shape[1]) == [reference["response"]]
    assert banned not in sequences[0, inputs["input_ids"].shape[1] :].tolist()


class _Never(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


UNSUPPORTED = [
    ({"num_beams": 2}, "num_beams"),
    ({"num_return_sequences": 2}, "num_return_sequences"),
    ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
    ({"output_scores": True, "return_dict_in_generate": True}, "output_scores"),
    ({"output_logits": True, "return_dict_in_generate": True}, "output_logits"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"min_new_tokens": 5}, "min_new_tokens"),
    ({"eos_token_id": 5}, "eos_token_id"),
    ({"stopping_criteria": [_Never()]}, "stopping_criteria"),
]


@pytest.mark.parametrize("form", ["directory", "callable"])
@pytest.mark.parametrize(("settings", "name"), UNSUPPORTED, ids=[name for _, name in UNSUPPORTED])
def test_a_setting_it_cannot_honour_is_a_value_error_naming_it(tiny, prompts, form, settings, name):
    model, tokenizer = tiny
    inputs = _encode(tokenizer, prompts[:1])
    if form == "directory":
        method = {"custom_generate": str(REPO), "trust_remote_code": True, "tokenizer": tokenizer}
    else:
        method = {"custom_generate": functools.partial(parallel_generate, tokenizer=tokenizer)}
    with pytest.raises(ValueError, match=name):
        model.generate(**inputs, **method, max_new_tokens=8, **settings)


def test_an_assistant_model_is_a_value_error(tiny, prompts):
    model, tokenizer = tiny
    inputs = _encode(tokenizer, prompts[:1])
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(
            **inputs, custom_generate=str(REPO), trust_remote_code=True, tokenizer=tokenizer, assistant_model=model
        )


def test_without_a_tokenizer_the_error_says_to_pass_one(tiny, prompts):
    model, tokenizer = tiny
    inputs = _encode(tokenizer, prompts[:1])
    with pytest.raises(ValueError, match=re.escape("pass tokenizer=")):
        model.generate(**inputs, custom_generate=str(REPO), trust_remote_code=True, max_new_tokens=8)
    with pytest.raises(ValueError, match=re.escape("pass tokenizer=")):  # called directly: generate's arguments
        parallel_generate(model, inputs["input_ids"], max_new_tokens=8)
    # transformers keeps generate's tokenizer= from a callable: the message says how to bind it
    with pytest.raises(ValueError, match=re.escape("functools.partial(parallel_generate, tokenizer=tokenizer)")):
        model.generate(**inputs, custom_generate=parallel_generate, tokenizer=tokenizer, max_new_tokens=8)


def test_right_padding_and_a_streamed_batch_are_value_errors(tiny, prompts):
    model, tokenizer = tiny
    method = {"custom_generate": str(REPO), "trust_remote_code": True, "tokenizer": tokenizer, "max_new_tokens": 8}
    tokenizer.padding_side = "right"
    try:
        right = _encode(tokenizer, prompts[:2])
    finally:
        tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="padding_side='left'"):
        model.generate(**right, **method)
    with pytest.raises(ValueError, match="streamer= streams one prompt"):
        model.generate(**_encode(tokenizer, prompts[:2]), **method, streamer=_Captured(tokenizer))


def test_the_directory_declares_what_transformers_checks():
    requirements = (REPO / "custom_generate" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert "parallel-decoding>=0.1.0" in requirements and "transformers>=5.17" in requirements
    card = (REPO / "custom_generate" / "README.md").read_text(encoding="utf-8")
    front_matter = card.split("---\n")[1]
    assert "library_name: transformers" in front_matter and "  - custom_generate" in front_matter


def test_readme_from_transformers_block_runs_as_written():
    section = (REPO / "README.md").read_text(encoding="utf-8").split("### From transformers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "custom_generate=" in code and "trust_remote_code=True" in code
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\[4\] branches; fallback: \[None\]$", proc.stdout, re.M), proc.stdout
    assert "Final answer:" in proc.stdout
