"""Many answers on one KV arena: each request owns a contiguous region of slots, and one pass serves them all.

A region is what one answer's decoder was before batching: a length that grows as tokens are appended and that a
rewind, a merge or a crop sets back, all inside the region, so one request never moves another's slots. The pass
packs every request's new tokens into one sequence; each token carries its absolute slot, its position (counted
from its own region's start, as if the request were alone), its branch id and its region's first slot, and the
arena's mask admits a key only from the same region, not later than the query, and shared or of the query's own
branch (``FastDecoder.forward_packed``).

``SlotAllocator`` hands out regions first-fit from a sorted free list and merges a freed region with its free
neighbours, so the arena does not fragment into pieces too small for the next request.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .arena import ArenaFullError, FastDecoder
from .interface import SHARED, CacheRegion, Keep, PassRequest, logits_to_keep

__all__ = ["PassRequest", "Region", "RegionDecoder", "SlotAllocator"]


class SlotAllocator:
    """First-fit allocation of contiguous slot ranges in ``[0, capacity)``; freed ranges coalesce."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"an allocator needs at least 1 slot, got {capacity}")
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, size), sorted by start, never adjacent

    def allocate(self, size: int) -> int | None:
        """The start of a free range of ``size`` slots, or None while none is free."""
        if size < 1:
            raise ValueError(f"a region needs at least 1 slot, got {size}")
        for i, (start, free) in enumerate(self._free):
            if free >= size:
                self._free[i : i + 1] = [(start + size, free - size)] if free > size else []
                return start
        return None

    def free(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self._free, (start, 0))
        if (i > 0 and sum(self._free[i - 1]) > start) or (i < len(self._free) and start + size > self._free[i][0]):
            raise ValueError(f"slots {start}..{start + size - 1} are already free")
        self._free.insert(i, (start, size))
        if i + 1 < len(self._free) and start + size == self._free[i + 1][0]:  # merge with the next free range
            self._free[i : i + 2] = [(start, size + self._free[i + 1][1])]
        if i > 0 and sum(self._free[i - 1]) == start:  # and with the previous one
            self._free[i - 1 : i + 1] = [(self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])]

    @property
    def free_slots(self) -> int:
        return sum(size for _, size in self._free)

    @property
    def largest_free(self) -> int:
        return max((size for _, size in self._free), default=0)


@dataclass
class Region:
    """One request's slots ``[start, start + size)``; ``length`` of them hold its text."""

    start: int
    size: int
    length: int = 0
    steps: int = 0  # forward passes this request took part in

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a region of {self.length} tokens to {length}")
        self.length = length


class RegionDecoder:
    """Regions of one :class:`FastDecoder`'s arena, and the packed pass over them (a ``Runner``)."""

    max_batch_size: int | None = None  # as many answers as their regions allow

    def __init__(self, fast: FastDecoder):
        self.fast = fast
        self.allocator = SlotAllocator(fast.capacity)

    @property
    def capacity(self) -> int:
        return self.fast.capacity

    def allocate(self, size: int, what: str = "an answer") -> Region | None:
        """A free region of ``size`` slots, or None while none is free; an answer larger than the arena raises."""
        if size > self.capacity:
            raise ArenaFullError(f"{what} needs {size} KV slots but the arena holds {self.capacity}; make it larger")
        start = self.allocator.allocate(size)
        return None if start is None else Region(start, size)

    def release(self, region: CacheRegion) -> None:
        own = _own_region(region)
        self.allocator.free(own.start, own.size)

    @torch.inference_mode()
    def run(self, requests: list[PassRequest]) -> list[torch.Tensor]:
        """One pass over every request's new tokens; returns each request's result as ``decoder.forward`` would
        (the kept rows' float logits (T', V), or with ``greedy`` their argmax (T',))."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        branch_ids: list[int] = []
        first_slots: list[int] = []
        kept: list[list[int]] = []
        for request in requests:
            region, count = _own_region(request.region), len(request.token_ids)
            if region.length + count > region.size:
                raise ArenaFullError(
                    f"a region of {region.size} KV slots holds {region.length} tokens; appending {count} overflows it"
                )
            offset = len(token_ids)
            token_ids += request.token_ids
            positions += request.positions or list(range(region.length, region.length + count))
            slots += range(region.start + region.length, region.start + region.length + count)
            branch_ids += request.branch_ids or [SHARED] * count
            first_slots += [region.start] * count
            kept.append([offset + row for row in _kept_rows(request.keep, count)])
        rows = [row for request_rows in kept for row in request_rows]
        # One greedy pass hands back one token per kept row; if any request needs logits (sampling, a processor),
        # the pass returns the kept rows' logits and the greedy requests take their argmax, as the step would.
        greedy = all(request.greedy for request in requests)
        out = self.fast.forward_packed(token_ids, positions, slots, branch_ids, first_slots, keep=rows, greedy=greedy)
        if greedy:  # every request reads its tokens on the host: one copy (the pass's one sync), not one per request
            out = out.cpu()
        results, offset = [], 0  # out: (R,) tokens, or (R, V) logits
        for request, request_rows in zip(requests, kept):
            picked = out[offset : offset + len(request_rows)]
            results.append(picked.argmax(dim=-1) if request.greedy and not greedy else picked)
            offset += len(request_rows)
            region = _own_region(request.region)
            region.length += len(request.token_ids)
            region.steps += 1
        return results


def _own_region(region: CacheRegion) -> Region:
    if not isinstance(region, Region):
        raise TypeError(f"a RegionDecoder runs its own regions, not {type(region).__name__}")
    return region


def _kept_rows(keep: Keep, count: int) -> list[int]:
    kept = logits_to_keep(keep)
    if isinstance(kept, list):
        return kept
    return [count - 1] if kept == 1 else list(range(count))
