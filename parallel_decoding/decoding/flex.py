"""FlexAttention for the KV arena: the tree mask over the written blocks only, grouped-query heads without copies.

The fast decoder's compiled pass attends with ``torch.nn.attention.flex_attention``. Its ``BlockMask`` is built
once per pass, inside the compiled graph, from device tensors only: the arena's branch id per slot, and per query
row its slot, its branch id and its first visible slot (the start of its request's region). The number of KV
blocks a pass visits comes from the largest real query slot, as a tensor, so one graph serves every length and
the cost follows the written text, not the arena's capacity. ``enable_gqa=True`` reads the arena's
(1, H_kv, C + 1, D) keys as they are, without repeating them per query head.

Mask rule: query ``q`` sees key slot ``k`` iff ``first[q] <= k`` (its request's region) and
``visibility.sees(slot[q], branch[q], k, branch[k])`` (the one rule) and ``branch[q] != PADDING``. A padding row
sees nothing (flex returns zeros for a fully masked row), and no real row sees the spare slot, whose branch id is
``PADDING``.

The model runs a wrapper of its own attention function, registered with transformers under
``arena_flex_<base>`` for ``base`` = ``sdpa`` or ``eager`` (no "flash" in the name: transformers would read that
as a FlashAttention or hub-kernel request). Given a ``BlockMask`` as the attention mask (only the fast decoder
passes one) the wrapper calls flex; given request spans (an uncompiled pass of the arena) it attends once per
request, over that request's slots (``_by_request``: with the sdpa base, sdpa itself, without a mask where the
request's layout needs none; else the base function under the request's mask); given anything else it calls the
base function with the arguments unchanged, and its mask function is the base's, so any other caller of the model
(the eager reference decoder, ``generate``) gets exactly the base attention.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import FLEX_BASES, flex_name
from .backend import KVBlocks, TreeRows
from .dense import PADDING as PADDING  # the branch id of padding rows, re-exported
from .visibility import sees

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import FlexKernelOptions

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    HAS_FLEX = True
except ImportError:  # torch without FlexAttention (before 2.5): the fast decoder's dense mask only
    HAS_FLEX = False

BLOCK = 128  # flex's query and key block size, in slots
# sdpa's enable_gqa (torch 2.5+): grouped-query heads read their KV head without repeat_kv (a causal prefill).
_SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= "2.5"
REQUEST_SPANS = "arena_request_spans"  # keyword of an exact pass over several requests (see _by_request)


def supported() -> bool:
    """Whether this torch can build the pass's ``BlockMask`` from block tables (``from_kv_blocks`` with
    ``seq_lengths`` and ``compute_q_blocks``)."""
    if not HAS_FLEX:
        return False
    params = inspect.signature(BlockMask.from_kv_blocks).parameters
    return "seq_lengths" in params and "compute_q_blocks" in params


# --- the attention function ----------------------------------------------------------------------------------------

_EAGER_FUNCTIONS: dict[str, Callable[..., Any]] = {}  # modeling module name -> its own eager_attention_forward
_WRAPPERS: dict[
    str, Callable[..., Any]
] = {}  # base -> the one wrapper function registered for it (graphs guard on its identity)


def _base_function(base: str, module: torch.nn.Module) -> Callable[..., Any]:
    if base == "eager":  # transformers has no global eager function: every modeling file defines its own
        return _EAGER_FUNCTIONS[type(module).__module__]
    return ALL_ATTENTION_FUNCTIONS[base]


def _flex(module, query, key, value, block_mask, kwargs) -> tuple[torch.Tensor, None]:
    """query (1, H_q, W, D); key, value (1, H_kv, C + 1, D), the whole arena. Returns ((1, W, H_q, D), None)."""
    if kwargs.get("dropout") and module.training:
        raise NotImplementedError("arena flex attention: attention dropout is not supported")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"arena flex attention: {name} layers are not supported")
    options = kernel_options(query.device.type, query.shape[2])
    out = flex_attention(
        query, key, value, block_mask=block_mask, scale=kwargs.get("scaling"), enable_gqa=True, kernel_options=options
    )
    return out.transpose(1, 2).contiguous(), None  # (1, H_q, W, D) -> (1, W, H_q, D)


def kernel_options(device_type: str, rows: int) -> FlexKernelOptions | None:
    """FlexAttention's kernel options for a pass of ``rows`` query rows on ``device_type``.

    On CUDA, inductor picks its split-KV decoding kernel for a short query (under 128 rows) whose grouped-query
    ratio is a power of two, and the main kernel otherwise. A pass of more than one row takes the main kernel
    here: on the first H200 run the compiled passes of several rows gave wrong answers on the embedded model
    (ratio 2, the decoding kernel) while one-row passes were right (docs/bench.md), and
    ``python -m parallel_decoding.bench.flex_rows`` holds both kernels to a dense reference, row count by row
    count, so the next GPU run tells which is right. A one-row pass keeps torch's choice, the kernel shown
    right there. The CPU has one template and no choice to make.
    """
    if device_type == "cuda" and rows > 1:
        return {"FORCE_USE_FLEX_ATTENTION": True}
    return None


@dataclass
class RequestSpan:
    """One request's part of an exact pass: its rows ``row_start .. row_end - 1`` see slots ``first .. end - 1``.

    ``layout`` says how (``KVArena.span_layout``): "tree", the mask decides; "all", one row of shared text over
    shared text, which sees every key of the span (no mask); "causal", rows of shared text that fill the span in
    order, each seeing the keys up to its own (a prompt's prefill; sdpa's causal path, no mask). ``make_mask()``
    builds the additive mask (1, 1, rows, end - first) when one is needed: once per pass, shared by every layer.
    """

    row_start: int
    row_end: int
    first: int
    end: int
    layout: str
    make_mask: Callable[[], torch.Tensor]
    _masks: dict[int, torch.Tensor] = field(
        default_factory=dict
    )  # groups -> the mask, each row repeated per query head of a KV head

    def mask(self, groups: int = 1) -> torch.Tensor:
        """(1, 1, G * rows, S): row g * rows + t is row t (``_sdpa_grouped``); G = 1 is the mask itself."""
        if groups not in self._masks:
            self._masks[groups] = self.make_mask() if groups == 1 else self.mask().repeat(1, 1, groups, 1)
        return self._masks[groups]


def _by_request(base: str, function, module, query, key, value, spans: list[RequestSpan], args, kwargs):
    """An exact pass over one or more requests: each request's rows attend over its own span of slots alone, under
    its own layout, so the work follows each request's text and not the whole arena.

    query (1, H_q, T, D); key, value (1, H_kv, S, D); spans in row order. Returns ((1, T, H_q, D), None), as the base.
    With the sdpa base the wrapper calls sdpa itself: without a mask where the layout needs none, and with grouped
    query heads folded into rows, not repeated keys; with another base it calls the base under the span's mask.
    """
    groups = _groups(module)
    direct = base == "sdpa" and _plain(module, kwargs)
    scaling = kwargs.get("scaling")
    outs = []
    for span in spans:
        rows = query[:, :, span.row_start : span.row_end]  # (1, H_q, rows, D)
        keys, values = key[:, :, span.first : span.end], value[:, :, span.first : span.end]  # (1, H_kv, S', D)
        if not direct:
            out, _ = function(module, rows, keys, values, span.mask(), *args, **kwargs)  # (1, rows, H_q, D)
        elif span.layout == "all":
            out = _sdpa_grouped(rows, keys, values, None, scaling)
        elif span.layout == "causal" and (groups == 1 or _SDPA_GQA):
            gqa: dict[str, Any] = {"enable_gqa": True} if groups > 1 else {}
            out = torch.nn.functional.scaled_dot_product_attention(
                rows, keys, values, is_causal=True, scale=scaling, **gqa
            )
            out = out.transpose(1, 2).contiguous()  # (1, H_q, rows, D) -> (1, rows, H_q, D)
        else:
            out = _sdpa_grouped(rows, keys, values, span.mask(groups), scaling)
        outs.append(out)
    return torch.cat(outs, dim=1), None  # (1, T, H_q, D)


def _groups(module) -> int:
    return getattr(module, "num_key_value_groups", 1)


def _plain(module, kwargs) -> bool:
    """Whether the layer's attention is plain scaled dot products under a mask (what ``_sdpa_grouped`` computes)."""
    if kwargs.get("dropout") and module.training:
        return False
    return all(kwargs.get(name) is None for name in ("sliding_window", "softcap", "s_aux", "position_bias"))


def _sdpa_grouped(query, key, value, grouped_mask: torch.Tensor | None, scaling) -> torch.Tensor:
    """sdpa of several query rows with grouped-query heads, without repeating the keys per query head: the G query
    heads of one KV head become G x T rows of that head (transformers does this for one row, ``pack_gqa``). Each row
    takes the same dot products and softmax as under ``repeat_kv``.

    query (1, H_q, T, D); key, value (1, H_kv, S, D); grouped_mask (1, 1, G * T, S) (``RequestSpan.mask(G)``), or
    None where every row sees every key. Returns (1, T, H_q, D).
    """
    _, heads, rows, dim = query.shape
    packed = query.reshape(1, key.shape[1], -1, dim)  # (1, H_q, T, D) -> (1, H_kv, G * T, D): row g * T + t
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=grouped_mask, scale=scaling)
    return out.reshape(1, heads, rows, dim).transpose(1, 2).contiguous()  # (1, H_kv, G * T, D) -> (1, T, H_q, D)


def _make_wrapper(base: str) -> Callable[..., Any]:
    def arena_flex_attention(module, query, key, value, attention_mask, *args, **kwargs):
        spans = kwargs.pop(REQUEST_SPANS, None)
        if HAS_FLEX and isinstance(attention_mask, BlockMask):
            return _flex(module, query, key, value, attention_mask, kwargs)
        function = _base_function(base, module)
        if spans is not None:
            return _by_request(base, function, module, query, key, value, spans, args, kwargs)
        return function(module, query, key, value, attention_mask, *args, **kwargs)

    arena_flex_attention.__name__ = f"arena_flex_{base}_attention"
    return arena_flex_attention


def register(model, base: str) -> str:
    """Register the flex wrapper of ``base`` for ``model``'s attention modules; returns its name.

    The mask function registered with it is the base's: with a 4D tensor or a ``BlockMask`` as the attention mask,
    transformers passes the mask through untouched (the fast decoder's passes), and without one it builds the base's
    own causal mask.
    """
    if base not in FLEX_BASES:
        raise ValueError(f"the arena's flex attention wraps {' or '.join(FLEX_BASES)} attention, not {base!r}")
    if base == "eager":
        for module in model.modules():
            owner = sys.modules.get(type(module).__module__)
            if owner is not None and hasattr(owner, "eager_attention_forward"):
                _EAGER_FUNCTIONS.setdefault(owner.__name__, owner.eager_attention_forward)
    name = flex_name(base)
    if base not in _WRAPPERS:
        _WRAPPERS[base] = _make_wrapper(base)
        AttentionInterface.register(name, _WRAPPERS[base])
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


# --- the block mask ------------------------------------------------------------------------------------------------


def tree_mask_mod(key_branch: torch.Tensor, slots: torch.Tensor, branch: torch.Tensor, first: torch.Tensor):
    """The mask rule as a flex ``mask_mod``. key_branch: (n_blocks * BLOCK,); slots, branch, first: (W,).

    Query indices past ``W`` (the rest of a query block) are clamped: their rows are not part of the output.
    """
    last = slots.shape[0] - 1

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx.clamp(max=last)
        query_branch, key = branch[q], key_branch[kv_idx]
        # Its own region (from its first visible slot on), then the one rule; a padding row sees nothing.
        return (kv_idx >= first[q]) & sees(slots[q], query_branch, kv_idx, key) & (query_branch != PADDING)

    return mask_mod


def block_mask(tables: KVBlocks, slots: torch.Tensor, branch: torch.Tensor, first: torch.Tensor) -> BlockMask:
    """The pass's ``BlockMask``, (1, 1, W, C + 1), from device tensors only: call it inside the compiled pass.

    Visited KV blocks: the ones :meth:`BlockTables.visit` listed for this pass (those that hold the rows' text), read
    from the tables on the device, so one graph serves every length and every layout of requests. Every visited
    block is partial (the mask_mod applies); the CPU template needs the full-block tables anyway, so they are
    passed as zeros.
    """
    return BlockMask.from_kv_blocks(
        tables.kv_num_blocks,  # (1, 1, 1): batch, heads, query blocks
        tables.kv_indices,
        tables.full_kv_num_blocks,
        tables.full_kv_indices,
        BLOCK_SIZE=BLOCK,
        mask_mod=tree_mask_mod(tables.key_branch, slots, branch, first),
        seq_lengths=(slots.shape[0], tables.kv_length),
        compute_q_blocks=False,  # the query-major tables serve the backward pass only
    )


class FlexMask:
    """The arena's compiled pass with FlexAttention: a ``BlockMask`` over the blocks that hold the rows' text,
    through the flex wrapper of the model's implementation (``arena_flex_sdpa`` or ``arena_flex_eager``)."""

    name = "flex"
    decoder: Literal["arena"] = "arena"

    def implementation(self, base: str) -> str:
        return flex_name(base)

    def arguments(self, rows: TreeRows) -> dict[str, Any]:
        if rows.tables is None:
            raise ValueError("a FlexAttention pass needs the arena's block tables")
        return {"attention_mask": block_mask(rows.tables, rows.slots, rows.branch, rows.first)}  # (1, 1, W, C + 1)


class BlockTables:
    """The block tables of an arena of ``kv_length`` slots, allocated once and passed into every compiled pass
    (created inside the graph, they fail to compile on the CPU), with the per-slot branch ids they read."""

    def __init__(self, key_branch: torch.Tensor, kv_length: int):
        blocks = key_branch.shape[0] // BLOCK
        device = key_branch.device
        self.key_branch = key_branch  # (blocks * BLOCK,), PADDING past the arena's last real slot
        self.kv_length = kv_length
        self.kv_indices = torch.arange(blocks, dtype=torch.int32, device=device).view(1, 1, 1, blocks)  # (1, 1, 1, N)
        self.kv_num_blocks = torch.zeros((1, 1, 1), dtype=torch.int32, device=device)  # (1, 1, 1): blocks visited
        self._visited: tuple | None = None  # the block list now in kv_indices, to skip rewriting the same one
        # Two distinct tensors for the partial and the (empty) full lists: one tensor for both fails to compile.
        self.full_kv_indices = torch.zeros((1, 1, 1, blocks), dtype=torch.int32, device=device)  # (1, 1, 1, N)
        self.full_kv_num_blocks = torch.zeros((1, 1, 1), dtype=torch.int32, device=device)  # (1, 1, 1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv_indices, self.kv_num_blocks, self.full_kv_indices, self.full_kv_num_blocks]

    @torch.inference_mode()  # the tables are made with the arena, under inference mode
    def visit(self, live: list[tuple[int, int]]) -> None:
        """List the blocks that hold slots of the ``live`` ranges ``(start, end)`` as the next pass's KV blocks, in
        place (the compiled pass, and on CUDA its graph, read these tensors). One copy to the device, and none
        when the list did not change."""
        blocks = sorted(
            {b for start, end in live if end > start for b in range(start // BLOCK, (end - 1) // BLOCK + 1)}
        )
        if tuple(blocks) == self._visited:
            return
        self._visited = tuple(blocks)
        if blocks:
            self.kv_indices[0, 0, 0, : len(blocks)].copy_(torch.tensor(blocks, dtype=torch.int32))
        self.kv_num_blocks.fill_(len(blocks))


def padded_slots(slots: int) -> int:
    """Slots rounded up to whole blocks: the length of the per-slot branch ids the mask_mod may read."""
    return -(-slots // BLOCK) * BLOCK
