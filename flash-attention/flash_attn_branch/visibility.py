"""The one definition of visibility between tokens of branches that share one sequence.

A query sees a key when the key is not later than the query and the key is shared or of the query's own branch:

    sees(query_position, query_branch, key_position, key_branch)
        = key_position <= query_position and (key_branch == SHARED or key_branch == query_branch)

Every mask builder applies this function: this package's reference (:mod:`.reference`) and, in the main project,
the eager decoder's 4D mask, the KV arena's dense mask and its FlexAttention ``mask_mod``. It lives here, in the
kernel package, because that package is the lowest layer: it imports nothing of the main project, which imports
this module (``parallel_decoding.decoding.visibility``). The Triton kernel (``_kernels.py``) cannot call a torch
function and keeps the same rule inline; the tests hold its output to this definition.

The arguments are tensors that broadcast against each other (or Python ints), so one call builds a whole (T, K)
mask from a (T, 1) column of queries and a (1, K) row of keys, and the same call runs inside a FlexAttention
``mask_mod`` on scalar tensors.
"""

from __future__ import annotations

from typing import TypeVar

import torch

SHARED = -1  # the branch id of shared text (a prompt, a skeleton, a merged answer): every branch sees it

Index = TypeVar("Index", torch.Tensor, int)


def sees(query_position: Index, query_branch: Index, key_position: Index, key_branch: Index) -> torch.Tensor:
    """True where a query sees a key: the key is not later, and is shared or of the query's own branch."""
    not_later = torch.as_tensor(key_position <= query_position)
    return not_later & ((key_branch == SHARED) | (key_branch == query_branch))
