"""Stage 2: decode every branch together in one sequence.

The KV cache holds the shared prefix (length P). All branch prefixes (their ``####Title:`` tokens) are prefilled in
one forward pass, then each forward pass appends one token per active branch. A branch may attend to the prefix and
to its own earlier tokens only, and its positions continue from the prefix as if it were alone: branch ``b``'s
``t``-th token (forced title tokens included) sits at position ``P + t``. Under that mask and those positions every
branch's logits are those of the branch decoded alone, which the tests check token for token.

Key bookkeeping: ``key_branch[k]`` is the branch id of cache slot ``k`` (-1 for the shared prefix). The buffer is
allocated once on the model's device and written by index; the mask of a step is one vectorized comparison of the
queries' branch ids against it, built once and shared by all layers.

The transformers plumbing (cache kwarg name, cache cropping, positions) lives in ``model_io``; this module only
knows about branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_io import Sampler, crop_cache, decode_step, forward, greedy, new_cache, prefill, uses_branch_kernel

SHARED = -1  # branch id of the shared prefix


def branch_mask(key_branch: torch.Tensor, query_branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask for queries that are the last ``T`` of ``K`` keys.

    key_branch: (K,) branch id per key, -1 = shared prefix. query_branch: (T,) branch id per query.
    Query ``i`` (absolute index ``K - T + i``) sees key ``j`` iff ``j <= K - T + i`` and key ``j`` is shared or of
    the query's own branch. Returns (1, 1, T, K) with 0 where visible and the dtype's minimum elsewhere.
    """
    num_keys, num_queries = key_branch.shape[0], query_branch.shape[0]
    key_index = torch.arange(num_keys, device=key_branch.device)  # (K,)
    query_index = key_index[num_keys - num_queries :]  # (T,)
    same_branch = (key_branch[None, :] == SHARED) | (key_branch[None, :] == query_branch[:, None])  # (T, K)
    causal = key_index[None, :] <= query_index[:, None]  # (T, K)
    visible = same_branch & causal
    mask = torch.zeros(visible.shape, dtype=dtype, device=key_branch.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, T, K)


class BranchLayout:
    """Branch ids of every cache slot from the prefix on, in a buffer allocated once.

    ``attention_inputs(query_branch)`` registers the step's queries and returns what the model needs to see the
    tree: a 4D additive mask for eager/sdpa, or the branch ids as keyword arguments for the project's kernel.
    """

    def __init__(self, model, prefix_len: int, capacity: int):
        self.device = model.device
        self.dtype = model.dtype
        self.use_kernel = uses_branch_kernel(model)
        self.key_branch = torch.full((capacity,), SHARED, dtype=torch.int32, device=self.device)
        self.length = prefix_len

    def attention_inputs(self, query_branch: torch.Tensor) -> dict:
        start, self.length = self.length, self.length + query_branch.shape[0]
        self.key_branch[start : self.length] = query_branch
        keys = self.key_branch[: self.length]  # (K,)
        if self.use_kernel:
            return {"q_branch": query_branch, "k_branch": keys}
        return {"attention_mask": branch_mask(keys, query_branch, self.dtype)}


@dataclass
class BranchResult:
    tokens: list[int]
    stop: str  # "stop_token" (EOS or a new '####'), "cap" (its max_new_tokens), "budget" (max_total_tokens)


def decode_branches_cached(
    model,
    cache,
    prefix_len: int,
    branch_prefixes: list[list[int]],
    max_new_tokens: int,
    stop_token_ids=(),
    sampler: Sampler | None = None,
    max_total_tokens: int | None = None,
) -> list[BranchResult]:
    """Decode all branches on a cache that holds the shared prefix in its first ``prefix_len`` slots.

    The cache is cropped to the prefix first. Takes one tree-prefill pass plus one pass per generated step; a
    branch leaves the active set at a stop token (which is not kept) or at ``max_new_tokens``.

    ``max_total_tokens`` bounds the tokens of all branches together: the stage stops before a step whose active
    branches outnumber the tokens left (no branch is favoured by writing while others wait), and the branches
    still active then end with ``stop="budget"``.
    """
    if not branch_prefixes or any(len(p) == 0 for p in branch_prefixes):
        raise ValueError("every branch needs a non-empty forced start (its title tokens)")
    if max_new_tokens < 1 or (max_total_tokens is not None and max_total_tokens < len(branch_prefixes)):
        raise ValueError(
            f"max_new_tokens must be >= 1 and max_total_tokens >= the number of branches ({len(branch_prefixes)}), "
            f"got {max_new_tokens} and {max_total_tokens}"
        )
    total_left = num_tokens_bound = len(branch_prefixes) * max_new_tokens
    if max_total_tokens is not None:
        total_left = num_tokens_bound = min(num_tokens_bound, max_total_tokens)
    sampler = sampler or greedy
    stop = frozenset(stop_token_ids)
    device = model.device
    crop_cache(cache, prefix_len)

    num_branches = len(branch_prefixes)
    prefix_lens = [len(p) for p in branch_prefixes]
    layout = BranchLayout(model, prefix_len, prefix_len + sum(prefix_lens) + num_tokens_bound)

    # Tree prefill: every branch's forced start in one pass; logits only at each branch's last forced token.
    flat_ids = [t for p in branch_prefixes for t in p]
    flat_branch = [b for b, n in enumerate(prefix_lens) for _ in range(n)]
    flat_pos = [prefix_len + j for n in prefix_lens for j in range(n)]
    last_index = torch.tensor([sum(prefix_lens[: b + 1]) - 1 for b in range(num_branches)], device=device)
    query_branch = torch.tensor(flat_branch, dtype=torch.int32, device=device)
    logits = forward(
        model,
        cache,
        torch.tensor([flat_ids], device=device),  # (1, sum of prefix lens)
        torch.tensor([flat_pos], device=device),
        logits_to_keep=last_index,
        **layout.attention_inputs(query_branch),
    )  # (N, V)

    outputs: list[list[int]] = [[] for _ in range(num_branches)]
    stops = ["cap"] * num_branches
    active = list(range(num_branches))
    positions = None
    while active:
        tokens = sampler(logits)  # (A,)
        token_list = tokens.tolist()  # the one host sync of the step
        still_active = []
        for b, t in zip(active, token_list):
            if t in stop:
                stops[b] = "stop_token"
                continue
            outputs[b].append(t)
            total_left -= 1
            if len(outputs[b]) < max_new_tokens:
                still_active.append(b)
        if len(still_active) > total_left:  # the next step would overflow the budget of all branches together
            for b in still_active:
                stops[b] = "budget"
            break
        if not still_active:
            break
        if still_active != active:  # some branch finished: drop its row from the step's inputs
            keep = torch.tensor([i for i, b in enumerate(active) if b in set(still_active)], device=device)
            tokens = tokens.index_select(0, keep)
        if still_active != active or positions is None:
            query_branch = torch.tensor(still_active, dtype=torch.int32, device=device)
            positions = torch.tensor(
                [[prefix_len + prefix_lens[b] + len(outputs[b]) - 1 for b in still_active]], device=device
            )  # (1, A)
        else:  # same branches as last step: each moves one position on
            positions = positions + 1
        active = still_active
        logits = forward(model, cache, tokens[None, :], positions, logits_to_keep=0, **layout.attention_inputs(query_branch))
    return [BranchResult(tokens=o, stop=s) for o, s in zip(outputs, stops)]


def _id_set(token_ids: int | list[int] | set[int] | None) -> set[int]:
    if token_ids is None:
        return set()
    return {token_ids} if isinstance(token_ids, int) else set(token_ids)


def decode_branches(
    model,
    prefix_ids: torch.Tensor,
    branch_prefixes: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    stop_token_ids=(),
    sampler: Sampler | None = None,
) -> list[list[int]]:
    """Greedy (or ``sampler``) decoding of several branches that share ``prefix_ids`` ((1, P) LongTensor).

    Returns, per branch, the tokens generated after its forced start ``branch_prefixes[b]``, stopping at
    ``eos_token_id`` / ``stop_token_ids`` (not included) or after ``max_new_tokens``. Takes about
    ``max_new_tokens + 1`` forward passes whatever the number of branches.
    """
    cache = _prefilled_cache(model, prefix_ids)
    stops = _id_set(eos_token_id) | set(stop_token_ids)
    results = decode_branches_cached(model, cache, prefix_ids.shape[1], branch_prefixes, max_new_tokens, stops, sampler)
    return [r.tokens for r in results]


def decode_branches_one_by_one(
    model, cache, prefix_len: int, branch_prefixes: list[list[int]], max_new_tokens: int, stop_token_ids=()
) -> list[list[int]]:
    """Plain reference for :func:`decode_branches_cached`: each branch alone after the cached prefix, greedy.

    Per branch: crop the cache to the prefix, prefill the branch's forced start, then one ``decode_step`` per token,
    exactly as normal decoding writes one branch after another.
    """
    stops = set(stop_token_ids)
    outputs = []
    for branch_prefix in branch_prefixes:
        crop_cache(cache, prefix_len)
        logits = prefill(model, cache, list(branch_prefix))  # (1, V)
        tokens: list[int] = []
        while len(tokens) < max_new_tokens:
            token = greedy(logits)  # (1,)
            if int(token) in stops:  # one host sync per step, as in normal decoding
                break
            tokens.append(int(token))
            if len(tokens) < max_new_tokens:
                logits = decode_step(model, cache, token)
        outputs.append(tokens)
    return outputs


def decode_branches_reference(
    model,
    prefix_ids: torch.Tensor,
    branch_prefixes: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
) -> list[list[int]]:
    """Plain reference for :func:`decode_branches`: each branch decoded alone, greedy, one after another."""
    cache = _prefilled_cache(model, prefix_ids)
    return decode_branches_one_by_one(model, cache, prefix_ids.shape[1], branch_prefixes, max_new_tokens, _id_set(eos_token_id))


def _prefilled_cache(model, prefix_ids: torch.Tensor):
    if prefix_ids.dim() != 2 or prefix_ids.shape[0] != 1 or prefix_ids.shape[1] == 0:
        raise ValueError(f"prefix_ids must be a non-empty (1, P) tensor, got shape {tuple(prefix_ids.shape)}")
    cache = new_cache(model)
    prefill(model, cache, prefix_ids[0].tolist())
    return cache
