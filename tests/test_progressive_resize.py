"""Progressive resizing (``data.early_scale`` / ``data.early_epochs``): the first epochs of a
run train at smaller scales, through the real loader and its worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdetr.config import ConfigError, load_config
from sdetr.data import EpochSchedule, generate_synthetic_coco
from sdetr.engine.data import aspect_ratios, build_dataset, build_loader, set_loader_epoch


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prog") / "ds"
    generate_synthetic_coco(out, num_train=8, num_val=2, seed=3)
    return out


def _config(root: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config("sparse_detr_tiny", [f"data.root={root}", "data.synthetic=false",
                                            "data.train_scales=[96]", "data.train_max_size=400",
                                            *extra])


def _short_sides(loader) -> list[int]:  # type: ignore[no-untyped-def]
    return [min(int(s) for s in t["size"]) for batch in loader for t in batch.targets]


def test_first_epochs_train_at_the_early_scales_then_the_train_scales(synth_root: Path) -> None:
    cfg = _config(synth_root, "data.train_scales=[96,128]", "data.early_scale=0.5",
                  "data.early_epochs=2")
    assert cfg.data.early_scales == [48, 64]
    assert cfg.data.scales_of_epoch(2) == [48, 64] and cfg.data.scales_of_epoch(3) == [96, 128]
    dataset = build_dataset(cfg.data, "train")
    assert isinstance(dataset.transforms, EpochSchedule)
    loader = build_loader(dataset, 4, shuffle=True, seed=0, num_workers=1,
                          aspect_ratios=aspect_ratios(dataset))
    seen = {}
    for epoch in (0, 1, 2, 3, 0):
        set_loader_epoch(loader, epoch)
        seen[epoch] = set(_short_sides(loader))
    assert seen[0] <= {48, 64} and seen[1] <= {48, 64} and seen[0] | seen[1] == {48, 64}
    assert seen[2] | seen[3] == {96, 128}


def test_off_by_default_and_eval_never_scheduled(synth_root: Path) -> None:
    cfg = _config(synth_root, "data.early_epochs=0")
    assert not isinstance(build_dataset(cfg.data, "train").transforms, EpochSchedule)
    scheduled = _config(synth_root, "data.early_scale=0.5", "data.early_epochs=1")
    assert not isinstance(build_dataset(scheduled.data, "val").transforms, EpochSchedule)


@pytest.mark.parametrize("overrides, culprit", [
    (["data.early_scale=0"], "data.early_scale"),
    (["data.early_scale=1.5", "data.early_epochs=1"], "data.early_scale"),
    (["data.early_epochs=-1"], "data.early_epochs"),
    (["data.early_scales=[192]"], "data.early_scales"),
])
def test_inconsistent_settings_are_refused_at_load(overrides: list[str], culprit: str) -> None:
    with pytest.raises(ConfigError, match=culprit) as info:
        load_config("sparse_detr_tiny", overrides)
    assert "\n" not in str(info.value)
