"""Stage 1: the skeleton processor and the skeleton parser.

The format prompt asks the model to write each independent step as ``####Title:`` and to close the block with
``####%%%%``. While the skeleton is generated, :class:`SkeletonLogitsProcessor` lets the model write only the titles:
once a title's colon is written it forces the ellipsis, a newline and the next ``####``, so the model chooses between
another title and ``%%%%``. :func:`parse_skeleton` turns the generated tokens back into branch prefixes.

Everything works on token ids looked up from the tokenizer; no id is hard-coded, so the same code serves the real
Qwen2 vocabulary (where ``:\\n`` and ``：`` are single tokens) and the project's tiny tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

BRANCH_MARKER = "####"
BLOCK_END_MARKER = "%%%%"
ELLIPSIS = "......"
COLONS = (":", "：")

# The rules of SkeletonLogitsProcessor, by the state they apply in (SkeletonState.rule).
FORCE = "force"  # after a title's colon: the next token of '......', newline, '####' is the only one allowed
NO_MARKER = "no_marker"  # the first generated token: no '####' or '%%%%'
NO_HASH = "no_hash"  # right after a '####': no token starting with '#'


def _token_texts(tokenizer) -> list[str]:
    """Decoded text of every token id (byte-level pieces decode to '\\ufffd' and never match a marker)."""
    size = len(tokenizer)
    single = [[i] for i in range(size)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer decodes the whole vocabulary in one batched call
        return backend.decode_batch(single, skip_special_tokens=False)
    return tokenizer.batch_decode(single, skip_special_tokens=False)


def _encode_exact(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids or tokenizer.decode(ids) != text:
        raise ValueError(f"the tokenizer cannot encode the marker {text!r} losslessly")
    return ids


@dataclass(frozen=True)
class MarkerVocab:
    """Token ids of the branch-format markers in one tokenizer.

    ``branch_ids``: every token whose text contains ``####`` (``####``, `` ####``, ``####\\n``, longer runs).
    ``block_end_ids``: every token whose text contains ``%%%%``.
    ``hash_start_ids``: tokens starting with ``#``; forbidden right after a marker so ``####`` is never doubled.
    ``colon_ids``: tokens that end a title: their text, right-stripped, ends with ``:`` or ``：``
    (``:``, ``:\\n``, ``]:``).
    ``forced_after_colon``: the ellipsis, a newline and the next ``####``, as token ids.
    """

    branch_ids: frozenset[int]
    block_end_ids: frozenset[int]
    hash_start_ids: frozenset[int]
    colon_ids: frozenset[int]
    marker_id_list: tuple[int, ...]
    forced_after_colon: tuple[int, ...]
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> MarkerVocab:
        texts = _token_texts(tokenizer)
        branch = frozenset(i for i, t in enumerate(texts) if BRANCH_MARKER in t)
        block_end = frozenset(i for i, t in enumerate(texts) if BLOCK_END_MARKER in t)
        hash_start = frozenset(i for i, t in enumerate(texts) if t.lstrip(" ").startswith("#"))
        colon = frozenset(i for i, t in enumerate(texts) if t.rstrip().endswith(COLONS) and i not in branch)
        forced = (
            _encode_exact(tokenizer, ELLIPSIS)
            + _encode_exact(tokenizer, "\n")
            + _encode_exact(tokenizer, BRANCH_MARKER)
        )
        if not branch or not block_end:
            raise ValueError("the tokenizer has no token containing '####' or '%%%%'")
        return cls(
            branch_ids=branch,
            block_end_ids=block_end,
            hash_start_ids=hash_start,
            colon_ids=colon,
            marker_id_list=tuple(sorted(branch | block_end)),
            forced_after_colon=tuple(forced),
            vocab_size=len(texts),
        )

    def is_branch(self, token_id: int) -> bool:
        return token_id in self.branch_ids and token_id not in self.block_end_ids

    def is_block_end(self, previous_id: int | None, token_id: int) -> bool:
        """``%%%%`` written right after ``####`` closes the block."""
        return token_id in self.block_end_ids and previous_id is not None and previous_id in self.branch_ids


class SkeletonState:
    """Incremental state of the skeleton grammar over a growing token list.

    Tracks where the last ``####`` is and how many forced tokens followed its title's colon. ``update`` consumes
    only the tokens appended since the last call, so a step costs O(1) whatever the answer's length.
    """

    def __init__(self, markers: MarkerVocab, start: int):
        self.markers = markers
        self.start = start  # index of the first generated token in the token list
        self.reset()

    def reset(self) -> None:
        self.seen = self.start
        self.last_token: int | None = None
        self.in_title = False  # after a '####', before its colon
        self.forced_done: int | None = None  # forced tokens written after the colon, None if no colon yet

    def update(self, tokens: list[int] | torch.Tensor) -> None:
        n = len(tokens)
        if n < self.seen:  # the sequence was cut back (new block, fallback): read it again from the start
            self.reset()
        for i in range(self.seen, n):
            self._push(int(tokens[i]))
        self.seen = n

    def _push(self, token: int) -> None:
        m = self.markers
        if self.forced_done is not None:
            self.forced_done += 1
            if self.forced_done >= len(m.forced_after_colon):  # the forced '####' opened the next title
                self.forced_done = None
                self.in_title = True
        elif m.is_branch(token):
            self.in_title = True
        elif self.in_title and token in m.block_end_ids:
            self.in_title = False
        elif self.in_title and token in m.colon_ids:
            self.in_title = False
            self.forced_done = 0
        self.last_token = token

    def forced_token(self) -> int | None:
        if self.forced_done is None:
            return None
        return self.markers.forced_after_colon[self.forced_done]

    def forced_tokens(self) -> tuple[int, ...]:
        """Every token still forced from here on (the rest of ``......``, newline, ``####``), without a model call."""
        if self.forced_done is None:
            return ()
        return self.markers.forced_after_colon[self.forced_done :]

    def at_start(self) -> bool:
        return self.seen == self.start

    def banned_ids(self) -> frozenset[int]:
        """The ids the skeleton processor forbids as the next token here (its NO_MARKER and NO_HASH masks); empty
        where it forbids none or forces one."""
        rule = self.rule()
        if rule == NO_MARKER:
            return self.markers.branch_ids | self.markers.block_end_ids
        if rule == NO_HASH:
            return self.markers.hash_start_ids
        return frozenset()

    def rule(self) -> str | None:
        """The rule the processor applies to the next token's scores here, or None when it leaves them alone."""
        if self.forced_done is not None:
            return FORCE
        if self.at_start():
            return NO_MARKER
        if self.last_token is not None and self.last_token in self.markers.branch_ids:
            return NO_HASH
        return None


class SkeletonLogitsProcessor(LogitsProcessor):
    """Lets the model write only branch titles inside a ``####`` block.

    Rules, applied to the scores of the next token:
    - no marker (``####`` or ``%%%%``) as the first generated token: a block needs a lead-in sentence, the shared
      prefix every branch sees;
    - no ``#`` token right after ``####`` (no ``########``);
    - after the colon that ends a title (``:``, ``:\\n``, ``：``): force ``......``, a newline and ``####``.

    ``prompt_length`` is the number of prompt tokens at the start of ``input_ids``. Works with
    ``model.generate(logits_processor=[...])`` (batch size 1) and with the engine's own loop, which hands it a CPU
    tensor so reading the history never syncs the device.
    """

    def __init__(self, tokenizer=None, prompt_length: int = 0, markers: MarkerVocab | None = None):
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        if markers is None:
            if tokenizer is None:
                raise ValueError("SkeletonLogitsProcessor needs a tokenizer or a MarkerVocab")
            markers = MarkerVocab.from_tokenizer(tokenizer)
        self.markers = markers
        self.state = SkeletonState(markers, prompt_length)
        self._marker_index = torch.tensor(markers.marker_id_list, dtype=torch.long)  # (M,) '####' and '%%%%' ids
        self._hash_index = torch.tensor(sorted(markers.hash_start_ids), dtype=torch.long)  # (H,) ids starting '#'
        self._on_device: dict = {}  # (index, device, vocab size) -> the index on that device, within the vocab

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        """The scores (1, V) of the next token after ``input_ids`` (1, L), masked by the rule that applies there."""
        rule = self._rule(input_ids)
        if rule == FORCE:
            out = torch.full_like(scores, float("-inf"))  # (1, V)
            out[:, self.state.forced_token()] = 0.0
            return out
        if rule == NO_MARKER:
            return self._forbid(scores, self._marker_index)
        if rule == NO_HASH:
            return self._forbid(scores, self._hash_index)
        return scores

    def leaves_scores_unchanged(self, input_ids: torch.LongTensor) -> bool:
        """True exactly when ``self(input_ids, scores)`` would return ``scores`` itself, for any scores.

        Reads only the host-side grammar state (``input_ids`` is the engine's CPU buffer), so asking costs no device
        sync: the engine takes the decoder's in-step greedy argmax on such a step instead of asking for logits.
        """
        return self._rule(input_ids) is None

    def _rule(self, input_ids: torch.LongTensor) -> str | None:
        """Which rule applies to the next token after ``input_ids`` (1, L): FORCE, NO_MARKER, NO_HASH or None."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"SkeletonLogitsProcessor supports batch size 1, got {input_ids.shape[0]}")
        self.state.update(input_ids[0])
        return self.state.rule()

    def forced_tokens(self, input_ids: torch.LongTensor) -> list[int]:
        """The tokens this processor would force next, one after another, after ``input_ids`` (1, L).

        The engine appends them in one forward pass (jump-forward) instead of sampling each from forced scores.
        """
        self.state.update(input_ids[0])
        return list(self.state.forced_tokens())

    def _forbid(self, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        key = (id(index), scores.device, scores.shape[-1])
        if key not in self._on_device:  # copied to the device once, not at every step
            self._on_device[key] = index[index < scores.shape[-1]].to(scores.device)  # (M',) ids within the vocab
        return scores.index_fill(-1, self._on_device[key], float("-inf"))


@dataclass
class SkeletonBlock:
    """One parsed ``####`` block of generated tokens (indices relative to the list given to :func:`parse_skeleton`)."""

    start: int  # index of the block's first '####' token: everything before it is the shared prefix
    end: int  # index just past the closing '%%%%' token
    titles: list[str]
    branch_prefixes: list[list[int]]  # per title: '####' + title tokens + the colon token
    closing: list[int]  # the '####' '%%%%' tokens that close the block


def parse_skeleton(tokens: list[int], markers: MarkerVocab, tokenizer=None) -> SkeletonBlock | None:
    """Parse the first closed block in ``tokens`` (generated with :class:`SkeletonLogitsProcessor` active).

    Returns None when no block is closed. A title that never reached its colon (the model wrote ``####`` then
    ``%%%%``) is the closing marker, not a branch. Without ``tokenizer`` the titles are left empty (the engine
    parses inside its timed loop and turns prefixes into text with :func:`branch_title` afterwards).
    """
    start = None  # index of the block's first '####'
    titles: list[str] = []
    prefixes: list[list[int]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if markers.is_branch(token):
            if start is None:
                start = i
            if i + 1 < len(tokens) and tokens[i + 1] in markers.block_end_ids:
                return SkeletonBlock(start, i + 2, titles, prefixes, [token, tokens[i + 1]])
            colon = i + 1  # the title runs up to its colon, unless a new '####' comes first
            while colon < len(tokens) and not (tokens[colon] in markers.colon_ids or markers.is_branch(tokens[colon])):
                colon += 1
            if colon < len(tokens) and tokens[colon] in markers.colon_ids:
                prefix = tokens[i : colon + 1]
                prefixes.append(prefix)
                if tokenizer is not None:
                    titles.append(branch_title(prefix, tokenizer))
                i = colon + 1
                continue
        i += 1
    return None


def first_branch_marker(tokens: list[int], start: int, markers: MarkerVocab) -> int | None:
    """The index of the first ``####`` in ``tokens`` at or after ``start`` (where an unclosed block opened), or None."""
    for i in range(start, len(tokens)):
        if markers.is_branch(tokens[i]):
            return i
    return None


def branch_title(prefix: list[int], tokenizer) -> str:
    """The title text of a branch prefix (``####`` + title tokens + colon)."""
    text = tokenizer.decode(prefix).strip()
    if text.startswith(BRANCH_MARKER):
        text = text[len(BRANCH_MARKER) :]
    return text.rstrip().rstrip("".join(COLONS)).strip()
