"""Peak memory of an inference forward and of a training step.

Method (the same for both measurements, stated in every protocol):

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` — bytes handed
  out by PyTorch's caching allocator (tensors and cuDNN/cuBLAS workspaces; not the allocator's
  cached-but-free blocks nor the CUDA context). ``resident`` = ``memory_allocated()`` before
  the step (weights, buffers, inputs).
* CPU: the trace of the c10 CPU allocator recorded by ``torch.profiler`` with
  ``profile_memory=True``: every allocation and free in time order; the peak is the maximum of
  their running sum (bytes live at the peak that were allocated during the step, intermediates
  inside custom ops included). ``resident`` = bytes of the distinct storages of parameters,
  buffers and inputs. Memory that bypasses the c10 allocator (glibc arenas' slack, oneDNN or
  OpenMP scratch of its own) is not seen; RSS is not used (it never shrinks and is noisy).

``peak = resident + increment``. A training step is forward (train mode) + loss (Hungarian
matching included) + backward, with gradients None at the start (as after
``zero_grad(set_to_none=True)``); the optimizer's state is not included — an AdamW state would
add ``2 × 4 bytes`` per trainable parameter (reported as ``adamw_state_bytes``, an estimate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sdetr.profiling.inputs import ProfileInput

CUDA_METHOD = "torch.cuda.max_memory_allocated (caching-allocator bytes in use at the peak)"
CPU_METHOD = ("torch.profiler profile_memory allocator trace (peak of live c10 CPU allocations "
              "made during the step) + resident parameter/buffer/input storages")


@dataclass(frozen=True)
class MemoryStats:
    """Bytes: ``peak`` = ``resident`` (before the step) + ``increment`` (peak growth in the step)."""

    peak_bytes: int
    resident_bytes: int
    increment_bytes: int

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out.update(peak_mb=self.peak_bytes / 2**20, increment_mb=self.increment_bytes / 2**20)
        return out


def method(device: torch.device) -> str:
    return CUDA_METHOD if device.type == "cuda" else CPU_METHOD


def _storage_bytes(tensors: list[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def cpu_allocation_peak(fn: Callable[[], Any]) -> int:
    """Peak of live bytes allocated by the c10 CPU allocator while ``fn()`` runs (>= 0): the
    project's one implementation, :func:`sdetr.bench.memory.peak_allocated_bytes` (also used
    by ``sdetr bench kernels``)."""
    from sdetr.bench.memory import peak_allocated_bytes
    return peak_allocated_bytes(fn)


def peak_memory(fn: Callable[[], Any], device: torch.device, resident: list[Tensor]) -> MemoryStats:
    """Peak memory of ``fn()`` on ``device``; ``resident``: tensors alive before (CPU method)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return MemoryStats(peak_bytes=peak, resident_bytes=before, increment_bytes=peak - before)
    before = _storage_bytes(resident)
    increment = cpu_allocation_peak(fn)
    return MemoryStats(peak_bytes=before + increment, resident_bytes=before,
                       increment_bytes=increment)


def _model_tensors(model: nn.Module, inp: ProfileInput) -> list[Tensor]:
    return [*model.parameters(), *model.buffers(), inp.images, inp.masks]


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def inference_memory(model: nn.Module, inp: ProfileInput, device: torch.device, *,
                     warmup: int = 1) -> MemoryStats:
    """Peak memory of one ``model(images, masks)`` under ``torch.no_grad`` (mode set by caller)."""
    def forward() -> None:
        with torch.no_grad():
            model(inp.images, inp.masks)
    for _ in range(warmup):
        forward()
    return peak_memory(forward, device, _model_tensors(model, inp))


def train_step_memory(model: nn.Module, criterion: nn.Module, inp: ProfileInput,
                      targets: list[dict[str, Tensor]], device: torch.device, *,
                      warmup: int = 1) -> MemoryStats:
    """Peak memory of forward + ``criterion.total_loss(criterion(out, targets))`` + backward.

    The model must be in train mode (set by the caller); gradients are cleared before each step
    and after the measurement.
    """
    def step() -> None:
        losses = criterion(model(inp.images, inp.masks), targets)
        criterion.total_loss(losses).backward()
    for _ in range(warmup):
        _clear_grads(model)
        step()
    _clear_grads(model)
    try:
        return peak_memory(step, device, _model_tensors(model, inp))
    finally:
        _clear_grads(model)


def adamw_state_bytes(model: nn.Module, bytes_per_value: int = 4) -> int:
    """Estimated AdamW state (exp_avg + exp_avg_sq) of the trainable parameters."""
    return 2 * bytes_per_value * sum(p.numel() for p in model.parameters() if p.requires_grad)

