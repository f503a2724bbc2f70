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
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

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


class AspectGroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices drawn from ``sampler`` in its order, each batch made of
    images of one orientation (``landscape[i]``: width >= height), so a padded batch wastes
    less compute on padding (on the synthetic set at micro-batch 2, padding adds 9% to the
    pixels instead of 18%).

    Like detectron2's grouping: an index waits in its orientation's bucket until the bucket
    holds ``batch_size``. The leftovers at the end of the epoch (fewer than ``batch_size`` per
    bucket) are batched together in sampler order, so the number of batches is exactly that of
    plain batching: ``len(sampler) // batch_size`` with ``drop_last``, rounded up without.
    That keeps every rank at the same number of steps.
    """

    def __init__(self, sampler: Sampler[int], landscape: Sequence[bool], batch_size: int,
                 drop_last: bool) -> None:
        self.sampler, self.landscape = sampler, list(landscape)
        self.batch_size, self.drop_last = batch_size, drop_last

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        for position, index in enumerate(self.sampler):
            bucket = buckets[self.landscape[index]]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                yield [i for _, i in bucket]
                bucket.clear()
        leftovers = [i for _, i in sorted(buckets[True] + buckets[False])]
        for start in range(0, len(leftovers), self.batch_size):
            batch = leftovers[start:start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def build_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int,
                 num_workers: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, landscape: Sequence[bool] | None = None
                 ) -> DataLoader:
    """A DataLoader of padded :class:`~sdetr.data.DetectionBatch` es.

    Always sampled by a :class:`DistributedSampler` (``num_replicas=world_size``, ``rank``,
    ``shuffle``, ``seed``, ``drop_last``), also for one process, so the order is the same
    function of (seed, epoch) everywhere: call :func:`set_loader_epoch` before each epoch.
    ``drop_last`` applies to both the sampler (drop the tail that does not split evenly over
    ranks) and the loader (drop the last incomplete batch). With ``world_size > 1`` and
    ``drop_last=False`` the sampler repeats a few items so every rank gets as many; use a
    one-process loader (``world_size=1``) for evaluation.

    ``landscape`` (one bool per dataset item, see :func:`landscape_flags`) groups each batch
    by image orientation with :class:`AspectGroupedBatchSampler`; ``None`` batches in
    sampler order.

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
    common = dict(num_workers=num_workers, collate_fn=collate_detection,
                  worker_init_fn=seed_worker, generator=generator, persistent_workers=False)
    if landscape is not None:
        if len(landscape) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"landscape has {len(landscape)} flags for "
                             f"{len(dataset)} items")  # type: ignore[arg-type]
        batches = AspectGroupedBatchSampler(sampler, landscape, batch_size, drop_last)
        return DataLoader(dataset, batch_sampler=batches, **common)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      **common)


def landscape_flags(dataset: CocoDetection) -> list[bool]:
    """Per item of ``dataset``: is the image at least as wide as high (from the annotation
    file's ``width`` / ``height``, no image is opened)."""
    infos = (dataset.coco.imgs[i] for i in dataset.ids)
    return [info["width"] >= info["height"] for info in infos]


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler which epoch starts (reshuffles deterministically)."""
    sampler = getattr(loader.batch_sampler, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        raise TypeError("set_loader_epoch: the loader was not made by build_loader")
    sampler.set_epoch(epoch)
