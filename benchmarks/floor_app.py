"""The floor: a minimal FastAPI app doing the server's work on one image and nothing else.

    python -m benchmarks.floor_app MODEL_DIR --port 8001

One route, POST /predict: read the body, decode with simplejpeg (DCT-scaled as the server does), resize to
the model's input with Pillow, run model.onnx with ONNX Runtime (1 intra-op thread) on one model thread
off the event loop, label the map above the threshold with scipy for boxes, answer with orjson; unless
`?heatmap=none`, a palette PNG by Pillow (compress_level 1) in base64. GET /health/live and /health/ready
as the probes. No batching, checks, metrics, logs or errors: what a request costs done plainly, measured
beside the server in the same run (benchmarks.server_overhead). It never imports the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import simplejpeg
import uvicorn
from fastapi import FastAPI, Request, Response
from PIL import Image
from scipy import ndimage

JET = (np.stack([np.interp(np.linspace(0, 1, 256), [0, 0.35, 0.66, 0.89, 1], [0, 0, 1, 1, 0.5]),
                 np.interp(np.linspace(0, 1, 256), [0, 0.125, 0.375, 0.64, 0.91, 1], [0, 0, 1, 1, 0, 0]),
                 np.interp(np.linspace(0, 1, 256), [0, 0.11, 0.34, 0.65, 1], [0.5, 1, 1, 0, 0])], 1)
       * 255).round().astype(np.uint8).tobytes()  # fmt: skip


def create_floor_app(model_dir: Path) -> FastAPI:
    """The app for the model in `model_dir` (model.onnx + model.json)."""
    info = json.loads((model_dir / "model.json").read_text())
    height, width = info["input"]["height"], info["input"]["width"]
    threshold = float(info["threshold"])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    model_thread = ThreadPoolExecutor(max_workers=1)
    app = FastAPI()

    def infer(pixels: np.ndarray) -> tuple[np.ndarray, float]:
        anomaly_map, score = session.run(None, {"image": pixels.transpose(2, 0, 1)[None]})
        return anomaly_map[0, 0], float(score[0])  # (H, W), score

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        data = await request.body()
        rows, columns, _, _ = simplejpeg.decode_jpeg_header(data)
        scale = next(
            s for s in (8, 4, 2, 1) if (rows // s >= 2 * height and columns // s >= 2 * width) or s == 1
        )
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=scale)
        if pixels.shape[:2] != (height, width):
            pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR))
        anomaly_map, score = await asyncio.get_running_loop().run_in_executor(model_thread, infer, pixels)
        labels, _ = ndimage.label(anomaly_map > threshold)
        boxes = [{"x": c.start, "y": r.start, "width": c.stop - c.start, "height": r.stop - r.start}
                 for r, c in ndimage.find_objects(labels)]  # fmt: skip
        answer = {"score": score, "is_anomaly": score > threshold, "threshold": threshold, "regions": boxes}
        if request.query_params.get("heatmap") != "none":
            levels = np.clip(anomaly_map * (127.5 / threshold), 0, 255).astype(np.uint8)
            image = Image.frombytes("P", (width, height), levels.tobytes())
            image.putpalette(JET)
            png = io.BytesIO()
            image.save(png, format="PNG", compress_level=1)
            answer["heatmap_png"] = base64.b64encode(png.getvalue()).decode()
        return Response(orjson.dumps(answer), media_type="application/json")

    @app.get("/health/live")
    @app.get("/health/ready")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.floor_app", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    uvicorn.run(create_floor_app(args.model_dir), host=args.host, port=args.port, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
