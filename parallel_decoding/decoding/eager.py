"""The readable reference decoder: transformers' ``DynamicCache`` and the stock forward, once per pass.

Sequential text runs under the model's own causal mask; a pass with branch ids gets the 4D tree mask of
:func:`~parallel_decoding.decoding.interface.branch_mask` (or the project kernel's branch ids). The fast decoder
(``arena.FastDecoder``) is held to this one token for token.
"""

from __future__ import annotations

import torch

from .backend import TreeRows
from .backends import eager_backend
from .hf import context_length, crop_cache, forward, new_cache
from .interface import SHARED, logits_to_keep


class EagerDecoder:
    """Reference decoder: a ``DynamicCache`` and one stock forward call per pass.

    ``key_branch[k]`` is the branch id of cache slot ``k``, in a buffer allocated once on the model's device and
    written by index; a pass with branch ids builds its tree mask with one vectorized comparison against it.
    """

    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.backend = eager_backend(model.config._attn_implementation)  # the tree mask, or the kernel's branch ids
        context = context_length(model)
        self.key_branch = torch.full((context,), SHARED, dtype=torch.int32, device=self.device)
        self.key_slots = torch.arange(context, device=self.device)  # (C,): query rows are keys at these slots
        self.first_slots = torch.zeros(context, dtype=torch.long, device=self.device)  # every row sees from slot 0
        self.reset()

    def reset(self) -> None:
        self.cache = new_cache(self.model)
        self.steps = 0

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def reserve(self, tokens: int, what: str) -> None:
        """Raise before decoding when ``tokens`` slots (``what`` says whose) exceed the model's context."""
        if tokens > self.key_branch.shape[0]:
            raise ValueError(f"{what} needs {tokens} positions but the model's context is {self.key_branch.shape[0]}")

    def crop(self, length: int) -> None:
        crop_cache(self.cache, length)

    def forward(
        self,
        token_ids: list[int],
        positions: list[int] | None = None,
        branch_ids: list[int] | None = None,
        keep=None,
        greedy: bool = False,
    ):
        """Append ``token_ids`` after the cache; returns the float logits of the ``keep`` rows (see
        :func:`logits_to_keep`), (T', V), or with ``greedy`` their argmax, (T',).

        ``positions`` default to the next slots (sequential text); ``branch_ids`` default to ``SHARED``, which
        leaves the model's own causal mask in charge.
        """
        start, count = self.length, len(token_ids)
        if positions is None:
            positions = list(range(start, start + count))
        attention = {}
        if branch_ids is None:
            self.key_branch[start : start + count] = SHARED
        else:
            query_branch = torch.tensor(branch_ids, dtype=torch.int32, device=self.device)  # (T,)
            self.key_branch[start : start + count] = query_branch
            keys = self.key_branch[: start + count]  # (K,)
            slots, first = self.key_slots[start : start + count], self.first_slots[:count]  # (T,)
            attention = self.backend.arguments(TreeRows(slots, query_branch, first, keys, self.model.dtype))
        keep = logits_to_keep(keep)
        if not isinstance(keep, int):
            keep = torch.tensor(keep, device=self.device)
        logits = forward(
            self.model,
            self.cache,
            torch.tensor([token_ids], device=self.device),  # (1, T)
            torch.tensor([positions], device=self.device),  # (1, T)
            logits_to_keep=keep,
            **attention,
        )
        self.steps += 1
        return logits.argmax(dim=-1) if greedy else logits
