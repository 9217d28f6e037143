"""Stage 2: decode every branch together in one sequence.

The KV cache holds the shared prefix (length P). All branch prefixes (their ``####Title:`` tokens) are prefilled in
one forward pass, then each forward pass appends one token per active branch. A branch may attend to the prefix and
to its own earlier tokens only, and its positions continue from the prefix as if it were alone: branch ``b``'s
``t``-th token (forced title tokens included) sits at position ``P + t``. Under that mask and those positions every
branch's logits are those of the branch decoded alone, which the tests check token for token.

Each pass goes through a decoder (``decoding.eager.EagerDecoder``, the reference, or ``decoding.arena.FastDecoder``,
which the scheduler may share among answers, each in its own region of slots), which keeps
the branch id of every cache slot (-1 for the shared prefix) and turns the queries' branch ids into the tree mask;
this module only knows about branches.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..decoding.interface import Decoder, Keep, PassRequest
from ..decoding.select import decoder_for
from .sampling import Sampler, greedy
from .scheduler import Slots, drive, slots_of


@dataclass
class BranchResult:
    tokens: list[int]
    stop: str  # "stop_token" (EOS or a new '####'), "cap" (its max_new_tokens), "budget" (max_total_tokens)


def decode_branches_cached(
    slots: Slots,
    prefix_len: int,
    branch_prefixes: list[list[int]],
    max_new_tokens: int,
    stop_token_ids: Iterable[int] = (),
    sampler: Sampler | Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_total_tokens: int | None = None,
    on_step: Callable[[list[list[int]], list[bool]], None] | None = None,
) -> Generator[PassRequest, torch.Tensor, list[BranchResult]]:
    """Decode all branches after the shared prefix that the first ``prefix_len`` slots of ``slots`` hold.

    A generator that yields its passes (see ``engine.scheduler``; :func:`decode_branches` runs it on a plain
    decoder).

    The cache is cropped to the prefix first. Takes one tree-prefill pass plus one pass per generated step; a
    branch leaves the active set at a stop token (which is not kept) or at ``max_new_tokens``.

    ``max_total_tokens`` bounds the tokens of all branches together: the stage stops before a step whose active
    branches outnumber the tokens left (no branch is favoured by writing while others wait), and the branches
    still active then end with ``stop="budget"``.

    ``on_step(outputs, finished)`` (optional) is called after each step with every branch's tokens so far and
    whether it has finished (a stream settles them in title order).
    """
    _check_branch_settings(branch_prefixes, max_new_tokens, max_total_tokens)
    total_left = len(branch_prefixes) * max_new_tokens
    if max_total_tokens is not None:
        total_left = min(total_left, max_total_tokens)
    stop_tokens = frozenset(stop_token_ids)
    sampler = sampler or greedy
    slots.crop(prefix_len)

    num_branches = len(branch_prefixes)
    prefix_lens = [len(prefix) for prefix in branch_prefixes]
    # Tree prefill: every branch's forced start in one pass; logits only at each branch's last forced token.
    tokens = yield from _next_tokens(  # (N,): each branch's first generated token
        slots,
        sampler,
        [token for prefix in branch_prefixes for token in prefix],
        positions=[prefix_len + j for length in prefix_lens for j in range(length)],
        branch_ids=[b for b, length in enumerate(prefix_lens) for _ in range(length)],
        keep=[sum(prefix_lens[: b + 1]) - 1 for b in range(num_branches)],
    )

    outputs: list[list[int]] = [[] for _ in range(num_branches)]
    stop_reasons = ["cap"] * num_branches
    active = list(range(num_branches))  # branch indices still decoding, in order
    while active:
        token_list = tokens.tolist()  # (A,): the one host sync of the step
        written, still_active, step_tokens = _take_tokens(
            token_list, active, outputs, stop_reasons, stop_tokens, max_new_tokens
        )
        total_left -= written
        if on_step is not None:
            still = set(still_active)
            on_step(outputs, [b not in still for b in range(num_branches)])
        if len(still_active) > total_left:  # the next step would overflow the budget of all branches together
            for b in still_active:
                stop_reasons[b] = "budget"
            break
        if not still_active:
            break
        active = still_active
        # One token per active branch, each at the position it would have alone: prefix + its own tokens so far.
        positions = [prefix_len + prefix_lens[b] + len(outputs[b]) - 1 for b in active]
        tokens = yield from _next_tokens(
            slots, sampler, step_tokens, positions=positions, branch_ids=active, keep="all"
        )  # (A,)
    return [BranchResult(tokens=branch_tokens, stop=reason) for branch_tokens, reason in zip(outputs, stop_reasons)]


def _check_branch_settings(branch_prefixes: list[list[int]], max_new_tokens: int, max_total_tokens: int | None) -> None:
    if not branch_prefixes or any(len(prefix) == 0 for prefix in branch_prefixes):
        raise ValueError("every branch needs a non-empty forced start (its title tokens)")
    if max_new_tokens < 1 or (max_total_tokens is not None and max_total_tokens < len(branch_prefixes)):
        raise ValueError(
            f"max_new_tokens must be >= 1 and max_total_tokens >= the number of branches ({len(branch_prefixes)}), "
            f"got {max_new_tokens} and {max_total_tokens}"
        )


def _next_tokens(
    slots: Slots,
    sampler: Sampler | Callable[[torch.Tensor], torch.Tensor],
    token_ids: list[int],
    positions: list[int],
    branch_ids: list[int],
    keep: Keep,
) -> Generator[PassRequest, torch.Tensor, torch.Tensor]:
    """A branch pass that returns the next token of every kept row, (N,): greedy takes the decoder's argmax inside
    its step and hands back one token per row; sampling (or a plain callable sampler) draws from the logits."""
    if not getattr(sampler, "do_sample", True):  # a plain callable sampler gets the logits
        return (yield from slots.forward(token_ids, positions, branch_ids, keep, greedy=True))
    return sampler((yield from slots.forward(token_ids, positions, branch_ids, keep)))


def _take_tokens(
    token_list: list[int],
    active: list[int],
    outputs: list[list[int]],
    stop_reasons: list[str],
    stop_tokens: frozenset[int],
    max_new_tokens: int,
) -> tuple[int, list[int], list[int]]:
    """Append each active branch's token to its output; a stop token ends the branch instead (and is not kept), and
    a branch that reached ``max_new_tokens`` ends at its cap. Returns the number of tokens appended, the branches
    that go on and their tokens."""
    written, still_active, step_tokens = 0, list[int](), list[int]()
    for b, token in zip(active, token_list):
        if token in stop_tokens:
            stop_reasons[b] = "stop_token"
            continue
        outputs[b].append(token)
        written += 1
        if len(outputs[b]) < max_new_tokens:
            still_active.append(b)
            step_tokens.append(token)
    return written, still_active, step_tokens


def _id_set(token_ids: int | list[int] | set[int] | None) -> set[int]:
    if token_ids is None:
        return set()
    return {token_ids} if isinstance(token_ids, int) else set(token_ids)


def decode_branches(
    model: PreTrainedModel,
    prefix_ids: torch.Tensor,
    branch_prefixes: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    stop_token_ids: Iterable[int] = (),
    sampler: Sampler | None = None,
    compile: bool = False,
    decoder: Decoder | None = None,
) -> list[list[int]]:
    """Greedy (or ``sampler``) decoding of several branches that share ``prefix_ids`` ((1, P) LongTensor).

    Returns, per branch, the tokens generated after its forced start ``branch_prefixes[b]``, stopping at
    ``eos_token_id`` / ``stop_token_ids`` (not included) or after ``max_new_tokens``. Takes about
    ``max_new_tokens + 1`` forward passes whatever the number of branches. ``compile=True`` runs on a fast
    decoder (KV arena, compiled step) instead of the eager reference: ``decoder`` when the caller holds one.
    """
    decoder = _prefilled_decoder(model, prefix_ids, compile, decoder)
    stop_tokens = _id_set(eos_token_id) | set(stop_token_ids)
    prefix_len = prefix_ids.shape[1]
    steps = decode_branches_cached(slots_of(decoder), prefix_len, branch_prefixes, max_new_tokens, stop_tokens, sampler)
    return [r.tokens for r in drive(steps, decoder)]


def _prefilled_decoder(
    model: PreTrainedModel, prefix_ids: torch.Tensor, compile: bool, decoder: Decoder | None
) -> Decoder:
    if prefix_ids.dim() != 2 or prefix_ids.shape[0] != 1 or prefix_ids.shape[1] == 0:
        raise ValueError(f"prefix_ids must be a non-empty (1, P) tensor, got shape {tuple(prefix_ids.shape)}")
    decoder = decoder_for(model, compile, decoder)
    decoder.forward(prefix_ids[0].tolist())
    return decoder
