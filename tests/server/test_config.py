"""Settings: defaults, EAD_* environment parsing (incl. NAME=PATH lists) and the validators."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import Settings


@pytest.fixture
def model_dirs(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "cookie", tmp_path / "screws"
    first.mkdir()
    second.mkdir()
    return first, second


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("EAD_"):
            monkeypatch.delenv(key)


def test_defaults_match_the_contract(model_dirs: tuple[Path, Path]) -> None:
    settings = Settings(model_dirs=[model_dirs[0]])
    assert settings.backend == "auto"
    assert (settings.max_batch_size, settings.max_batch_delay_ms, settings.max_queue) == (16, 0.0, 256)
    assert settings.request_timeout_ms == 10_000
    assert settings.max_body_bytes == 20 * 1024 * 1024
    assert (settings.max_image_pixels, settings.min_image_side) == (40_000_000, 16)
    assert (settings.heatmap, settings.heatmap_style, settings.heatmap_size) == ("png", "jet", "model")
    assert settings.api_key is None and settings.api_key_bytes() is None
    assert (settings.host, settings.port, settings.log_level, settings.log_format) == (
        "127.0.0.1",
        8000,
        "INFO",
        "json",
    )
    assert settings.intra_op_threads == 0
    assert settings.models() == [("cookie", model_dirs[0])]
    assert settings.default_model_name() == "cookie"


def test_environment_variables_with_named_and_plain_model_dirs(
    model_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EAD_MODEL_DIRS", f"{model_dirs[0]}, bolts={model_dirs[1]}")
    monkeypatch.setenv("EAD_DEFAULT_MODEL", "bolts")
    monkeypatch.setenv("EAD_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("EAD_MAX_BATCH_DELAY_MS", "0.5")
    monkeypatch.setenv("EAD_BACKEND", "onnxruntime-cpu")
    monkeypatch.setenv("EAD_API_KEY", "s3cret")
    monkeypatch.setenv("EAD_LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.models() == [("cookie", model_dirs[0]), ("bolts", model_dirs[1])]
    assert settings.default_model_name() == "bolts"
    assert settings.max_batch_size == 32 and settings.max_batch_delay_ms == 0.5
    assert settings.backend == "onnxruntime-cpu"
    assert settings.api_key_bytes() == b"s3cret"
    assert settings.log_level == "DEBUG"


def test_a_batch_delay_of_zero_is_allowed_and_a_positive_one_is_opt_in(
    model_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings(model_dirs=[model_dirs[0]], max_batch_delay_ms=0).max_batch_delay_ms == 0
    monkeypatch.setenv("EAD_MAX_BATCH_DELAY_MS", "0")
    assert Settings(model_dirs=[model_dirs[0]]).max_batch_delay_ms == 0
    monkeypatch.setenv("EAD_MAX_BATCH_DELAY_MS", "2")
    assert Settings(model_dirs=[model_dirs[0]]).max_batch_delay_ms == 2.0


def test_api_key_is_never_shown(model_dirs: tuple[Path, Path]) -> None:
    settings = Settings(model_dirs=[model_dirs[0]], api_key="very-secret-key")
    assert "very-secret-key" not in repr(settings)
    assert "very-secret-key" not in str(settings.model_dump())
    assert Settings(model_dirs=[model_dirs[0]], api_key="").api_key is None  # empty variable = no key


def test_to_environment_round_trips(model_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        model_dirs=[f"a={model_dirs[0]}", str(model_dirs[1])],
        max_batch_size=4,
        api_key="k",
        default_model="screws",
    )
    for key, value in settings.to_environment().items():
        monkeypatch.setenv(key, value)
    again = Settings()
    assert again.models() == settings.models()
    assert (
        again.max_batch_size == 4 and again.default_model_name() == "screws" and again.api_key_bytes() == b"k"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_batch_size", 0, "at least 1"),
        ("max_queue", -3, "at least 1"),
        ("max_body_bytes", 0, "at least 1"),
        ("request_timeout_ms", 0, "greater than 0"),
        ("max_batch_delay_ms", -1, "not be negative"),
        ("max_batch_delay_ms", float("nan"), "finite number"),
        ("max_batch_delay_ms", float("inf"), "finite number"),
        ("backend", "tensorflow", "auto"),
        ("heatmap_style", "rainbow", "jet"),
        ("log_level", "LOUD", "INFO"),
        ("port", 70000, "TCP port"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(
    model_dirs: tuple[Path, Path], field: str, value: object, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(model_dirs=[model_dirs[0]], **{field: value})
    assert field in str(caught.value) and message in str(caught.value)


def test_model_dir_problems(model_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"model directory not found: .*missing"):
        Settings(model_dirs=[tmp_path / "missing"])
    with pytest.raises(ValidationError, match="no model directory given"):
        Settings()
    twin = tmp_path / "other" / "cookie"
    twin.mkdir(parents=True)
    with pytest.raises(ValidationError, match="share the name 'cookie'"):
        Settings(model_dirs=[model_dirs[0], twin])
    assert Settings(model_dirs=[model_dirs[0], f"cookie2={twin}"]).names() == ["cookie", "cookie2"]
    with pytest.raises(ValidationError, match="default_model 'nope' is not one of the models"):
        Settings(model_dirs=[model_dirs[0]], default_model="nope")
