"""Parallel decoding of independent reasoning branches inside one sequence.

Names are imported on first use (PEP 562), so the CPU-only parts (metrics, tasks, eval) load without torch.
"""

import importlib

_EXPORTS = {
    "GenerationConfig": "engine",
    "chat_prompt_ids": "engine",
    "normal_decode": "engine",
    "parallel_decode": "engine",
    "branch_mask": "branches",
    "decode_branches": "branches",
    "decode_branches_reference": "branches",
    "MarkerVocab": "skeleton",
    "SkeletonLogitsProcessor": "skeleton",
    "parse_skeleton": "skeleton",
    "build_prompt": "tasks",
    "load_dataset": "tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parallel_decoding' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
