"""The dense backend of the KV arena: an additive mask over the slots a pass attends over.

Each query row sees the slots of its own request's region (from its first visible slot on) that the one rule of
``decoding.visibility`` admits. A padding row (branch id ``PADDING``) sees the padding slots alone (the arena's
spare slot), so its softmax has one key and no NaN, and no real row sees a padding slot.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from .backend import TreeRows
from .visibility import sees

PADDING = -2  # branch id of padding rows (and of the arena's spare slot and the slots past it)


def dense_mask(
    key_branch: torch.Tensor,
    key_slots: torch.Tensor,
    slots: torch.Tensor,
    branch: torch.Tensor,
    first: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive mask of query rows (``slots``, ``branch``, ``first``: (T,)) over keys at ``key_slots`` with
    ``key_branch`` ((S,) each): (1, 1, T, S), 0 where visible and the dtype's minimum elsewhere."""
    keys, index = key_branch[None, :], key_slots[None, :]  # (1, S)
    queries, query_branch = slots[:, None], branch[:, None]  # (T, 1)
    # Its own region (from its first visible slot on), then the one rule; a padding query sees padding alone.
    visible = (index >= first[:, None]) & sees(queries, query_branch, index, keys)  # (T, S)
    visible &= (query_branch != PADDING) | (keys == PADDING)
    mask = torch.full(visible.shape, torch.finfo(dtype).min, dtype=dtype, device=slots.device)  # (T, S)
    return mask.masked_fill(visible, 0.0)[None, None]  # (1, 1, T, S)


class DenseMask:
    """The arena's compiled (or exact) pass with the model's own attention function under a dense additive mask."""

    name = "dense"
    decoder: Literal["arena"] = "arena"

    def implementation(self, base: str) -> str:
        return base

    def arguments(self, rows: TreeRows) -> dict[str, Any]:
        key_slots = torch.arange(rows.key_branch.shape[0], device=rows.key_branch.device)  # (S,)
        return {
            "attention_mask": dense_mask(rows.key_branch, key_slots, rows.slots, rows.branch, rows.first, rows.dtype)
        }
