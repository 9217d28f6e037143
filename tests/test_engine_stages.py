"""The engine's stages in detail: which steps ask the decoder for logits, the skeleton processor's host-side query,
and the ids user logits processors see (on the scores' device)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_decoder
from test_engine import _encode, _scripted
from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor

import parallel_decoding.engine.decode as engine
from parallel_decoding import MarkerVocab, SkeletonLogitsProcessor, normal_decode, parallel_decode
from parallel_decoding.engine.decode import chat_prompt_ids, stop_token_ids
from parallel_decoding.engine.sequential import Sequence
from parallel_decoding.engine.skeleton import FORCE, NO_HASH, NO_MARKER

SKELETON = "Let me check each one.\n####Alpha:......\n####Beta two:......\n####Gamma:......\n####%%%%"
ANSWER_KEYS = (
    "response",
    "length",
    "num_branches",
    "num_blocks",
    "stage1_response",
    "branches",
    "fallback",
    "caps",
    "steps",
)


def _same_answer(a: dict, b: dict) -> None:
    assert {k: a.get(k) for k in ANSWER_KEYS} == {k: b.get(k) for k in ANSWER_KEYS}


class Unchanged(LogitsProcessor):
    """A user processor that returns the scores as they are; the engine must still treat it as constraining, so a
    run with it asks for logits at every step, as every skeleton step did before the in-step argmax."""

    def __call__(self, input_ids, scores):
        return scores


# --- the skeleton processor's host-side query ------------------------------------------------------------------------


def test_leaves_scores_unchanged_is_true_exactly_when_call_returns_the_scores(qwen_tokenizer):
    markers = MarkerVocab.from_tokenizer(qwen_tokenizer)
    prompt = _encode(qwen_tokenizer, "<|im_start|>user\nQ<|im_end|>\n")
    text = "Note: 3:4.\n####Alice:......\n####Bob Li:\n......\n####预算：......\n####%%%% Done: ok"
    answer = _encode(qwen_tokenizer, text)
    queried = SkeletonLogitsProcessor(prompt_length=len(prompt), markers=markers)
    rules = set()
    histories = [prompt + answer[:n] for n in range(len(answer) + 1)]
    histories += [prompt + answer[:5], prompt + answer[:12]]  # cut back: the state reads the history again
    for history in histories:
        ids = torch.tensor([history])  # (1, L)
        scores = torch.randn(1, markers.vocab_size, generator=torch.Generator().manual_seed(len(history)))  # (1, V)
        unchanged = queried.leaves_scores_unchanged(ids)
        rules.add(queried.state.rule())
        out = queried(ids, scores)
        assert unchanged == (out is scores), qwen_tokenizer.decode(history[len(prompt) :])
        # asking first changes nothing: a processor that is only called gives the same scores
        fresh = SkeletonLogitsProcessor(prompt_length=len(prompt), markers=markers)
        assert torch.equal(fresh(ids, scores), out)
    assert rules == {FORCE, NO_MARKER, NO_HASH, None}  # every state of the grammar was asked about


# --- which passes ask for logits --------------------------------------------------------------------------------------


class ForwardSpy:
    """The answer's decoder, recording per pass whether it was sequential or a branch pass and asked for the
    greedy argmax or for logits."""

    def __init__(self, decoder):
        self.decoder, self.calls = decoder, []

    def forward(self, token_ids, positions=None, branch_ids=None, keep=None, greedy=False):
        self.calls.append(("branches" if branch_ids is not None else "sequential", greedy))
        return self.decoder.forward(token_ids, positions, branch_ids, keep, greedy=greedy)

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def count(self, kind: str, greedy: bool) -> int:
        return self.calls.count((kind, greedy))


@pytest.fixture
def spies(monkeypatch):
    """Every decoder the engine makes is wrapped in a ForwardSpy; every skeleton processor call records whether it
    changed the scores."""
    made, skeleton_calls = [], []
    decoder_for = engine.decoder_for

    def spying_decoder_for(model, compile=False, decoder=None):
        made.append(ForwardSpy(decoder_for(model, compile, decoder)))
        return made[-1]

    original_call = SkeletonLogitsProcessor.__call__

    def recording_call(self, input_ids, scores):
        out = original_call(self, input_ids, scores)
        skeleton_calls.append(out is not scores)
        return out

    monkeypatch.setattr(engine, "decoder_for", spying_decoder_for)
    monkeypatch.setattr(SkeletonLogitsProcessor, "__call__", recording_call)
    return made, skeleton_calls


class ScriptedModel:
    """Makes a random tiny decoder write ``script`` (token ids) from the start of the answer: a hook adds a large
    bonus to the scripted token's logit in every sequential pass whose next position falls in the script. Branch
    passes (a tree mask) are left alone. A model, not a processor: the engine's greedy steps see it as well."""

    def __init__(self, model, prompt_len: int, script: list[int]):
        self.prompt_len, self.script, self.next_position = prompt_len, script, None
        model.register_forward_pre_hook(self._inputs, with_kwargs=True)
        model.get_output_embeddings().register_forward_hook(self._bonus)

    def _inputs(self, module, args, kwargs):
        sequential = kwargs.get("attention_mask") is None
        self.next_position = int(kwargs["position_ids"][0, -1]) + 1 if sequential else None

    def _bonus(self, module, args, logits):  # logits (1, T', V); a sequential pass keeps its last row
        if self.next_position is not None and 0 <= self.next_position - self.prompt_len < len(self.script):
            logits[0, -1, self.script[self.next_position - self.prompt_len]] += 1e4
        return logits


def _check_logits_only_at_constrained_steps(spy: ForwardSpy, skeleton_calls: list[bool]) -> None:
    logits_passes = spy.count("sequential", False)
    assert len(skeleton_calls) == logits_passes  # each logits pass fed one skeleton step ...
    assert all(skeleton_calls)  # ... that the skeleton constrained
    assert spy.count("sequential", True) > 2 * logits_passes  # most sequential steps took the in-step argmax
    assert spy.count("branches", False) == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_skeleton_steps_take_the_in_step_argmax_on_a_random_model(qwen_tokenizer, spies, seed):
    made, skeleton_calls = spies
    tokenizer, prompt = qwen_tokenizer, "Check every option."
    model = tiny_decoder("qwen2", vocab_size=len(tokenizer), attn_implementation="sdpa", seed=seed)
    ScriptedModel(model, len(chat_prompt_ids(tokenizer, prompt)), _encode(tokenizer, SKELETON))
    out = parallel_decode(model, tokenizer, prompt, max_new_tokens=48, max_branch_tokens=6)
    assert out["num_branches"] == 3 and out["fallback"] is None and out["stage1_response"] == SKELETON
    _check_logits_only_at_constrained_steps(made[-1], skeleton_calls)
    # The same run asking for logits at every step, as before: the same answer in the same passes.
    with_logits = parallel_decode(
        model, tokenizer, prompt, max_new_tokens=48, max_branch_tokens=6, logits_processor=[Unchanged()]
    )
    _same_answer(out, with_logits)
    assert made[-1].count("sequential", True) == 0
    # Normal decoding with no processor asks for no logits at all.
    normal_decode(model, tokenizer, prompt, max_new_tokens=12)
    assert made[-1].count("sequential", False) == 0


@pytest.fixture(scope="module")
def embedded_with_format():
    """The embedded model with its own format prompt (what generate.py sends it), one row of each retrieval file."""
    from test_tiny_model import MODEL_DIR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallel_decoding.tasks import build_prompt, load_dataset, read_format_prompt

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    own_format = read_format_prompt(str(MODEL_DIR / "format_prompt.txt"))
    prompts = [
        build_prompt("retrieval", load_dataset("retrieval", str(MODEL_DIR.parents[1] / path))[1], own_format)
        for path in ("data/retrieval_4.jsonl", "data/retrieval_10.jsonl")
    ]
    return model, tokenizer, prompts


def test_skeleton_steps_take_the_in_step_argmax_on_the_embedded_model(embedded_with_format, spies):
    made, skeleton_calls = spies
    model, tokenizer, prompts = embedded_with_format
    for prompt in prompts:
        skeleton_calls.clear()
        out = parallel_decode(model, tokenizer, prompt, max_new_tokens=200)
        assert out["num_branches"] >= 4 and out["fallback"] is None
        _check_logits_only_at_constrained_steps(made[-1], skeleton_calls)
        _same_answer(out, parallel_decode(model, tokenizer, prompt, max_new_tokens=200, logits_processor=[Unchanged()]))
        slow = parallel_decode(model, tokenizer, prompt, max_new_tokens=200, jump_forward=False)
        _same_answer({**out, "steps": None}, {**slow, "steps": None})


# --- user processors get the ids on the scores' device ---------------------------------------------------------------


@pytest.fixture(scope="module")
def penalty_model(qwen_tokenizer):
    return tiny_decoder("qwen2", vocab_size=len(qwen_tokenizer), attn_implementation="sdpa", seed=2), qwen_tokenizer


def test_repetition_penalty_gives_the_tokens_of_model_generate(penalty_model):
    model, tokenizer = penalty_model
    prompt, max_new_tokens = "Say something.", 24
    ours = normal_decode(
        model,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        logits_processor=[RepetitionPenaltyLogitsProcessor(1.3)],
    )
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    stops = sorted(stop_token_ids(model, tokenizer))
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            repetition_penalty=1.3,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )  # (1, P + N)
    tokens = generated[0, len(prompt_ids) :].tolist()
    if tokens and tokens[-1] in stops:  # generate keeps the EOS it stopped at; the engine does not
        tokens = tokens[:-1]
    assert ours["length"] == len(tokens)
    assert ours["response"] == tokenizer.decode(tokens, skip_special_tokens=True)
    assert ours["response"] != normal_decode(model, tokenizer, prompt, max_new_tokens=max_new_tokens)["response"]
    # no block: parallel decoding falls back to the same sequential answer, the penalty applied alike
    parallel = parallel_decode(
        model,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        logits_processor=[RepetitionPenaltyLogitsProcessor(1.3)],
    )
    assert parallel["response"] == ours["response"] and parallel["fallback"] is not None


class RecordingProcessor(LogitsProcessor):
    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append((input_ids.device == scores.device, input_ids.clone()))
        return scores


@pytest.fixture
def checked_mirror(monkeypatch):
    """Every read of the device ids is checked against the host buffer at that moment."""
    reads = []
    ids_on = Sequence.ids_on

    def checking_ids_on(self, device):
        out = ids_on(self, device)
        assert out.device == torch.device(device) and out.data_ptr() != self.buffer.data_ptr()  # the mirror
        assert torch.equal(out.cpu(), self.ids)
        reads.append(out.shape[1])
        return out

    monkeypatch.setattr(Sequence, "ids_on", checking_ids_on)
    return reads


def test_user_processors_see_the_sequence_so_far_on_the_scores_device(penalty_model, checked_mirror):
    model, tokenizer = penalty_model
    prompt = "Say something."
    recorder = RecordingProcessor()
    out = normal_decode(model, tokenizer, prompt, max_new_tokens=10, logits_processor=[recorder])
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    assert len(recorder.seen) == out["length"] == 10 and all(same for same, _ in recorder.seen)
    history = [ids[0].tolist() for _, ids in recorder.seen]
    assert history[0] == prompt_ids
    assert all(later[:-1] == earlier for earlier, later in zip(history, history[1:]))  # one token more each step
    assert checked_mirror == [len(prompt_ids) + k for k in range(10)]


@pytest.mark.parametrize(
    "scripts, settings",
    [
        ([SKELETON], dict(max_new_tokens=40, max_branch_tokens=4)),  # forced tokens, a merge, stage 3
        (
            ["First part.\n####A:......\n####B:......\n####%%%%", " Second.\n####C:......\n####D:......\n####%%%%"],
            dict(max_new_tokens=70, max_branch_tokens=5),
        ),  # two merges
        (["Start.\n####Only:"], dict(max_new_tokens=24)),  # never closed: the answer is cut back and decoded again
    ],
    ids=["one-block", "two-blocks", "unclosed"],
)
def test_the_device_ids_follow_merges_and_rewinds(penalty_model, checked_mirror, scripts, settings):
    model, tokenizer = penalty_model
    prompt = "Check every option."
    recorder = RecordingProcessor()
    processors = [*_scripted(tokenizer, prompt, *scripts), recorder]
    out = parallel_decode(model, tokenizer, prompt, logits_processor=processors, **settings)
    assert len(recorder.seen) == len(checked_mirror) > 0 and all(same for same, _ in recorder.seen)
    assert out["fallback"] is None or "did not close" in out["fallback"]


def test_the_mirror_is_written_from_the_step_token_and_caught_up_from_the_host():
    seq = Sequence([5, 6, 7], capacity=4)
    assert seq.ids_on(torch.device("cpu")).tolist() == [[5, 6, 7]]
    seq.append(8, on_device=torch.tensor([8]))  # from the step's token tensor, no host copy needed
    assert seq.mirrored == seq.length == 4
    seq.extend([9, 10, 11])  # from the host, past the capacity: both buffers grow
    assert seq.mirrored == 4 and seq.buffer.shape[1] >= 7 and seq.mirror.shape == seq.buffer.shape
    assert seq.ids_on(torch.device("cpu")).tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    seq.truncate(2)  # answer cut back to [8, 9]
    assert seq.mirrored == 5
    seq.append(12, on_device=torch.tensor([12]))
    seq.append(13)  # no device token: copied from the host at the next read
    assert seq.mirrored == 6
    assert seq.ids_on(torch.device("cpu")).tolist() == [[5, 6, 7, 8, 9, 12, 13]] and seq.mirrored == 7
