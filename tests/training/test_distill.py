"""Distillation on the bundled natural images with EfficientNet-Lite0: it learns, is seeded, and writes a
teacher file that loads into a working PDN; teacher files fail loudly when missing, truncated or foreign."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from efficientad.cli import main
from efficientad.errors import UserError
from training.backbones import BackboneError, build_backbone
from training.checkpoint import CheckpointError
from training.device import resolve_precision
from training.distill import (
    DistillationImages,
    DistillationTargets,
    crop_window,
    distill_step,
    distill_teacher,
    feature_statistics,
    grayscale,
    state_path,
)
from training.images import DataError, list_images, load_image_tensor
from training.model import imagenet_normalise
from training.networks import PDN, PDN_BORDER_CELLS, pdn_output_size
from training.teacher_check import teacher_target
from training.teacher_file import load_teacher, save_teacher

NATURAL = Path(__file__).resolve().parents[2] / "samples" / "natural"
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    returned = distill_teacher(
        NATURAL, out, steps=20, batch_size=4, image_size=IMAGE_SIZE, device="cpu", learning_rate=1e-3
    )
    assert returned == out
    return out


def distillation_error(teacher: PDN) -> float:
    """MSE between the padded PDN and the standardised backbone features on all 8 images (no augmentation)."""
    backbone = build_backbone("efficientnet-lite0", image_size=IMAGE_SIZE)
    paths = list_images(NATURAL)
    images = DistillationImages(paths, image_size=IMAGE_SIZE, backbone_size=backbone.input_size)
    targets = DistillationTargets(images, backbone, torch.device("cpu"), precision="fp32", cache_bytes=0)
    mean, std, _ = feature_statistics(targets, list(range(len(paths))))
    targets.set_statistics(mean, std)
    pdn_images = torch.stack([images.pdn_image(index) for index in range(len(paths))])
    wanted = torch.stack([targets.get(index, gray=False) for index in range(len(paths))])
    inside = (..., slice(PDN_BORDER_CELLS, -PDN_BORDER_CELLS), slice(PDN_BORDER_CELLS, -PDN_BORDER_CELLS))
    with torch.no_grad():  # the interior cells: the unpadded PDN's grid, the one used in training and serving
        return F.mse_loss(teacher(imagenet_normalise(pdn_images))[inside], wanted[inside]).item()


def test_the_loss_leaves_out_the_border_cells_that_the_unpadded_teacher_does_not_have() -> None:
    torch.manual_seed(0)
    padded, unpadded = PDN(size="small", padding=True), PDN(size="small")
    unpadded.load_state_dict(padded.state_dict())
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        full, inner = padded(imagenet_normalise(images)), unpadded(imagenet_normalise(images))
    border = PDN_BORDER_CELLS
    assert torch.allclose(full[..., border:-border, border:-border], inner, atol=1e-6)  # (2, 384, 8, 8)
    targets = torch.zeros_like(full)  # (2, 384, 16, 16)
    wild = targets.clone()
    wild[..., :border, :] = 1e3  # targets on border cells must not matter
    losses = []
    for wanted in (targets, wild):
        teacher = copy.deepcopy(padded)
        optimizer = torch.optim.SGD(teacher.parameters(), lr=0.0)
        losses.append(distill_step(teacher, optimizer, images, wanted, torch.device("cpu"), "fp32").item())
    assert losses[0] == losses[1]
    assert losses[0] == pytest.approx(F.mse_loss(inner, torch.zeros_like(inner)).item(), rel=1e-5)


def padded_copy(teacher: PDN) -> PDN:
    padded = PDN(size=teacher.size, padding=True)
    padded.load_state_dict(teacher.state_dict())
    return padded.eval()


def test_distillation_reduces_the_error_to_the_backbone_features(distilled: Path) -> None:
    teacher, metadata = load_teacher(distilled)
    torch.manual_seed(0)
    untrained = PDN(size="small", padding=True).eval()  # a fresh initialisation
    before, after = distillation_error(untrained), distillation_error(padded_copy(teacher))
    assert after < 0.95 * before, (before, after)
    # the recorded window means (first and last 5 of 20 noisy steps) are only required to be real numbers
    assert 0 < float(metadata["final_loss"]) < 10 and 0 < float(metadata["initial_loss"]) < 10


def test_teacher_file_loads_into_an_unpadded_pdn(distilled: Path) -> None:
    teacher, metadata = load_teacher(distilled)
    assert not teacher.padding and not teacher.training
    with torch.no_grad():
        features = teacher(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert features.shape == (1, 384, 8, 8) == (1, 384, pdn_output_size(64), pdn_output_size(64))
    assert metadata["format"] == "efficientad-teacher"
    assert metadata["size"] == "small"
    assert metadata["backbone"] == "efficientnet-lite0"
    assert metadata["backbone_weights"] == "efficientnet-lite0-57934424.pth"
    assert (metadata["steps"], metadata["batch_size"], metadata["image_size"]) == ("20", "4", "64")
    assert metadata["num_images"] == "8"
    assert len(metadata["dataset_fingerprint"]) == 64
    assert metadata["dataset_fingerprint_covers"] == "names+contents"
    assert '"torch"' in metadata["versions"]


def test_distillation_is_seeded(tmp_path: Path) -> None:
    settings = dict(steps=2, batch_size=2, image_size=48, device="cpu")
    first = distill_teacher(NATURAL, tmp_path / "a.safetensors", seed=3, **settings)
    second = distill_teacher(NATURAL, tmp_path / "b.safetensors", seed=3, **settings)
    # the process-wide random state moved on between the runs: equal weights mean the seed set it all
    assert torch.equal(load_teacher(first)[0].layers[0].weight, load_teacher(second)[0].layers[0].weight)


def test_distill_rejects_bad_settings(tmp_path: Path) -> None:
    out = tmp_path / "teacher.safetensors"
    with pytest.raises(UserError, match="unknown backbone"):
        distill_teacher(NATURAL, out, backbone="vgg16", steps=1)
    with pytest.raises(UserError, match="--steps"):
        distill_teacher(NATURAL, out, steps=0)
    with pytest.raises(DataError, match="image folder not found"):
        distill_teacher(tmp_path / "missing", out, steps=1)
    assert not out.exists()


def test_teacher_file_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match=r"teacher weights not found: .*missing\.safetensors"):
        load_teacher(missing)

    good = tmp_path / "good.safetensors"
    save_teacher(good, PDN(size="medium"), {"backbone": "test", "steps": 3})  # type: ignore[dict-item]
    teacher, metadata = load_teacher(good)
    assert teacher.size == "medium" and metadata["steps"] == "3"

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(
        CheckpointError, match=r"truncated\.safetensors .*truncated, corrupt or not a safetensors"
    ):
        load_teacher(truncated)

    pickled = tmp_path / "pickled.safetensors"
    torch.save(PDN().state_dict(), pickled)
    with pytest.raises(CheckpointError, match=r"pickled\.safetensors"):
        load_teacher(pickled)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"teacher.layers.0.weight": torch.zeros(1)}, str(foreign), metadata={"format": "other"})
    with pytest.raises(CheckpointError, match="not an EfficientAD teacher file"):
        load_teacher(foreign)

    wrong_shape = tmp_path / "wrong_shape.safetensors"
    tensors = {f"teacher.{name}": value for name, value in PDN(size="small").state_dict().items()}
    save_file(tensors, str(wrong_shape), metadata={"format": "efficientad-teacher", "size": "medium"})
    with pytest.raises(
        CheckpointError, match=r"wrong_shape\.safetensors: tensor 'teacher\.layers\.0\.weight' has shape"
    ):
        load_teacher(wrong_shape)


def test_crops_see_the_matching_window_of_the_whole_image() -> None:
    """The padded PDN on a crop at a multiple of 4 px gives the whole image's output window there,
    away from the crop's padded border (the 33-px receptive field reaches 4 cells in)."""
    torch.manual_seed(0)
    teacher = PDN(size="small", padding=True).eval()
    image = load_image_tensor(NATURAL / "n04599235_wool.jpg", 128)[None]  # (1, 3, 128, 128)
    top, left, crop = 36, 20, 64
    with torch.no_grad():
        whole = teacher(imagenet_normalise(image))  # (1, 384, 32, 32)
        part = teacher(imagenet_normalise(image[..., top : top + crop, left : left + crop]))  # 16x16 cells
    window = crop_window(whole, top, left, crop)
    assert part.shape == window.shape == (1, 384, 16, 16)
    margin = 4
    inner = (..., slice(margin, -margin), slice(margin, -margin))
    assert torch.allclose(part[inner], window[inner], atol=1e-5), (part[inner] - window[inner]).abs().max()
    assert not torch.allclose(part, window, atol=1e-3)  # the border does differ: the test can fail


def test_crop_distillation_runs_and_records_its_settings(tmp_path: Path) -> None:
    out = distill_teacher(
        NATURAL, tmp_path / "t.safetensors", steps=4, batch_size=2, image_size=64, crop_size=48, device="cpu"
    )
    metadata = load_teacher(out)[1]
    native = resolve_precision("auto", torch.device("cpu"))  # bf16 on CPUs with AVX512-BF16 or AMX
    assert (metadata["crop_size"], metadata["images_seen"], metadata["precision"]) == ("48", "8", native)
    assert metadata["aggregation"].startswith("patchcore")
    with pytest.raises(UserError, match="--crop-size"):
        distill_teacher(NATURAL, tmp_path / "u.safetensors", steps=1, image_size=64, crop_size=30)


def test_distill_target_variant_learns_those_stages_and_says_so(tmp_path: Path) -> None:
    """--target lite0-s8s16: the PDN learns Lite0's stride-8 and -16 stages (not the default three), the
    teacher file names the variant, and the teacher-check compares the teacher with that variant."""
    settings = dict(steps=2, batch_size=2, image_size=48, device="cpu", seed=1)
    default = distill_teacher(NATURAL, tmp_path / "default.safetensors", **settings)
    variant = distill_teacher(NATURAL, tmp_path / "s8s16.safetensors", target="lite0-s8s16", **settings)
    metadata = load_teacher(variant)[1]
    assert (metadata["target"], metadata["target_strides"]) == ("lite0-s8s16", "[8, 16]")
    assert metadata["backbone"] == "efficientnet-lite0"
    assert load_teacher(default)[1]["target"] == "lite0"
    assert teacher_target(metadata) == "lite0-s8s16"  # what the teacher-check compares it with
    assert teacher_target({"backbone": "efficientnet-lite0"}) == "efficientnet-lite0"  # older teachers
    # different targets, so different first steps from the same seed: the variant really was learnt
    first, second = load_teacher(default)[0], load_teacher(variant)[0]
    assert not torch.equal(first.layers[0].weight, second.layers[0].weight)
    with pytest.raises(BackboneError, match="unknown target"):
        distill_teacher(NATURAL, tmp_path / "bad.safetensors", target="vgg16-s8", steps=1)


def test_distill_resume_continues_bit_identically(tmp_path: Path) -> None:
    settings = dict(steps=6, batch_size=2, image_size=64, crop_size=48, device="cpu", save_every=0)
    whole = distill_teacher(NATURAL, tmp_path / "whole.safetensors", **settings)
    split = tmp_path / "split.safetensors"
    distill_teacher(NATURAL, split, stop_after_step=3, **settings)
    state = state_path(split)
    assert not split.exists() and sorted(p.name for p in tmp_path.iterdir()) == [state.name, whole.name]
    distill_teacher(NATURAL, split, resume=True, device="cpu")
    assert not state.exists()
    first, first_meta = load_teacher(whole)
    second, second_meta = load_teacher(split)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert first_meta["final_loss"] == second_meta["final_loss"]


def test_distill_resume_needs_a_state(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        distill_teacher(NATURAL, tmp_path / "none.safetensors", resume=True)


def test_distill_cli_resume_refuses_changed_settings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "t.safetensors"
    common = ["distill", str(NATURAL), "--out", str(out), "--image-size", "64", "--batch-size", "2"]
    assert main([*common, "--steps", "4", "--stop-after", "2", "--device", "cpu"]) == 0
    assert not out.exists()
    assert main([*common, "--steps", "5", "--crop-size", "48", "--resume"]) == 2
    assert "--crop-size 48 (the run has None)" in capsys.readouterr().err
    # steps may change on resume (the one rule of training.run_state): the run is extended to 5
    assert (
        main(["distill", str(NATURAL), "--out", str(out), "--resume", "--steps", "5", "--device", "cpu"]) == 0
    )
    assert load_teacher(out)[1]["steps"] == "5"


def test_grayscale_keeps_the_shape_and_equal_channels() -> None:
    image = load_image_tensor(NATURAL / "n12267677_acorn.jpg", 32)
    gray = grayscale(image)
    assert gray.shape == image.shape and gray.dtype == torch.uint8
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert not torch.equal(gray, image)


def test_sigterm_leaves_a_resumable_state(tmp_path: Path) -> None:
    """`kill` of a background distillation (which ignores SIGINT under nohup) saves its state, like Ctrl-C."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "t.safetensors"
    command = [sys.executable, "-m", "efficientad", "distill", str(NATURAL), "--out", str(out)]
    settings = ["--image-size", "64", "--crop-size", "48", "--batch-size", "2", "--device", "cpu"]
    process = subprocess.Popen(
        [*command, *settings, "--steps", "100000", "--save-every", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        # wait until the loop runs (the loss shows on the progress bar after 10 steps), then stop the job
        seen = ""
        while "loss=" not in seen and time.monotonic() < deadline:
            seen += process.stderr.read(1)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    document = state_path(out)
    assert document.is_file() and not out.exists()
    assert main([*command[3:], "--resume", "--stop-after", str(int(_saved_step(document)) + 1)]) == 0
    assert _saved_step(document) > 0


def _saved_step(state: Path) -> int:
    from training.run_state import load_run_state

    return load_run_state(state, kind="efficientad-distill-state", what="a distillation state").step
