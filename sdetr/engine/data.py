"""Datasets and loaders of a run, built from a :class:`~sdetr.config.DataConfig`.

The only place in the engine that reads a ``DataConfig``. Split names ``"train"`` / ``"val"``
map to ``data.train_split`` / ``data.val_split`` (``train2017`` / ``val2017`` by default);
the folder layout is COCO 2017's::

    <root>/<split>/<file_name>              images
    <root>/annotations/instances_<split>.json
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sdetr.config import DataConfig
from sdetr.data import (CocoDetection, DatasetError, collate_detection, make_eval_transforms,
                        make_train_transforms, synth_main)

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]


def split_name(data: DataConfig, split: Split) -> str:
    """Folder name of ``split``: ``data.train_split`` or ``data.val_split``."""
    if split == "train":
        return data.train_split
    if split == "val":
        return data.val_split
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def split_paths(data: DataConfig, split: Split) -> tuple[Path, Path]:
    """(image folder, annotation file) of ``split`` under ``data.root``."""
    name = split_name(data, split)
    root = Path(data.root)
    return root / name, root / "annotations" / f"instances_{name}.json"


def ensure_dataset(data: DataConfig, *, splits: Sequence[Split] = ("train", "val")) -> Path:
    """Make sure the dataset of ``data`` is on disk; return its root.

    With ``data.synthetic`` the synthetic set (``synth_train`` / ``synth_val`` images, seed
    ``synth_seed``) is generated at ``data.root`` unless a synth output of the same parameters
    is already there (then it is reused; a different one raises DatasetError). Otherwise the
    COCO layout of ``splits`` is checked. Raises DatasetError naming the first missing path.

    Generation is not safe against two processes doing it at once: call this once before
    starting workers (or on rank 0 followed by a barrier).
    """
    root = Path(data.root)
    if data.synthetic:
        synth_main(str(root), data.synth_train, data.synth_val, data.synth_seed)
    for split in splits:
        img_dir, ann_file = split_paths(data, split)
        if not img_dir.is_dir():
            raise DatasetError(f"dataset image folder not found: {img_dir} "
                               f"(data.root={data.root}, split {split_name(data, split)})")
        if not ann_file.is_file():
            raise DatasetError(f"dataset annotation file not found: {ann_file} "
                               f"(data.root={data.root})")
    return root


def build_dataset(data: DataConfig, split: Split) -> CocoDetection:
    """The ``split`` dataset with the config's transforms (§1.2): train augmentation
    (``train_scales``, ``train_max_size``, ``crop_scales`` (empty = no crop branch),
    ``crop_min``, ``crop_max``) or the deterministic eval resize (``eval_size``,
    ``eval_max_size``)."""
    img_dir, ann_file = split_paths(data, split)
    if split == "train":
        transforms = make_train_transforms(data.train_scales, data.train_max_size,
                                           data.crop_scales or None, data.crop_min,
                                           data.crop_max)
    else:
        transforms = make_eval_transforms(data.eval_size, data.eval_max_size)
    return CocoDetection(img_dir, ann_file, transforms)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed
    (torch seeds each worker with the loader's base seed + worker id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int,
                 num_workers: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> DataLoader:
    """A DataLoader of padded :class:`~sdetr.data.DetectionBatch` es.

    Always sampled by a :class:`DistributedSampler` (``num_replicas=world_size``, ``rank``,
    ``shuffle``, ``seed``, ``drop_last``), also for one process, so the order is the same
    function of (seed, epoch) everywhere: call :func:`set_loader_epoch` (or
    ``loader.sampler.set_epoch``) before each epoch. ``drop_last`` applies to both the sampler
    (drop the tail that does not split evenly over ranks) and the loader (drop the last
    incomplete batch). With ``world_size > 1`` and ``drop_last=False`` the sampler repeats a
    few items so every rank gets as many; use a one-process loader (``world_size=1``) for
    evaluation.

    Augmentation randomness: workers are seeded from a generator seeded with ``seed + rank``
    (different per rank, reproducible); with ``num_workers=0`` the transforms draw from the
    global torch RNG of the calling process.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, collate_fn=collate_detection,
                      worker_init_fn=seed_worker, generator=generator,
                      persistent_workers=False)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler which epoch starts (reshuffles deterministically)."""
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler):
        raise TypeError("set_loader_epoch: the loader was not made by build_loader")
    sampler.set_epoch(epoch)
