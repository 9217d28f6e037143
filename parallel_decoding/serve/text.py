"""Incremental detokenization of a streamed answer: the deltas, concatenated, are the answer's text exactly.

The engine hands over the answer's settled tokens in final-answer order (``engine.stream``); text is sent only
once it is a stable prefix of the answer: the common prefix of the text with and without the newest token (so a
token that changes how the one before it reads, e.g. a tokenizer's space clean-up, is held back), less any
trailing U+FFFD (an incomplete UTF-8 character, whose bytes are still coming). At the end, whatever the answer's
text (``result["response"]``) has beyond what was sent.
"""

from __future__ import annotations

import logging
import os

REPLACEMENT = "\ufffd"
log = logging.getLogger("parallel_decoding.serve")


class IncrementalText:
    """The text of a growing token sequence, handed out in stable pieces."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the new stable text ("" if none)."""
        if not token_ids:
            return ""
        self.tokens += list(token_ids)
        text = self._decode(self.tokens)
        before = self._decode(self.tokens[:-1])
        stable = os.path.commonprefix([before, text]).rstrip(REPLACEMENT)
        if len(stable) <= len(self.sent) or not stable.startswith(self.sent):
            return ""
        delta, self.sent = stable[len(self.sent) :], stable
        return delta

    def finish(self, response: str) -> str:
        """The rest of the answer ``response`` after what was sent."""
        if not response.startswith(self.sent):  # cannot happen with a stable prefix; say so rather than hide it
            log.warning("streamed text is not a prefix of the answer; the stream differs from it")
            return ""
        delta, self.sent = response[len(self.sent) :], response
        return delta
