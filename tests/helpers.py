"""Shared test fixtures: tiny configs and hand-made images/targets."""

from __future__ import annotations

import re
import subprocess

import torch

from sdetr.config import ExperimentConfig, load_config

# Smallest sensible settings: width 64, 2+2 layers, 20 queries (seconds per step on 2 cores).
MICRO = ["model.hidden_dim=64", "model.nheads=4", "model.dim_feedforward=128",
         "model.enc_layers=2", "model.dec_layers=2", "model.num_queries=20",
         "model.num_classes=24", "model.dropout=0.0"]


def micro_config(preset: str, *extra: str) -> ExperimentConfig:
    return load_config(preset, [*MICRO, *extra])


def build_micro(preset: str, *extra: str, seed: int = 0):
    """``sdetr.models.build`` of the micro config of ``preset`` (+ overrides), seeded."""
    from sdetr.models import build
    torch.manual_seed(seed)
    return build(micro_config(preset, *extra).model)


def refused_at_load(preset: str, override: str, key: str) -> None:
    """Assert that loading ``preset`` with ``override`` raises a ConfigError naming ``key``."""
    import pytest
    from sdetr.config import ConfigError
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(preset, [override])


def two_images(height: int = 64, width: int = 80) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Two fixed images with bright rectangles on noise, the second padded on the right."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, height, width, generator=gen) * 0.1
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[1, :, width - 16:] = True
    images[1, :, :, width - 16:] = 0
    boxes = [torch.tensor([[0.30, 0.35, 0.30, 0.40], [0.72, 0.70, 0.25, 0.30]]),
             torch.tensor([[0.50, 0.45, 0.50, 0.50]])]
    labels = [torch.tensor([3, 7]), torch.tensor([12])]
    valid_w = [width, width - 16]
    for i, (bxs, lbl) in enumerate(zip(boxes, labels)):
        for (cx, cy, w, h), c in zip(bxs.tolist(), lbl.tolist()):
            x0, x1 = int((cx - w / 2) * valid_w[i]), int((cx + w / 2) * valid_w[i])
            y0, y1 = int((cy - h / 2) * height), int((cy + h / 2) * height)
            images[i, c % 3, y0:y1, x0:x1] += 2.0
    targets = [{"labels": lbl, "boxes": bxs} for bxs, lbl in zip(boxes, labels)]
    return images, masks, targets


def assert_same_matching_outputs(a: dict, b: dict) -> None:
    """The one-to-one predictions (final and first aux layer) and the DAM loss of two forward
    outputs agree (the queries added in one of them did not leak into the others)."""
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a["aux_outputs"][0][key], b["aux_outputs"][0][key],
                                   rtol=1e-5, atol=1e-5)
    if "extra_losses" in b:
        torch.testing.assert_close(a["extra_losses"]["loss_dam"], b["extra_losses"]["loss_dam"],
                                   rtol=1e-5, atol=1e-6)


def stop_with_sigterm(proc: subprocess.Popen, wait_s: float = 120) -> str:
    """SIGTERM ``proc`` and return its output (text mode, stdout piped); SIGKILL it if it is
    still alive after ``wait_s`` seconds."""
    try:
        proc.terminate()
        out, _ = proc.communicate(timeout=wait_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out
