"""Parallel decoding of independent reasoning branches inside one sequence."""

from .branches import branch_mask, decode_branches, decode_branches_reference
from .engine import GenerationConfig, chat_prompt_ids, normal_decode, parallel_decode
from .skeleton import MarkerVocab, SkeletonLogitsProcessor, parse_skeleton

__all__ = [
    "GenerationConfig",
    "MarkerVocab",
    "SkeletonLogitsProcessor",
    "branch_mask",
    "chat_prompt_ids",
    "decode_branches",
    "decode_branches_reference",
    "normal_decode",
    "parallel_decode",
    "parse_skeleton",
]
