"""The operator page end to end: real headless Chromium, the real server on loopback (ONNX Runtime CPU).

A 64 px model exported from a random-weight checkpoint; real cookie images go in through the page's file
input (and its keyboard file picker), and what the page shows is checked against the API's own answer.
Needs Debian's chromium (`make install-browser`) and the playwright package; skips naming what is missing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path(os.environ.get("EAD_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: run `make install-browser` (apt-get install chromium) "
        "or set EAD_CHROMIUM",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[dev]')"
)

sync_api.expect.set_options(timeout=15_000)  # the 2 shared CI cores can be slow; a pass stays fast

REPO = Path(__file__).resolve().parents[2]
ANOMALY_IMAGE = REPO / "samples/cookie/test/anomaly/anomaly-10.jpg"
SECOND_ANOMALY_IMAGE = REPO / "samples/cookie/test/anomaly/anomaly-11.jpg"
GOOD_IMAGE = REPO / "samples/cookie/test/good/test-normal-1.jpg"
DOCS_SCREENSHOT = REPO / "docs/operator-page.png"
IMAGE_SIZE = 64
THRESHOLD = 0.0005  # near this random model's scores, so the screenshot shows both verdicts
API_KEY = "line-7-operator-key"
VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Every control a keyboard user needs, in page order.
CONTROLS_IN_TAB_ORDER = [
    "drop-zone",
    "threshold-slider",
    "threshold-input",
    "threshold-reset",
    "heatmap-style",
    "api-key",
    "clear-results",
]
SCORE_IN_JSON = re.compile(r'"score"\s*:\s*(-?[0-9.eE+-]+)')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px model dir exported from a random-weight checkpoint."""
    pytest.importorskip("torch")
    from tests.server.conftest import export_random_model

    root = tmp_path_factory.mktemp("operator-page")
    return export_random_model(
        root, IMAGE_SIZE, name="cookie-line", threshold=THRESHOLD, parity_images=[ANOMALY_IMAGE]
    )


@contextmanager
def serving(model_dir: Path, *, api_key: str | None = None) -> Iterator[str]:
    """The app as shipped (create_app mounts the page) under uvicorn on loopback, ready; yields its URL."""
    from server.app import create_app
    from server.config import Settings
    from tests.server.conftest import running_server

    settings = Settings(
        model_dirs=[model_dir],
        backend="onnxruntime-cpu",
        max_batch_size=4,
        intra_op_threads=1,
        decode_threads=1,
        api_key=api_key,
        log_format="text",
        log_level="WARNING",
    )
    with running_server(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport=VIEWPORT)  # a fresh context: empty sessionStorage
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    yield page
    context.close()
    assert not page_errors, f"JavaScript errors on the page: {page_errors}"


def api_predict(url: str, image: Path, *, api_key: str | None = None, **params: str) -> tuple[str, dict]:
    """POST the image to /predict as a client would: (the score exactly as written in the JSON, the JSON)."""
    headers = {"Content-Type": "image/jpeg", "Accept": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    response = httpx.post(
        f"{url}/predict", content=image.read_bytes(), headers=headers, params=params, timeout=30
    )
    assert response.status_code == 200, response.text
    match = SCORE_IN_JSON.search(response.text)
    assert match, response.text
    return match.group(1), response.json()


def result_card(page: object, filename: str) -> object:
    return page.locator(f'.result[data-filename="{filename}"]')


def wait_for_done(page: object, filename: str) -> object:
    card = result_card(page, filename)
    card.and_(page.locator('[data-state="done"]')).wait_for(timeout=30_000)
    return card


def png_pixels(data_url: str) -> object:
    import numpy as np
    from PIL import Image

    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def server_url(model_dir: Path) -> Iterator[str]:
    with serving(model_dir) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server_url(model_dir: Path) -> Iterator[str]:
    with serving(model_dir, api_key=API_KEY) as url:
        yield url


def open_page(page: object, url: str) -> list[str]:
    """Load the operator page; returns the list the page's /predict requests are appended to."""
    predict_requests: list[str] = []
    page.on("request", lambda request: "/predict" in request.url and predict_requests.append(request.url))
    page.goto(url + "/")
    sync_api.expect(page.locator("#readiness")).to_have_text("Ready")
    return predict_requests


def server_predict_requests(url: str) -> int:
    """The predict requests the server counted, read from /metrics here in Python."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        match = re.match(r"ead_requests_total\{(.*)\} (\S+)$", line)
        if match and "predict" in dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))).get("route", ""):
            total += float(match.group(2))
    return int(total)


def test_model_info_and_readiness_come_from_the_api(server_url: str, page: object) -> None:
    open_page(page, server_url)
    model = httpx.get(f"{server_url}/v1/model").json()
    sync_api.expect(page.locator("#model-name")).to_have_text("cookie-line")
    sync_api.expect(page.locator("#model-version")).to_have_text(model["version"])
    sync_api.expect(page.locator("#model-input")).to_have_text(f"{IMAGE_SIZE}×{IMAGE_SIZE}")
    sync_api.expect(page.locator("#model-backend")).to_contain_text(model["backend"])
    sync_api.expect(page.locator("#threshold-input")).to_have_value(str(THRESHOLD))
    sync_api.expect(page.locator("#threshold-default")).to_have_text(f"Model default: {THRESHOLD}")


def test_uploaded_image_shows_the_api_score_verdict_and_heatmap(server_url: str, page: object) -> None:
    predict_requests = open_page(page, server_url)
    page.set_input_files("#file-input", [str(ANOMALY_IMAGE)])
    card = wait_for_done(page, ANOMALY_IMAGE.name)
    api_score, api_body = api_predict(server_url, ANOMALY_IMAGE)

    # Exactly the score the API writes for the same file (both alone in their batch: bit-identical).
    assert card.get_attribute("data-score") == api_score
    assert card.locator(".score").inner_text() == api_score
    assert card.locator(".verdict").inner_text() == ("ANOMALY" if api_body["is_anomaly"] else "OK")
    heatmap = card.locator(".heatmap")
    assert heatmap.get_attribute("src") == f"data:image/png;base64,{api_body['heatmap_png']}"
    assert heatmap.evaluate("image => image.complete && image.naturalWidth") == IMAGE_SIZE
    width, height = api_body["image_size"]
    assert card.locator(".image-size").inner_text() == f"{width}×{height}"
    assert card.locator(".original").evaluate("image => image.naturalWidth") == width
    assert "inference" in card.locator(".timings").inner_text()
    assert len(predict_requests) == 1

    # Several files at once: one result each, scored by the server (batched, so float32-close).
    page.set_input_files("#file-input", [str(GOOD_IMAGE), str(SECOND_ANOMALY_IMAGE)])
    for image in (GOOD_IMAGE, SECOND_ANOMALY_IMAGE):
        shown = float(wait_for_done(page, image.name).get_attribute("data-score"))
        assert shown == pytest.approx(float(api_predict(server_url, image)[0]), rel=1e-4, abs=1e-7)
    sync_api.expect(page.locator("#results-summary")).to_contain_text("3 images")
    assert len(predict_requests) == 3


def test_threshold_flips_verdicts_client_side(server_url: str, page: object) -> None:
    predict_requests = open_page(page, server_url)
    page.set_input_files("#file-input", [str(ANOMALY_IMAGE)])
    card = wait_for_done(page, ANOMALY_IMAGE.name)
    score = float(card.get_attribute("data-score"))
    verdict = card.locator(".verdict")
    assert verdict.inner_text() == ("ANOMALY" if score > THRESHOLD else "OK")

    page.fill("#threshold-input", repr(score * 2))
    sync_api.expect(verdict).to_have_text("OK")
    sync_api.expect(card).to_have_attribute("data-verdict", "ok")
    page.fill("#threshold-input", repr(score / 2))
    sync_api.expect(verdict).to_have_text("ANOMALY")
    page.fill("#threshold-input", repr(score))  # the server's rule: anomalous when score > threshold
    sync_api.expect(verdict).to_have_text("OK")

    page.focus("#threshold-slider")
    page.keyboard.press("Home")  # threshold 0
    sync_api.expect(verdict).to_have_text("ANOMALY")
    assert float(page.input_value("#threshold-input")) == 0
    page.keyboard.press("End")  # the slider reaches above every score seen
    sync_api.expect(verdict).to_have_text("OK")
    assert float(page.input_value("#threshold-input")) > score

    page.click("#threshold-reset")
    sync_api.expect(page.locator("#threshold-input")).to_have_value(str(THRESHOLD))
    sync_api.expect(verdict).to_have_text("ANOMALY" if score > THRESHOLD else "OK")
    assert len(predict_requests) == 1  # no new request for any threshold change


def test_heatmap_style_rerenders_through_the_server(server_url: str, page: object) -> None:
    predict_requests = open_page(page, server_url)
    page.set_input_files("#file-input", [str(ANOMALY_IMAGE)])
    card = wait_for_done(page, ANOMALY_IMAGE.name)
    heatmap = card.locator(".heatmap")
    jet = png_pixels(heatmap.get_attribute("src"))
    assert not (jet[..., 0] == jet[..., 2]).all()  # jet is coloured

    page.select_option("#heatmap-style", "gray")
    sync_api.expect(card.locator(".heatmap-style-name")).to_have_text("gray")
    gray = png_pixels(heatmap.get_attribute("src"))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert card.get_attribute("data-score") == api_predict(server_url, ANOMALY_IMAGE)[0]

    page.select_option("#heatmap-style", "overlay")
    sync_api.expect(card.locator(".heatmap-style-name")).to_have_text("overlay")
    expected = api_predict(server_url, ANOMALY_IMAGE, heatmap_style="overlay")[1]["heatmap_png"]
    assert heatmap.get_attribute("src") == f"data:image/png;base64,{expected}"
    styles = [url.split("heatmap_style=")[1].split("&")[0] for url in predict_requests]
    assert styles == ["jet", "gray", "overlay"]
    assert all(f"threshold={THRESHOLD}" in url for url in predict_requests)  # regions at the page's threshold


def test_keyboard_reaches_every_control_and_opens_the_file_picker(server_url: str, page: object) -> None:
    # Subscribe to file choosers now: Playwright turns on the interception asynchronously, and a key press
    # right after `expect_file_chooser` could otherwise open the picker before it is intercepted.
    page.on("filechooser", lambda _chooser: None)
    open_page(page, server_url)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    focused: list[str] = []
    for _ in range(12):
        page.keyboard.press("Tab")
        element_id, outline_style, outline_width = page.evaluate(
            "() => { const e = document.activeElement; const s = getComputedStyle(e);"
            " return [e.id, s.outlineStyle, s.outlineWidth]; }"
        )
        if element_id in CONTROLS_IN_TAB_ORDER:
            focused.append(element_id)
            assert outline_style != "none" and float(outline_width.removesuffix("px")) >= 2, element_id
        if element_id == CONTROLS_IN_TAB_ORDER[-1]:
            break
    assert focused == CONTROLS_IN_TAB_ORDER

    # The drop zone is a button: Enter (and Space) open the file picker; the chosen files are inspected.
    page.focus("#drop-zone")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    assert chooser.value.is_multiple()
    chooser.value.set_files(str(ANOMALY_IMAGE))
    wait_for_done(page, ANOMALY_IMAGE.name)
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(str(GOOD_IMAGE))
    wait_for_done(page, GOOD_IMAGE.name)
    assert page.locator("#results").get_attribute("aria-live") == "polite"


def test_dropped_files_are_inspected(server_url: str, page: object) -> None:
    open_page(page, server_url)
    files = [
        (image.name, base64.b64encode(image.read_bytes()).decode()) for image in (ANOMALY_IMAGE, GOOD_IMAGE)
    ]
    transfer = page.evaluate_handle(
        """files => {
            const transfer = new DataTransfer();
            for (const [name, data] of files) {
                const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
            }
            return transfer;
        }""",
        files,
    )
    page.dispatch_event("#drop-zone", "dragenter", {"dataTransfer": transfer})
    sync_api.expect(page.locator("#drop-zone")).to_have_class(re.compile(r"\bdragging\b"))
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    sync_api.expect(page.locator("#drop-zone")).not_to_have_class(re.compile(r"\bdragging\b"))
    for image in (ANOMALY_IMAGE, GOOD_IMAGE):
        assert float(wait_for_done(page, image.name).get_attribute("data-score")) > 0


def test_api_errors_are_shown_on_their_image(server_url: str, page: object) -> None:
    open_page(page, server_url)
    uploads = [
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"},
        {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": ANOMALY_IMAGE.read_bytes()[:200]},
    ]
    good = {"name": GOOD_IMAGE.name, "mimeType": "image/jpeg", "buffer": GOOD_IMAGE.read_bytes()}
    page.set_input_files("#file-input", [*uploads, good])
    for upload in uploads:
        response = httpx.post(
            f"{server_url}/predict", content=upload["buffer"], headers={"Content-Type": upload["mimeType"]}
        )
        assert response.status_code in (400, 415)
        body = response.json()
        card = result_card(page, upload["name"])
        card.and_(page.locator('[data-state="error"]')).wait_for(timeout=30_000)
        assert (
            card.locator(".error").inner_text() == f"{response.status_code} {body['error']}: {body['detail']}"
        )
        assert card.locator(".verdict").inner_text() == "ERROR"
    wait_for_done(page, GOOD_IMAGE.name)  # one bad file does not stop the others
    sync_api.expect(page.locator("#results-summary")).to_contain_text("2 failed")


def test_live_metrics_and_screenshot(server_url: str, page: object, tmp_path: Path) -> None:
    open_page(page, server_url)
    images = [ANOMALY_IMAGE, GOOD_IMAGE, SECOND_ANOMALY_IMAGE]
    page.set_input_files("#file-input", [str(image) for image in images])
    for image in images:
        wait_for_done(page, image.name)

    # Request rate, latency and mean batch size over the poll interval that saw the three predictions.
    page.wait_for_function(
        "() => ['metric-rate', 'metric-latency', 'metric-batch'].every(id =>"
        " /^[0-9]+[.][0-9]+$/.test(document.getElementById(id).textContent))"
        " && Number(document.getElementById('metric-rate').textContent) > 0",
        timeout=15_000,
    )
    assert 1 <= float(page.inner_text("#metric-batch")) <= 4  # the server's max_batch_size
    assert float(page.inner_text("#metric-latency")) > 0
    sync_api.expect(page.locator("#metric-total")).to_have_text(
        str(server_predict_requests(server_url)), timeout=10_000
    )

    # Clear, then the three results again for the docs: 1280x800 at the model's threshold.
    page.click("#clear-results")
    sync_api.expect(page.locator(".result")).to_have_count(0)
    sync_api.expect(page.locator("#results-empty")).to_be_visible()
    page.set_input_files("#file-input", [str(image) for image in images])
    for image in images:
        wait_for_done(page, image.name)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    screenshot = tmp_path / "operator-page.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000


def test_api_key_missing_shows_401_then_key_gives_results(keyed_server_url: str, page: object) -> None:
    url = keyed_server_url
    open_page(page, url)

    page.set_input_files("#file-input", [str(ANOMALY_IMAGE)])
    card = result_card(page, ANOMALY_IMAGE.name)
    card.and_(page.locator('[data-state="error"]')).wait_for(timeout=30_000)
    error_text = card.locator(".error").inner_text()
    assert error_text.startswith("401 Unauthorized: missing API key"), error_text
    assert "API key" in page.locator("#banner").inner_text()
    assert card.locator(".verdict").inner_text() == "ERROR"
    assert card.get_attribute("data-score") is None

    # Entering the key retries the refused image with X-API-Key and keeps the key for this tab.
    page.fill("#api-key", API_KEY)
    page.keyboard.press("Enter")
    wait_for_done(page, ANOMALY_IMAGE.name)
    assert card.get_attribute("data-score") == api_predict(url, ANOMALY_IMAGE, api_key=API_KEY)[0]
    sync_api.expect(page.locator("#banner")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('efficientad.apiKey')") == API_KEY
    sync_api.expect(page.locator("#model-name")).to_have_text("cookie-line")

    # A wrong key is refused with the server's own message, shown on the image.
    page.fill("#api-key", "not-the-key")
    page.keyboard.press("Enter")
    page.set_input_files("#file-input", [str(GOOD_IMAGE)])
    good_card = result_card(page, GOOD_IMAGE.name)
    good_card.and_(page.locator('[data-state="error"]')).wait_for(timeout=30_000)
    assert good_card.locator(".error").inner_text().startswith("401 Unauthorized: wrong API key")


def test_page_and_assets_need_no_key_and_stay_out_of_the_api_schema(keyed_server_url: str) -> None:
    url = keyed_server_url
    index = httpx.get(url + "/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', index.text):
        response = httpx.get(f"{url}/{asset}")
        assert response.status_code == 200, asset
        assert response.content, asset
    assert {"static/app.js", "static/style.css"} <= set(re.findall(r'"(static/[^"]+)"', index.text))
    openapi = json.loads(httpx.get(url + "/openapi.json").text)
    assert "/" not in openapi["paths"]
    assert httpx.post(url + "/predict", content=GOOD_IMAGE.read_bytes()).status_code == 401


SHIPPED_CHECKPOINT = REPO / "samples/models/cookie"


@pytest.fixture(scope="module")
def shipped_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped cookie model (samples/models/cookie) exported, as `make demo` serves it."""
    if not (SHIPPED_CHECKPOINT / "checkpoint.json").is_file():
        pytest.skip("samples/models/cookie is not committed")
    pytest.importorskip("torch")
    from export.exporter import export_model

    out_dir = tmp_path_factory.mktemp("shipped") / "cookie"
    export_model(SHIPPED_CHECKPOINT, out_dir, parity_images=[ANOMALY_IMAGE])
    return out_dir


def test_the_shipped_model_draws_defect_regions_and_makes_the_docs_screenshot(
    shipped_model_dir: Path, page: object, tmp_path: Path
) -> None:
    """The docs' screenshot: the shipped cookie model at its own threshold, boxes on the bitten cookies."""
    images = [ANOMALY_IMAGE, REPO / "samples/cookie/test/good/test-normal-10.jpg", SECOND_ANOMALY_IMAGE]
    with serving(shipped_model_dir) as url:
        open_page(page, url)
        page.set_input_files("#file-input", [str(image) for image in images])
        for image in images:
            card = wait_for_done(page, image.name)
            _, answer = api_predict(url, image)
            assert card.get_attribute("data-regions") == str(len(answer["regions"]))
            assert card.locator(".region").count() == len(answer["regions"])
        bitten = result_card(page, ANOMALY_IMAGE.name)
        assert bitten.locator(".verdict").inner_text() == "ANOMALY"
        assert bitten.locator(".region").count() >= 1
        box = bitten.locator(".region").first.bounding_box()
        frame = bitten.locator(".image-frame").bounding_box()
        assert box is not None and frame is not None
        assert frame["x"] <= box["x"] and box["x"] + box["width"] <= frame["x"] + frame["width"] + 1
        assert frame["y"] <= box["y"] and box["y"] + box["height"] <= frame["y"] + frame["height"] + 1
        page.evaluate("document.activeElement && document.activeElement.blur()")
        screenshot = tmp_path / "operator-page.png"
        page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("EAD_UPDATE_SCREENSHOT") == "1" or not DOCS_SCREENSHOT.exists():
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)
