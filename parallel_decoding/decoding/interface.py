"""The decoder interface: one forward pass of the model over new tokens, each tagged with its branch.

The engine never touches a cache directly. It asks a decoder to append tokens at given positions, each token
tagged with its branch (``SHARED`` for the sequential text), and gets the logits of the query rows it keeps:

    logits = decoder.forward(token_ids, positions=None, branch_ids=None, keep=None)
    tokens = decoder.forward(token_ids, ..., greedy=True)   # the argmax of the kept rows instead, (T',) on the device
    decoder.crop(length); decoder.length; decoder.steps

``greedy=True`` lets the fast decoder take the argmax inside its compiled step, so a greedy step without logits
processors that constrain the step reads back one token per row, not the rows' logits.

``EagerDecoder`` is the readable reference: transformers' ``DynamicCache``, the stock forward called once per pass,
plain causal attention for sequential text and a 4D tree mask (or the project kernel's branch ids) for branches.
``arena.FastDecoder`` does the same over a static KV arena with a compiled step; the tests hold it to the
reference token for token.
"""

from __future__ import annotations

import torch

SHARED = -1  # branch id of the shared text (prompt, skeleton, merged answer)


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


def logits_to_keep(keep) -> int | list[int]:
    """``keep`` (the query rows whose logits a pass returns) as transformers' ``logits_to_keep``: None = the last
    row (1), "all" = every row (0), else a list of row indices."""
    if keep is None:
        return 1
    if isinstance(keep, str):
        if keep != "all":
            raise ValueError(f"keep must be None, 'all' or row indices, got {keep!r}")
        return 0
    return keep


COMPILE_CHOICES = ("auto", "on", "off")


def compile_enabled(setting, device: torch.device) -> bool:
    """``compile`` as given to the engine (True/False or "auto"/"on"/"off") for a model on ``device``.

    "auto" is on for CUDA, where the compiled step is captured as CUDA graphs, and off on a CPU, where compiling
    every bucket costs more than it saves on a dataset of the project's size (docs/bench.md,
    "End to end: compile on vs off", has the measurement).
    """
    if isinstance(setting, bool):
        return setting
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"compile must be True, False or one of {', '.join(COMPILE_CHOICES)}; got {setting!r}")
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"
