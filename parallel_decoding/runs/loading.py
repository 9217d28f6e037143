"""The model a run decodes with: its path, the device and dtype, the attention backend of each mode, loading it
(on one device, sharded by --tp or spread by --device_map), and the log's words for where it is."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from parallel_decoding.cli import UsageError, one_line

from . import distributed
from .comparison import BackendError
from .comparison import attention_backends as choose_attention_backends
from .distributed import DATA_PARALLEL, TENSOR_PARALLEL, Ranks

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


def choose_device(args, ranks: Ranks = Ranks()):
    """This rank's device (made its current CUDA device under --tp and --data_parallel) and the run's dtype."""
    import torch

    try:
        device = ranks.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    distributed.set_current_device(ranks, device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def attention_backends(attn_implementation: str, device, normal_stock_flash_attn: bool = False) -> dict:
    """Attention implementation per mode (runs.comparison.attention_backends); the project's Triton kernel is
    registered with transformers first when flash_attention_2 asks for it."""
    from parallel_decoding.decoding.attention import (
        KernelUnavailable, kernel_interpreter_enabled, register_branch_kernel,
    )

    try:
        branch_kernel = register_branch_kernel() if attn_implementation == "flash_attention_2" else None
        interpreter = kernel_interpreter_enabled() if branch_kernel is not None else False
        return choose_attention_backends(attn_implementation, branch_kernel, device, normal_stock_flash_attn,
                                         interpreter, importlib.util.find_spec("flash_attn") is not None)
    except (KernelUnavailable, BackendError) as e:
        raise UsageError(str(e)) from None


def load_model(args, model_path: str, attn_implementation: str, device, dtype, ranks: Ranks = Ranks()):
    """The model and its tokenizer: on `device`, sharded over the ranks (--tp) or spread by --device_map."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation, "trust_remote_code": args.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
        if ranks.mode == TENSOR_PARALLEL:
            config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
            distributed.check_heads_divide(config, ranks.world_size, model_path)
            kwargs.update(distributed.tensor_parallel_kwargs(ranks.world_size))
        elif args.device_map is not None:
            kwargs.update(distributed.device_map_kwargs(args.device_map, args.offload_folder))
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load model {model_path}: {one_line(e)}") from None
    if ranks.mode != TENSOR_PARALLEL and args.device_map is None:
        model.to(device)
    return model.eval(), tokenizer


def usable_context(model, max_new_tokens: int):
    """Longest prompt (tokens) that leaves room for max_new_tokens; None if the config states no limit."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
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

