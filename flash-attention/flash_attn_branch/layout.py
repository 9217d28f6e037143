"""Branch ids (`q_branch` / `k_branch`) for the two sequence layouts used with this kernel.

A branch id of -1 marks a shared token (the prompt and anything every branch may read); ids 0..n-1 name branches.
"""

from collections.abc import Sequence

import torch


def branch_ids_from_reference_layout(
    total_len: int, para_begin_position: int, num_para: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Reference layout: a shared prefix of `para_begin_position` tokens, then the branches interleaved one token
    each, so token t >= para_begin_position belongs to branch (t - para_begin_position) % num_para.

    Returns int32 (total_len,).  Queries of the last decode step are the final `num_para` positions of it.
    """
    if num_para < 1:
        raise ValueError(f"branch_ids_from_reference_layout: num_para must be >= 1, got {num_para}")
    if not 0 <= para_begin_position <= total_len:
        raise ValueError(
            f"branch_ids_from_reference_layout: para_begin_position must be in [0, {total_len}], "
            f"got {para_begin_position}"
        )
    positions = torch.arange(total_len, dtype=torch.int32, device=device)
    branch = (positions - para_begin_position) % num_para
    return torch.where(positions < para_begin_position, torch.full_like(positions, -1), branch)


def branch_ids_for_engine_layout(
    prefix_len: int,
    title_lengths: Sequence[int],
    active_branches_per_step: Sequence[Sequence[int]] = (),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The engine's layout: shared prefix (-1), then the tree-prefill block (branch 0's title tokens, branch 1's,
    ...), then one token per active branch for every decode step, in branch order (finished branches drop out).

    `title_lengths[b]` is the number of tokens of branch b in the tree-prefill block; `active_branches_per_step[s]`
    lists the branches that produced a token at decode step s.  Returns int32 (total_len,).  The engine itself
    appends to its own k_branch vector step by step; this builds the same vector in one go (tests, debugging).
    """
    if prefix_len < 0 or any(n < 0 for n in title_lengths):
        raise ValueError("branch_ids_for_engine_layout: lengths must be non-negative")
    num_branches = len(title_lengths)
    ids = [-1] * prefix_len
    for branch, length in enumerate(title_lengths):
        ids += [branch] * length
    for step, active in enumerate(active_branches_per_step):
        if list(active) != sorted(set(active)) or any(not 0 <= b < num_branches for b in active):
            raise ValueError(
                f"branch_ids_for_engine_layout: step {step} must list distinct branch ids in increasing "
                f"order within [0, {num_branches}), got {list(active)}"
            )
        ids += list(active)
    return torch.tensor(ids, dtype=torch.int32, device=device)
