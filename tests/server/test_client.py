"""server/client.py (`efficientad predict`) against a small real HTTP server started here.

The stand-in server answers like the API: it decodes the body with server.imaging (so a wrong
Content-Type fails as it would for real), scores it by mean brightness, and renders a real heatmap.
"""

from __future__ import annotations

import argparse
import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

from efficientad.errors import UserError
from server.client import (
    HEATMAP_STYLE_CHOICES,
    add_predict_arguments,
    heatmap_filenames,
    predict_command,
)
from server.heatmap import HEATMAP_STYLES, render_heatmap
from server.imaging import ImageError, content_type_for, decode_for_model

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "cookie" / "test"
GOOD = SAMPLES / "good" / "test-normal-1.jpg"
BAD = SAMPLES / "anomaly" / "anomaly-10.jpg"
API_KEY = "secret-key"


@dataclass
class FakeApi:
    """What the stand-in server saw, and how it answers."""

    url: str = ""
    threshold: float | None = 0.5
    delay_s: float = 0.0  # how long each request is held
    requests: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_handler(api: FakeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def reply(self, status: int, body: dict) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:
            with api.lock:
                api.in_flight += 1
                api.max_in_flight = max(api.max_in_flight, api.in_flight)
            try:
                self.handle_predict()
            finally:
                with api.lock:
                    api.in_flight -= 1

        def handle_predict(self) -> None:
            parsed = urlparse(self.path)
            query = {key: values[0] for key, values in parse_qs(parsed.query).items()}
            body = self.rfile.read(int(self.headers["Content-Length"]))
            content_type = self.headers.get("Content-Type")
            api.requests.append(
                {
                    "path": parsed.path,
                    "query": query,
                    "content_type": content_type,
                    "api_key": self.headers.get("X-API-Key"),
                }
            )
            time.sleep(api.delay_s)
            if self.headers.get("X-API-Key") != API_KEY:
                return self.reply(401, {"error": "unauthorized", "detail": "missing or wrong API key"})
            try:
                pixels, original_size = decode_for_model(
                    body, content_type=content_type, height=32, width=32, max_pixels=10**7
                )
            except ImageError as error:
                return self.reply(400, {"error": "undecodable_image", "detail": str(error)})
            score = float(pixels.mean()) / 255.0  # brightness stands in for the model
            is_anomaly = api.threshold is not None and score > api.threshold
            heatmap = None
            if query.get("heatmap", "png") == "png":
                anomaly_map = pixels.mean(axis=0).astype(np.float32) / 255.0  # (32, 32)
                heatmap = render_heatmap(
                    anomaly_map,
                    style=query.get("heatmap_style", "jet"),
                    value_range=(0.0, 1.0),
                    size=original_size if query.get("heatmap_size") == "original" else None,
                    background=pixels,
                )
            self.reply(
                200,
                {
                    "model": query.get("model", "cookie"),
                    "model_version": "0123456789ab",
                    "score": score,
                    "is_anomaly": is_anomaly,
                    "threshold": api.threshold,
                    "heatmap_png": base64.b64encode(heatmap).decode() if heatmap else None,
                    "heatmap_size": None,
                    "image_size": list(original_size),
                    "timings_ms": {
                        "decode": 1.0,
                        "queue": 0.0,
                        "inference": 1.0,
                        "encode": 1.0,
                        "total": 3.0,
                    },
                },
            )

    return Handler


@pytest.fixture
def api() -> Iterator[FakeApi]:
    state = FakeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    return parser.parse_args(list(argv))


def expected_score(path: Path) -> float:
    pixels, _ = decode_for_model(
        path.read_bytes(), content_type=content_type_for(path), height=32, width=32, max_pixels=10**7
    )
    return float(pixels.mean()) / 255.0


def test_prints_one_line_per_image_in_order(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.threshold = (expected_score(GOOD) + expected_score(BAD)) / 2  # one above, one below
    exit_code = predict_command(parse(str(BAD), str(GOOD), "--url", api.url, "--api-key", API_KEY))
    assert exit_code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    verdicts = {}
    for line, path in zip(lines, (BAD, GOOD), strict=True):
        name, score, verdict, threshold = line.split("  ")
        assert name == str(path)
        assert float(score) == pytest.approx(expected_score(path), abs=1e-6)
        assert float(threshold.removeprefix("threshold=")) == pytest.approx(api.threshold, abs=1e-6)
        verdicts[path] = verdict
    brighter, darker = sorted((BAD, GOOD), key=expected_score, reverse=True)
    assert verdicts == {brighter: "ANOMALY", darker: "ok"}
    assert all(request["query"] == {"heatmap": "none"} for request in api.requests)
    assert all(request["path"] == "/predict" for request in api.requests)


def test_content_type_follows_the_suffix(api: FakeApi, tmp_path: Path) -> None:
    image = Image.open(GOOD).convert("RGB")
    files = {}
    for suffix in (".png", ".bmp", ".tif", ".webp", ".JPG"):
        path = tmp_path / f"cookie{suffix}"
        image.save(path, format={".tif": "TIFF", ".JPG": "JPEG"}.get(suffix, suffix[1:].upper()))
        files[path.name] = path
    no_suffix = tmp_path / "cookie_without_suffix"
    no_suffix.write_bytes(GOOD.read_bytes())
    exit_code = predict_command(
        parse(*map(str, files.values()), str(no_suffix), "--url", api.url, "--api-key", API_KEY)
    )
    assert exit_code == 0  # the stand-in decodes each body as the declared type: all must match
    seen = sorted(request["content_type"] for request in api.requests)
    assert seen == sorted(
        ["image/png", "image/bmp", "image/tiff", "image/webp", "image/jpeg", "application/octet-stream"]
    )


def test_writes_heatmaps_and_forwards_options(api: FakeApi, tmp_path: Path) -> None:
    out = tmp_path / "heatmaps"
    argv = [str(GOOD), str(BAD), "--url", api.url + "/", "--api-key", API_KEY, "--out", str(out)]
    argv += ["--heatmap-style", "gray", "--heatmap-size", "original", "--model", "cookie-s"]
    assert predict_command(parse(*argv)) == 0
    for path in (GOOD, BAD):
        heatmap = Image.open(out / f"{path.stem}_heatmap.png")
        assert heatmap.mode == "L"
        assert heatmap.size == Image.open(path).size  # original size was asked for
    assert len(api.requests) == 2
    for request in api.requests:
        assert request["query"] == {
            "heatmap": "png",
            "heatmap_style": "gray",
            "heatmap_size": "original",
            "model": "cookie-s",
        }
        assert request["api_key"] == API_KEY


def test_failed_requests_print_the_servers_detail_and_exit_1(
    api: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text_as_jpeg = tmp_path / "notes.jpg"
    text_as_jpeg.write_text("not a picture")
    exit_code = predict_command(parse(str(GOOD), str(text_as_jpeg), "--url", api.url, "--api-key", API_KEY))
    assert exit_code == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{GOOD}  ")
    assert str(text_as_jpeg) in captured.err
    assert "HTTP 400" in captured.err and "not a valid image/jpeg image" in captured.err


def test_wrong_api_key_fails(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    assert predict_command(parse(str(GOOD), "--url", api.url, "--api-key", "wrong")) == 1
    assert "HTTP 401: missing or wrong API key" in capsys.readouterr().err


def test_api_key_defaults_to_the_environment(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EAD_API_KEY", API_KEY)
    assert predict_command(parse(str(GOOD), "--url", api.url)) == 0
    assert api.requests[0]["api_key"] == API_KEY


def test_no_threshold_prints_no_verdict(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.threshold = None
    assert predict_command(parse(str(GOOD), "--url", api.url, "--api-key", API_KEY)) == 0
    assert capsys.readouterr().out.rstrip().endswith("  -  threshold=none")


def test_several_images_are_sent_concurrently(api: FakeApi, tmp_path: Path) -> None:
    api.delay_s = 0.3
    images = []
    for index in range(4):
        path = tmp_path / f"copy{index}.jpg"
        path.write_bytes(GOOD.read_bytes())
        images.append(str(path))
    assert predict_command(parse(*images, "--url", api.url, "--api-key", API_KEY)) == 0
    assert len(api.requests) == 4
    assert api.max_in_flight >= 2  # each request is held 0.3 s on the server


def test_missing_file_is_a_user_error(api: FakeApi, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nothing\.jpg"):
        predict_command(parse(str(GOOD), str(tmp_path / "nothing.jpg"), "--url", api.url))
    assert api.requests == []  # checked before anything is sent


def test_unreachable_server_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there
    assert predict_command(parse(str(GOOD), "--url", f"http://127.0.0.1:{port}", "--timeout", "5")) == 1
    assert "request to" in capsys.readouterr().err


def test_heatmap_filenames_avoid_collisions() -> None:
    names = heatmap_filenames(
        [Path("good/000.png"), Path("crack/000.png"), Path("a/x.jpg"), Path("b/x/y.png")]
    )
    assert names == ["good_000_heatmap.png", "crack_000_heatmap.png", "x_heatmap.png", "y_heatmap.png"]
    assert heatmap_filenames([Path("a/s/1.png"), Path("b/s/1.png")]) == [
        "s_1_0_heatmap.png",
        "s_1_1_heatmap.png",
    ]


def test_style_choices_match_the_server() -> None:
    assert HEATMAP_STYLE_CHOICES == HEATMAP_STYLES
    assert content_type_for(Path("x.TIFF")) == "image/tiff"


def test_predict_via_the_efficientad_command(
    api: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once server/cli.py registers `predict`, the console command runs this client (exit 2: missing file)."""
    from efficientad.cli import build_parser, main

    try:
        build_parser().parse_args(["predict", str(GOOD)])
    except SystemExit:
        pytest.skip("server/cli.py does not register `predict` yet")
    assert main(["predict", str(GOOD), "--url", api.url, "--api-key", API_KEY]) == 0
    assert capsys.readouterr().out.startswith(f"{GOOD}  ")
    assert main(["predict", str(tmp_path / "missing.png"), "--url", api.url]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_image_bytes_arrive_unchanged(
    api: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The body is the file itself, so the server's decode sees the original pixels."""
    bright = tmp_path / "bright.png"
    Image.new("RGB", (40, 40), (250, 250, 250)).save(bright, format="PNG")
    api.threshold = 0.9
    assert predict_command(parse(str(bright), "--url", api.url, "--api-key", API_KEY)) == 0
    _, score, verdict, _ = capsys.readouterr().out.strip().split("  ")
    assert float(score) == pytest.approx(250 / 255, abs=1e-6)
    assert verdict == "ANOMALY"


def test_the_console_prints_results_only_and_the_request_log_behind_verbose(api: FakeApi) -> None:
    """`efficientad predict` as a new user runs it: stdout one line per image, stderr without httpx's
    `HTTP Request: POST ...` INFO line per request; with -v that line comes back."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "efficientad", "predict", str(GOOD), str(GOOD), "--url", api.url,
               "--api-key", API_KEY]  # fmt: skip
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert quiet.returncode == 0, quiet.stderr
    assert [line.split("  ")[0] for line in quiet.stdout.splitlines()] == [str(GOOD), str(GOOD)]
    assert "HTTP Request" not in quiet.stderr
    verbose = subprocess.run([*command, "-v"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert verbose.returncode == 0 and verbose.stderr.count("HTTP Request: POST") == 2
