"""Test oracles: each branch decoded alone after the shared prefix, one after another, greedy.

Plain loops over the eager reference decoder, deliberately apart from the engine: the tree-masked branch stage
(``decode_branches``) must give exactly these tokens.
"""

from __future__ import annotations

import torch

from parallel_decoding.decoding.eager import EagerDecoder


def decode_branches_one_by_one(
    decoder, prefix_len: int, branch_prefixes: list[list[int]], max_new_tokens: int, stop_token_ids=()
) -> list[list[int]]:
    """Plain reference for ``engine.branches.decode_branches_cached``: each branch alone after the cached prefix,
    greedy.

    Per branch: crop the cache to the prefix, prefill the branch's forced start, then one pass per token, exactly
    as normal decoding writes one branch after another.
    """
    stops = set(stop_token_ids)
    outputs = []
    for branch_prefix in branch_prefixes:
        decoder.crop(prefix_len)
        next_token = decoder.forward(list(branch_prefix), greedy=True)  # (1,)
        tokens: list[int] = []
        while len(tokens) < max_new_tokens:
            token = int(next_token)  # one host sync per step, as in normal decoding
            if token in stops:
                break
            tokens.append(token)
            if len(tokens) < max_new_tokens:
                next_token = decoder.forward([token], greedy=True)
        outputs.append(tokens)
    return outputs


def decode_branches_reference(
    model,
    prefix_ids: torch.Tensor,
    branch_prefixes: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
) -> list[list[int]]:
    """Plain reference for ``parallel_decoding.decode_branches``: each branch decoded alone, greedy, one after
    another."""
    decoder = EagerDecoder(model)
    decoder.forward(prefix_ids[0].tolist())
    stops = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    return decode_branches_one_by_one(decoder, prefix_ids.shape[1], branch_prefixes, max_new_tokens, stops)
