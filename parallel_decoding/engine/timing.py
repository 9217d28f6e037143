"""Wall-clock time per stage of an answer, read after the model's devices (and tensor-parallel ranks) are done."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def _mesh_group(model):
    """The process group a tensor-parallel model's parameters are sharded over; None for an unsharded model."""
    from torch.distributed.tensor import DTensor

    for param in model.parameters():
        if isinstance(param, DTensor):
            return param.device_mesh.get_group()
    return None


def model_devices(model) -> list[torch.device]:
    """Every device that holds some of the model's weights (several under a device map); meta = offloaded."""
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    return sorted((d for d in devices if d.type != "meta"), key=str)


def timing_sync(model):
    """What a stage timer must wait for before reading the clock: every CUDA device of the model and, for a
    tensor-parallel model, every rank (a barrier), so a stage's time on rank 0 covers the slowest rank."""
    cuda_devices = [d for d in model_devices(model) if d.type == "cuda"]
    group = _mesh_group(model) if dist.is_available() and dist.is_initialized() else None

    def sync() -> None:
        for device in cuda_devices:
            torch.cuda.synchronize(device)
        if group is not None:
            dist.barrier(group=group)

    return sync


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall-clock time per stage, read after ``sync`` so device work is counted where it ran.

    ``StageTimer.for_model(model)`` waits for every CUDA device the model is on and, for a tensor-parallel model,
    for every rank (see :func:`timing_sync`). ``lap(stage)`` adds the time since the previous lap (or the
    start) to ``stage``: a stage can be named after its work is done, as when a sequential segment turns out to
    have been a skeleton.
    """

    def __init__(self, sync=lambda: None):
        self.sync = sync
        self.totals: dict[str, float] = {}
        sync()
        self._last = time.perf_counter()

    @classmethod
    def for_model(cls, model) -> StageTimer:
        return cls(timing_sync(model))

    def lap(self, stage: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[stage] = self.totals.get(stage, 0.0) + now - self._last
        self._last = now

    def get(self, stage: str) -> float:
        return self.totals.get(stage, 0.0)

    @property
    def total(self) -> float:
        return sum(self.totals.values())
