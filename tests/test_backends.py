"""The attention-backend registry and the one visibility rule every backend applies (decoding.backends)."""

from __future__ import annotations

import pytest
import torch

from parallel_decoding.decoding.backend import TreeRows
from parallel_decoding.decoding.backends import (
    ATTN_IMPLEMENTATIONS,
    BACKENDS,
    arena_choices,
    attn_implementation,
    backend,
    eager_backend,
)
from parallel_decoding.decoding.dense import PADDING
from parallel_decoding.decoding.visibility import SHARED, sees


def test_the_registry_holds_the_four_backends_each_for_its_decoder():
    assert {name: b.decoder for name, b in BACKENDS.items()} == {
        "mask": "eager",
        "branch_attention": "eager",
        "dense": "arena",
        "flex": "arena",
    }
    assert arena_choices() == ("flex", "dense")
    assert eager_backend("sdpa").name == "mask" and eager_backend("branch_attention").name == "branch_attention"
    assert (
        backend("flex").implementation("sdpa") == "arena_flex_sdpa"
        and backend("dense").implementation("eager") == "eager"
    )
    with pytest.raises(ValueError, match="no attention backend 'paged'; the registered ones are mask, "):
        backend("paged")


def test_the_kernel_has_its_own_name_and_keeps_the_reference_spelling_as_an_alias():
    assert ATTN_IMPLEMENTATIONS == ("sdpa", "eager", "branch_attention")
    assert attn_implementation("flash_attention_2") == attn_implementation("branch_attention") == "branch_attention"
    with pytest.raises(ValueError, match="one of sdpa, eager, branch_attention, flash_attention_2; got 'flash'"):
        attn_implementation("flash")


def _rows(branch_ids: list[int], queries: int) -> TreeRows:
    """The last ``queries`` of the keys ``branch_ids`` as query rows of one answer (first visible slot 0)."""
    keys = torch.tensor(branch_ids)
    slots = torch.arange(len(branch_ids) - queries, len(branch_ids))
    return TreeRows(slots, keys[-queries:], torch.zeros(queries, dtype=torch.long), keys, torch.float32)


def test_every_mask_builder_applies_the_one_rule():
    """The eager mask and the dense mask over a tree of ragged branches are both ``sees``; the kernel's backend
    passes the branch ids the kernel applies it to (tests/test_flash_kernel.py holds the kernel to ``sees``)."""
    branch_ids = [SHARED] * 4 + [0, 0, 1, 2, 1, 0, 2, 2]
    rows = _rows(branch_ids, 5)
    keys = torch.arange(len(branch_ids))
    expected = sees(rows.slots[:, None], rows.branch[:, None], keys[None, :], rows.key_branch[None, :])  # (T, K)
    for name in ("mask", "dense"):
        mask = BACKENDS[name].arguments(rows)["attention_mask"]  # (1, 1, T, K)
        assert torch.equal(mask[0, 0] == 0, expected), name
    kernel = BACKENDS["branch_attention"].arguments(rows)
    assert torch.equal(kernel["q_branch"], rows.branch) and torch.equal(kernel["k_branch"], rows.key_branch)


def test_the_dense_mask_keeps_requests_apart_and_padding_alone():
    """Two requests in regions [0, 4) and [4, 8), then a padding row at the spare slot 8."""
    key_branch = torch.tensor([SHARED, SHARED, 0, 1, SHARED, SHARED, 0, 0, PADDING])
    slots, branch, first = torch.tensor([3, 7, 8]), torch.tensor([1, 0, PADDING]), torch.tensor([0, 4, 8])
    mask = BACKENDS["dense"].arguments(TreeRows(slots, branch, first, key_branch, torch.float32))["attention_mask"]
    assert (mask[0, 0] == 0).int().tolist() == [
        [1, 1, 0, 1, 0, 0, 0, 0, 0],  # request 1, branch 1: its shared prefix and itself
        [0, 0, 0, 0, 1, 1, 1, 1, 0],  # request 2, branch 0: its own region only
        [0, 0, 0, 0, 0, 0, 0, 0, 1],  # padding: the spare slot alone
    ]
