"""The MVTec folder layout on the bundled real images: scanning, the split, masks, fingerprint, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    data_fingerprint,
    load_images,
    load_mask,
    load_test_set,
    penalty_image_paths,
    scan_category,
    split_validation,
)
from training.images import DataError


def test_scan_cookie_lists_train_test_and_masks(cookie_dir: Path) -> None:
    category = scan_category(cookie_dir)
    assert len(category.train_images) == 10
    assert all(path.parent == cookie_dir / "train" / "good" for path in category.train_images)
    by_name = {sample.path.name: sample for sample in category.test_samples}
    assert len(by_name) == 10
    assert sum(sample.defect == "good" for sample in by_name.values()) == 4
    assert (
        by_name["anomaly-10.jpg"].mask_path == cookie_dir / "ground_truth" / "anomaly" / "anomaly-10_mask.png"
    )
    assert by_name["test-anomaly-1.jpg"].mask_path is None  # image-level metrics only
    assert by_name["test-normal-1.jpg"].mask_path is None and not by_name["test-normal-1.jpg"].is_anomalous


def test_validation_split_is_seeded_from_train_good_only(cookie_dir: Path) -> None:
    category = scan_category(cookie_dir)
    training, validation = split_validation(category.train_images, 0.1, seed=0)
    assert len(validation) == 1 and len(training) == 9
    assert set(training) | set(validation) == set(category.train_images)
    assert not set(training) & set(validation)
    test_paths = {sample.path for sample in category.test_samples}
    assert not set(validation) & test_paths
    assert split_validation(category.train_images, 0.1, seed=0) == (training, validation)
    chosen = {tuple(split_validation(category.train_images, 0.3, seed=seed)[1]) for seed in range(6)}
    assert len(chosen) > 1  # the seed matters
    assert len(split_validation(category.train_images, 0.3, seed=0)[1]) == 3
    assert len(split_validation(category.train_images[:3], 0.01, seed=0)[1]) == 1  # at least one


def test_split_needs_two_images_and_a_sane_fraction(cookie_dir: Path) -> None:
    images = scan_category(cookie_dir).train_images
    with pytest.raises(DataError, match="at least 2 training images"):
        split_validation(images[:1], 0.1, seed=0)
    with pytest.raises(DataError, match="between 0 and 1"):
        split_validation(images, 1.0, seed=0)


def test_test_set_masks_labels_and_resizing(cookie_dir: Path) -> None:
    test_set = load_test_set(scan_category(cookie_dir), 64)
    assert test_set.images.shape == (10, 3, 64, 64) and test_set.images.dtype == torch.uint8
    assert test_set.masks.shape == (10, 64, 64) and test_set.masks.dtype == bool
    good = ~test_set.labels
    assert good.sum() == 4 and not test_set.masks[good].any()
    names = test_set.names
    no_mask = names.index("test/anomaly/test-anomaly-1.jpg")
    assert not test_set.has_mask[no_mask] and test_set.has_mask.sum() == 9
    with_mask = [i for i, name in enumerate(names) if test_set.labels[i] and test_set.has_mask[i]]
    assert len(with_mask) == 5
    assert all(test_set.masks[i].any() for i in with_mask)


def test_mask_is_binarised_at_127_and_resized_with_nearest(tmp_path: Path) -> None:
    path = tmp_path / "m_mask.png"
    Image.fromarray(np.array([[0, 200], [127, 128]], dtype=np.uint8), mode="L").save(path)
    mask = load_mask(path, 4)
    expected = np.array([[0, 0, 1, 1]] * 4, dtype=bool)  # 200 and 128 are in, 0 and 127 out; 2x2 blocks
    assert mask.dtype == bool
    assert np.array_equal(mask, expected)


def test_any_image_mode_loads_as_rgb(tmp_path: Path, cookie_dir: Path) -> None:
    source = Image.open(next((cookie_dir / "train" / "good").iterdir())).convert("RGB")
    paths = []
    for mode in ("L", "RGBA", "I;16"):
        path = tmp_path / f"image_{mode.replace(';', '')}.png"
        converted = source.convert("L").convert("I;16") if mode == "I;16" else source.convert(mode)
        converted.save(path)
        paths.append(path)
    images = load_images(paths, 64)
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8
    assert images.float().std() > 10  # real content, not a blank


def test_fingerprint_follows_content_not_location(cookie_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cookie_dir, copy)
    original = data_fingerprint(cookie_dir, scan_category(cookie_dir).train_images)
    assert data_fingerprint(copy, scan_category(copy).train_images) == original
    changed = copy / "train" / "good" / "normal-1.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")
    assert data_fingerprint(copy, scan_category(copy).train_images) != original


def test_penalty_folder_subset_is_seeded(natural_dir: Path) -> None:
    everything, available = penalty_image_paths(natural_dir, 100, seed=0)
    assert available == 8 and len(everything) == 8  # README.md is not an image
    subset, _ = penalty_image_paths(natural_dir, 3, seed=0)
    assert len(subset) == 3 and set(subset) <= set(everything)
    assert penalty_image_paths(natural_dir, 3, seed=0)[0] == subset


# ------------------------------------------------------------------ bad input -> DataError naming the path


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as error:
        scan_category(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty") as error:
        scan_category(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(error.value)
    (tmp_path / "noimages" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no images") as error:
        scan_category(tmp_path / "noimages")
    assert str(tmp_path / "noimages" / "train" / "good") in str(error.value)


def test_wrong_layout_names_the_expected_folder(cookie_copy: Path) -> None:
    shutil.move(cookie_copy / "train" / "good", cookie_copy / "train" / "ok")
    with pytest.raises(DataError, match="wrong data layout") as error:
        scan_category(cookie_copy)
    assert str(cookie_copy / "train" / "good") in str(error.value)


def test_unreadable_image_is_named(cookie_copy: Path) -> None:
    broken = cookie_copy / "train" / "good" / "broken.png"
    broken.write_bytes(b"this is not a png")
    category = scan_category(cookie_copy)
    with pytest.raises(DataError, match="cannot read image") as error:
        load_images(category.train_images, 64)
    assert str(broken) in str(error.value)


def test_mask_without_image_is_named(cookie_copy: Path) -> None:
    (cookie_copy / "test" / "anomaly" / "anomaly-12.jpg").unlink()
    with pytest.raises(DataError, match="mask without image") as error:
        scan_category(cookie_copy)
    assert str(cookie_copy / "ground_truth" / "anomaly" / "anomaly-12_mask.png") in str(error.value)


def test_masks_for_a_missing_defect_folder_are_named(cookie_copy: Path) -> None:
    shutil.rmtree(cookie_copy / "test" / "anomaly")
    with pytest.raises(DataError, match="mask without image") as error:
        scan_category(cookie_copy)
    assert "anomaly-10_mask.png" in str(error.value)
