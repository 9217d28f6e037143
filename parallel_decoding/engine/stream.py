"""Streaming an answer in the order the final answer reads, while its branches are still decoding.

The engine tells an :class:`AnswerStream` which tokens of the final answer are settled, and the stream hands the
new ones to its callback, so the tokens it ever sends, joined, are the final answer:

- sequential text is settled as it is decoded, up to the first ``####`` of a block that may still open (a
  skeleton's titles are replaced by the branches; an unclosed block is rewound to that ``####``);
- in a branch block, the first branch is settled live, token by token, and each later branch as soon as every
  branch before it has finished (then it goes on live), in title order, as the merge will lay them out;
- after the merge, the closing marker and the continuation are sequential text again; at the end, the rest.
"""

from __future__ import annotations

from collections.abc import Callable

from .sequential import Sequence


class AnswerStream:
    """Settled answer tokens, handed to ``on_tokens(new_token_ids)`` once each, in the final answer's order."""

    def __init__(self, on_tokens: Callable[[list[int]], None]):
        self.on_tokens = on_tokens
        self.sent = 0  # answer tokens handed over so far
        self._scanned = 0  # answer tokens looked at for a block marker
        self._hold: int | None = None  # answer index of a '####' that may open a block: nothing from it is settled

    def settle(self, seq: Sequence, settled: int, tail: list[int] | None = None) -> None:
        """The answer's first ``settled`` tokens (in ``seq``) and then ``tail`` are final; send what is new."""
        start = seq.prompt_len
        new = seq.buffer[0, start + self.sent : start + settled].tolist() if self.sent < settled else []
        new += (tail or [])[max(0, self.sent - settled) :]
        if new:
            self.sent += len(new)
            self.on_tokens(new)

    def sequential(self, seq: Sequence, search_from: int | None, is_branch: Callable[[int], bool]) -> None:
        """After a sequential step: settle up to the first branch marker at or after answer index ``search_from``
        (None: no block can open, everything is settled)."""
        written = seq.length - seq.prompt_len
        if search_from is None:
            self._hold = None
        else:
            if self._hold is not None and self._hold >= written:  # the answer was cut back before the marker
                self._hold = None
            begin = max(self._scanned if self._hold is None else written, search_from)
            for index in range(begin, written):
                if is_branch(int(seq.buffer[0, seq.prompt_len + index])):
                    self._hold = index
                    break
        self._scanned = written
        self.settle(seq, written if self._hold is None else self._hold)

    def branches(
        self, seq: Sequence, block_start: int, prefixes: list[list[int]], outputs: list[list[int]], finished: list[bool]
    ) -> None:
        """After a branch step: the text before the block, then the branches in title order, each once every
        branch before it has finished."""
        tail: list[int] = []
        for prefix, tokens, done in zip(prefixes, outputs, finished):
            tail += prefix + tokens
            if not done:
                break
        self.settle(seq, block_start, tail)

    def merged(self, block_search_from: int) -> None:
        """After a merge: the next block can only start after the merged one."""
        self._hold = None
        self._scanned = block_search_from

    def finish(self, seq: Sequence) -> None:
        self.settle(seq, seq.length - seq.prompt_len)
