"""MVTec-style data for one category: the folder layout, the validation split, loading, the fingerprint.

Layout (as in MVTec AD):

    DATA_DIR/train/good/*.png|jpg|...            normal training images
    DATA_DIR/test/<defect>/*                      test images; `good` holds the normal ones
    DATA_DIR/ground_truth/<defect>/<stem>_mask.png  pixel masks of anomalous test images (optional)

Images are decoded by `training.images` (any mode to RGB, EXIF orientation) and resized to the square
input size. Masks are binarised (> 127) and resized with nearest neighbour. Test images of `good` get
all-zero masks; anomalous test images without a mask count for image-level metrics only.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from training.images import DataError, list_images, load_image_tensor, load_rgb

logger = logging.getLogger(__name__)

GOOD = "good"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class EvaluationSample:
    path: Path
    defect: str  # the test sub-folder name; "good" for normal images
    mask_path: Path | None  # None for good images and for anomalies without a mask

    @property
    def is_anomalous(self) -> bool:
        return self.defect != GOOD


@dataclass(frozen=True)
class Category:
    """One category's files, checked for layout; nothing decoded yet."""

    root: Path
    train_images: list[Path]  # all of train/good, sorted
    test_samples: list[EvaluationSample]  # empty when DATA_DIR/test does not exist

    @property
    def has_test(self) -> bool:
        return bool(self.test_samples)


@dataclass
class EvaluationData:
    """Decoded test images with labels and masks at the input size."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: np.ndarray  # (N,) bool, True = anomalous
    masks: np.ndarray  # (N, S, S) bool; all zero for good images and anomalies without a mask
    has_mask: np.ndarray  # (N,) bool, False for anomalies without a mask (image-level metrics only)
    defects: list[str]  # (N,) the defect type of each image ("good" for normal ones)
    names: list[str]  # (N,) paths relative to DATA_DIR


def scan_category(data_dir: Path) -> Category:
    """Check the folder layout and list the files; a DataError naming the path when something is off."""
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    if not any(root.iterdir()):
        raise DataError(f"data folder is empty: {root}")
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        raise DataError(
            f"wrong data layout: {train_dir} not found (expected DATA_DIR/train/good with the normal images, "
            "DATA_DIR/test/<defect>/ and DATA_DIR/ground_truth/<defect>/<stem>_mask.png as in MVTec AD)"
        )
    train_images = list_images(train_dir)
    test_samples = _scan_test(root)
    return Category(root=root, train_images=train_images, test_samples=test_samples)


def _scan_test(root: Path) -> list[EvaluationSample]:
    test_dir = root / "test"
    ground_truth = root / "ground_truth"
    if not test_dir.exists():
        for mask_dir in sorted(ground_truth.iterdir()) if ground_truth.is_dir() else []:
            masks = _masks_by_stem(mask_dir)
            if masks:
                raise DataError(f"mask without image: {next(iter(masks.values()))} (no folder {test_dir})")
        return []
    if not test_dir.is_dir():
        raise DataError(f"wrong data layout: {test_dir} is not a folder")
    defect_dirs = sorted(p for p in test_dir.iterdir() if p.is_dir())
    if not defect_dirs:
        raise DataError(
            f"wrong data layout: {test_dir} has no sub-folders (expected test/good and test/<defect>)"
        )
    samples: list[EvaluationSample] = []
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        images = list_images(defect_dir)
        masks = _masks_by_stem(ground_truth / defect)
        stems = {image.stem for image in images}
        orphans = sorted(set(masks) - stems)
        if orphans:
            raise DataError(f"mask without image: {masks[orphans[0]]} (no {defect_dir}/{orphans[0]}.*)")
        for image in images:
            mask = masks.get(image.stem) if defect != GOOD else None
            samples.append(EvaluationSample(path=image, defect=defect, mask_path=mask))
    if ground_truth.is_dir():
        for mask_dir in sorted(p for p in ground_truth.iterdir() if p.is_dir()):
            masks = _masks_by_stem(mask_dir)
            if masks and not (test_dir / mask_dir.name).is_dir():
                first = next(iter(masks.values()))
                raise DataError(f"mask without image: {first} (no folder {test_dir / mask_dir.name})")
    return samples


def _masks_by_stem(mask_dir: Path) -> dict[str, Path]:
    """`<stem>_mask.png` files in a ground-truth folder, keyed by the image stem they belong to."""
    if not mask_dir.is_dir():
        return {}
    masks = {}
    for path in sorted(mask_dir.iterdir()):
        if path.is_file() and path.stem.endswith(MASK_SUFFIX):
            masks[path.stem.removesuffix(MASK_SUFFIX)] = path
    return masks


def split_validation(images: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded split of train/good into (training, validation); at least one image in each part."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction}")
    if len(images) < 2:
        folder = images[0].parent if images else "train/good"
        raise DataError(f"need at least 2 training images (one is held out for validation) in {folder}")
    count = min(len(images) - 1, max(1, round(fraction * len(images))))
    order = np.random.default_rng(seed).permutation(len(images))
    held_out = set(order[:count].tolist())
    training = [path for index, path in enumerate(images) if index not in held_out]
    validation = [path for index, path in enumerate(images) if index in held_out]
    return training, validation


def load_images(paths: list[Path], size: int, *, desc: str = "loading images") -> torch.Tensor:
    """Decode and resize every file -> (N, 3, size, size) uint8; a DataError names an unreadable file."""
    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for index, path in enumerate(tqdm(paths, desc=desc, unit="img", leave=False, disable=None)):
        images[index] = load_image_tensor(path, size)
    return images


def load_mask(path: Path, size: int) -> np.ndarray:
    """Mask file -> (size, size) bool: binarised at > 127, resized with nearest neighbour."""
    gray = load_rgb(path).convert("L").resize((size, size), Image.NEAREST)
    return np.asarray(gray) > 127


def load_test_set(category: Category, size: int) -> EvaluationData:
    """Decode all test images and masks of a category at the input size."""
    samples = category.test_samples
    images = load_images([sample.path for sample in samples], size, desc="loading test images")
    masks = np.zeros((len(samples), size, size), dtype=bool)
    has_mask = np.ones(len(samples), dtype=bool)
    for index, sample in enumerate(samples):
        if sample.mask_path is not None:
            masks[index] = load_mask(sample.mask_path, size)
        elif sample.is_anomalous:
            has_mask[index] = False
    return EvaluationData(
        images=images,
        labels=np.array([sample.is_anomalous for sample in samples], dtype=bool),
        masks=masks,
        has_mask=has_mask,
        defects=[sample.defect for sample in samples],
        names=[relative_name(sample.path, category.root) for sample in samples],
    )


def relative_name(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def data_fingerprint(root: Path, paths: list[Path]) -> str:
    """sha256 over (relative path, content sha256) of each file, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        digest.update(f"{relative_name(path, root)}\0{content}\n".encode())
    return digest.hexdigest()


def penalty_image_paths(folder: Path, limit: int, seed: int) -> tuple[list[Path], int]:
    """Image files of the penalty folder (any images); a seeded subset of `limit` when there are more.

    Returns (the files used, how many the folder holds).
    """
    paths = list_images(Path(folder))
    available = len(paths)
    if available > limit:
        chosen = np.sort(np.random.default_rng(seed).choice(available, size=limit, replace=False))
        paths = [paths[index] for index in chosen]
        logger.info("penalty images: using a seeded subset of %d of the %d in %s", limit, available, folder)
    return paths, available
