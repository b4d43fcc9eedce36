"""Backbones: the bundled EfficientNet-Lite0 and -Lite2 weights really load; feature shapes match the padded
PDN grid; the target variants (stages, input scale) and their names; WideResNet-101-2 weights
round-trip through the loader from .safetensors and torchvision-style .pth files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from training.backbones import (
    TARGET_VARIANTS,
    BackboneError,
    BackboneTarget,
    FeatureAggregator,
    WideResNet101Trunk,
    build_backbone,
    load_efficientnet_lite,
    load_efficientnet_lite0,
)
from training.images import load_image_tensor, load_rgb
from training.networks import pdn_output_size

NATURAL = Path(__file__).resolve().parents[2] / "samples" / "natural"
SHARED_NATURAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "natural"
# ImageNet-1k class index of each bundled sample (the index of its WordNet id in sorted order)
SAMPLE_CLASSES = {
    "n01685808_whiptail.jpg": 41,
    "n02113624_toy_poodle.jpg": 265,
    "n02640242_sturgeon.jpg": 394,
    "n02802426_basketball.jpg": 430,
    "n04141076_sax.jpg": 776,
    "n04461696_tow_truck.jpg": 864,
    "n04599235_wool.jpg": 911,
    "n12267677_acorn.jpg": 988,
}


def center_crop(path: Path, size: int = 224) -> torch.Tensor:
    """Short side to `size`, centre crop, (3, size, size) float in [0, 1]."""
    image = load_rgb(path)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0


def classify(paths: list[Path], variant: str = "efficientnet-lite0", size: int = 224) -> torch.Tensor:
    network = (
        load_efficientnet_lite0(size)
        if variant == "efficientnet-lite0"
        else load_efficientnet_lite(variant, size)
    )
    images = torch.stack([center_crop(path, size) for path in paths])
    with torch.no_grad():
        return network((images - 0.5) / 0.5)  # (N, 1000) logits


def test_efficientnet_lite0_weights_recognise_the_sample_images() -> None:
    names = sorted(SAMPLE_CLASSES)
    logits = classify([NATURAL / name for name in names])
    truth = torch.tensor([SAMPLE_CLASSES[name] for name in names])
    top1 = (logits.argmax(1) == truth).sum().item()
    top5 = (logits.topk(5, dim=1).indices == truth[:, None]).any(1).sum().item()
    # Random weights would score 0 of 8; these tiny (160 px) samples give 5/8 top-1 and 7/8 top-5.
    assert top1 >= 4, f"top-1 {top1}/8"
    assert top5 >= 6, f"top-5 {top5}/8"


def test_efficientnet_lite2_weights_recognise_the_sample_images() -> None:
    names = sorted(SAMPLE_CLASSES)
    logits = classify([NATURAL / name for name in names], "efficientnet-lite2", 260)  # its native size
    truth = torch.tensor([SAMPLE_CLASSES[name] for name in names])
    assert (logits.argmax(1) == truth).sum().item() >= 4  # 5 of 8 measured
    assert (logits.topk(5, dim=1).indices == truth[:, None]).any(1).sum().item() >= 7  # 8 of 8 measured


@pytest.mark.skipif(not SHARED_NATURAL.is_dir(), reason="../shared/data/natural is not present")
def test_efficientnet_lite0_accuracy_on_shared_natural_images() -> None:
    paths = sorted(SHARED_NATURAL.glob("*.jpg"))  # one image per class, class index = sorted position
    assert len(paths) == 1000
    chosen = list(range(0, 1000, 40))
    logits = classify([paths[index] for index in chosen])
    accuracy = (logits.argmax(1) == torch.tensor(chosen)).float().mean().item()
    assert accuracy >= 0.75  # 88.8% over all 1000 (shared/data/README.md)


def test_efficientnet_lite0_features_on_the_padded_pdn_grid() -> None:
    backbone = build_backbone("efficientnet-lite0", image_size=64)
    assert backbone.input_size == 128
    assert backbone.output_size == pdn_output_size(64, padding=True) == 16
    assert not any(parameter.requires_grad for parameter in backbone.parameters())
    backbone.train()
    assert not backbone.training and not any(module.training for module in backbone.modules())
    # its own normalisation: (x - 0.5) / 0.5, as the Lite weights expect
    images = torch.rand(2, 3, 128, 128)
    assert torch.allclose(backbone.prepare(images), images * 2 - 1)
    images[1] = center_crop(NATURAL / "n02802426_basketball.jpg", 128)
    with torch.no_grad():
        features = backbone(images)
        from_small = backbone(torch.nn.functional.interpolate(images, size=64, mode="bilinear"))
    assert features.shape == (2, 384, 16, 16)
    assert from_small.shape == (2, 384, 16, 16)  # other input sizes are resized to input_size
    assert torch.isfinite(features).all()
    assert (features[0] - features[1]).abs().mean() > 0.1 * features.abs().mean()


def test_efficientnet_lite0_grid_at_256_pixels() -> None:
    backbone = build_backbone("efficientnet-lite0", image_size=256)
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 512, 512))
    assert features.shape == (1, 384, 64, 64)


def test_unknown_backbone_and_missing_wide_resnet_weights() -> None:
    with pytest.raises(BackboneError, match="unknown backbone 'resnet18'"):
        build_backbone("resnet18", image_size=64)
    with pytest.raises(BackboneError, match="cannot be downloaded here; pass --backbone-weights PATH"):
        build_backbone("wide-resnet101", image_size=64, weights=None)
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("wide-resnet101", image_size=64, weights=Path("/nonexistent/wrn.pth"))


def test_wide_resnet_keys_follow_torchvision() -> None:
    shapes = {name: tuple(value.shape) for name, value in WideResNet101Trunk().state_dict().items()}
    # torchvision's wide_resnet101_2 without layer4 and fc: 6 stem tensors, 24 per first block, 18 per other
    assert len(shapes) == 6 + (24 + 2 * 18) + (24 + 3 * 18) + (24 + 22 * 18)
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer2.0.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["layer2.3.bn3.num_batches_tracked"] == ()
    assert shapes["layer3.22.conv3.weight"] == (1024, 512, 1, 1)
    assert "layer3.1.downsample.0.weight" not in shapes


def test_wide_resnet_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {name: value.clone() for name, value in WideResNet101Trunk().state_dict().items()}
    state["bn1.running_mean"] = torch.randn(64)  # non-default statistics must arrive too
    safetensors_path = tmp_path / "wrn.safetensors"
    save_file(state, str(safetensors_path))
    pth_path = tmp_path / "wide_resnet101_2.pth"
    torchvision_extras = {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    torchvision_extras["layer4.0.conv1.weight"] = torch.zeros(1024, 1024, 1, 1)
    torch.save({"state_dict": {**state, **torchvision_extras}}, pth_path)

    images = torch.rand(1, 3, 64, 64)
    outputs = []
    for path in (safetensors_path, pth_path):
        backbone = build_backbone("wide-resnet101", image_size=32, weights=path)
        loaded = backbone.trunk.state_dict()
        assert torch.equal(loaded["bn1.running_mean"], state["bn1.running_mean"])
        assert torch.equal(loaded["layer3.22.conv3.weight"], state["layer3.22.conv3.weight"])
        with torch.no_grad():
            outputs.append(backbone(images))
        del backbone
    assert outputs[0].shape == (1, 384, pdn_output_size(32, padding=True), pdn_output_size(32, padding=True))
    assert torch.isfinite(outputs[0]).all()
    assert torch.equal(outputs[0], outputs[1])


class NotWeights:
    def __reduce__(self):  # a pickle that would run code when unpickled without weights_only
        return (print, ("this must never run",))


def test_wide_resnet_rejects_foreign_and_unsafe_files(tmp_path: Path) -> None:
    partial = tmp_path / "partial.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(partial))
    with pytest.raises(BackboneError, match=r"partial\.safetensors does not fit .* tensors missing"):
        build_backbone("wide-resnet101", image_size=32, weights=partial)
    unsafe = tmp_path / "unsafe.pth"
    unsafe.write_bytes(pickle.dumps(NotWeights(), protocol=2))
    with pytest.raises(BackboneError, match=r"unsafe\.pth as a plain tensor state dict"):
        build_backbone("wide-resnet101", image_size=32, weights=unsafe)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(partial.read_bytes()[:100])
    with pytest.raises(BackboneError, match=r"truncated\.safetensors"):
        build_backbone("wide-resnet101", image_size=32, weights=truncated)


def patchcore_reference(features: list[torch.Tensor], grid: int) -> torch.Tensor:
    """PatchCore's aggregation written out step by step: 3x3 patches, resize, pool to 1024, concat, 384."""
    per_layer = []
    for feature in features:
        n, c, h, w = feature.shape
        patches = torch.nn.functional.unfold(feature, 3, padding=1).view(n, c * 9, h, w)
        patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bilinear")
        flat = patches.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)  # (N*g*g, 1, C*9)
        per_layer.append(torch.nn.functional.adaptive_avg_pool1d(flat, 1024))
    joined = torch.cat(per_layer, dim=2)  # (N*g*g, 1, L*1024)
    pooled = torch.nn.functional.adaptive_avg_pool1d(joined, 384)  # (N*g*g, 1, 384)
    return pooled.view(n, grid, grid, 384).permute(0, 3, 1, 2)


def test_aggregation_equals_patchcore_written_out() -> None:
    torch.manual_seed(0)
    features = [torch.randn(2, 40, 16, 16), torch.randn(2, 112, 8, 8), torch.randn(2, 320, 4, 4)]
    aggregated = FeatureAggregator([40, 112, 320], grid=16)(features)
    assert aggregated.shape == (2, 384, 16, 16)
    assert torch.allclose(aggregated, patchcore_reference(features, 16), atol=1e-5)


def test_distillation_targets_have_full_rank_and_no_twin_channels() -> None:
    """On real images the 384 target channels are 384 different directions: no channel is a copy."""
    backbone = build_backbone("efficientnet-lite0", image_size=128)
    paths = sorted(NATURAL.glob("*.jpg"))
    images = torch.stack([load_image_tensor(path, backbone.input_size) for path in paths]).float() / 255
    with torch.no_grad():
        targets = backbone(images)  # (8, 384, 32, 32)
    samples = targets.permute(0, 2, 3, 1).reshape(-1, 384).double()  # (8192, 384)
    samples = samples - samples.mean(dim=0)
    assert torch.linalg.matrix_rank(samples).item() == 384
    correlation = torch.corrcoef(samples.T)
    correlation.fill_diagonal_(0)
    assert correlation.abs().max().item() < 0.99  # pooling channels up made 96 twins with |corr| > 0.999


def test_target_names_parse_and_print_canonically() -> None:
    assert BackboneTarget.parse("lite0") == BackboneTarget("efficientnet-lite0")
    assert BackboneTarget.parse("efficientnet-lite0").name == "lite0"
    assert BackboneTarget.parse("lite0-s32s16s8").name == "lite0"  # the default stages, in any order
    assert BackboneTarget.parse("LITE2-s16s8-x1.5") == BackboneTarget("efficientnet-lite2", (16, 8), 1.5)
    assert BackboneTarget.parse("lite2-s16s8-x1.5").name == "lite2-s8s16-x1.5"
    assert BackboneTarget.parse("wrn101-s16").name == "wrn101-s16"
    assert [BackboneTarget.parse(name).name for name in TARGET_VARIANTS] == list(TARGET_VARIANTS)
    for bad in ("lite3", "lite0-x", "lite0-s", "lite0-x1-s8", ""):
        with pytest.raises(BackboneError, match="unknown target"):
            BackboneTarget.parse(bad)


def test_target_variants_choose_stages_and_input_scale() -> None:
    image = center_crop(NATURAL / "n04599235_wool.jpg", 128)[None]  # (1, 3, 128, 128)
    default = build_backbone("efficientnet-lite0", image_size=64)
    same = BackboneTarget.parse("lite0-s16s32s8").build(image_size=64)
    paper_stages = BackboneTarget.parse("lite0-s8s16").build(image_size=64)
    half_scale = BackboneTarget.parse("lite0-x1").build(image_size=64)
    lite2 = BackboneTarget.parse("lite2-s8s16").build(image_size=64)
    assert default.strides == same.strides == (8, 16, 32) and paper_stages.strides == (8, 16)
    assert len(paper_stages.blocks) == 11 < len(default.blocks) == 16  # stops after the stride-16 stage
    assert (default.input_size, half_scale.input_size, lite2.input_size) == (128, 64, 128)
    with torch.no_grad():
        outputs = [backbone(image) for backbone in (default, same, paper_stages, half_scale, lite2)]
    assert all(output.shape == (1, 384, 16, 16) for output in outputs)  # one grid: the padded PDN's
    assert torch.equal(outputs[0], outputs[1])
    for other in outputs[2:]:
        assert (other - outputs[0]).abs().mean() > 0.05 * outputs[0].abs().mean()
    with pytest.raises(BackboneError, match="cannot aggregate strides"):
        build_backbone("efficientnet-lite2", image_size=64, strides=(8, 64))
    with pytest.raises(BackboneError, match="input scale must be between"):
        build_backbone("efficientnet-lite0", image_size=64, input_scale=0.1)
