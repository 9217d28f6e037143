"""The fast path: a static KV arena (a transformers ``Cache`` subclass) and one compiled forward pass per bucket.

``KVArena`` holds every layer's keys and values in tensors allocated once, at a capacity, and written by slot
index. The slots a pass writes are in ``write_slots`` (set by the pass itself, read by each layer's ``update``),
so the same code serves transformers 5.17 (``cache.update(k, v, layer_idx)``) and 5.24 (which adds keyword
arguments). ``crop`` only sets a length. ``key_branch`` (on the device) is the branch id of every slot.

``FastDecoder`` has the interface of :class:`~parallel_decoding.decoders.EagerDecoder`. Each pass pads its query
rows up to a bucket (1, 2, 4, ... 64 rows) and runs one compiled function over the whole arena, whose shapes
depend on the bucket only, so nothing recompiles as the cache grows or from one row to the next:

- padding rows write to one spare slot past the capacity and carry the branch id ``PADDING``; the mask lets them
  see that slot alone, and no real row sees it, so padding changes nothing;
- the mask is built inside the compiled pass from ``key_branch`` and the query slots: a query sees the slots up to
  its own that hold shared text or its own branch. The mask spans the capacity, as the keys do (the uncompiled
  exact-size pass below sees the written slots only);
- the pass returns the rows' float logits and their argmax, so a greedy step takes its tokens inside the graph
  and reads back one id per row;
- on CUDA the compiled pass is captured as CUDA graphs (inductor's ``triton.cudagraphs``, what
  ``mode="reduce-overhead"`` sets), one per bucket; the arena tensors are marked as static addresses so the graphs
  write into them in place;
- each decoder's graphs are cached apart from other decoders' and, where torch allows that, without dynamo's
  guards on the model's modules, which cost most of the per-call guard check (``_compile_settings``).

A pass with more rows than the largest bucket (a long prefill, a merge) runs the same function uncompiled at its
exact size. ``warm_up()`` compiles every bucket on padding rows only, which write nothing but the spare slot.
(transformers guards the graphs on its registry of model classes built so far: building a model of a new class
after compiling recompiles each bucket once, which the graph limits leave room for; a run loads its one model
first.)
"""

from __future__ import annotations

import inspect
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .interface import SHARED, logits_to_keep
from .hf import cache_argument, context_length
from .attention import uses_branch_kernel

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # query rows per compiled pass
PADDING = -2  # branch id of padding rows


class ArenaFullError(ValueError):
    """The tokens of a row do not fit in the arena."""


class ArenaLayer(CacheLayerMixin):
    """One layer's keys and values, (1, H_kv, capacity + 1, D), written at the arena's ``write_slots``."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, arena: "KVArena", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.arena = arena
        self.keys, self.values = keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("KVArena layers are allocated by the arena, never lazily")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        slots = self.arena.write_slots[: key_states.shape[-2]]  # (T,)
        self.keys[:, :, slots] = key_states  # (1, H_kv, T, D) into (1, H_kv, C + 1, D)
        self.values[:, :, slots] = value_states
        visible = self.arena.visible_slots
        return self.keys[:, :, :visible], self.values[:, :, :visible]  # (1, H_kv, S, D)

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

    def __init__(self, model, capacity: int):
        if capacity < 1:
            raise ValueError(f"the KV arena needs a capacity of at least 1 token, got {capacity}")
        text = model.config.get_text_config()
        layer_types = getattr(text, "layer_types", None) or ["full_attention"]
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"the KV arena serves full-attention decoders only; this model has layers {sorted(set(layer_types))}")
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        device, dtype = model.device, model.dtype
        slots = capacity + 1  # the last slot is where padding rows write
        shape = (1, heads, slots, head_dim)  # (B, H_kv, C + 1, D)
        layers = [
            ArenaLayer(self, torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(text.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.capacity = capacity
        self.spare_slot = capacity
        self.length = 0
        self.write_slots = torch.zeros((slots,), dtype=torch.long, device=device)
        self.key_branch = torch.full((slots,), SHARED, dtype=torch.long, device=device)
        self.key_branch[self.spare_slot] = PADDING
        self.slot_index = torch.arange(slots, device=device)
        # Slots a pass attends over, S: all of them in a compiled pass (one shape for every length), only the
        # written ones in an uncompiled exact-size pass (a prefill or a merge need not scan the empty arena).
        self.visible_slots = slots
        for tensor in [self.write_slots, self.key_branch, *(t for layer in layers for t in (layer.keys, layer.values))]:
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs write into these in place

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """transformers' convention: keep ``max_length`` tokens, or drop ``-max_length`` if negative."""
        keep = self.length + max_length if max_length < 0 else max_length
        if not 0 <= keep <= self.length:
            raise ValueError(f"cannot crop a KV arena of {self.length} tokens to {keep}")
        self.length = keep

    def tree_mask(self, slots: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Record the queries' branch ids and return their additive mask over the visible slots, (1, 1, T, S).

        slots, branch: (T,). A query sees the slots up to its own holding shared text or its own branch; a
        padding query sees padding slots only (the spare slot).
        """
        self.key_branch[slots] = branch
        keys = self.key_branch[None, : self.visible_slots]  # (1, S)
        causal = self.slot_index[None, : self.visible_slots] <= slots[:, None]  # (T, S)
        own = keys == branch[:, None]
        shared = (keys == SHARED) & (branch[:, None] != PADDING)
        visible = causal & (own | shared)
        mask = torch.full(visible.shape, torch.finfo(dtype).min, dtype=dtype, device=slots.device)
        return mask.masked_fill(visible, 0.0)[None, None]  # (1, 1, T, S)


class FastDecoder:
    """Decoder over a :class:`KVArena` with a compiled pass per bucket; same interface as ``EagerDecoder``."""

    def __init__(self, model, capacity: int, buckets: tuple[int, ...] = BUCKETS, compile: bool = True):
        if uses_branch_kernel(model):
            raise ValueError("the fast path builds its own mask over the arena; use it with eager or sdpa attention")
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive row counts, got {buckets}")
        self.model = model
        self.device = model.device
        self.buckets = tuple(sorted(set(buckets)))
        self._cache_argument = cache_argument(model)  # looked up here: signature inspection does not trace
        with torch.inference_mode():
            self.arena = KVArena(model, capacity)
        self.use_cuda_graphs = compile and self.device.type == "cuda"
        self.attn_implementation = model.config._attn_implementation
        if compile:
            self._compiled = torch.compile(self._pass, dynamic=False, fullgraph=True, **self._compile_settings())
        else:
            self._compiled = self._pass
        self.steps = 0

    def _compile_settings(self) -> dict:
        """``torch.compile`` settings: one graph per bucket, CUDA graphs on CUDA, and the guards that matter.

        Dynamo checks every guard before every call, and for a stock transformers model most guards are on its
        modules (types, attributes, config): about 0.11 of 0.14 ms a call for 4 layers and 0.27 of 0.33 ms for 28
        (tiny Qwen2 configs, medians on the project's 2-core CPU). Where torch can keep this decoder's graphs apart
        from other decoders' (``isolate_recompiles``), the module guards go. That assumes the model is not changed
        in place while its decoder lives: the one setting the engine itself may change, the attention
        implementation, ``forward`` checks; a model moved to another device or dtype no longer fits its arena and
        fails there. Older torch shares one cache per function among all decoders, and there the module guards
        tell the models apart, so they stay.

        Each bucket may compile twice: transformers guards the graphs on its registry of model classes, so a model
        of a new class built after warm-up recompiles every bucket once.
        """
        graphs = 2 * len(self.buckets)
        options = {"triton.cudagraphs": True} if self.use_cuda_graphs else {}  # what mode="reduce-overhead" sets
        # Inductor's Python checks of its extern kernels' output sizes and strides run at every call (67 a pass
        # for the embedded model, 2.4 % of a parallel row's time); the tests hold the graphs to the eager path.
        options["size_asserts"] = False
        isolated = isolates_recompiles()
        _reserve_compiled_graphs(graphs, per_function=not isolated)
        if isolated:
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            return {"options": options, "isolate_recompiles": True, "recompile_limit": graphs}
        return {"options": options}

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    @property
    def length(self) -> int:
        return self.arena.length

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

    def _pass(self, packed: torch.Tensor, logits_to_keep: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass; packed (4, W): token ids, positions, slots, branch ids.

        Returns the kept rows' float logits (W', V) and their argmax (W',): a greedy step reads back the tokens
        alone, and on CUDA the argmax is part of the captured graph.
        """
        token_ids, positions, slots, branch = packed  # each (W,)
        self.arena.write_slots[: slots.shape[0]] = slots
        mask = self.arena.tree_mask(slots, branch, self.model.dtype)  # (1, 1, W, S)
        out = self.model(
            input_ids=token_ids[None],  # (1, W)
            position_ids=positions[None],  # (1, W)
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_argument: self.arena},
        )
        logits = out.logits[0].float()  # (W', V)
        return logits, logits.argmax(dim=-1)

    @torch.inference_mode()
    def forward(
        self, token_ids: list[int], positions: list[int] | None = None, branch_ids: list[int] | None = None, keep=None,
        greedy: bool = False,
    ):
        """As ``EagerDecoder.forward``: the float logits of the ``keep`` rows (T', V), or with ``greedy`` their argmax (T',)."""
        if self.model.config._attn_implementation != self.attn_implementation:
            raise ValueError(
                f"the model's attention implementation changed from {self.attn_implementation!r} to "
                f"{self.model.config._attn_implementation!r} after its fast decoder was made; make a new one with "
                f"prepare_fast_decoder(model)"
            )
        start, count = self.arena.length, len(token_ids)
        if start + count > self.capacity:
            raise ArenaFullError(f"the KV arena holds {self.capacity} tokens; appending {count} after {start} overflows it")
        if positions is None:
            positions = list(range(start, start + count))
        if branch_ids is None:
            branch_ids = [SHARED] * count
        keep = logits_to_keep(keep)
        width = self.bucket(count)
        pad = 0 if width is None else width - count
        packed = torch.tensor(
            [
                list(token_ids) + [0] * pad,
                list(positions) + [0] * pad,
                list(range(start, start + count)) + [self.arena.spare_slot] * pad,
                list(branch_ids) + [PADDING] * pad,
            ],
            device=self.device,
        )  # (4, W)
        if width is None:  # more rows than the largest bucket: the same pass, uncompiled, at its exact size
            keep = torch.tensor(keep, device=self.device) if not isinstance(keep, int) else keep
            self.arena.visible_slots = start + count
            try:
                logits, tokens = self._pass(packed, keep)
            finally:
                self.arena.visible_slots = self.arena.capacity + 1
            out = tokens if greedy else logits
        else:
            if self.use_cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits, tokens = self._compiled(packed)  # (W, V), (W,): every row, padding included
            out = tokens if greedy else logits
            if keep == 1:
                out = out[count - 1 : count]
            elif keep == 0:
                out = out[:count]
            else:
                out = out[torch.tensor(keep, device=self.device)]
            if self.use_cuda_graphs:  # the graph's output buffers are overwritten by the next replay
                out = out.clone()
        self.arena.length += count
        self.steps += 1
        return out

    @torch.inference_mode()
    def warm_up(self, buckets: tuple[int, ...] | None = None) -> None:
        """Compile (and on CUDA capture) the pass of every bucket on padding rows, which change no real slot."""
        for width in buckets or self.buckets:
            packed = torch.tensor(
                [[0] * width, [0] * width, [self.arena.spare_slot] * width, [PADDING] * width], device=self.device
            )  # (4, W)
            if self.use_cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            self._compiled(packed)


def isolates_recompiles() -> bool:
    """Whether this torch's ``torch.compile`` can keep one call's graphs apart (``isolate_recompiles``)."""
    return "isolate_recompiles" in inspect.signature(torch.compile).parameters


_compiled_graphs = 0


def _reserve_compiled_graphs(count: int, per_function: bool) -> None:
    """Raise dynamo's limits so every graph of every fast decoder is kept: the process-wide count, and with
    ``per_function`` (decoders sharing one cache for ``_pass``) the per-function one."""
    global _compiled_graphs
    _compiled_graphs += count
    config = torch._dynamo.config
    if per_function:
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), _compiled_graphs))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, _compiled_graphs)


_fast_decoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fast_decoder(model) -> FastDecoder:
    """The model's fast decoder: one arena per model, made on first use (at the model's context length) and kept,
    so the compiled graphs are reused from one answer to the next. :func:`prepare_fast_decoder` sizes it."""
    kept = _fast_decoders.get(model)
    return kept if kept is not None else prepare_fast_decoder(model)


def prepare_fast_decoder(
    model, capacity: int | None = None, buckets: tuple[int, ...] = BUCKETS, warm_up: bool = False, compile: bool = True
) -> FastDecoder:
    """Allocate the model's arena (``capacity`` tokens, default its context length), keep it as the model's fast
    decoder, and with ``warm_up`` compile every bucket now."""
    decoder = FastDecoder(model, capacity or context_length(model), buckets, compile)
    _fast_decoders[model] = decoder
    if warm_up:
        decoder.warm_up()
    return decoder
