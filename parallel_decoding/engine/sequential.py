"""Sequential decoding: the answer so far, the logits processors, and the one-token-at-a-time loop that normal
decoding, the skeleton (stage 1) and the continuation after a merge (stage 3) all share."""

from __future__ import annotations

import torch


class Sequence:
    """The prompt and the answer tokens so far.

    ``buffer`` is a CPU tensor, so the skeleton processor and the loop read the history without a device sync.
    User logits processors index the scores with the ids, so they get :meth:`ids_on` the scores' device instead: a
    mirror there, made on first use and kept up to date without a sync (a sampled token is copied into it from the
    step's token tensor, device to device; tokens written from the host, such as forced or merged ones, go over in
    one non-blocking copy when the mirror is next read).
    """

    def __init__(self, prompt_ids: list[int], capacity: int):
        self.prompt_len = len(prompt_ids)
        self.buffer = torch.zeros((1, capacity), dtype=torch.long)  # (1, C)
        self.buffer[0, : self.prompt_len] = torch.tensor(prompt_ids)
        self.length = self.prompt_len
        self.mirror: torch.Tensor | None = None  # (1, C) on the user processors' device, once they ran
        self.mirrored = 0  # the first tokens of the buffer that the mirror holds

    def _reserve(self, needed: int) -> None:
        if needed > self.buffer.shape[1]:  # merged branches can outgrow the sequential budget
            capacity = max(needed, 2 * self.buffer.shape[1])
            grown = torch.zeros((1, capacity), dtype=torch.long)  # (1, C')
            grown[:, : self.length] = self.buffer[:, : self.length]
            self.buffer = grown
            if self.mirror is not None:
                mirror = torch.zeros((1, capacity), dtype=torch.long, device=self.mirror.device)  # (1, C')
                mirror[:, : self.mirrored] = self.mirror[:, : self.mirrored]
                self.mirror = mirror

    def append(self, token: int, on_device: torch.Tensor | None = None) -> None:
        """Append ``token``; ``on_device`` (1,) is the same token where the step made it, for the mirror."""
        self._reserve(self.length + 1)
        self.buffer[0, self.length] = token
        if (
            self.mirror is not None
            and self.mirrored == self.length
            and on_device is not None
            and on_device.device == self.mirror.device
        ):
            self.mirror[0, self.length : self.length + 1].copy_(on_device)
            self.mirrored += 1
        self.length += 1

    def truncate(self, answer_len: int) -> None:
        self.length = self.prompt_len + answer_len
        self.mirrored = min(self.mirrored, self.length)

    def extend(self, tokens: list[int]) -> None:
        self._reserve(self.length + len(tokens))
        self.buffer[0, self.length : self.length + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        self.length += len(tokens)

    @property
    def ids(self) -> torch.Tensor:
        return self.buffer[:, : self.length]  # (1, L) on the CPU

    def ids_on(self, device: torch.device) -> torch.Tensor:
        """The ids so far on ``device`` (1, L), from the mirror; no host-device sync."""
        if self.mirror is None or self.mirror.device != device:
            self.mirror = torch.zeros(self.buffer.shape, dtype=torch.long, device=device)  # (1, C)
            self.mirrored = 0
        if self.mirrored < self.length:  # tokens written from the host since the mirror was last read
            new = slice(self.mirrored, self.length)
            self.mirror[:, new].copy_(self.buffer[:, new], non_blocking=True)
            self.mirrored = self.length
        return self.mirror[:, : self.length]  # (1, L)

    @property
    def answer(self) -> list[int]:
        return self.buffer[0, self.prompt_len : self.length].tolist()


class ProcessorChain:
    """Logits processors applied in order: the skeleton processor (if any) first, on the host ids, then the
    user's, on ids on the scores' device (:meth:`Sequence.ids_on`), as transformers' processors expect.

    What ``LogitsProcessorList`` does for processors called with ``(input_ids, scores)`` alone, without inspecting
    each processor's signature at every step: that inspection is per-step Python whose cost grows with the number
    of steps, not with the model, so it weighs most on a small model (docs/bench.md, "End to end: compile on vs
    off", has the measurement).
    """

    def __init__(self, processors=(), skeleton=None):
        self.skeleton = skeleton
        self.processors = list(processors)

    def __call__(self, seq: Sequence, scores: torch.Tensor) -> torch.Tensor:
        if self.skeleton is not None:
            scores = self.skeleton(seq.ids, scores)
        if self.processors:
            input_ids = seq.ids_on(scores.device)  # (1, L)
            for processor in self.processors:
                scores = processor(input_ids, scores)
        return scores

    def constrains(self, seq: Sequence) -> bool:
        """Whether applying the chain after ``seq`` could change the scores; asked on the host, no device sync.

        A user processor always could (nothing says otherwise); the skeleton processor says so itself.
        """
        if self.processors:
            return True
        return self.skeleton is not None and not self.skeleton.leaves_scores_unchanged(seq.ids)


def processor_chain(processors, skeleton=None) -> ProcessorChain | None:
    """``processors`` (user logits processors, may be None) after ``skeleton``, or None when there are none."""
    processors = list(processors or [])
    if not processors and skeleton is None:
        return None
    return ProcessorChain(processors, skeleton)


def forward_next(slots, seq: Sequence, tokens: list[int], config, processor: ProcessorChain | None = None):
    """One pass over ``tokens`` (the last tokens of ``seq``, not yet in the cache); returns ``(logits, next_token)``.

    A generator, like every function of the engine that needs a pass: it yields the pass to the scheduler
    (``slots.forward``, see ``engine.scheduler``) and returns when the pass is done.

    A greedy step whose processors leave the scores alone takes the decoder's in-step argmax, ``(None, (1,))``,
    which on the compiled fast path reads back one token, not a row of float logits; any other step gets the
    logits, ``((1, V), None)``, for the processors and the sampler.
    """
    if not config.sampler.do_sample and (processor is None or not processor.constrains(seq)):
        return None, (yield from slots.forward(tokens, greedy=True))
    return (yield from slots.forward(tokens)), None


def decode_sequential(
    slots,
    seq: Sequence,
    logits,
    budget: int,
    config,
    stop_ids,
    processor=None,
    block_end=None,
    skeleton=None,
    next_token=None,
    on_step=None,
):
    """Decode one token at a time for at most ``budget`` tokens, from the pass that gave the next-token ``logits``
    (1, V) after the cache, or ``next_token`` (1,), its greedy argmax (``logits`` None), as :func:`forward_next`
    returns them.

    A generator (see :func:`forward_next`). Returns why it stopped: ``"eos"``, ``"block_end"`` (``%%%%`` after
    ``####``, only with ``block_end`` given) or
    ``"budget"``. The stopping token is appended to ``seq`` except for EOS; the cache holds every appended token but
    the last one, whose logits were never needed.

    Jump-forward: with ``skeleton`` (the :class:`SkeletonLogitsProcessor` in ``processor``) the tokens the skeleton
    forces after a title's colon are appended without sampling and go through the model in the colon's pass, one
    pass for ``:`` ``......`` ``\\n`` ``####`` instead of four. Greedy decoding gives the same tokens either way.

    ``on_step()`` (optional) is called after each step's tokens are appended (a stream settles them).
    """
    written = 0
    while written < budget:
        if next_token is None:
            scores = processor(seq, logits) if processor is not None else logits  # (1, V)
            next_token = config.sampler(scores)  # (1,) on the device
        token = int(next_token)  # the one host sync of the step
        if token in stop_ids:
            return "eos"
        previous = int(seq.buffer[0, seq.length - 1])
        seq.append(token, on_device=next_token)
        written += 1
        if block_end is not None and block_end(previous, token):
            return "block_end"
        pending = [token]
        if skeleton is not None:
            forced = skeleton.forced_tokens(seq.ids)[: budget - written]
            seq.extend(forced)
            written += len(forced)
            pending += forced
        if on_step is not None:
            on_step()
        if written < budget:
            logits, next_token = yield from forward_next(slots, seq, pending, config, processor)
    return "budget"
