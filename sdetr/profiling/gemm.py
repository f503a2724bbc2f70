"""Achieved fp32 GEMM rate of this machine, the denominator of a latency floor.

A model's latency **floor** is its fvcore GFLOPs divided by the rate the same process reaches
on large dense fp32 GEMMs with the same intra-op thread count: the time the model would take if
every counted multiply-add ran at GEMM speed and nothing else cost anything. ``latency / floor``
then measures everything that is not peak GEMM (memory-bound elementwise ops and norms, small
or skinny GEMMs, gathers, grid_sample, Python overhead).

Units follow the FLOPs convention of :mod:`sdetr.profiling` (fvcore, 1 multiply-add = 1 flop):
an (M, K) @ (K, N) product counts M·K·N, so the rates here are multiply-adds per second and are
HALF the usual "2·M·K·N" GFLOP/s of BLAS benchmarks (``ieee_gflop_per_s`` gives that too).

Two problems are timed, each the median of ``repeats`` runs after one warm-up:

* ``matmul``: ``torch.mm`` of two square n×n matrices for each n of ``sizes`` (1024, 2048):
  the best case of dense fp32 GEMM, the most optimistic rate, so the floor is a true lower bound.
  Its rate (the best over the sizes) is the one floors are computed with.
* ``conv``: a ResNet-50 layer3 3×3 convolution, 256 → 256 channels on a (1, 256, 54, 65) map
  (stride 16 of an 850×1040 image), through ``F.conv2d``: the GEMM-like work that dominates the
  backbone, as the backend actually runs it (oneDNN on CPU, cuDNN on GPU). Reported beside the
  matmul rate to show how far the real convolutions fall below it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

MATMUL_SIZES: tuple[int, ...] = (1024, 2048)
CONV_PROBLEM: tuple[int, int, int, int, int] = (256, 256, 54, 65, 3)
"""(C_in, C_out, H, W, kernel) of the conv problem (ResNet-50 layer3 at 850×1040)."""


@dataclass(frozen=True)
class GemmRate:
    """Achieved rates in GMAC/s (= fvcore GFLOP/s, 1 multiply-add = 1 flop).

    matmul_gmac_per_s: best over ``matmul_sizes`` of the median square-matmul rate; the floor
        rate. matmul_by_size: n → median rate of the n×n product.
    conv_gmac_per_s: median rate of the conv problem (:data:`CONV_PROBLEM`).
    threads: ``torch.get_num_threads()`` during the measurement; device: "cpu" / "cuda".
    """

    matmul_gmac_per_s: float
    matmul_by_size: dict[int, float]
    conv_gmac_per_s: float
    repeats: int
    threads: int
    device: str

    @property
    def ieee_gflop_per_s(self) -> float:
        """The matmul rate in the BLAS convention (2 flops per multiply-add)."""
        return 2.0 * self.matmul_gmac_per_s

    def floor_ms(self, gflops: float) -> float:
        """Latency floor (ms) of ``gflops`` fvcore GFLOPs at the matmul rate."""
        return 1e3 * gflops / self.matmul_gmac_per_s

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["matmul_by_size"] = {str(n): r for n, r in self.matmul_by_size.items()}
        out["ieee_gflop_per_s"] = self.ieee_gflop_per_s
        out["floor_rate"] = "matmul"
        return out


def _median_seconds(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def conv_macs(c_in: int, c_out: int, height: int, width: int, kernel: int) -> int:
    """Multiply-adds of a stride-1, 'same'-padded conv on a (1, c_in, height, width) map."""
    return c_in * c_out * kernel * kernel * height * width


@torch.no_grad()
def measure_gemm_rate(*, device: torch.device, repeats: int = 5,
                      sizes: tuple[int, ...] = MATMUL_SIZES, seed: int = 0) -> GemmRate:
    """Time the matmul and conv problems (module docstring) on ``device`` in fp32.

    ``repeats`` timed runs per problem after one warm-up; median reported. Uses the current
    ``torch.get_num_threads()``. Raises ValueError for repeats < 1 or no sizes.
    """
    if repeats < 1 or not sizes:
        raise ValueError(f"need repeats >= 1 and some sizes, got repeats={repeats}, sizes={sizes}")
    gen = torch.Generator().manual_seed(seed)
    by_size: dict[int, float] = {}
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device)
        b = torch.randn(n, n, generator=gen).to(device)
        by_size[n] = n ** 3 / _median_seconds(lambda: torch.mm(a, b), repeats, device) / 1e9
    c_in, c_out, height, width, kernel = CONV_PROBLEM
    x = torch.randn(1, c_in, height, width, generator=gen).to(device)
    w = torch.randn(c_out, c_in, kernel, kernel, generator=gen).to(device)
    conv_s = _median_seconds(lambda: F.conv2d(x, w, padding=kernel // 2), repeats, device)
    return GemmRate(matmul_gmac_per_s=max(by_size.values()), matmul_by_size=by_size,
                    conv_gmac_per_s=conv_macs(*CONV_PROBLEM) / conv_s / 1e9, repeats=repeats,
                    threads=torch.get_num_threads(), device=device.type)
