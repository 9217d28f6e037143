"""Sequential decoding: the answer so far, the logits processors, and the one-token-at-a-time loop that normal
decoding, the skeleton (stage 1) and the continuation after a merge (stage 3) all share."""

from __future__ import annotations

import torch


class Sequence:
    """The prompt and the answer tokens so far, in a CPU buffer the logits processor reads without a device sync."""

    def __init__(self, prompt_ids: list[int], capacity: int):
        self.prompt_len = len(prompt_ids)
        self.buffer = torch.zeros((1, capacity), dtype=torch.long)
        self.buffer[0, : self.prompt_len] = torch.tensor(prompt_ids)
        self.length = self.prompt_len

    def _reserve(self, needed: int) -> None:
        if needed > self.buffer.shape[1]:  # merged branches can outgrow the sequential budget
            grown = torch.zeros((1, max(needed, 2 * self.buffer.shape[1])), dtype=torch.long)
            grown[:, : self.length] = self.buffer[:, : self.length]
            self.buffer = grown

    def append(self, token: int) -> None:
        self._reserve(self.length + 1)
        self.buffer[0, self.length] = token
        self.length += 1

    def truncate(self, answer_len: int) -> None:
        self.length = self.prompt_len + answer_len

    def extend(self, tokens: list[int]) -> None:
        self._reserve(self.length + len(tokens))
        self.buffer[0, self.length : self.length + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        self.length += len(tokens)

    @property
    def ids(self) -> torch.Tensor:
        return self.buffer[:, : self.length]  # (1, L)

    @property
    def answer(self) -> list[int]:
        return self.buffer[0, self.prompt_len : self.length].tolist()


def processor_chain(processors):
    """Logits processors applied in order, or None when there are none.

    What ``LogitsProcessorList`` does for processors called with ``(input_ids, scores)`` alone, without inspecting
    each processor's signature at every step, which took 2.6 % of a parallel row's time on the embedded model.
    """
    processors = list(processors or [])
    if not processors:
        return None

    def apply(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in processors:
            scores = processor(input_ids, scores)
        return scores

    return apply


def decode_sequential(
    decoder, seq: Sequence, logits, budget: int, config, stop_ids, processor=None, block_end=None, skeleton=None
):
    """Decode one token at a time from ``logits`` (next-token logits after the cache) for at most ``budget`` tokens.

    Returns why it stopped: ``"eos"``, ``"block_end"`` (``%%%%`` after ``####``, only with ``block_end`` given) or
    ``"budget"``. The stopping token is appended to ``seq`` except for EOS; the cache holds every appended token but
    the last one, whose logits were never needed.

    Jump-forward: with ``skeleton`` (the :class:`SkeletonLogitsProcessor` in ``processor``) the tokens the skeleton
    forces after a title's colon are appended without sampling and go through the model in the colon's pass, one
    pass for ``:`` ``......`` ``\n`` ``####`` instead of four. Greedy decoding gives the same tokens either way.
    """
    # Greedy with no processor to apply: the decoder takes the argmax inside its step (compiled on the fast path).
    argmax_in_step = processor is None and not config.sampler.do_sample
    next_token = None  # (1,) on the device: the step's argmax when the decoder took it
    written = 0
    while written < budget:
        if next_token is None:
            scores = processor(seq.ids, logits) if processor is not None else logits
            next_token = config.sampler(scores)
        token = int(next_token)  # the one host sync of the step
        if token in stop_ids:
            return "eos"
        previous = int(seq.buffer[0, seq.length - 1])
        seq.append(token)
        written += 1
        if block_end is not None and block_end(previous, token):
            return "block_end"
        pending = [token]
        if skeleton is not None:
            forced = skeleton.forced_tokens(seq.ids)[: budget - written]
            seq.extend(forced)
            written += len(forced)
            pending += forced
        if written < budget:  # the logits after the last appended token, (1, V), or their argmax, (1,)
            if argmax_in_step:
                next_token = decoder.forward(pending, greedy=True)
            else:
                logits, next_token = decoder.forward(pending), None
    return "budget"
