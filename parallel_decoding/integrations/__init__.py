"""Parallel decoding where other libraries decode: transformers' ``model.generate(..., custom_generate=...)``
(``transformers_generate``; the repository's ``custom_generate/`` directory is its Hub form)."""

from .transformers_generate import ParallelGenerateOutput, generate_from_arguments, parallel_generate

__all__ = ["ParallelGenerateOutput", "generate_from_arguments", "parallel_generate"]
