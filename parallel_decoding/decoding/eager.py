"""The readable reference decoder: transformers' ``DynamicCache`` and the stock forward, once per pass.

Sequential text runs under the model's own causal mask; a pass with branch ids gets the 4D tree mask of
:func:`~parallel_decoding.decoding.interface.branch_mask` (or the project kernel's branch ids). The fast decoder
(``arena.FastDecoder``) is held to this one token for token.
"""

from __future__ import annotations

import torch

from .attention import uses_branch_kernel
from .hf import context_length, crop_cache, forward, new_cache
from .interface import SHARED, branch_mask, logits_to_keep


class EagerDecoder:
    """Reference decoder: a ``DynamicCache`` and one stock forward call per pass.

    ``key_branch[k]`` is the branch id of cache slot ``k``, in a buffer allocated once on the model's device and
    written by index; a pass with branch ids builds its tree mask with one vectorized comparison against it.
    """

    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.use_kernel = uses_branch_kernel(model)
        self.key_branch = torch.full((context_length(model),), SHARED, dtype=torch.int32, device=self.device)
        self.reset()

    def reset(self) -> None:
        self.cache = new_cache(self.model)
        self.steps = 0

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def crop(self, length: int) -> None:
        crop_cache(self.cache, length)

    def forward(
        self, token_ids: list[int], positions: list[int] | None = None, branch_ids: list[int] | None = None, keep=None,
        greedy: bool = False,
    ):
        """Append ``token_ids`` after the cache; returns the float logits of the ``keep`` rows (see :func:`logits_to_keep`),
        (T', V), or with ``greedy`` their argmax, (T',).

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
            if self.use_kernel:
                attention = {"q_branch": query_branch, "k_branch": keys}
            else:
                attention = {"attention_mask": branch_mask(keys, query_branch, self.model.dtype)}
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
