"""One forward pass of the model over new tokens: the plain reference (``EagerDecoder``) and its interface.

The engine never touches a cache directly. It asks a decoder to append tokens at given positions, each token
tagged with its branch (``SHARED`` for the sequential text), and gets the logits of the rows it asks for:

    logits = decoder.forward(token_ids, positions=None, branch_ids=None, rows=None)
    tokens = decoder.forward(token_ids, ..., greedy=True)   # the argmax of those rows instead, (T',) on the device
    decoder.crop(length); decoder.length; decoder.steps

``greedy=True`` lets the fast decoder take the argmax inside its compiled step, so a greedy step without logits
processors reads back one token per row, not the rows' logits.

``EagerDecoder`` is the readable reference: transformers' ``DynamicCache``, the stock forward called once per pass,
plain causal attention for sequential text and a 4D tree mask (or the project kernel's branch ids) for branches.
``arena.FastDecoder`` does the same over a static KV arena with a compiled step; the tests hold it to the
reference token for token.
"""

from __future__ import annotations

import torch

from .model_io import context_length, crop_cache, forward, new_cache, uses_branch_kernel

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


def logits_rows(rows, num_tokens: int):
    """``rows`` as transformers' ``logits_to_keep``: None = the last row, "all" = every row, else row indices."""
    if rows is None:
        return 1
    if isinstance(rows, str):
        if rows != "all":
            raise ValueError(f"rows must be None, 'all' or row indices, got {rows!r}")
        return 0
    return rows


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
        self, token_ids: list[int], positions: list[int] | None = None, branch_ids: list[int] | None = None, rows=None,
        greedy: bool = False,
    ):
        """Append ``token_ids`` after the cache; returns the float logits of ``rows`` (see :func:`logits_rows`),
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
        keep = logits_rows(rows, count)
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


COMPILE_CHOICES = ("auto", "on", "off")


def compile_enabled(setting, device: torch.device) -> bool:
    """``compile`` as given to the engine (True/False or "auto"/"on"/"off") for a model on ``device``.

    "auto" is on for CUDA, where the compiled step is captured as CUDA graphs, and off on a CPU: on the project's
    2-core CPU the compiled step makes the embedded model's rows faster (1.53x normal tokens/s), but compiling the
    seven buckets (53 s with inductor's cache already warm, more when cold) costs more than it saves on a 50-row
    dataset (about 0.34 s a 10-student row, both modes); docs/bench.md has the numbers.
    """
    if isinstance(setting, bool):
        return setting
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"compile must be True, False or one of {', '.join(COMPILE_CHOICES)}; got {setting!r}")
    if setting == "auto":
        return device.type == "cuda" or AUTO_COMPILE_ON_CPU
    return setting == "on"


AUTO_COMPILE_ON_CPU = False  # measured: see docs/bench.md


def decoder_for(model, compile=False):
    """The eager reference decoder, or the model's fast decoder (reset for a new answer) when compile is on."""
    if compile_enabled(compile, model.device):
        from .arena import fast_decoder

        decoder = fast_decoder(model)
        decoder.reset()
        return decoder
    return EagerDecoder(model)
