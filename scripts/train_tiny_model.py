"""Train the embedded default model: a tiny stock Qwen2 that writes the branch format for the retrieval task.

    python scripts/train_tiny_model.py                      # ~55 min on 2 CPU cores -> models/tiny-qwen2-retrieval
    python scripts/train_tiny_model.py --tiny --steps 3 --output_dir /tmp/tiny   # smoke run, seconds

Everything is made here from the project's own retrieval generator (``parallel_decoding.tasks.retrieval``) and
prompt builder (``parallel_decoding.tasks.build_prompt``) with the format instruction ``FORMAT_INSTRUCTION`` below,
which is saved with the model as ``format_prompt.txt``, so the prompts are byte for byte those ``generate.py``
sends. Held-out evaluation rows use seed 1234; training rows use ``--data_seed`` (must differ from 1234).

Steps, one small function each:
1. rows: 4- and 10-student retrieval rows (never a held-out prompt); the target answer is written by ``step_text``
   and ``answer_full`` below: a verdict right after each GPA, the inside step naming the answer.
2. tokenizer: a byte-level BPE trained on those prompts and answers, with the markers ``####``, ``%%%%``, ``......``,
   ``Final answer:``, the chat tokens ``<|im_start|>``, ``<|im_end|>`` (EOS), ``<|endoftext|>`` (pad), every GPA
   (`` 3.59``) and the range check's words as single tokens, and a Qwen2.5-style chat template.
3. examples: each row becomes ONE packed sequence shaped like the engine's stage 2, a tree: the shared prefix
   (chat prompt + stem sentence) followed by several segments that each see the prefix and themselves only, with
   positions continuing from the prefix as if alone:
     - full:      every step in order, ``####%%%%``, ``Final answer: <name>``, ``<|im_end|>`` (normal decoding and
                  the merged stage 3 see exactly this);
     - skeleton:  ``####<name>:......\\n`` per student then ``####%%%%`` (stage 1: the model picks the next title or
                  closes the block; the forced ``......``, newline and ``####`` carry no loss);
     - branches:  ``####<name>: <step>\\n####`` for every student but the first, alone after the prefix (stage 2:
                  a branch sees the prefix and its own title only and must stop where the next ``####`` starts);
                  their tokens weigh ``--branch_weight`` in the loss.
   One forward pass thus trains all three decoding stages on one prompt, which costs about a third of three
   separate sequences: the prompt is most of the tokens.
4. model: a stock ``Qwen2ForCausalLM`` (GQA, RoPE, tied embeddings) whose first two layers start as the building
   blocks of the prompt look-ups the answers need (``init_lookup_circuits``: previous-token, line-name and induction
   heads) and whose comparison of a GPA with the asked range is set by hand and kept fixed (``init_range_check``,
   section 4b; nearly linear RMSNorms, ``calibrate_norms``), trained with fp32 AdamW and a cosine schedule; the loss
   is taken on assistant tokens only, each token predicted from its parent in the tree.
5. save: ``save_pretrained`` (safetensors, bfloat16 weights) for model and tokenizer, ``generation_config`` with
   EOS ``<|im_end|>``, the format instruction as ``format_prompt.txt``, the tasks it knows as ``trained_tasks.txt``,
   the loss curve as ``loss.png`` and ``train_log.json``.

Seeded and reproducible: the same arguments and thread count give the same losses and weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from parallel_decoding.engine.decode import chat_prompt_ids  # noqa: E402
from parallel_decoding.tasks import MODEL_FORMAT_PROMPT_FILE, MODEL_TASKS_FILE, build_prompt  # noqa: E402
from parallel_decoding.tasks.retrieval import (  # noqa: E402
    FIRST_NAMES,
    GPA_MAX_HUNDREDTHS,
    GPA_MIN_HUNDREDTHS,
    LAST_NAMES,
    MAX_RANGE_SLACK_HUNDREDTHS,
    format_gpa,
    make_retrieval_rows,
)

EVAL_SEED = 1234  # seed of the held-out data/retrieval_*.jsonl files; training never uses it
DEFAULT_OUTPUT_DIR = REPO_ROOT / "models" / "tiny-qwen2-retrieval"

# --- chat tokens, markers and the answer format -----------------------------------------------------------------

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
BRANCH, BLOCK_END, ELLIPSIS = "####", "%%%%", "......"

# Qwen2.5's template without its default system message (a toy model has no use for one) and without tools.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's own pre-tokenizer split (digits one by one, letters apart from punctuation, so a title ends in a lone
# ':' token and ' ' joins the following word). It must be exactly Qwen2's: transformers loads any qwen2 model's
# tokenizer as Qwen2Tokenizer, which rebuilds this split (and an NFC normalizer) whatever tokenizer.json says.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The format instruction this model is trained with. It is part of the model: ``save`` writes it beside the weights
# as format_prompt.txt, and generate.py sends it instead of the project's default for this model. It is the
# project's instruction from before the default gained a worked example; a new wording means retraining.
FORMAT_INSTRUCTION = (
    "Answer format: steps that do not depend on each other form a parallel block. Write each such step on its own "
    "line as `####Title: content`; no step may use the result of another. After the last step write `####%%%%` on "
    "its own line, then give the conclusion that combines the steps."
)

STEM = "Let me check each student's GPA against the range.\n"
FINAL = "Final answer:"  # one token: the conclusion copies the name that follows it in the one "inside" step


def step_text(student: dict, gpa_range: list) -> str:
    """The content of one student's step, after ``####<name>:`` (ends with the newline before the next ``####``).

    The verdict follows the GPA at once, so it is predicted at the GPA token, where the range check (section 4b)
    reads the value; the step that finds its student inside the range ends by naming that student as the answer,
    which the conclusion then copies (an induction on the ``Final answer:`` token)."""
    lo, hi = gpa_range
    if lo <= student["gpa"] <= hi:
        return f" GPA {format_gpa(student['gpa'])} inside the range. {FINAL} {student['name']}\n"
    return f" GPA {format_gpa(student['gpa'])} outside the range.\n"


def training_prompt(row: dict) -> str:
    """The user message of a row, built as generate.py builds it, with this model's format instruction."""
    return build_prompt("retrieval", row, FORMAT_INSTRUCTION)


def answer_full(row: dict) -> str:
    steps = "".join(f"{BRANCH}{s['name']}:{step_text(s, row['gpa_range'])}" for s in row["students"])
    return f"{STEM}{steps}{BRANCH}{BLOCK_END}\n{FINAL} {row['gold_keys']}"


# --- 1. rows --------------------------------------------------------------------------------------------------


def make_rows(num_rows_4: int, num_rows_10: int, seed: int) -> list:
    """Training rows, 4- and 10-student ones interleaved in a seeded order."""
    if seed == EVAL_SEED:
        raise ValueError(f"--data_seed {seed} is the held-out evaluation seed; pick another")
    rows = [
        row
        for num_students, num_rows in ((4, num_rows_4), (10, num_rows_10))
        if num_rows > 0
        for row in make_retrieval_rows(num_students, num_rows, seed)
    ]
    held_out = held_out_prompts()
    rows = [row for row in rows if row["prompt"] not in held_out]  # none match for seed 1; kept as a guarantee
    random.Random(seed).shuffle(rows)
    return rows


def held_out_prompts() -> set:
    """The prompts of the committed evaluation files, which training must never see."""
    return {
        json.loads(line)["prompt"]
        for path in sorted((REPO_ROOT / "data").glob("retrieval_*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    }


# --- 2. tokenizer ---------------------------------------------------------------------------------------------


def gpa_token_texts() -> list:
    """' 1.85' ... ' 4.15': every GPA and range end the generator can write, each made one token.

    Qwen2's split writes a number digit by digit, and any qwen2 model's tokenizer is loaded with that split; added
    tokens are matched before it, so these stay whole. A GPA is then one token to copy out of a resume line and
    one embedding to compare with the range's ends. Only a space-led two-decimal number matches (' 3.59' in
    'GPA 3.59,'); other numbers keep their digits.
    """
    low = GPA_MIN_HUNDREDTHS - MAX_RANGE_SLACK_HUNDREDTHS
    high = GPA_MAX_HUNDREDTHS + MAX_RANGE_SLACK_HUNDREDTHS
    return [f" {format_gpa(v / 100)}" for v in range(low, high + 1)]


def train_tokenizer(rows: list, vocab_size: int):
    """Byte-level BPE on the rows' prompts and answers; returns a transformers fast tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in (ENDOFTEXT, IM_START, IM_END)]
    markers = [AddedToken(t, special=False, normalized=False) for t in (BRANCH, BLOCK_END, ELLIPSIS, FINAL)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The markers are cut out of the training text: they become whole tokens below, and no BPE merge of '#', '%'
    # or '.' runs should compete with them.
    marker_split = re.compile("|".join(re.escape(m) for m in (BRANCH, BLOCK_END, ELLIPSIS, FINAL, *RANGE_CHECK_TOKENS)))
    texts = [training_prompt(r) for r in rows] + [answer_full(r) for r in rows]
    tok.train_from_iterator((piece for text in texts for piece in marker_split.split(text) if piece), trainer)
    tok.add_special_tokens(specials)  # registered explicitly: the trainer keeps only some of them on some releases
    tok.add_tokens(markers)
    tok.add_tokens([AddedToken(text, special=False, normalized=False) for text in gpa_token_texts()])
    # The words the range check reads or writes (section 4b) must be whole tokens whatever the vocabulary size.
    tok.add_tokens([AddedToken(text, special=False, normalized=False) for text in RANGE_CHECK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "left"
    return fast


def check_tokenizer(tokenizer) -> None:
    """The properties the engine relies on; raise with the offending text if one does not hold."""
    for text in (BRANCH, BLOCK_END, ELLIPSIS, FINAL, "\n", ":", IM_START, IM_END, ENDOFTEXT, *RANGE_CHECK_TOKENS):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tokenizer: {text!r} should be one token, got {tokenizer.convert_ids_to_tokens(ids)}")
    one = {
        text: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))[0]
        for text in (BRANCH, BLOCK_END, ELLIPSIS, "\n", ":")
    }
    name_ids = tokenizer.encode("\nAva Chen", add_special_tokens=False)[1:]  # a name as it starts a resume line
    skeleton = tokenizer.encode("####Ava Chen:......\n####%%%%", add_special_tokens=False)
    expected = [one[BRANCH], *name_ids, one[":"], one[ELLIPSIS], one["\n"], one[BRANCH], one[BLOCK_END]]
    if skeleton != expected:
        raise ValueError(
            f"tokenizer: skeleton pieces {tokenizer.convert_ids_to_tokens(skeleton)}, "
            f"expected {tokenizer.convert_ids_to_tokens(expected)}"
        )


# --- 3. examples ----------------------------------------------------------------------------------------------

IGNORE = -100
FIRST_BRANCH_SEGMENT = 3  # segments: 0 the shared prefix, 1 the full answer, 2 the skeleton, 3.. the branches


@dataclass
class Example:
    """One row as a tree: ``segment`` is 0 for the shared prefix, k >= 1 for the k-th segment.

    ``labels[i]`` is the token to predict from position ``parent[i]`` (-100: no loss on that prediction).
    """

    input_ids: list
    position_ids: list
    segment: list
    labels: list  # labels[i]: target of token i (its own id or IGNORE); predicted from parent[i]
    parent: list  # index of the token whose logits predict token i (-1 for the first token)


def _encode(tokenizer, text: str) -> list:
    return tokenizer.encode(text, add_special_tokens=False)


def build_example(tokenizer, row: dict) -> Example:
    """The row as one tree (see step 3 of the module docstring); the prompt is exactly what ``generate.py`` sends."""
    prompt_ids = chat_prompt_ids(tokenizer, training_prompt(row))  # wrapped exactly as the engine wraps it
    stem_ids = _encode(tokenizer, STEM)
    shared = list(prompt_ids) + stem_ids
    shared_loss = [False] * len(prompt_ids) + [True] * len(stem_ids)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)

    segments = []  # (ids, loss mask)
    full = answer_full(row)[len(STEM) :]
    segments.append((_encode(tokenizer, full) + [im_end], None))

    skeleton_ids, skeleton_loss = [], []
    for piece, loss in _skeleton_pieces(row):
        ids = _encode(tokenizer, piece)
        skeleton_ids += ids
        skeleton_loss += [loss] * len(ids)
    segments.append((skeleton_ids, skeleton_loss))

    for student in row["students"][1:]:
        title = _encode(tokenizer, f"{BRANCH}{student['name']}:")
        body = _encode(tokenizer, step_text(student, row["gpa_range"]) + BRANCH)
        segments.append((title + body, [False] * len(title) + [True] * len(body)))

    input_ids, position_ids, segment, labels, parent = [], [], [], [], []
    for i, (t, loss) in enumerate(zip(shared, shared_loss)):
        input_ids.append(t)
        position_ids.append(i)
        segment.append(0)
        labels.append(t if loss else IGNORE)
        parent.append(i - 1)
    prefix_len = len(shared)
    for k, (ids, loss) in enumerate(segments, start=1):
        loss = loss or [True] * len(ids)
        start = len(input_ids)
        for j, (t, on) in enumerate(zip(ids, loss)):
            input_ids.append(t)
            position_ids.append(prefix_len + j)
            segment.append(k)
            labels.append(t if on else IGNORE)
            parent.append(prefix_len - 1 if j == 0 else start + j - 1)
    return Example(input_ids, position_ids, segment, labels, parent)


def _skeleton_pieces(row: dict) -> list:
    """(text, has loss) pieces of the stage-1 skeleton after the stem; the engine forces the pieces without loss."""
    pieces = [(BRANCH, False)]  # the first '####' is learned in the full segment
    for student in row["students"]:
        pieces += [(f"{student['name']}:", True), (ELLIPSIS + "\n" + BRANCH, False)]
    pieces.append((BLOCK_END, True))
    return pieces


def collate(examples: list, pad_id: int, dtype: torch.dtype = torch.float32, branch_weight: float = 1.0):
    """Pad to the longest example; returns tensors, an additive tree mask (B, 1, T, T) of ``dtype`` and the targets
    (batch index, predicting position, token id, loss weight: ``branch_weight`` in the branch segments, else 1)."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # -1: padding, sees only padding
    target_batch, target_pos, target_ids, target_weight = [], [], [], []
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        position_ids[b, :n] = torch.tensor(e.position_ids)
        segment[b, :n] = torch.tensor(e.segment)
        labels, parent = torch.tensor(e.labels), torch.tensor(e.parent)
        keep = labels != IGNORE
        target_ids.append(labels[keep])
        target_pos.append(parent[keep])
        target_batch.append(torch.full((int(keep.sum()),), b))
        in_branch = torch.tensor(e.segment)[keep] >= FIRST_BRANCH_SEGMENT
        target_weight.append(torch.where(in_branch, branch_weight, 1.0))
    causal = torch.ones((T, T), dtype=torch.bool).tril()  # (T, T)
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    shared_key = (segment == 0)[:, None, :] & (segment >= 0)[:, :, None]  # (B, T, T): real queries see the prefix
    visible = (same | shared_key) & causal  # (B, T, T)
    # Additive, as both eager and sdpa attention take it: 0 where visible, the dtype's minimum elsewhere.
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    targets = (torch.cat(target_batch), torch.cat(target_pos), torch.cat(target_ids), torch.cat(target_weight))
    return input_ids, position_ids, mask[:, None], targets  # mask: (B, 1, T, T)


# --- 4. model and training ------------------------------------------------------------------------------------


@dataclass
class ModelSize:
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048


TINY_SIZE = ModelSize(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

ROPE_THETA = 1e6  # Qwen2.5's; its many slow RoPE frequencies leave room for position-free content matching


def make_model(tokenizer, size: ModelSize, structured_init: bool = True):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        rope_theta=ROPE_THETA,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        rms_norm_eps=NORM_EPS,
        attn_implementation="sdpa",
        **asdict(size),
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for norm in norms(model):  # nearly linear RMSNorm (section 4b), reading a unit vector at RMSNorm's length
            norm.weight.fill_(math.sqrt(NORM_EPS) * math.sqrt(config.hidden_size))
    if structured_init:
        init_lookup_circuits(model, tokenizer)
        init_range_check(model, tokenizer)
    calibrate_norms(model, tokenizer)
    return model


CALIBRATION_SEED = 2  # rows that only set the norm gains: neither training (--data_seed) nor held-out rows


def calibrate_norms(model, tokenizer) -> None:
    """Give each RMSNorm's learnt dimensions the gain an ordinary RMSNorm applies at this initialisation.

    An ordinary RMSNorm reads a residual x at length sqrt(d) whatever |x|; the nearly linear one (section 4b) reads
    it at gain * |x|. So each norm's gain is set, once, to sqrt(d) / (mean |x| over the learnt dimensions of its
    input), measured on one fixed row in one forward pass (each norm is set before it runs, so later ones see the
    earlier ones' gains). The weights are fixed from then on: Adam's steps of ~lr could not move a weight of ~1e4.
    """
    d = model.config.hidden_size
    learned = torch.ones(d, dtype=torch.bool)
    if d % 6 == 0:
        learned[ResidualLayout.for_width(d).reserved] = False
    example = build_example(tokenizer, make_rows(1, 0, CALIBRATION_SEED)[0])
    full = [i for i, s in enumerate(example.segment) if s <= 1]  # the prefix and the full answer, as one sequence
    input_ids = torch.tensor([[example.input_ids[i] for i in full]])  # (1, T)

    def set_gain(norm, args):
        (x,) = args  # (1, T, d)
        mean_norm = x[..., learned].norm(dim=-1).mean().item()
        norm.weight[learned] = math.sqrt(NORM_EPS) * math.sqrt(d) / mean_norm

    hooks = [norm.register_forward_pre_hook(set_gain) for norm in norms(model)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()


def norms(model) -> list:
    return [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [
        model.model.norm
    ]


# --- 4a. structured initialization ------------------------------------------------------------------------------
#
# Every answer token that depends on the row is a look-up in the prompt: the title after ``####`` is the name on
# the resume line after the previous title's line, the GPA after `` GPA`` is the one on the title's line, the final
# answer is the title of the step that says ``inside``. Trained from a random start, the heads these look-ups are
# built from (previous token, "which line am I on", induction) form only after a long loss plateau: runs of 1,300
# steps here never left it. So four heads start as those building blocks, each writing into its own slice of the
# residual stream, and training (which changes every weight freely, but for the range check's entries of section 4b)
# wires the look-ups out of them in a few hundred steps. The residual stream of width d is laid out as
#
#     [ token (d/2 - 12) | reserved (12, section 4b) | PREV: previous token (d/6) | LINE: most recent name (d/6) |
#       PREV_LINE: LINE one back (d/6) ]
#
#   layer 0, KV head 1 -> PREV       attends to the previous token (RoPE position bias through q/k biases)
#   layer 0, KV head 0 -> LINE       attends to the nearest name tokens (a "name" direction in their embeddings)
#   layer 1, KV head 0 -> token      induction: query = current token, key = PREV; copies the key's token
#   layer 1, KV head 1 -> PREV_LINE  attends to the previous token and copies its LINE
#
# A title's next name is then the token whose PREV is a line end and whose PREV_LINE is the previous title's LINE;
# a GPA is the token whose PREV is `` GPA`` and whose PREV_LINE is the title's name. Token embeddings start in the
# token slice only; names carry a shared "name" direction, a space-led first name starts equal to its line-start
# form (" Ava" in "Final answer: Ava Chen" and "Ava" in "\nAva Chen"), GPA tokens carry their value along a
# "magnitude" direction. The other heads and MLPs start as usual, with small output weights (GPT-2's residual
# scaling) so they do not drown the building blocks.


@dataclass(frozen=True)
class ResidualLayout:
    token: slice
    reserved: slice  # the range check's own dimensions (section 4b); no learnt weight writes them
    prev: slice
    line: slice
    prev_line: slice

    @classmethod
    def for_width(cls, hidden_size: int) -> ResidualLayout:
        if hidden_size % 6:
            raise ValueError(f"structured init needs hidden_size divisible by 6, got {hidden_size}")
        t, c = hidden_size // 2, hidden_size // 6
        r = t - len(RESERVED_DIMS)
        return cls(slice(0, r), slice(r, t), slice(t, t + c), slice(t + c, t + 2 * c), slice(t + 2 * c, hidden_size))

    def dim(self, name: str) -> int:
        """The residual index of one reserved dimension (``RESERVED_DIMS``)."""
        return self.reserved.start + RESERVED_DIMS.index(name)


def rope_position_bias(inv_freq: torch.Tensor, head_dim: int, distance: float, band: tuple, score: float):
    """Query and key biases that make a head attend ``distance`` tokens back whatever the tokens are.

    Under RoPE a constant query q and key k score a key ``d`` tokens back by
    sum_j |q_j||k_j| cos(theta_j d - phase_j) / sqrt(head_dim); equal weights on the frequencies theta_j in
    ``band`` and phases theta_j * distance make that ``score`` at d = distance, falling off around it."""
    half = head_dim // 2
    used = (inv_freq >= band[0]) & (inv_freq <= band[1])
    if not used.any():
        raise ValueError(f"no RoPE frequency in {band} for head_dim {head_dim}")
    r = math.sqrt(score * math.sqrt(head_dim) / int(used.sum()))
    k_bias = torch.zeros(head_dim)
    k_bias[:half][used] = r
    phase = inv_freq * distance
    q_bias = torch.zeros(head_dim)
    q_bias[:half][used] = (r * torch.cos(phase))[used]
    q_bias[half:][used] = (-r * torch.sin(phase))[used]
    return q_bias, k_bias


def _single_token(tokenizer, text: str, after_newline: bool = False):
    """The id of ``text`` if it is one token (read after a newline: how a resume line starts), else None."""
    ids = tokenizer.encode(f"\n{text}" if after_newline else text, add_special_tokens=False)
    ids = ids[1:] if after_newline else ids
    return ids[0] if len(ids) == 1 else None


def _name_token_ids(tokenizer) -> tuple:
    """(line-start first names, their space-led forms, space-led last names), single tokens only.

    A small vocabulary (the ``--tiny`` smoke run) splits some names; those just start without the priors."""
    starts, spaced = [], []
    for name in FIRST_NAMES:
        start, space = _single_token(tokenizer, name, after_newline=True), _single_token(tokenizer, f" {name}")
        if start is not None and space is not None:
            starts.append(start)
            spaced.append(space)
    last = [i for i in (_single_token(tokenizer, f" {n}") for n in LAST_NAMES) if i is not None]
    return starts, spaced, last


def init_lookup_circuits(
    model,
    tokenizer,
    seed: int = 1234,
    name_score: float = 30.0,
    induction_gain: float = 2.5,
    copy_norm: float = 3.0,
    value_gain: float = 2.0,
) -> None:
    """Start the four building-block heads described above (in place; see the section comment)."""
    config = model.config
    num_kv, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    d = config.hidden_size
    layout = ResidualLayout.for_width(d)
    channel = layout.prev.stop - layout.prev.start
    if config.num_hidden_layers < 2 or num_kv < 2:
        raise ValueError("structured init needs at least 2 layers and 2 key/value heads")
    layer0, layer1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    head_dim = layer0.head_dim
    if channel > head_dim:
        raise ValueError(f"structured init needs head_dim >= hidden_size / 6, got {head_dim} < {channel}")
    half = head_dim // 2
    inv_freq = model.model.rotary_emb.inv_freq.float()  # (head_dim / 2,)
    token_dims = layout.token.stop
    norm_scale = math.sqrt(d)  # RMSNorm output norm: every token vector is read at this length
    gen = torch.Generator().manual_seed(seed)

    def orthonormal_rows(rows: int, cols: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(cols, rows, generator=gen))[0].T  # (rows, cols)

    def clear(attn, kv_head: int) -> tuple:
        """Zero one KV head, its query heads and their output columns; return the KV head's rows (of k/v_proj) and
        the rows of its first query head (of q_proj; the same indices are that head's o_proj columns), which
        carries the circuit; the group's other query heads start silent and are free for training."""
        kv_rows = slice(kv_head * head_dim, (kv_head + 1) * head_dim)
        q_rows = slice(kv_head * group * head_dim, (kv_head + 1) * group * head_dim)
        for proj, rows in ((attn.k_proj, kv_rows), (attn.v_proj, kv_rows), (attn.q_proj, q_rows)):
            proj.weight[rows] = 0
            proj.bias[rows] = 0
        attn.o_proj.weight[:, q_rows] = 0
        first_q = slice(q_rows.start, q_rows.start + head_dim)  # the group's first query head carries the circuit
        return kv_rows, first_q

    names, spaced_names, last_names = _name_token_ids(tokenizer)
    gpa_ids = [_single_token(tokenizer, text) for text in gpa_token_texts()]  # added tokens: always single
    gpa_values = torch.tensor([float(t) - 3.0 for t in gpa_token_texts()])  # centred on the middle of 2.00..4.00

    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # (V, d), tied with the LM head
        emb.normal_(0.0, 1.0 / math.sqrt(token_dims), generator=gen)  # |e| ~ 1 inside the token slice
        emb[:, token_dims:] = 0
        emb[spaced_names] = emb[names]
        name_dir = torch.randn(token_dims, generator=gen)
        name_dir /= name_dir.norm()
        emb[names + spaced_names + last_names, :token_dims] += name_dir
        value_dir = torch.randn(token_dims, generator=gen)
        value_dir /= value_dir.norm()
        emb[gpa_ids, :token_dims] += value_gain * gpa_values[:, None] * value_dir
        small = 0.02 / math.sqrt(2 * config.num_hidden_layers)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.normal_(0.0, small, generator=gen)
            layer.mlp.down_proj.weight.normal_(0.0, small, generator=gen)

        prev_proj = orthonormal_rows(channel, token_dims)  # what PREV keeps of a token
        line_proj = orthonormal_rows(channel, token_dims)  # what LINE keeps of a name
        # A unit-norm token read at RMSNorm length keeps |proj| ~ norm_scale * sqrt(channel / token_dims); the
        # writes below bring each slice back to ~1, the size of a token embedding.
        write_gain = 1.0 / (norm_scale * math.sqrt(channel / token_dims))
        prev_q_bias, prev_k_bias = rope_position_bias(inv_freq, head_dim, 1.0, (0.1, 1.0), 16.0)

        # layer 0, KV head 1: previous token -> PREV
        kv_rows, q_rows = clear(layer0, 1)
        layer0.k_proj.bias[kv_rows] = prev_k_bias
        layer0.q_proj.bias[q_rows] = prev_q_bias
        layer0.v_proj.weight[kv_rows.start : kv_rows.start + channel, layout.token] = prev_proj
        layer0.o_proj.weight[layout.prev, q_rows.start : q_rows.start + channel] = write_gain * torch.eye(channel)

        # layer 0, KV head 0: the nearest names -> LINE. One slow RoPE pair (~0.03 rad/token) makes the score
        # name_score * cos(0.03 d): names on the current line (d < 30) win over the previous line's.
        kv_rows, q_rows = clear(layer0, 0)
        pair = int(torch.argmin((inv_freq - 0.03).abs()))
        name_read = norm_scale / math.sqrt(2.0)  # a name's embedding is ~half name direction
        layer0.k_proj.weight[kv_rows.start + pair, layout.token] = name_dir
        layer0.q_proj.bias[q_rows.start + pair] = name_score * math.sqrt(head_dim) / name_read
        layer0.v_proj.weight[kv_rows.start : kv_rows.start + channel, layout.token] = line_proj
        layer0.o_proj.weight[layout.line, q_rows.start : q_rows.start + channel] = write_gain * torch.eye(channel)

        # layer 1, KV head 0: induction on the slow RoPE pairs (nearly position-free over a prompt's length)
        kv_rows, q_rows = clear(layer1, 0)
        slow = torch.nonzero(inv_freq <= 1.5e-3).flatten()[: channel // 2]
        dims = torch.cat([slow, slow + half])  # (m,): both halves of each slow rotation pair
        m = len(dims)
        layer1.q_proj.weight[q_rows.start + dims, layout.token] = induction_gain * prev_proj[:m]
        prev_dims = slice(layout.prev.start, layout.prev.start + m)
        layer1.k_proj.weight[kv_rows.start + dims, prev_dims] = induction_gain * torch.eye(m)
        copy_proj = orthonormal_rows(head_dim, token_dims)
        layer1.v_proj.weight[kv_rows, layout.token] = copy_proj
        copy_gain = copy_norm / (norm_scale * 0.6 * math.sqrt(head_dim / token_dims))  # token slice ~0.6 of the norm
        layer1.o_proj.weight[layout.token, q_rows] = copy_gain * copy_proj.T

        # layer 1, KV head 1: the previous token's LINE -> PREV_LINE
        kv_rows, q_rows = clear(layer1, 1)
        layer1.k_proj.bias[kv_rows] = prev_k_bias
        layer1.q_proj.bias[q_rows] = prev_q_bias
        layer1.v_proj.weight[kv_rows.start : kv_rows.start + channel, layout.line] = torch.eye(channel)
        line_gain = 2.0 / norm_scale  # LINE is read at about half the RMSNorm length: bring it back to ~1
        layer1.o_proj.weight[layout.prev_line, q_rows.start : q_rows.start + channel] = line_gain * torch.eye(channel)


# --- 4b. the range check, set by hand and kept fixed -------------------------------------------------------------
#
# Whether a GPA lies in [low, high] is never learnt here: from a random start, and from the look-up start above,
# every earlier run of this project answered "outside" for every student (docs/tiny_model.md). So the comparison is
# built by hand out of a few residual dimensions of its own (``layout.reserved``), spare rows of two heads and a few
# MLP units, and training leaves those entries as they are (``frozen_entries``: restored after every optimizer
# step). Everything else (titles, copying the GPA, the wording, naming the answer) is learnt.
#
#   embeddings   every GPA token: is_gpa = 1, value = (100 * GPA - 300) / 64 (exact in bfloat16);
#                " between": between = 1, " and": and = 1; " inside": verdict = +1, " outside": verdict = -1
#   layer 0      the previous-token head (query head 2) also carries between/and -> prev_between/prev_and, in two
#                value rows its look-up circuit leaves free
#   layer 0 MLP  at a GPA token, saturating steps of prev_between/prev_and: low_here = value after " between",
#                high_here = value after " and", bound = 1 at either (exactly 1 or 0, whatever the attention leaks)
#   layer 1      query head 3 attends equally to the two bound tokens (keys on RoPE pairs too slow to turn over a
#                prompt) and copies 2 * mean(low_here, high_here) -> low, high: every position after the question
#                holds the range's ends, exactly
#   layer 1 MLP  five units: at a GPA token, 16 * (step(value >= low) + step(value <= high) - 1.5) -> verdict (+-8)
#   final norm   reads only verdict among the reserved dimensions, so the next token's logits move by +-16
#                towards " inside" / " outside"; no other logit sees the reserved dimensions
#
# A value copied from one position and compared at another must keep its scale, which RMSNorm does not give (it
# divides each position by its own norm). So every RMSNorm has eps = 1e6 and weight sqrt(eps) * gain: it multiplies
# by `gain` and divides by sqrt(eps + mean(x^2)), the same at every position to 1e-5 while the residual's mean square
# stays far below eps. The model stays a stock Qwen2 (a config value and weights). Reserved dimensions are read at
# gain 1; with 1/64 per hundredth and steps sharp at 1/64, the comparison is exact.

NORM_EPS = 1e6
RESERVED_DIMS = (
    "is_gpa",
    "value",
    "between",
    "and",
    "prev_between",
    "prev_and",
    "low_here",
    "high_here",
    "bound",
    "low",
    "high",
    "verdict",
)
RANGE_CHECK_TOKENS = (" between", " and", " inside", " outside")
VALUE_SCALE = 1 / 64  # one hundredth of a GPA in the value dimension: a power of two, so bfloat16 keeps it exact
BOUND_SCORE = 40.0  # attention score of the two bound tokens in the range-ends head; every other key scores 0
STEP_SHARPNESS = 16.0  # silu(16 x) is relu(16 x) to 1e-6 at every integer x
MARK_SHARPNESS = 128.0  # steps of prev_between/prev_and from 0.25 to 0.5 (the previous-token head gives >= 0.76 and
# <= 0.16 at initialisation; it is frozen)
VERDICT_GAIN = 16.0  # verdict = +-VERDICT_GAIN / 2; the logit gap between " inside" and " outside" is twice that
MARK_UNITS = 8  # layer 0's first MLP units
VERDICT_UNITS = 5  # layer 1's first MLP units


def range_check_rows(config, head_dim: int) -> dict:
    """Index ranges the range check uses: KV head 1's key rows, its two spare value rows (the look-up circuits use
    the first d / 6), query heads 2 and 3."""
    group = config.num_attention_heads // config.num_key_value_heads
    channel = config.hidden_size // 6
    if head_dim < channel + 2:
        raise ValueError(f"the range check needs head_dim >= hidden_size / 6 + 2, got {head_dim}")
    spare = (channel, channel + 1)
    kv1 = 1 * head_dim
    q2, q3 = 1 * group * head_dim, (1 * group + 1) * head_dim
    return {
        "keys": slice(kv1, kv1 + head_dim),
        "spare_values": [kv1 + r for r in spare],
        "prev_head": slice(q2, q2 + head_dim),  # layer 0: the previous-token head
        "ends_head": slice(q3, q3 + head_dim),  # layer 1: the range-ends head
        "prev_head_spare": [q2 + r for r in spare],  # o_proj columns fed by the spare value rows
        "ends_head_spare": [q3 + r for r in spare],
        "slow_pair": head_dim // 2 - 1,  # the slowest RoPE pair: under 0.01 rad over 2,048 tokens
    }


def init_range_check(model, tokenizer) -> None:
    """Set the range check described above (in place). Call after ``init_lookup_circuits``."""
    config = model.config
    layout = ResidualLayout.for_width(config.hidden_size)
    R = layout.dim
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    mlp0, mlp1 = model.model.layers[0].mlp, model.model.layers[1].mlp
    head_dim = attn0.head_dim
    rows = range_check_rows(config, head_dim)
    token_id = {text: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))[0] for text in RANGE_CHECK_TOKENS}
    gpa_ids = [_single_token(tokenizer, text) for text in gpa_token_texts()]
    hundredths = torch.tensor([round(float(t) * 100) - 300 for t in gpa_token_texts()], dtype=torch.float32)
    unit = math.sqrt(NORM_EPS)  # the norm weight that reads a dimension at gain 1

    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # (V, d), tied with the LM head
        emb[:, layout.reserved] = 0
        emb[gpa_ids, R("is_gpa")] = 1.0
        emb[gpa_ids, R("value")] = hundredths * VALUE_SCALE
        emb[token_id[" between"], R("between")] = 1.0
        emb[token_id[" and"], R("and")] = 1.0
        emb[token_id[" inside"], R("verdict")] = 1.0
        emb[token_id[" outside"], R("verdict")] = -1.0
        for norm in norms(model):
            norm.weight[layout.reserved] = unit
        model.model.norm.weight[layout.reserved] = 0.0
        model.model.norm.weight[R("verdict")] = unit
        for layer in model.model.layers:  # only the circuit below writes the reserved dimensions
            layer.self_attn.o_proj.weight[layout.reserved] = 0
            layer.mlp.down_proj.weight[layout.reserved] = 0

        # layer 0: the previous-token head also copies the previous token's between/and
        for value_row, column, (src, dst) in zip(
            rows["spare_values"], rows["prev_head_spare"], (("between", "prev_between"), ("and", "prev_and"))
        ):
            attn0.v_proj.weight[value_row] = 0
            attn0.v_proj.weight[value_row, R(src)] = 1.0
            attn0.o_proj.weight[:, column] = 0
            attn0.o_proj.weight[R(dst), column] = 1.0

        # layer 0 MLP: unit = silu(gate) * up, with is_gpa as the constant input (MLPs have no bias). For a mark m,
        # (silu(k (m - 1/4)) - silu(k (m - 1/2))) / (k / 4) is 1 to 1e-9 for m >= 0.7 and 0 to 1e-5 for m <= 0.2.
        k = MARK_SHARPNESS
        for proj in (mlp0.gate_proj, mlp0.up_proj):
            proj.weight[:MARK_UNITS] = 0
        mlp0.down_proj.weight[:, :MARK_UNITS] = 0
        unit_index = 0
        for mark, up, out in (
            ("prev_between", "value", "low_here"),
            ("prev_and", "value", "high_here"),
            ("prev_between", "is_gpa", "bound"),
            ("prev_and", "is_gpa", "bound"),
        ):
            for threshold, sign in ((0.25, 1.0), (0.5, -1.0)):
                mlp0.gate_proj.weight[unit_index, R(mark)] = k
                mlp0.gate_proj.weight[unit_index, R("is_gpa")] = -k * threshold
                mlp0.up_proj.weight[unit_index, R(up)] = 1.0
                mlp0.down_proj.weight[R(out), unit_index] = sign / (k / 4)
                unit_index += 1

        # layer 1: query head 3 attends to the bound tokens alone, with equal weights, and copies their low_here and
        # high_here (each nonzero at one of the two) through KV head 1's spare value rows: out = x / 2, so gain 2.
        key_row = rows["keys"].start + rows["slow_pair"]
        key_gain = 16.0
        attn1.k_proj.weight[key_row] = 0
        attn1.k_proj.bias[key_row] = 0
        attn1.k_proj.weight[key_row, R("bound")] = key_gain
        ends = rows["ends_head"]
        attn1.q_proj.weight[ends] = 0
        attn1.q_proj.bias[ends] = 0
        attn1.q_proj.bias[ends.start + rows["slow_pair"]] = BOUND_SCORE * math.sqrt(head_dim) / key_gain
        attn1.o_proj.weight[:, ends] = 0
        for value_row, column, (src, dst) in zip(
            rows["spare_values"], rows["ends_head_spare"], (("low_here", "low"), ("high_here", "high"))
        ):
            attn1.v_proj.weight[value_row] = 0
            attn1.v_proj.bias[value_row] = 0
            attn1.v_proj.weight[value_row, R(src)] = 1.0
            attn1.o_proj.weight[R(dst), column] = 2.0

        # layer 1 MLP: with x = 64 (value - low), an integer at a GPA token, (silu(k (x + 1)) - silu(k x)) / k is 1
        # for x >= 0 and 0 for x <= -1: the step value >= low; the same for high >= value.
        k, per_hundredth = STEP_SHARPNESS, STEP_SHARPNESS / VALUE_SCALE
        for proj in (mlp1.gate_proj, mlp1.up_proj):
            proj.weight[:VERDICT_UNITS] = 0
        mlp1.down_proj.weight[:, :VERDICT_UNITS] = 0
        for unit_index, (plus, minus, offset) in enumerate(
            (("value", "low", k), ("value", "low", 0.0), ("high", "value", k), ("high", "value", 0.0))
        ):
            mlp1.gate_proj.weight[unit_index, R(plus)] = per_hundredth
            mlp1.gate_proj.weight[unit_index, R(minus)] = -per_hundredth
            mlp1.gate_proj.weight[unit_index, R("is_gpa")] = offset
            mlp1.up_proj.weight[unit_index, R("is_gpa")] = 1.0
            mlp1.down_proj.weight[R("verdict"), unit_index] = (1.0 if offset else -1.0) * VERDICT_GAIN / k
        # unit 4: silu(k) ~ k at a GPA token, so verdict = gain * (step_low + step_high - 1.5) = +-gain / 2
        mlp1.gate_proj.weight[4, R("is_gpa")] = k
        mlp1.up_proj.weight[4, R("is_gpa")] = 1.0
        mlp1.down_proj.weight[R("verdict"), 4] = -1.5 * VERDICT_GAIN / k


def frozen_entries(model) -> list:
    """(parameter, bool mask) pairs of the entries the range check owns (and every norm gain, see
    ``calibrate_norms``); ``train`` restores them after every step."""
    config = model.config
    layout = ResidualLayout.for_width(config.hidden_size)
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    rows = range_check_rows(config, attn0.head_dim)
    masks: dict = {}

    def freeze(param, index) -> None:
        mask = masks.setdefault(param, torch.zeros_like(param, dtype=torch.bool))
        mask[index] = True

    freeze(model.model.embed_tokens.weight, (slice(None), layout.reserved))
    for norm in norms(model):
        freeze(norm.weight, slice(None))
    for layer in model.model.layers:
        freeze(layer.self_attn.o_proj.weight, layout.reserved)
        freeze(layer.mlp.down_proj.weight, layout.reserved)
    # layer 0: the previous-token head keeps attending to the previous token, and its spare rows stay marks
    for proj in (attn0.k_proj, attn0.q_proj):
        part = rows["keys"] if proj is attn0.k_proj else rows["prev_head"]
        freeze(proj.weight, part)
        freeze(proj.bias, part)
    for value_row, column in zip(rows["spare_values"], rows["prev_head_spare"]):
        freeze(attn0.v_proj.weight, value_row)
        freeze(attn0.v_proj.bias, value_row)
        freeze(attn0.o_proj.weight, (slice(None), column))
    # layer 1: the range-ends head whole, its key row and value rows
    key_row = rows["keys"].start + rows["slow_pair"]
    freeze(attn1.k_proj.weight, key_row)
    freeze(attn1.k_proj.bias, key_row)
    freeze(attn1.q_proj.weight, rows["ends_head"])
    freeze(attn1.q_proj.bias, rows["ends_head"])
    freeze(attn1.o_proj.weight, (slice(None), rows["ends_head"]))
    for value_row in rows["spare_values"]:
        freeze(attn1.v_proj.weight, value_row)
        freeze(attn1.v_proj.bias, value_row)
    for mlp, units in ((model.model.layers[0].mlp, MARK_UNITS), (model.model.layers[1].mlp, VERDICT_UNITS)):
        freeze(mlp.gate_proj.weight, slice(0, units))
        freeze(mlp.up_proj.weight, slice(0, units))
        freeze(mlp.down_proj.weight, (slice(None), slice(0, units)))
    return list(masks.items())


def tree_loss(model, batch) -> torch.Tensor:
    """Weighted mean cross-entropy of every labelled token, predicted from its parent's hidden state."""
    input_ids, position_ids, mask, (tb, tpos, tids, weights) = batch
    hidden = model.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[tb, tpos])  # (N, V): only the positions that predict a label
    losses = F.cross_entropy(logits.float(), tids, reduction="none")  # (N,)
    return (losses * weights).sum() / weights.sum()


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, batches: list, pad_id: int, args) -> list:
    frozen = [(p, m, p.detach().clone()) for p, m in frozen_entries(model)]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    log, start, cpu_start, window = [], time.time(), time.process_time(), []
    for step, batch in enumerate(batches):
        lr = lr_at(step, len(batches), args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = tree_loss(model, collate(batch, pad_id, branch_weight=args.branch_weight))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for param, mask, _ in frozen:
            param.grad[mask] = 0  # so they do not count in the clipped norm
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        with torch.no_grad():
            for param, mask, value in frozen:  # AdamW's decay and momentum would still move them
                param[mask] = value[mask]
        window.append(loss.item())
        log.append(
            {
                "step": step + 1,
                "loss": loss.item(),
                "lr": lr,
                "time": time.time() - start,
                "cpu_time": time.process_time() - cpu_start,
            }
        )
        if (step + 1) % args.log_every == 0 or step + 1 == len(batches):
            print(
                f"step {step + 1:5d}/{len(batches)}  loss {sum(window) / len(window):.4f}  lr {lr:.2e}  "
                f"{time.time() - start:7.1f}s wall  {time.process_time() - cpu_start:7.1f}s cpu",
                flush=True,
            )
            window = []
    model.eval()
    return log


def make_batches(tokenizer, rows: list, batch_size: int) -> list:
    """Consecutive rows of the same student count form a batch (similar lengths, little padding).

    Returns lists of examples; ``collate`` turns one into tensors when it is trained on (the tree masks of a
    whole run would not fit in memory)."""
    by_size: dict = {}
    batches = []
    for row in rows:
        group = by_size.setdefault(row["num_students"], [])
        group.append(build_example(tokenizer, row))
        if len(group) == batch_size:
            batches.append(group)
            by_size[row["num_students"]] = []
    return batches


# --- 5. save --------------------------------------------------------------------------------------------------


def save(model, tokenizer, log: list, args, output_dir: Path, elapsed: float) -> None:
    from transformers import GenerationConfig

    output_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
        max_new_tokens=256,
    )
    # Stored in bfloat16: half the bytes (the repo keeps the file under 5 MiB); a loader upcasts to the dtype it
    # asks for (generate.py uses float32 on a CPU). Training itself ran in float32.
    model.to(torch.bfloat16).save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    (output_dir / MODEL_FORMAT_PROMPT_FILE).write_text(FORMAT_INSTRUCTION + "\n", encoding="utf-8")
    (output_dir / MODEL_TASKS_FILE).write_text(
        "# Tasks this model was trained for (generate.py warns before decoding any other task).\nretrieval\n"
    )
    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(elapsed, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": log[-1]["loss"] if log else None,
        "loss": [round(e["loss"], 5) for e in log],
    }
    (output_dir / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_loss(log, output_dir / "loss.png")


def plot_loss(log: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in log]
    losses = [e["loss"] for e in log]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, label="loss (per step)")
    k = max(1, len(losses) // 50)
    if k > 1:
        smooth = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))
        ]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of last {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (assistant tokens)")
    ax.set_title("tiny-qwen2-retrieval training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the row order")
    p.add_argument("--data_seed", type=int, default=1, help=f"retrieval generator seed (not {EVAL_SEED})")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--frac_10", type=float, default=0.4, help="fraction of training rows with 10 students")
    p.add_argument(
        "--branch_weight",
        type=float,
        default=3.0,
        help="loss weight of the branch segments' tokens: a branch must find its student by name alone, "
        "where the full answer can also go by the order of the lines",
    )
    p.add_argument("--tokenizer_rows", type=int, default=2000, help="rows the BPE is trained on")
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log_every", type=int, default=25)
    p.add_argument("--tiny", action="store_true", help="smoke mode: a 2-layer width-48 model, a 512-token vocab")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "tokenizer_rows", "threads", "log_every", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.branch_weight <= 0:
        p.error(f"--branch_weight must be > 0, got {args.branch_weight}")
    if not 0.0 <= args.frac_10 <= 1.0:
        p.error(f"--frac_10 must be in [0, 1], got {args.frac_10}")
    if args.data_seed == EVAL_SEED:
        p.error(f"--data_seed {EVAL_SEED} is the held-out evaluation seed; pick another")
    if args.tiny:
        args.vocab_size = min(args.vocab_size, 512)
        args.tokenizer_rows = min(args.tokenizer_rows, 100)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.time()

    num_rows = args.steps * args.batch_size
    num_10 = round(num_rows * args.frac_10)
    rows = make_rows(num_rows - num_10 + args.batch_size, num_10 + args.batch_size, args.data_seed)
    tokenizer = train_tokenizer(rows[: args.tokenizer_rows], args.vocab_size)
    check_tokenizer(tokenizer)
    batches = make_batches(tokenizer, rows, args.batch_size)[: args.steps]
    tokens = sum(len(e.input_ids) for b in batches for e in b)
    print(
        f"{len(rows)} rows, vocab {len(tokenizer)}, {len(batches)} batches, {tokens} tokens; "
        f"data ready in {time.time() - t0:.1f}s",
        flush=True,
    )

    model = make_model(tokenizer, TINY_SIZE if args.tiny else ModelSize())
    print(f"Qwen2ForCausalLM with {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    t1 = time.time()
    log = train(model, batches, tokenizer.convert_tokens_to_ids(ENDOFTEXT), args)
    elapsed = time.time() - t1
    print(f"trained {len(batches)} steps in {elapsed:.1f}s; final loss {log[-1]['loss']:.4f}", flush=True)
    save(model, tokenizer, log, args, args.output_dir, elapsed)
    print(f"saved to {args.output_dir} (total {time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
