"""Device and precision choice: bf16 only where the hardware computes it natively, and bf16 results close
to fp32 ones (the networks under autocast; losses stay fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from efficientad.errors import UserError
from training.device import autocast, cpu_flags, cpu_has_native_bf16, resolve_precision
from training.images import load_image_tensor
from training.model import imagenet_normalise
from training.networks import PDN

NATURAL = Path(__file__).resolve().parents[2] / "samples" / "natural"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert {"avx2", "avx512_bf16"} <= cpu_flags(cpuinfo)
    assert cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2\n")
    assert not cpu_has_native_bf16(cpuinfo)
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_auto_precision_follows_the_hardware() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # asked for explicitly: honoured (with a warning)
    with pytest.raises(UserError, match="--precision"):
        resolve_precision("fp16", cpu)


def test_bf16_features_are_close_to_fp32() -> None:
    torch.manual_seed(0)
    teacher = PDN(size="small").eval()
    images = imagenet_normalise(load_image_tensor(NATURAL / "n04461696_tow_truck.jpg", 64)[None])
    with torch.no_grad():
        full = teacher(images)  # (1, 384, 8, 8)
        with autocast(torch.device("cpu"), "bf16"):
            half = teacher(images)
    assert half.dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
    relative = (half.float() - full).norm() / full.norm()
    assert 0 < relative.item() < 0.02, relative.item()  # bf16 keeps ~3 significant digits per value
    with torch.no_grad(), autocast(torch.device("cpu"), "fp32"):
        assert teacher(images).dtype == torch.float32


def test_a_bf16_training_step_gives_the_fp32_losses_closely() -> None:
    from training.model import EfficientAD
    from training.networks import Autoencoder
    from training.train import TrainingImages, train_step

    torch.manual_seed(0)
    model = EfficientAD(
        PDN(size="small").eval(),
        PDN(size="small", out_channels=768),
        Autoencoder(out_channels=384, image_size=64),
        image_size=64,
    )
    images = torch.stack([load_image_tensor(path, 64) for path in sorted(NATURAL.glob("*.jpg"))[:2]])
    penalty = torch.stack([load_image_tensor(path, 128) for path in sorted(NATURAL.glob("*.jpg"))[2:4]])
    inputs = TrainingImages(train=images, penalty_pool=penalty)
    batch = images[:1].float() / 255.0  # (1, 3, 64, 64)
    losses = {}
    for precision in ("fp32", "bf16"):
        generator = torch.Generator().manual_seed(1)
        losses[precision] = train_step(model, batch, inputs, generator, precision)
    for name, value in losses["fp32"].items():
        assert losses["bf16"][name].dtype == torch.float32, name  # losses are computed in fp32
        assert torch.isclose(losses["bf16"][name], value, rtol=0.05), (name, losses["bf16"][name], value)
