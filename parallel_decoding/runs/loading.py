"""The model a run decodes with: its path, the device and dtype, the attention implementation of each mode, loading it
(on one device, sharded by --tp or spread by --device_map), and the log's words for where it is."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from parallel_decoding.cli import UsageError, one_line

from . import distributed
from .comparison import AttentionChoiceError, asks_for_branch_kernel
from .comparison import attention_per_mode as choose_attention_per_mode
from .distributed import DATA_PARALLEL, TENSOR_PARALLEL, Ranks

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_PATH = REPO_ROOT / "models" / "tiny-qwen2-retrieval"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name": left to from_pretrained, not checked on disk


def resolve_model_path(model_path) -> str:
    """A local directory, or a hub id (org/name) when no such local path exists; anything else is an error."""
    if model_path is None:
        if not DEFAULT_MODEL_PATH.is_dir():
            raise UsageError(f"the embedded default model {DEFAULT_MODEL_PATH} is missing; pass --model_path")
        return str(DEFAULT_MODEL_PATH)
    if os.path.isdir(model_path):
        missing = missing_model_files(Path(model_path))
        if missing:
            raise UsageError(f"--model_path {model_path} is not a model directory: {', '.join(missing)}")
        return model_path
    if os.path.exists(model_path):
        raise UsageError(f"--model_path {model_path} is a file, not a model directory")
    if HUB_ID.match(model_path) and not model_path.startswith("."):
        return model_path
    raise UsageError(f"--model_path {model_path} does not exist")


def missing_model_files(directory: Path) -> list:
    """What from_pretrained needs and `directory` lacks: the config, tokenizer files, weights."""
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("no config.json")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES) and not any(directory.glob("*.tiktoken")):
        missing.append(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("pytorch_model*.bin")):
        missing.append("no weights (*.safetensors or pytorch_model*.bin)")
    return missing


def choose_device(args: argparse.Namespace, ranks: Ranks | None = None) -> tuple[torch.device, torch.dtype]:
    """:func:`pick_device` from the flags (--device, --dtype)."""
    return pick_device(args.device, args.dtype, ranks)


def pick_device(
    device: str | None = None, dtype: str | None = None, ranks: Ranks | None = None
) -> tuple[torch.device, torch.dtype]:
    """This rank's device (made its current CUDA device under --tp and --data_parallel) and the run's dtype
    (``dtype`` by its torch name; default bfloat16 on CUDA, float32 elsewhere). A plain signature: the server
    and the Python API call it with keywords, generate.py through :func:`choose_device`."""
    import torch

    ranks = ranks if ranks is not None else Ranks()
    try:
        chosen = ranks.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device}: {e}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    distributed.set_current_device(ranks, chosen)
    return chosen, getattr(torch, dtype) if dtype else (torch.bfloat16 if chosen.type == "cuda" else torch.float32)


def attention_per_mode(attn_implementation: str, device, normal_stock_flash_attn: bool = False) -> dict:
    """Attention implementation per mode (runs.comparison.attention_per_mode); the project's Triton kernel is
    registered with transformers first when flash_attention_2 asks for it."""
    from parallel_decoding.decoding.attention import (
        KernelUnavailable,
        kernel_interpreter_enabled,
        register_branch_kernel,
    )

    try:
        asks = asks_for_branch_kernel(attn_implementation)
        branch_kernel = register_branch_kernel() if asks else None
        interpreter = kernel_interpreter_enabled() if branch_kernel is not None else False
        return choose_attention_per_mode(
            attn_implementation,
            branch_kernel,
            device,
            normal_stock_flash_attn,
            interpreter,
            importlib.util.find_spec("flash_attn") is not None,
        )
    except (KernelUnavailable, AttentionChoiceError) as e:
        raise UsageError(str(e)) from None


def load_model(
    args: argparse.Namespace,
    model_path: str,
    attn_implementation: str,
    device: torch.device,
    dtype: torch.dtype,
    ranks: Ranks | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_pretrained` from the flags (--device_map, --offload_folder, --trust_remote_code)."""
    return load_pretrained(
        model_path,
        attn_implementation,
        device,
        dtype,
        ranks=ranks,
        device_map=args.device_map,
        offload_folder=args.offload_folder,
        trust_remote_code=args.trust_remote_code,
    )


def load_pretrained(
    model_path: str,
    attn_implementation: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    ranks: Ranks | None = None,
    device_map: str | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and its tokenizer: on ``device``, sharded over the ranks (--tp) or spread by ``device_map``. A plain
    signature: the server and the Python API call it with keywords, generate.py through :func:`load_model`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ranks = ranks if ranks is not None else Ranks()
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if ranks.mode == TENSOR_PARALLEL:
            config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            distributed.check_heads_divide(config, ranks.world_size, model_path)
            kwargs.update(distributed.tensor_parallel_kwargs(ranks.world_size))
        elif device_map is not None:
            kwargs.update(distributed.device_map_kwargs(device_map, offload_folder))
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load model {model_path}: {one_line(e)}") from None
    if ranks.mode != TENSOR_PARALLEL and device_map is None:
        torch.nn.Module.to(model, device)  # (transformers' typing of its own `to` takes no device)
    return model.eval(), tokenizer


def usable_context(model, max_new_tokens: int):
    """Longest prompt (tokens) that leaves room for max_new_tokens; None if the config states no limit. ``model``:
    the model, or its config alone (a serving engine's run loads no weights here)."""
    config = getattr(model, "config", model)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    return None if limit is None else limit - max_new_tokens


def describe_placement(args, ranks: Ranks, model, device) -> str:
    """Where the model is, for the log: one device, sharded, copied per rank, or spread by --device_map."""
    if ranks.mode == TENSOR_PARALLEL:
        return f"sharded over {ranks.world_size} processes (tensor parallel, {device.type})"
    if ranks.mode == DATA_PARALLEL:
        return f"copied to each of {ranks.world_size} processes (data parallel, {device.type})"
    if args.device_map is not None:
        placed = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()})
        return f"spread by --device_map over {', '.join(placed) or model.device}"
    return f"on {device}"
