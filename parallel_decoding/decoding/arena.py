"""The fast path: a static KV arena (a transformers ``Cache`` subclass) and one compiled forward pass per bucket.

``KVArena`` holds every layer's keys and values in tensors allocated once, at a capacity, and written by slot
index. The slots a pass writes are in ``write_slots`` (set by the pass itself, read by each layer's ``update``),
so the same code serves transformers 5.17 (``cache.update(k, v, layer_idx)``) and 5.24 (which adds keyword
arguments). ``crop`` only sets a length. ``key_branch`` (on the device) is the branch id of every slot.

``FastDecoder`` has the interface of :class:`~parallel_decoding.decoding.eager.EagerDecoder`, and under it
:meth:`FastDecoder.forward_packed`: rows at absolute arena slots, each with the first slot it may see (the start
of its request's region), so several requests can share one pass. A query sees the slots from its first visible
slot up to its own that hold shared text or its own branch. Each pass pads its query rows up to a bucket (1, 2,
4, ... 64 rows) and runs one compiled function whose shapes depend on the bucket only, so nothing recompiles as
the text grows or from one row to the next:

- ``attention="flex"`` (the default where torch has FlexAttention): the pass builds a ``BlockMask`` inside the
  graph (``flex.py``) and visits the KV blocks up to its largest real query slot only, so its cost follows the
  written text, not the capacity; grouped-query heads read the arena's keys without copies. The model runs the
  flex wrapper of its attention implementation while the decoder lives (``arena_flex_sdpa`` or
  ``arena_flex_eager``): the same attention as before for every other caller;
- ``attention="dense"``: an additive mask built in the pass over the whole arena (capacity + 1 slots), with the
  model's own attention function; kept for comparisons;
- padding rows write to one spare slot past the capacity and carry the branch id ``PADDING``: they see nothing
  (flex) or that slot alone (dense), and no real row sees it, so padding changes nothing;
- the pass returns the rows' float logits and their argmax, so a greedy step takes its tokens inside the graph
  and reads back one id per row;
- on CUDA the compiled pass is captured as CUDA graphs (inductor's ``triton.cudagraphs``, what
  ``mode="reduce-overhead"`` sets), one per bucket; the arena tensors are marked as static addresses so the graphs
  write into them in place;
- each decoder's graphs are cached apart from other decoders' and, where torch allows that, without dynamo's
  guards on the model's modules, which cost most of the per-call guard check (``_compile_settings``).

A pass with more rows than the largest bucket (a long prefill, a merge), and every pass of a decoder made with
``compile=False``, runs the same function uncompiled at its exact size, with a dense mask over the slots up to its
largest query slot. ``warm_up()`` compiles (and on CUDA records) every bucket on padding rows only, which write
nothing but the spare slot. (transformers guards the graphs on its registry of model classes built so far:
building a model of a new class after compiling recompiles each bucket once, which the graph limits leave room
for; a run loads its one model first.)
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, cast

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from . import flex
from .attention import FLEX_BASES, base_attention, flex_name, switch_attention, uses_branch_kernel
from .backend import AttentionBackend, TreeRows
from .backends import arena_choices, backend
from .dense import PADDING, dense_mask
from .hf import cache_argument, context_length, takes_cache_position
from .interface import SHARED, logits_to_keep

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # query rows per compiled pass
# How a compiled pass attends: a backend of the arena (decoding.backends), or "auto": flex where torch has it.
ATTENTION_CHOICES = ("auto", *arena_choices())


class ArenaFullError(ValueError):
    """The tokens of a row do not fit in the arena."""


class ArenaLayer(CacheLayerMixin):
    """One layer's keys and values, (1, H_kv, capacity + 1, D), written at the arena's ``write_slots``."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, arena: KVArena, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.arena = arena
        self.keys, self.values = keys, values
        self.stored = (keys, values)  # the same tensors, typed as allocated (the mixin's may be None)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("KVArena layers are allocated by the arena, never lazily")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.stored
        slots = self.arena.write_slots[: key_states.shape[-2]]  # (T,)
        keys[:, :, slots] = key_states  # (1, H_kv, T, D) into (1, H_kv, C + 1, D)
        values[:, :, slots] = value_states
        visible = self.arena.visible_slots
        return keys[:, :, :visible], values[:, :, :visible]  # (1, H_kv, S, D)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.arena.visible_slots, 0

    def get_seq_length(self) -> int:
        return self.arena.length

    def get_max_length(self) -> int:
        return self.arena.capacity

    def crop(self, tokens_to_remove: int) -> None:  # the arena sets the length once for all layers
        pass

    def reset(self) -> None:
        self.arena.length = 0


class KVArena(Cache):
    """Keys and values of every layer for ``capacity`` tokens (plus one spare slot), allocated once."""

    def __init__(self, model: PreTrainedModel, capacity: int):
        if capacity < 1:
            raise ValueError(f"the KV arena needs a capacity of at least 1 token, got {capacity}")
        text = model.config.get_text_config()
        layer_types = getattr(text, "layer_types", None) or ["full_attention"]
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"the KV arena serves full-attention decoders only; this model has layers {sorted(set(layer_types))}"
            )
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        device, dtype = model.device, model.dtype
        slots = capacity + 1  # the last slot is where padding rows write
        shape = (1, heads, slots, head_dim)  # (B, H_kv, C + 1, D)
        layers = [
            ArenaLayer(
                self, torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
            )
            for _ in range(text.num_hidden_layers)
        ]
        super().__init__(layers=cast("list[Any]", layers))  # ArenaLayer is a CacheLayerMixin
        self.capacity = capacity
        self.spare_slot = capacity
        self.length = 0
        self.write_slots = torch.zeros((slots,), dtype=torch.long, device=device)  # (C + 1,)
        # Branch id per slot, padded with PADDING to whole flex blocks (a block mask reads up to the end of the last
        # block it visits): SHARED for the real slots, PADDING for the spare slot and past it.
        blocks = flex.padded_slots(slots)
        self.key_branch = torch.full((blocks,), PADDING, dtype=torch.long, device=device)  # (N * BLOCK,)
        self.key_branch[:capacity] = SHARED
        self.tables = flex.BlockTables(self.key_branch, slots)
        # The same branch ids of the real slots and the spare one, on the host, written by every pass: an exact pass
        # tells from them, without a device sync, that a request's text holds no branch (flex.RequestSpan layouts).
        self.host_branch = torch.full((slots,), SHARED, dtype=torch.long)  # (C + 1,), on the CPU
        self.host_branch[capacity] = PADDING
        self.slot_index = torch.arange(slots, device=device)  # (C + 1,)
        # Slots a pass attends over, S: all of them in a compiled pass (one shape for every length), only those up
        # to the largest query slot in an uncompiled exact-size pass (a prefill or a merge need not scan the arena).
        # Each pass states its own (begin_pass), as it states the slots it writes.
        self.visible_slots = slots
        static = [self.write_slots, self.key_branch, *self.tables.tensors()]
        for tensor in [*static, *(t for layer in layers for t in layer.stored)]:
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs write into (and read) these in place

    def begin_pass(self, write_slots: torch.Tensor, visible_slots: int) -> None:
        """What the layers of the next pass read: the slots its rows write, (T,), and how many slots it attends
        over (``visible_slots``: the whole arena, capacity + 1, or the slots up to its largest row slot)."""
        self.write_slots[: write_slots.shape[0]] = write_slots
        self.visible_slots = visible_slots

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """transformers' convention: keep ``max_length`` tokens, or drop ``-max_length`` if negative."""
        keep = self.length + max_length if max_length < 0 else max_length
        if not 0 <= keep <= self.length:
            raise ValueError(f"cannot crop a KV arena of {self.length} tokens to {keep}")
        self.length = keep

    def tree_mask(
        self, slots: torch.Tensor, branch: torch.Tensor, first: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Record the queries' branch ids and return their additive mask over the visible slots, (1, 1, T, S)."""
        self.key_branch[slots] = branch
        return self.span_mask(slots, branch, first, dtype, 0, self.visible_slots)

    def span_mask(
        self, slots: torch.Tensor, branch: torch.Tensor, first: torch.Tensor, dtype: torch.dtype, start: int, end: int
    ) -> torch.Tensor:
        """The additive mask of queries over the slots ``start .. end - 1``, (1, 1, T, end - start), from the recorded
        branch ids (the queries' own included): ``dense.dense_mask``, the dense backend's rule.

        slots, branch, first: (T,). A query sees the slots from its first visible slot up to its own that hold
        shared text or its own branch; a padding query sees padding slots only (the spare slot).
        """
        return dense_mask(self.key_branch[start:end], self.slot_index[start:end], slots, branch, first, dtype)

    @torch.inference_mode()  # the arena is made under inference mode
    def record_on_host(self, slots: list[int], branch_ids: list[int]) -> None:
        self.host_branch[slots] = torch.tensor(branch_ids, dtype=torch.long)

    def span_layout(self, slots: list[int], branch_ids: list[int], first: int, end: int) -> str:
        """How one request's rows of an exact pass (at ``slots``, with ``branch_ids``) see their span of slots
        ``first .. end - 1`` (see ``flex.RequestSpan``), from the branch ids recorded on the host."""
        if any(b != SHARED for b in branch_ids) or not bool((self.host_branch[first:end] == SHARED).all()):
            return "tree"  # a branch in the rows or in their text: the mask decides
        if len(slots) == 1:
            return "all"  # one row of shared text at the span's last slot, over shared text: it sees every key
        if slots == list(range(first, end)):
            return "causal"  # the rows fill the span in order: each sees the keys up to its own
        return "tree"


class FastDecoder:
    """Decoder over a :class:`KVArena` with a compiled pass per bucket; same interface as ``EagerDecoder``, plus
    :meth:`forward_packed` for rows of several requests at absolute slots."""

    def __init__(
        self, model, capacity: int, buckets: tuple[int, ...] = BUCKETS, compile: bool = True, attention: str = "auto"
    ):
        if uses_branch_kernel(model):
            raise ValueError("the fast path builds its own mask over the arena; use it with eager or sdpa attention")
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive row counts, got {buckets}")
        self.model = model
        self.device = model.device
        self.buckets = tuple(sorted(set(buckets)))
        self.attention = _attention_choice(attention, self.buckets)
        self.backend = backend(self.attention)  # how its compiled passes attend
        self._cache_argument = cache_argument(model)  # looked up here: signature inspection does not trace
        self._cache_position = takes_cache_position(model)
        base = base_attention(model.config._attn_implementation)
        if base is None:
            raise ValueError("the model states no attention implementation (config._attn_implementation)")
        self.base_attention: str = base
        if (compile and self.attention == "flex") or (not compile and self.base_attention in FLEX_BASES):
            _own_attention(model, self.base_attention)  # a compiled flex pass, or exact passes request by request
        self.attn_implementation = model.config._attn_implementation
        with torch.inference_mode():
            self.arena = KVArena(model, capacity)
        self.use_cuda_graphs = compile and self.device.type == "cuda"
        self._compiled = None  # compile=False: every pass at its exact size
        self._limits: dict[str, int] = {}
        if compile:
            self._compiled = torch.compile(self._bucket_pass, dynamic=False, fullgraph=True, **self._compile_settings())
        self.steps = 0

    def _compile_settings(self) -> dict:
        """``torch.compile`` settings: one graph per bucket, CUDA graphs on CUDA, and the guards that matter.

        Dynamo checks every guard before every call, and for a stock transformers model most guards are on its
        modules (types, attributes, config), most of the per-call check (docs/bench.md). Where torch can keep this
        decoder's graphs apart from other decoders' (``isolate_recompiles``), the module guards go. That assumes
        the model is not changed in place while its decoder lives: the one setting the engine itself may change,
        the attention implementation, ``forward`` checks; a model moved to another device or dtype no longer fits
        its arena and fails there. Older torch shares one cache per function among all decoders, and there the
        module guards tell the models apart, so they stay.

        Each bucket may compile twice: transformers guards the graphs on its registry of model classes, so a model
        of a new class built after warm-up recompiles every bucket once.
        """
        graphs = 2 * len(self.buckets)
        options: dict[str, Any] = {"triton.cudagraphs": True} if self.use_cuda_graphs else {}  # reduce-overhead's
        # Inductor's Python checks of its extern kernels' output sizes and strides run at every call, for every
        # extern kernel of the pass; the tests hold the graphs to the eager path.
        options["size_asserts"] = False
        isolated = isolates_recompiles()
        self._limits = _graph_limits(isolated)
        if isolated:
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            return {"options": options, "isolate_recompiles": True, "recompile_limit": graphs}
        return {"options": options}

    def _call_compiled(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled pass of ``packed`` (5, W), under this decoder's graph limits (:func:`_graph_limits`)."""
        if self._compiled is None:
            raise RuntimeError("this decoder was made with compile=False: every pass runs at its exact size")
        with torch._dynamo.config.patch(self._limits):
            return self._compiled(packed)

    @property
    def compiled(self) -> bool:
        """Whether the passes that fit a bucket run the compiled function (else every pass at its exact size)."""
        return self._compiled is not None

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    @property
    def length(self) -> int:
        return self.arena.length

    @property
    def warm_up_calls(self) -> int:
        """Calls of each bucket's compiled pass ``warm_up`` makes: the first compiles it; with CUDA graphs, torch's
        cudagraph trees run that first call eagerly in the graph pool (their warm-up) and record the graph at the
        second, so the second is made too, and a timed step only replays."""
        return 2 if self.use_cuda_graphs else 1

    def reset(self) -> None:
        self.arena.length = 0
        self.steps = 0

    def crop(self, length: int) -> None:
        self.arena.crop(length)

    def reserve(self, tokens: int, what: str) -> None:
        """Raise before decoding when ``tokens`` slots (``what`` says whose) do not fit in the arena."""
        if tokens > self.capacity:
            raise ArenaFullError(f"{what} needs {tokens} KV slots but the arena holds {self.capacity}; make it larger")

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def _pass(
        self,
        packed: torch.Tensor,
        logits_to_keep: int | torch.Tensor = 0,
        attend: AttentionBackend | None = None,
        spans: list[tuple[int, int, int, int, str]] | None = None,
        visible_slots: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass; packed (5, W): token ids, positions, slots, branch ids, first visible slots; the pass
        attends over the arena's first ``visible_slots`` slots (default all of them, the spare one included).

        ``attend``: the attention backend of the pass (``decoding.backends``; default the dense mask over the visible
        slots); ``spans``: an exact pass whose attention wrapper attends request by request instead. Returns the
        kept rows' float logits (W', V) and their argmax (W',): a greedy step reads back the tokens alone, and on
        CUDA the argmax is part of the captured graph.
        """
        token_ids, positions, slots, branch, first = packed  # each (W,)
        visible = self.arena.capacity + 1 if visible_slots is None else visible_slots
        self.arena.begin_pass(slots, visible)
        self.arena.key_branch[slots] = branch  # the rows' branch ids, before any mask reads them
        kwargs: dict[str, Any] = {self._cache_argument: self.arena}
        if spans is not None:  # the attention wrapper attends request by request, each under its own layout
            kwargs[flex.REQUEST_SPANS] = [
                flex.RequestSpan(
                    rows_start,
                    rows_end,
                    start,
                    end,
                    layout,
                    functools.partial(
                        self.arena.span_mask,
                        slots[rows_start:rows_end],
                        branch[rows_start:rows_end],
                        first[rows_start:rows_end],
                        self.model.dtype,
                        start,
                        end,
                    ),
                )  # mask (1, 1, rows, end - start)
                for rows_start, rows_end, start, end, layout in spans
            ]
            kwargs["attention_mask"] = torch.empty(
                (1, 1, slots.shape[0], 0), dtype=self.model.dtype, device=slots.device
            )  # unused
        else:
            attend = attend or backend("dense")
            tables = self.arena.tables if attend.decoder == "arena" else None
            rows = TreeRows(slots, branch, first, self.arena.key_branch[:visible], self.model.dtype, tables)
            kwargs.update(attend.arguments(rows))  # a BlockMask (1, 1, W, C + 1) or a dense mask (1, 1, W, S)
        if self._cache_position:  # never derived from the arena's length inside a graph
            kwargs["cache_position"] = slots
        out = self.model(
            input_ids=token_ids[None],  # (1, W)
            position_ids=positions[None],  # (1, W)
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        logits = out.logits[0].float()  # (W', V)
        return logits, logits.argmax(dim=-1)

    def _bucket_pass(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled function: every row of a padded pass, (W, V) and (W,)."""
        return self._pass(packed, 0, self.backend)

    def _check_attention(self) -> None:
        """The model must attend as when this decoder was made. A switch between a base implementation and its flex
        wrapper is no change (the wrapper is the base for every other caller): a compiled decoder switches back."""
        current = self.model.config._attn_implementation
        if current == self.attn_implementation:
            return
        if base_attention(current) != self.base_attention:
            raise ValueError(
                f"the model's attention implementation changed from {self.base_attention!r} to {current!r} after its "
                f"fast decoder was made; make a new one with prepare_fast_decoder(model)"
            )
        if self._compiled is not None:
            switch_attention(self.model, self.attn_implementation)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: list[int],
        positions: list[int] | None = None,
        branch_ids: list[int] | None = None,
        keep=None,
        greedy: bool = False,
    ):
        """As ``EagerDecoder.forward``: the float logits of the ``keep`` rows (T', V), or with ``greedy`` their argmax
        (T',). One answer in the region that starts at slot 0, appended after ``length``."""
        start, count = self.arena.length, len(token_ids)
        if start + count > self.capacity:
            raise ArenaFullError(
                f"the KV arena holds {self.capacity} tokens; appending {count} after {start} overflows it"
            )
        if positions is None:
            positions = list(range(start, start + count))
        if branch_ids is None:
            branch_ids = [SHARED] * count
        slots = list(range(start, start + count))
        out = self.forward_packed(token_ids, positions, slots, branch_ids, [0] * count, keep=keep, greedy=greedy)
        self.arena.length += count
        return out

    @torch.inference_mode()
    def forward_packed(
        self, token_ids, positions, slots, branch_ids, first_slots, keep=None, greedy: bool = False
    ) -> torch.Tensor:
        """One pass over rows at absolute arena slots, e.g. of several requests, each in its own region of slots.

        Row ``i`` (token ``token_ids[i]`` at position ``positions[i]``, branch ``branch_ids[i]``, ``SHARED`` for
        sequential text) writes its keys, values and branch id at slot ``slots[i]`` and sees slot ``k`` iff
        ``first_slots[i] <= k <= slots[i]`` and slot ``k`` holds shared text or the row's own branch. Returns the
        float logits of the ``keep`` rows (None: the last, "all", or row indices), (R, V), or with ``greedy`` their
        argmax, (R,). ``length`` and any region bookkeeping are the caller's: only ``steps`` changes.

        The rows of one request are consecutive and share a first visible slot, and a request's new rows are the
        last slots it writes, so its text spans ``first .. its largest slot``: the pass attends over those spans
        only (:func:`request_spans`), not over the room between regions.
        """
        self._check_attention()
        rows = [list(token_ids), list(positions), list(slots), list(branch_ids), list(first_slots)]
        self._check_rows(*rows)
        keep = logits_to_keep(keep)
        self.arena.record_on_host(rows[2], rows[3])
        width = None if self._compiled is None else self.bucket(len(rows[0]))
        spans = request_spans(rows[2], rows[4])
        if width is None:
            out = self._exact_pass(rows, keep, greedy, spans)
        else:
            if self.attention == "flex":
                self.arena.tables.visit([(first, end) for _, _, first, end in spans])
            out = self._padded_pass(rows, width, keep, greedy)
        self.steps += 1
        return out

    def _check_rows(self, token_ids, positions, slots, branch_ids, first_slots) -> None:
        count = len(token_ids)
        if not count or any(len(r) != count for r in (positions, slots, branch_ids, first_slots)):
            raise ValueError(
                "a pass needs one or more rows, each with a token, a position, a slot, a branch id and a "
                "first visible slot"
            )
        if min(slots) < 0 or max(slots) >= self.capacity:
            raise ArenaFullError(f"slots {min(slots)}..{max(slots)} fall outside the KV arena of {self.capacity} slots")
        if len(set(slots)) != count:
            raise ValueError("two rows of one pass write the same slot")
        if any(not 0 <= first <= slot for first, slot in zip(first_slots, slots)):
            raise ValueError("a row's first visible slot must lie between 0 and its own slot")
        if PADDING in branch_ids:
            raise ValueError(f"branch id {PADDING} is reserved for padding rows")

    def _exact_pass(self, rows: list[list[int]], keep, greedy: bool, spans: list[tuple]) -> torch.Tensor:
        """The uncompiled pass at its exact size. With the model on this decoder's attention wrapper, each request's
        rows attend over its own span of slots only, under its own mask, so the cost follows each request's text,
        not the arena between them; else (another attention implementation) a dense mask over the slots up to the
        pass's largest row slot."""
        packed = torch.tensor(rows, device=self.device)  # (5, T)
        if not isinstance(keep, int):
            keep = torch.tensor(keep, device=self.device)  # (T',)
        by_request = self.model.config._attn_implementation == flex_name(self.base_attention)
        if by_request:
            spans = [
                (a, b, first, end, self.arena.span_layout(rows[2][a:b], rows[3][a:b], first, end))
                for a, b, first, end in spans
            ]
        visible = max(rows[2]) + 1  # the slots up to the pass's largest row slot
        spans_or_none = spans if by_request else None
        logits, tokens = self._pass(packed, keep, spans=spans_or_none, visible_slots=visible)  # (T', V), (T',)
        return tokens if greedy else logits

    def _padded_pass(self, rows: list[list[int]], width: int, keep, greedy: bool) -> torch.Tensor:
        """The compiled pass of bucket ``width``: the rows, then padding rows at the spare slot."""
        count, spare = len(rows[0]), self.arena.spare_slot
        pad = width - count
        padding = ([0] * pad, [0] * pad, [spare] * pad, [PADDING] * pad, [spare] * pad)
        packed = torch.tensor([r + p for r, p in zip(rows, padding)], device=self.device)  # (5, W)
        if self.use_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits, tokens = self._call_compiled(packed)  # (W, V), (W,): every row, padding included
        out = tokens if greedy else logits
        if keep == 1:
            out = out[count - 1 : count]
        elif keep == 0:
            out = out[:count]
        else:
            out = out[torch.tensor(keep, device=self.device)]
        if self.use_cuda_graphs:  # the graph's output buffers are overwritten by the next replay
            out = out.clone()
        return out

    @torch.inference_mode()
    def warm_up(self, buckets: tuple[int, ...] | None = None) -> None:
        """Compile (and on CUDA record) the pass of every bucket on padding rows, which change no real slot: each
        bucket is called :attr:`warm_up_calls` times, so no graph is compiled or recorded inside a timed step."""
        if self._compiled is None:
            return
        self._check_attention()
        spare = self.arena.spare_slot
        for width in buckets or self.buckets:
            packed = torch.tensor(
                [[0] * width, [0] * width, [spare] * width, [PADDING] * width, [spare] * width], device=self.device
            )  # (5, W)
            for _ in range(self.warm_up_calls):
                if self.use_cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                self._call_compiled(packed)


def request_spans(slots: list[int], first_slots: list[int]) -> list[tuple[int, int, int, int]]:
    """The requests of a pass, ``(row_start, row_end, first_slot, end_slot)`` each: runs of consecutive rows with one
    first visible slot, whose text spans ``first_slot .. end_slot - 1`` (its largest row slot)."""
    spans, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or first_slots[i] != first_slots[start]:
            spans.append((start, i, first_slots[start], max(slots[start:i]) + 1))
            start = i
    return spans


def _attention_choice(attention: str, buckets: tuple[int, ...]) -> str:
    """``attention`` as given to :class:`FastDecoder`, resolved to "flex" or "dense"."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}; got {attention!r}")
    if attention == "auto":
        attention = "flex" if flex.supported() and max(buckets) <= flex.BLOCK else "dense"
    if attention == "flex" and not flex.supported():
        raise ValueError(
            f"attention='flex' needs torch's FlexAttention with BlockMask.from_kv_blocks("
            f"seq_lengths=...); torch {torch.__version__} lacks it (use attention='dense')"
        )
    if attention == "flex" and max(buckets) > flex.BLOCK:
        raise ValueError(
            f"the flex pass takes at most {flex.BLOCK} query rows (one query block); got buckets {buckets}"
        )
    return attention


def _own_attention(model, base: str) -> None:
    """Switch ``model`` to the flex wrapper of its implementation ``base``, registered first."""
    if base not in FLEX_BASES:
        raise ValueError(
            f"the compiled flex pass wraps {' or '.join(FLEX_BASES)} attention; this model runs {base!r} "
            f"(use attention='dense' or compile=False)"
        )
    switch_attention(model, flex.register(model, base))


def isolates_recompiles() -> bool:
    """Whether this torch's ``torch.compile`` can keep one call's graphs apart (``isolate_recompiles``)."""
    return "isolate_recompiles" in inspect.signature(torch.compile).parameters


def _graph_limits(isolated: bool) -> dict[str, int]:
    """The dynamo limits a decoder's compiled calls run under (``torch._dynamo.config.patch``, for those calls only).

    A decoder compiles at most two graphs per bucket (``FastDecoder._compile_settings``), and that is its cap: with
    ``isolate_recompiles`` the ``recompile_limit`` of its own ``torch.compile``. Dynamo's process-wide safety cap,
    ``accumulated_recompile_limit``, counts the graphs of every decoder ever made on the same code (a run makes one,
    the tests many), so a decoder's calls lift it: no other decoder's graphs may refuse this one's. Older torch keeps
    one cache for all decoders of ``_pass`` (the module guards tell them apart), so there the per-function limit is
    lifted the same way, for these calls only."""
    config = torch._dynamo.config
    names = [] if isolated else ["recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"]
    if hasattr(config, "accumulated_recompile_limit"):
        names.append("accumulated_recompile_limit")
    return {name: sys.maxsize for name in names}


def prepare_fast_decoder(
    model,
    capacity: int | None = None,
    buckets: tuple[int, ...] = BUCKETS,
    warm_up: bool = False,
    compile: bool = True,
    attention: str = "auto",
) -> FastDecoder:
    """A fast decoder for ``model``: its arena (``capacity`` tokens, default the model's context length) and, with
    ``warm_up``, every bucket compiled now (``attention``: see :class:`FastDecoder`). The caller holds it and passes
    it on (``normal_decode(..., decoder=...)``, ``Engine(..., decoder=...)``): its graphs serve every answer it is
    given, and nothing else decides which arena a call uses."""
    decoder = FastDecoder(model, capacity or context_length(model), buckets, compile, attention)
    if warm_up:
        decoder.warm_up()
    return decoder
