"""Process-group helpers: who am I, seeding, RNG state, small collectives.

The engine runs inside whatever launched it. Under Ray Train the process group already exists
(Ray sets MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK and initialises gloo or NCCL); a
plain process gets a one-rank gloo group from :func:`init_single_process_group`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank in [0, world_size), and its torch device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_single_process_group(backend: str = "gloo") -> None:
    """Initialise a one-rank process group on localhost (plain, non-Ray runs).

    Sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK in ``os.environ`` (DeepSpeed
    reads them). Raises RuntimeError if a process group already exists.
    """
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialised")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group(backend, rank=0, world_size=1)


def current_context(use_gpu: bool) -> DistContext:
    """Rank/world size of the initialised process group and the device to train on.

    ``use_gpu`` picks ``cuda:<LOCAL_RANK>``; it raises RuntimeError when CUDA is unavailable.
    """
    if not dist.is_initialized():
        raise RuntimeError("no torch.distributed process group: launch through "
                           "sdetr.engine.launch.run_training (or Ray Train)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu is true but CUDA is not available here")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and all CUDA devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU, and CUDA if present) RNG states of this process,
    made of tensors, tuples and numbers only (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                       int(has_gauss), float(cached)),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state from :func:`rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def barrier() -> None:
    """``dist.barrier()`` (gloo and NCCL alike)."""
    dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (pickled), in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """While inside, also write this process's INFO-and-above log records to ``path``
    (appended: a resumed run adds to its log)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a float tensor (a new tensor; the input is not modified)."""
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: its message with whitespace collapsed, else its type name."""
    return " ".join(str(exc).split()) or type(exc).__name__


class RankZeroError(RuntimeError):
    """Raised on the other ranks when work that only rank 0 does failed there."""


def run_on_main(ctx: DistContext, fn: Callable[[], T]) -> Optional[T]:
    """Run ``fn`` on rank 0 only, then let every rank know whether it worked (a collective).

    Rank 0 gets ``fn``'s result (or re-raises its exception); the other ranks get None, or
    :class:`RankZeroError` carrying rank 0's one-line message, instead of waiting for rank 0
    at the next collective forever.
    """
    result: Optional[T] = None
    error: Optional[BaseException] = None
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as exc:  # re-raised below, after telling the other ranks
            error = exc
    message = broadcast_object(None if error is None else one_line(error))
    if error is not None:
        raise error
    if message is not None:
        raise RankZeroError(f"rank 0 failed: {message}")
    return result
