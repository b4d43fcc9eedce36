"""Teacher check: how well a teacher's features, and its distillation target's, tell defects apart, untrained.

A nearest-neighbour detector (PatchCore-like, no training) is built on each feature source and scored by
image AUROC on DATA_DIR/test (MVTec layout):

1. features of up to `memory_images` train/good images (a seeded subset), standardised per channel with
   the mean and std over all their positions;
2. a seeded random subset of `memory_patches` of those standardised patch vectors is the memory;
3. a test image's score is the max over its positions of the L2 distance to the nearest memory vector.

Feature sources: the teacher PDN as detection uses it (unpadded, ImageNet-normalised image at the image
size; `random` for a seeded random PDN) and each distillation target (`training.backbones.BackboneTarget`,
the image decoded at the backbone's input size, as `efficientad distill` feeds it). A teacher that is as
good as its target scores close to it; the gap is what distillation lost.

The search is exact and float32 (chunked `torch.cdist`), pruned without changing the result: each
position's distance to the first `probe` memory vectors bounds its nearest distance from above, so only
positions whose bound exceeds the image's best exact distance so far are searched in the whole memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from efficientad.errors import UserError
from efficientad.scores import image_auroc
from training.backbones import Backbone, BackboneTarget
from training.data import load_images, scan_category
from training.model import imagenet_normalise
from training.networks import PDN, TEACHER_CHANNELS
from training.teacher_file import load_teacher

logger = logging.getLogger(__name__)

RANDOM_TEACHER = "random"
DEFAULT_IMAGE_SIZE = 256  # for a random teacher, which names none
DEFAULT_TARGET = "lite0"  # for a teacher whose file names no backbone
CDIST_CHUNK = 4096  # query vectors per cdist call: (4096, 40000) float32 distances = 655 MB

Extractor = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) uint8 -> (B, C, h, w) float32


@dataclass(frozen=True)
class CheckSettings:
    image_size: int
    memory_images: int = 300
    memory_patches: int = 40_000
    seed: int = 0
    batch_size: int = 8
    probe: int = 4_000  # memory vectors whose distance bounds each position's nearest distance first

    def check(self) -> None:
        if self.image_size < 32 or self.image_size % 4:
            raise UserError(f"--image-size must be a multiple of 4 and >= 32, got {self.image_size}")
        for name in ("memory_images", "memory_patches", "batch_size", "probe"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class FeatureSource:
    kind: str  # "teacher" or "target"
    name: str  # the teacher file's name, "random", or the target's short name
    description: str
    input_size: int  # side of the images it is fed
    extract: Extractor


# --- the nearest-neighbour detector ------------------------------------------------------------------------


def nearest_distances(queries: torch.Tensor, memory: torch.Tensor, chunk: int = CDIST_CHUNK) -> torch.Tensor:
    """(Q, C), (K, C) -> (Q,) L2 distance of each query to its nearest memory vector (float32)."""
    out = torch.empty(len(queries), dtype=torch.float32, device=queries.device)
    for start in range(0, len(queries), chunk):
        out[start : start + chunk] = torch.cdist(queries[start : start + chunk], memory).amin(dim=1)
    return out


def max_nearest_distances(
    queries: torch.Tensor, memory: torch.Tensor, *, probe: int = 4_000, block: int = 64
) -> torch.Tensor:
    """(B, P, C) positions of B images, (K, C) memory -> (B,) max over positions of the nearest distance.

    Equal to `nearest_distances(...).amax()` per image (up to float rounding): positions whose distance to
    `memory[:probe]` (an upper bound) is no larger than the best exact distance found are skipped.
    """
    images, positions, channels = queries.shape
    upper = nearest_distances(queries.reshape(-1, channels), memory[:probe]).view(images, positions)  # (B, P)
    if probe >= len(memory):
        return upper.amax(dim=1)
    scores = torch.empty(images, dtype=torch.float32, device=queries.device)
    for index in range(images):
        order = upper[index].argsort(descending=True)  # (P,) most promising positions first
        best = -1.0
        for start in range(0, positions, block):
            chosen = order[start : start + block]
            if upper[index, chosen[0]].item() <= best:
                break  # every remaining position's nearest distance is at most its bound <= best
            best = max(best, nearest_distances(queries[index, chosen], memory).max().item())
        scores[index] = best
    return scores


def batches(images: torch.Tensor, size: int, desc: str) -> Iterator[torch.Tensor]:
    for start in tqdm(range(0, len(images), size), desc=desc, unit="batch", leave=False, disable=None):
        yield images[start : start + size]


def positions(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    return features.flatten(2).transpose(1, 2)


@torch.no_grad()
def nearest_neighbour_scores(
    extract: Extractor,
    memory_images: torch.Tensor,
    test_images: torch.Tensor,
    settings: CheckSettings,
    *,
    desc: str = "features",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores (T,) of the test images against a memory built from `memory_images`; also the grid and sizes."""
    memory = torch.cat(
        [
            positions(extract(batch))
            for batch in batches(memory_images, settings.batch_size, f"{desc}: memory")
        ]
    ).flatten(0, 1)  # (M*h*w, C)
    mean, std = memory.mean(dim=0), memory.std(dim=0).clamp_min(1e-6)  # (C,) each
    generator = torch.Generator().manual_seed(settings.seed)
    kept = torch.randperm(len(memory), generator=generator)[: settings.memory_patches]
    bank = ((memory[kept] - mean) / std).contiguous()  # (K, C)
    del memory
    scores, grid = [], 0
    for batch in batches(test_images, settings.batch_size, f"{desc}: test"):
        features = extract(batch)  # (B, C, h, w)
        grid = features.shape[-1]
        queries = (positions(features) - mean) / std  # (B, h*w, C)
        scores.append(max_nearest_distances(queries, bank, probe=settings.probe))
    return torch.cat(scores).numpy(), {"grid": grid, "channels": len(mean), "memory_patches": len(bank)}


# --- feature sources ---------------------------------------------------------------------------------------


def teacher_extractor(teacher: PDN, device: torch.device) -> Extractor:
    def extract(images: torch.Tensor) -> torch.Tensor:
        return teacher(imagenet_normalise(images.to(device))).float().cpu()  # (B, 384, h, w)

    return extract


def target_extractor(backbone: Backbone, device: torch.device) -> Extractor:
    def extract(images: torch.Tensor) -> torch.Tensor:
        return backbone(images.to(device).float() / 255.0).float().cpu()  # (B, 384, g, g)

    return extract


def load_check_teacher(teacher: str | Path, seed: int) -> tuple[PDN, dict[str, str], str]:
    """The teacher PDN (eval), its file metadata and its name; `random`: a seeded random PDN-S."""
    if str(teacher) == RANDOM_TEACHER:
        torch.manual_seed(seed)
        return PDN(size="small", out_channels=TEACHER_CHANNELS).eval(), {}, RANDOM_TEACHER
    path = Path(teacher)
    network, metadata = load_teacher(path)  # CheckpointError (a UserError) naming the path
    return network, metadata, path.name


def describe_target(target: BackboneTarget, backbone: Backbone) -> str:
    strides = ", ".join(str(stride) for stride in backbone.strides)
    return f"{target.backbone}, strides {strides}, input {backbone.input_size} px"


def teacher_target(metadata: dict[str, str]) -> str:
    """The target a teacher file was distilled from: its `target` variant (teachers distilled with
    --target), else its backbone's default stages (older teachers), else DEFAULT_TARGET (random)."""
    return metadata.get("target") or metadata.get("backbone", DEFAULT_TARGET)


# --- the check ---------------------------------------------------------------------------------------------


def teacher_check(
    teacher: str | Path,
    data_dir: Path,
    *,
    targets: Sequence[str] | None = None,
    image_size: int | None = None,
    memory_images: int = 300,
    memory_patches: int = 40_000,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    on_source: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Nearest-neighbour image AUROC on DATA_DIR/test of the teacher's features and of each target's.

    `teacher`: a teacher `.safetensors` path or "random"; `targets`: target names for
    `BackboneTarget.parse` (default: the backbone the teacher file names); `image_size`: default the
    teacher's. Returns a dict with the settings, the data and one entry per source (its image AUROC,
    seconds, grid); `format_table` prints it. `on_source` is called with each source's entry when known.
    """
    network, metadata, teacher_name = load_check_teacher(teacher, seed)
    size = image_size or int(metadata.get("image_size", DEFAULT_IMAGE_SIZE))
    settings = CheckSettings(
        image_size=size,
        memory_images=memory_images,
        memory_patches=memory_patches,
        seed=seed,
        batch_size=batch_size,
    )
    settings.check()
    if targets is None:
        targets = [teacher_target(metadata)]
    parsed = [BackboneTarget.parse(name) for name in targets]  # a BackboneError before any work
    category = scan_category(Path(data_dir))
    labels = np.array([sample.is_anomalous for sample in category.test_samples], dtype=bool)
    if not labels.any() or labels.all():
        raise UserError(f"{category.root / 'test'} needs both good and defective images for an AUROC")
    chosen = np.arange(len(category.train_images))
    if len(chosen) > settings.memory_images:
        rng = np.random.default_rng(settings.seed)
        chosen = np.sort(rng.choice(len(chosen), size=settings.memory_images, replace=False))
    memory_paths = [category.train_images[index] for index in chosen]
    test_paths = [sample.path for sample in category.test_samples]
    device = torch.device(device)
    decoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # images per input size, decoded once

    def images_at(side: int) -> tuple[torch.Tensor, torch.Tensor]:
        if side not in decoded:
            decoded[side] = (
                load_images(memory_paths, side, desc=f"memory images at {side} px"),
                load_images(test_paths, side, desc=f"test images at {side} px"),
            )
        return decoded[side]

    def measure(kind: str, name: str, description: str, input_size: int, extract: Extractor) -> dict:
        start = time.perf_counter()
        memory, test = images_at(input_size)
        scores, details = nearest_neighbour_scores(extract, memory, test, settings, desc=f"{kind} {name}")
        entry = {
            "kind": kind,
            "name": name,
            "description": description,
            "input_size": input_size,
            **details,
            "image_auroc": image_auroc(labels, scores),
            "seconds": round(time.perf_counter() - start, 1),
        }
        logger.info("%s %s: image AUROC %.3f (%.0f s)", kind, name, entry["image_auroc"], entry["seconds"])
        if on_source is not None:
            on_source(entry)
        return entry

    sources = []
    with torch.no_grad():
        network = network.to(device)
        sources.append(
            measure(
                "teacher",
                teacher_name,
                f"PDN-{network.size[0].upper()}, unpadded, at {size} px",
                size,
                teacher_extractor(network, device),
            )
        )
        for target in parsed:
            backbone = target.build(image_size=size, device=device)
            description = describe_target(target, backbone)
            extract = target_extractor(backbone, device)
            sources.append(measure("target", target.name, description, backbone.input_size, extract))
            del backbone
    return {
        "teacher": str(teacher),
        "teacher_metadata": {
            key: metadata[key]
            for key in ("backbone", "image_size", "steps", "images_seen")
            if key in metadata
        },
        "data_dir": str(data_dir),
        "test_images": len(labels),
        "anomalous_images": int(labels.sum()),
        "memory_images": len(memory_paths),
        "train_images": len(category.train_images),
        "settings": asdict(settings),
        "device": device_description(device),
        "sources": sources,
    }


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip() + ", "
                break
    threads = torch.get_num_threads()
    return f"cpu ({model}{threads} thread{'' if threads == 1 else 's'})"


def format_table(result: dict[str, Any]) -> str:
    """The check as a small text table, one row per feature source."""
    settings = result["settings"]
    lines = [
        f"teacher-check of {result['teacher']} on {result['data_dir']}: {result['test_images']} test images "
        f"({result['anomalous_images']} defective), memory {settings['memory_patches']} patches of "
        f"{result['memory_images']} good images, {settings['image_size']} px, {result['device']}",
        f"{'source':<8} {'name':<28} {'image AUROC':>11} {'grid':>5} {'seconds':>8}  details",
    ]
    for source in result["sources"]:
        lines.append(
            f"{source['kind']:<8} {source['name']:<28} {source['image_auroc']:>11.3f} "
            f"{source['grid']:>5} {source['seconds']:>8.1f}  {source['description']}"
        )
    return "\n".join(lines)
