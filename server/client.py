"""`efficientad predict IMAGE...`: send images to a running server, print one verdict line per image.

Each image goes as the raw request body with the Content-Type of its suffix; several images are sent
concurrently (one pooled HTTP client, a few threads) and printed in the order given. Heatmaps are written
as `<out>/<stem>_heatmap.png` when --out is given. Needs only httpx: no numpy, no model.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficientad.errors import UserError

if TYPE_CHECKING:
    import httpx

# The same names as server.heatmap.HEATMAP_STYLES (a test keeps them equal); repeated here so that
# building the CLI parser does not import numpy and Pillow.
HEATMAP_STYLE_CHOICES = ("gray", "jet", "overlay")
HEATMAP_SIZE_CHOICES = ("model", "original")
DEFAULT_URL = "http://127.0.0.1:8000"
MAX_CONCURRENT_REQUESTS = 8
EXIT_OK = 0
EXIT_REQUEST_FAILED = 1


@dataclass(frozen=True)
class PredictionLine:
    """What the command prints for one image: a verdict line, or an error line (failed)."""

    text: str
    failed: bool


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The `predict` subcommand's arguments (the handler is predict_command)."""
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files to score")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    parser.add_argument("--model", default=None, help="model name (default: the server's default model)")
    parser.add_argument("--out", type=Path, default=None, help="write <stem>_heatmap.png files here")
    parser.add_argument(
        "--heatmap-style",
        choices=HEATMAP_STYLE_CHOICES,
        default=None,
        help="heatmap colouring (default: the server's, normally jet)",
    )
    parser.add_argument(
        "--heatmap-size",
        choices=HEATMAP_SIZE_CHOICES,
        default=None,
        help="heatmap at the model's input size or the image's original size (default: the server's)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("EAD_API_KEY"),
        help="API key sent as X-API-Key (default: $EAD_API_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also log each HTTP request (httpx's INFO lines)"
    )


def heatmap_filenames(images: list[Path]) -> list[str]:
    """`<stem>_heatmap.png` per image; images sharing a stem (good/000.png, crack/000.png) get their
    folder name in front, and any name still taken gets the image's position appended."""
    stem_counts = Counter(path.stem for path in images)
    names = [
        f"{path.parent.name}_{path.stem}" if stem_counts[path.stem] > 1 else path.stem for path in images
    ]
    name_counts = Counter(names)
    return [
        f"{name}_{index}_heatmap.png" if name_counts[name] > 1 else f"{name}_heatmap.png"
        for index, name in enumerate(names)
    ]


def _query_parameters(args: argparse.Namespace) -> dict[str, str]:
    params = {"heatmap": "png" if args.out is not None else "none"}
    if args.model:
        params["model"] = args.model
    if args.heatmap_style:
        params["heatmap_style"] = args.heatmap_style
    if args.heatmap_size:
        params["heatmap_size"] = args.heatmap_size
    return params


def _error_detail(response: httpx.Response) -> str:
    """The server's `detail` (our JSON error body), or the start of whatever else it sent."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else str(detail)
    return str(body)[:200]


def format_result(path: Path, result: dict[str, Any]) -> str:
    """`path  score  ANOMALY|ok  threshold=T` (verdict '-' when the model has no threshold)."""
    threshold = result.get("threshold")
    if threshold is None:
        verdict, threshold_text = "-", "none"
    else:
        verdict, threshold_text = ("ANOMALY" if result["is_anomaly"] else "ok"), f"{threshold:.6f}"
    return f"{path}  {result['score']:.6f}  {verdict}  threshold={threshold_text}"


def _predict_one(
    client: httpx.Client, url: str, params: dict[str, str], path: Path, heatmap_path: Path | None
) -> PredictionLine:
    import httpx

    from server.imaging import content_type_for  # numpy and Pillow: not at parser-building time

    headers = {"Content-Type": content_type_for(path)}
    try:
        response = client.post(url, params=params, content=path.read_bytes(), headers=headers)
    except OSError as error:
        return PredictionLine(f"{path}  error: cannot read the file: {error}", failed=True)
    except httpx.HTTPError as error:
        return PredictionLine(f"{path}  error: request to {url} failed: {error}", failed=True)
    if response.status_code != 200:
        return PredictionLine(
            f"{path}  error: HTTP {response.status_code}: {_error_detail(response)}", failed=True
        )
    try:
        result = response.json()
        line = format_result(path, result)
    except (ValueError, KeyError, TypeError) as error:
        return PredictionLine(f"{path}  error: unexpected response from {url}: {error}", failed=True)
    if heatmap_path is not None:
        if not result.get("heatmap_png"):
            return PredictionLine(f"{line}  (error: the server sent no heatmap)", failed=True)
        try:
            heatmap_path.write_bytes(base64.b64decode(result["heatmap_png"]))
        except (OSError, ValueError) as error:
            return PredictionLine(f"{line}  (error: cannot write {heatmap_path}: {error})", failed=True)
    return PredictionLine(line, failed=False)


def predict_command(args: argparse.Namespace) -> int:
    """Score every image; 0 if all succeeded, 1 if any request failed (a missing file is a UserError: 2)."""
    import httpx

    # the results (and errors) only: httpx logs every request at INFO, one line between every two results
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.INFO if args.verbose else logging.WARNING)
    images: list[Path] = list(args.images)
    missing = [str(path) for path in images if not path.is_file()]
    if missing:
        raise UserError(f"image file not found: {', '.join(missing)}")
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the output folder {args.out}: {error}") from None
        heatmap_paths: list[Path | None] = [args.out / name for name in heatmap_filenames(images)]
    else:
        heatmap_paths = [None] * len(images)

    url = args.url.rstrip("/") + "/predict"
    params = _query_parameters(args)
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    workers = min(MAX_CONCURRENT_REQUESTS, len(images))
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    failed = False
    with (
        httpx.Client(timeout=args.timeout, headers=headers, limits=limits) as client,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        lines = pool.map(
            lambda job: _predict_one(client, url, params, *job), zip(images, heatmap_paths, strict=True)
        )
        for line in lines:  # in the order given, each as soon as it and those before it are done
            stream = sys.stderr if line.failed else sys.stdout
            stream.write(line.text + "\n")
            stream.flush()
            failed = failed or line.failed
    return EXIT_REQUEST_FAILED if failed else EXIT_OK
