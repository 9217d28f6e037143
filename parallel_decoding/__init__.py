"""Parallel decoding of independent reasoning branches inside one sequence.

The public API. Names are imported on first use (PEP 562), so the parts without torch (tasks, evaluation) load
without it. docs/architecture.md maps the folders: ``engine`` (the method), ``decoding`` (one forward pass),
``runs`` (what generate.py drives), ``evaluation`` (eval.py), ``tasks`` (datasets and prompts), ``bench``;
``ServedEngine`` (``served_engine``) runs the method on vLLM or an OpenAI-compatible server.
"""

import importlib

_EXPORTS = {
    "Engine": "engine.batch",
    "ServedEngine": "served_engine",
    "GenerationConfig": "engine.decode",
    "chat_prompt_ids": "engine.decode",
    "normal_decode": "engine.decode",
    "parallel_decode": "engine.decode",
    "decode_branches": "engine.branches",
    "MarkerVocab": "engine.skeleton",
    "SkeletonLogitsProcessor": "engine.skeleton",
    "parse_skeleton": "engine.skeleton",
    "branch_mask": "decoding.interface",
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
