"""Decoding beyond one device: tensor parallel, data parallel and a device map.

- **Tensor parallel** (``torchrun --nproc_per_node N generate.py --tp``): transformers shards one model over all N
  ranks (``tp_plan="auto"``: attention heads and MLP columns split, the logits gathered on every rank). Every rank
  runs every forward pass, so every rank decodes every row in lockstep; the logits, hence the tokens, are the same
  on all ranks. Rank 0 alone writes files and logs.
- **Data parallel** (``torchrun --nproc_per_node N generate.py --data_parallel``): a full model per rank; rank ``r``
  decodes pending rows ``r, r + N, ...``. Ranks only meet to agree on the work at the start and to wait for each
  other at the end (both on a gloo group, which has no watchdog trouble with long waits).
- **Device map** (one process, ``--device_map auto``): accelerate places the layers over the visible GPUs, then the
  CPU, then disk; its hooks move every forward argument (4D mask, positions, branch ids) to each layer's device.

Everything here is a no-op in a plain single-process run: ``Ranks()`` is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

SINGLE, TENSOR_PARALLEL, DATA_PARALLEL = "single", "tp", "dp"
# A data-parallel rank that finishes its share waits at the final barrier for the slowest rank, which on a big
# dataset can be hours; the process group's timeout bounds that wait (torch's default of 30 minutes is too short).
GROUP_TIMEOUT = timedelta(days=7)


class DistributedError(Exception):
    """A distributed setup that cannot work (missing launcher, bad combination, head counts): one line."""


class ControlGroup:
    """The gloo group the ranks agree on and wait over, held so that :func:`stop` can free it.

    A gloo group's worker threads drop the tensors of a finished collective on their own, which takes the GIL.
    If the process exits first (a rank that only reports an error returns right after its last collective), a
    worker that reaches the GIL while the interpreter is finalizing is stopped inside C++ and the rank dies with
    SIGABRT. Destroying the group joins its workers, so :meth:`close` frees it while the interpreter still runs.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self._group: dist.ProcessGroup | None = group

    @property
    def group(self) -> dist.ProcessGroup:
        if self._group is None:
            raise RuntimeError("the control group was closed (distributed.stop)")
        return self._group

    def close(self) -> None:
        """Tear the group down; dropping the last reference destroys it, joining its worker threads."""
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank among ``world_size`` processes launched together, and the run's mode."""

    mode: str = SINGLE
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # A gloo group over all ranks for small Python objects and long waits, whatever backend the model uses.
    control: ControlGroup | None = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        """The process that writes the results file and the log (tensor parallel) and merges shards (data parallel)."""
        return self.rank == 0

    @property
    def control_group(self) -> dist.ProcessGroup:
        """The gloo group of a multi-process run (a plain run has none: it never exchanges anything)."""
        if self.control is None:
            raise RuntimeError("a single-process run has no control group")
        return self.control.group

    def share(self, items: list) -> list:
        """This rank's part of ``items``: all of them unless data parallel, else every ``world_size``-th one."""
        return items[self.rank :: self.world_size] if self.mode == DATA_PARALLEL else list(items)

    def device(self, requested: str | None) -> torch.device:
        """``cuda:LOCAL_RANK`` per rank when CUDA is there (and no other device was asked for), else the CPU."""
        if self.mode != SINGLE and requested is None and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def set_current_device(ranks: Ranks, device: torch.device) -> None:
    """Make a rank's CUDA device (``cuda:LOCAL_RANK``) its current one, under --tp and --data_parallel alike.

    Code that names no index (``torch.cuda.synchronize()``, the allocator, CUDA graphs, kernels launched on the
    current stream) uses the current device, which is ``cuda:0`` in every process until one is set; without this
    every rank but 0 would also touch GPU 0. Nothing for a plain run, a CPU, or a device without an index.
    """
    if ranks.mode != SINGLE and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def start(mode: str) -> Ranks:
    """Join the process group torchrun set up (``mode`` tensor or data parallel); ``Ranks()`` for a plain run.

    A data-parallel run without torchrun is a plain run (one rank, all rows): that is how a run is resumed on one
    process. Tensor parallel without torchrun is an error, since there is nothing to shard over.
    """
    if mode == SINGLE or not launched_by_torchrun():
        if mode == TENSOR_PARALLEL:
            raise DistributedError(
                "--tp shards the model over the processes torchrun starts: "
                "run `torchrun --nproc_per_node N generate.py --tp ...`"
            )
        return Ranks()
    rank, local_rank, world_size = (int(os.environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and mode == TENSOR_PARALLEL  # data-parallel ranks never exchange tensors
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            device_id=torch.device("cuda", local_rank) if use_cuda else None,
            timeout=GROUP_TIMEOUT,
        )
    control = ControlGroup(dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT))  # every rank, at the same point
    ranks = Ranks(mode, rank, local_rank, world_size, control)
    if not ranks.is_main:  # one log per run: rank 0's (transformers' warnings and progress bars included)
        import warnings

        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
    if mode == DATA_PARALLEL and not torch.cuda.is_available():
        # N full models on one CPU: each rank gets its part of the cores instead of all ranks fighting over all of them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return ranks


def stop(ranks: Ranks) -> None:
    """Free every process group before the interpreter exits (:class:`ControlGroup` says why)."""
    if ranks.control is not None:
        ranks.control.close()
    if ranks.mode != SINGLE and dist.is_initialized():
        dist.destroy_process_group()


def from_main(ranks: Ranks, value=None):
    """Rank 0's ``value`` on every rank (picklable objects), so that all ranks act on one decision."""
    if ranks.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=ranks.control_group)
    return box[0]


def first_error(ranks: Ranks, error: str | None) -> str | None:
    """The first rank's error (None if no rank has one), on every rank: bad input stops all ranks, not only the
    ones that saw it. Called by every rank at the same point."""
    if ranks.world_size == 1:
        return error
    errors = [None] * ranks.world_size
    dist.all_gather_object(errors, error, group=ranks.control_group)
    for rank, message in enumerate(errors):
        if message is not None:
            return message if rank == 0 else f"rank {rank}: {message}"
    return None


def wait_for_all(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier(group=ranks.control_group)


# --- tensor parallel --------------------------------------------------------------------------------------------


def check_heads_divide(config, world_size: int, model_path: str) -> None:
    """Tensor parallel gives every rank an equal share of the query and key/value heads."""
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    for name, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if count is not None and count % world_size:
            raise DistributedError(
                f"--tp over {world_size} processes: {model_path} has {name}={count}, which "
                f"{world_size} does not divide; use a --nproc_per_node that divides {count}"
            )


def tensor_parallel_kwargs(world_size: int) -> dict:
    """``from_pretrained`` arguments for the model's own tensor-parallel plan over all ranks."""
    try:  # transformers >= 5.18 wants the plan in a DistributedConfig (a bare tp_plan= still works, with a warning)
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=world_size)}


# --- device map -------------------------------------------------------------------------------------------------


def device_map_kwargs(device_map, offload_folder: str | None) -> dict:
    """``from_pretrained`` arguments that spread the model over devices with accelerate (``"auto"`` or an explicit
    ``{module name: device}``; ``"disk"`` entries are written to ``offload_folder``)."""
    kwargs = {"device_map": device_map}
    if offload_folder is not None:
        kwargs["offload_folder"] = offload_folder
    return kwargs
