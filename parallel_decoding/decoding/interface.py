"""The decoder interface: one forward pass of the model over new tokens, each tagged with its branch.

The engine never touches a cache directly. It asks a decoder (:class:`Decoder`) to append tokens at given
positions, each token tagged with its branch (``SHARED`` for the sequential text), and gets the logits of the query
rows it keeps:

    logits = decoder.forward(token_ids, positions=None, branch_ids=None, keep=None)
    tokens = decoder.forward(token_ids, ..., greedy=True)   # the argmax of the kept rows instead, (T',) on the device
    decoder.crop(length); decoder.length; decoder.steps; decoder.reserve(tokens, what); decoder.reset()

What an answer sees of its cache is a :class:`CacheRegion` (a whole decoder is one); what runs the passes of one or more
answers is a :class:`Runner` (``engine.scheduler.SoloRunner``: one answer on one decoder;
``decoding.regions.RegionDecoder``: many answers in regions of one KV arena), sent :class:`PassRequest` s.

``greedy=True`` lets the fast decoder take the argmax inside its compiled step, so a greedy step without logits
processors that constrain the step reads back one token per row, not the rows' logits.

``EagerDecoder`` is the readable reference: transformers' ``DynamicCache``, the stock forward called once per pass,
plain causal attention for sequential text and a 4D tree mask (or the project kernel's branch ids) for branches.
``arena.FastDecoder`` does the same over a static KV arena with a compiled step; the tests hold it to the
reference token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union

import torch

from .backend import TreeRows
from .visibility import SHARED as SHARED  # the branch id of shared text, re-exported: the engine's name for it
from .visibility import sees


def branch_mask(key_branch: torch.Tensor, query_branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask for queries that are the last ``T`` of ``K`` keys.

    key_branch: (K,) branch id per key, -1 = shared prefix. query_branch: (T,) branch id per query.
    Query ``i`` sits at absolute index ``K - T + i`` and sees key ``j`` as :func:`~.visibility.sees` says.
    Returns (1, 1, T, K) with 0 where visible and the dtype's minimum elsewhere.
    """
    num_keys, num_queries = key_branch.shape[0], query_branch.shape[0]
    key_index = torch.arange(num_keys, device=key_branch.device)  # (K,)
    query_index = key_index[num_keys - num_queries :]  # (T,)
    visible = sees(query_index[:, None], query_branch[:, None], key_index[None, :], key_branch[None, :])  # (T, K)
    mask = torch.zeros(visible.shape, dtype=dtype, device=key_branch.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, T, K)


# The query rows whose logits a pass returns: None = the last row, "all" = every row, else the row indices.
Keep = Union[None, str, list[int]]  # noqa: UP007  (a runtime alias: Python 3.10 cannot `|` None with str)


class CacheRegion(Protocol):
    """The KV cache of one answer: how many tokens it holds, how many passes it took part in, and a crop."""

    @property
    def length(self) -> int: ...

    @property
    def steps(self) -> int: ...

    def crop(self, length: int) -> None: ...


class Decoder(CacheRegion, Protocol):
    """One forward pass of the model over new tokens of one answer (``EagerDecoder``, ``arena.FastDecoder``)."""

    def forward(
        self,
        token_ids: list[int],
        positions: list[int] | None = None,
        branch_ids: list[int] | None = None,
        keep: Keep = None,
        greedy: bool = False,
    ) -> torch.Tensor:
        """The float logits of the ``keep`` rows (T', V), or with ``greedy`` their argmax (T',)."""
        ...

    def reserve(self, tokens: int, what: str) -> None:
        """Raise before decoding when an answer of ``tokens`` slots (``what`` says whose) cannot fit."""
        ...

    def reset(self) -> None:
        """Empty the cache for a new answer."""
        ...


@dataclass
class PassRequest:
    """One answer's part of a pass: what ``Decoder.forward`` takes, for that answer's region."""

    region: CacheRegion
    token_ids: list[int]
    positions: list[int] | None = None
    branch_ids: list[int] | None = None
    keep: Keep = None  # None (last row), "all", or row indices, as in Decoder.forward
    greedy: bool = False


class Runner(Protocol):
    """Runs the passes of the answers in flight: hands out their regions and runs one pass over their requests."""

    @property
    def max_batch_size(self) -> int | None:
        """The most answers it can hold at once (None: as many as their regions allow)."""
        ...

    def allocate(self, size: int, what: str) -> CacheRegion | None:
        """A region of ``size`` slots for an answer (``what`` says whose), or None while none is free; raises
        ``ValueError`` when the answer can never fit."""
        ...

    def release(self, region: CacheRegion) -> None: ...

    def run(self, requests: list[PassRequest]) -> list[torch.Tensor]:
        """One pass over every request; each request's result as ``Decoder.forward`` returns it."""
        ...


class EagerMask:
    """The reference decoder's passes with the model's own attention (sdpa or eager) under the 4D tree mask of
    :func:`branch_mask`: its rows are the last of the cache's keys."""

    name = "mask"
    decoder: Literal["eager"] = "eager"

    def implementation(self, base: str) -> str:
        return base

    def arguments(self, rows: TreeRows) -> dict[str, Any]:
        return {"attention_mask": branch_mask(rows.key_branch, rows.branch, rows.dtype)}


def logits_to_keep(keep: Keep) -> int | list[int]:
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
