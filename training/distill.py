"""Teacher distillation: train the PDN to reproduce a pretrained backbone's features (paper, Sec. 3.1).

The PDN (with padding, so its 64x64 grid at 256 px lines up with the backbone's) sees each image at the
PDN resolution with ImageNet normalisation; the backbone sees the same image at twice that resolution.
The backbone's features are first standardised per channel with a mean and std estimated on up to
`STATISTICS_IMAGES` of the distillation images; the loss is the mean squared error to those targets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from efficientad.errors import UserError
from training.anomaly_maps import imagenet_normalise
from training.backbones import BACKBONES, Backbone, build_backbone
from training.checkpoint import file_sha256, versions
from training.device import resolve_device
from training.images import list_images, load_rgb, to_uint8_tensor
from training.networks import PDN, TEACHER_CHANNELS, ModelSize
from training.teacher_file import save_teacher

logger = logging.getLogger(__name__)

STATISTICS_IMAGES = 256  # images used to estimate the backbone's channel mean and std
GRAYSCALE_PROBABILITY = 0.1  # as in the paper's pretraining
PROGRESS_EVERY = 10  # steps between loss updates on the progress bar
CONTENT_FINGERPRINT_LIMIT = 20_000  # larger folders are fingerprinted by file names and sizes
LOSS_WINDOW = 100  # initial and final loss: means over the first and last this many steps (<= steps/4)


class DistillationImages(Dataset):
    """Each item: the same image at the PDN size and at the backbone size, both (3, S, S) uint8.

    With `augment`, a random horizontal flip and (with probability 0.1) grayscale, applied to both.
    """

    def __init__(self, paths: list[Path], *, image_size: int, backbone_size: int, augment: bool):
        self.paths = paths
        self.image_size = image_size
        self.backbone_size = backbone_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_rgb(self.paths[index])
        if self.augment:
            flip, gray = torch.rand(2).tolist()
            if flip < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if gray < GRAYSCALE_PROBABILITY:
                image = image.convert("L").convert("RGB")
        return to_uint8_tensor(image, self.image_size), to_uint8_tensor(image, self.backbone_size)


def dataset_fingerprint(paths: list[Path]) -> tuple[str, str]:
    """(sha256 hex, what it covers) over the image files in sorted order.

    Up to CONTENT_FINGERPRINT_LIMIT files: each file's name and content sha256 (the scheme of
    `training.data.data_fingerprint`); beyond that (ImageNet-sized folders) names and sizes only, so that
    starting a run does not read every byte twice.
    """
    digest = hashlib.sha256()
    by_content = len(paths) <= CONTENT_FINGERPRINT_LIMIT
    for path in sorted(paths):
        detail = file_sha256(path) if by_content else str(path.stat().st_size)
        digest.update(f"{path.name}\0{detail}\n".encode())
    return digest.hexdigest(), "names+contents" if by_content else "names+sizes"


@torch.no_grad()
def backbone_features(backbone: Backbone, images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 3, 2S, 2S) uint8 -> (N, 384, g, g) float32 features (bfloat16 autocast on CUDA)."""
    images = images_uint8.float() / 255.0
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        return backbone(images).float()


@torch.no_grad()
def feature_statistics(
    backbone: Backbone, loader: DataLoader, device: torch.device, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (384,) of the backbone features over the first `limit` images of `loader`."""
    total = torch.zeros(TEACHER_CHANNELS, dtype=torch.float64, device=device)
    total_squares = torch.zeros_like(total)
    count, seen = 0, 0
    with tqdm(total=limit, desc="feature statistics", unit="img", leave=False) as progress:
        for _, backbone_images in loader:
            backbone_images = backbone_images[: limit - seen]
            features = backbone_features(backbone, backbone_images.to(device, non_blocking=True)).double()
            total += features.sum(dim=(0, 2, 3))
            total_squares += features.square().sum(dim=(0, 2, 3))
            count += features.shape[0] * features.shape[2] * features.shape[3]
            seen += features.shape[0]
            progress.update(features.shape[0])
            if seen >= limit:
                break
    mean = total / count
    variance = (total_squares / count - mean.square()).clamp_min(0.0)
    return mean.float(), variance.sqrt().clamp_min(1e-6).float()  # (384,), (384,)


def _check_settings(backbone: str, size: str, steps: int, batch_size: int, image_size: int) -> None:
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if size not in ("small", "medium"):
        raise UserError(f"--size must be small or medium, got {size!r}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if image_size < 32 or image_size % 4:
        raise UserError(f"--image-size must be a multiple of 4 and at least 32, got {image_size}")


def _workers(device: torch.device) -> int:
    """Decode in worker processes only where the network runs elsewhere (CUDA); on CPU they compete."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def distill_teacher(
    image_dir: Path,
    out: Path,
    *,
    backbone: str = "efficientnet-lite0",
    size: ModelSize = "small",
    steps: int = 10_000,
    batch_size: int = 8,
    image_size: int = 256,
    device: str = "auto",
    seed: int = 0,
    backbone_weights: Path | None = None,
    learning_rate: float = 1e-4,
    weight_decay: float = 1e-5,
) -> Path:
    """Distill a teacher PDN from `backbone` on the images in `image_dir`; write it to `out`, return `out`."""
    _check_settings(backbone, size, steps, batch_size, image_size)
    paths = list_images(Path(image_dir))
    torch_device = resolve_device(device)
    torch.manual_seed(seed)
    logger.info(
        "distilling a PDN-%s teacher from %s on %d images on %s", size, backbone, len(paths), torch_device
    )

    extractor = build_backbone(backbone, image_size=image_size, weights=backbone_weights, device=torch_device)
    workers = _workers(torch_device)
    loader_options = {"num_workers": workers, "pin_memory": torch_device.type == "cuda"}
    if workers:
        loader_options |= {"persistent_workers": True, "prefetch_factor": 4}

    plain = DistillationImages(
        paths, image_size=image_size, backbone_size=extractor.input_size, augment=False
    )
    order = torch.Generator().manual_seed(seed)
    statistics_loader = DataLoader(
        plain, batch_size=batch_size, sampler=RandomSampler(plain, generator=order), **loader_options
    )
    feature_mean, feature_std = feature_statistics(
        extractor, statistics_loader, torch_device, min(STATISTICS_IMAGES, len(paths))
    )
    feature_mean, feature_std = feature_mean.view(1, -1, 1, 1), feature_std.view(1, -1, 1, 1)
    del statistics_loader

    augmented = DistillationImages(
        paths, image_size=image_size, backbone_size=extractor.input_size, augment=True
    )
    sampler = RandomSampler(augmented, replacement=True, num_samples=steps * batch_size, generator=order)
    loader = DataLoader(
        augmented,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed + 1),  # seeds the workers' augmentation
        **loader_options,
    )

    teacher = PDN(size=size, out_channels=TEACHER_CHANNELS, padding=True).to(torch_device).train()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=learning_rate, weight_decay=weight_decay)
    window = max(1, min(LOSS_WINDOW, steps // 4))
    losses = torch.zeros(steps, device=torch_device)  # kept on the device: no sync per step
    started = time.monotonic()
    progress = tqdm(loader, total=steps, desc=f"distill {backbone} -> PDN-{size[0].upper()}", unit="step")
    for step, (pdn_images, backbone_images) in enumerate(progress):
        targets = backbone_features(extractor, backbone_images.to(torch_device, non_blocking=True))
        targets = (targets - feature_mean) / feature_std  # (N, 384, g, g)
        # the PDN sees ImageNet-normalised images, as in training and serving
        predictions = teacher(
            imagenet_normalise(pdn_images.to(torch_device, non_blocking=True))
        )  # (N, 384, g, g)
        loss = F.mse_loss(predictions, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        if step % PROGRESS_EVERY == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    progress.close()
    initial_loss, final_loss = losses[:window].mean().item(), losses[-window:].mean().item()
    if not math.isfinite(final_loss):
        raise UserError(f"distillation diverged (loss {final_loss}); try a lower learning rate")
    logger.info("distillation done in %.0f s, final loss %.4f", time.monotonic() - started, final_loss)

    metadata = {
        "backbone": backbone,
        "backbone_weights": extractor.weights_path.name,
        "backbone_weights_sha256": file_sha256(extractor.weights_path),
        "image_size": str(image_size),
        "steps": str(steps),
        "batch_size": str(batch_size),
        "learning_rate": str(learning_rate),
        "weight_decay": str(weight_decay),
        "seed": str(seed),
        "initial_loss": f"{initial_loss:.6f}",
        "final_loss": f"{final_loss:.6f}",
        "num_images": str(len(paths)),
        "dataset": Path(image_dir).name,
        "device": str(torch_device),
        "versions": json.dumps(versions(), sort_keys=True),
    }
    out = Path(out)
    metadata["dataset_fingerprint"], metadata["dataset_fingerprint_covers"] = dataset_fingerprint(paths)
    save_teacher(out, teacher.cpu(), metadata)
    logger.info("teacher written to %s", out)
    return out
