"""`efficientad serve MODEL_DIR...` (uvicorn + the FastAPI app), `efficientad predict IMAGE...` (the client),
`efficientad calibrate MODEL_DIR GOOD_DIR` (a threshold for a false-alarm rate, server.calibrate).

Options not given on the command line come from `EAD_*` environment variables, then the defaults.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
from pathlib import Path
from typing import Any

from efficientad.errors import UserError

BACKENDS = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")


def register(subcommands: argparse._SubParsersAction) -> None:
    from server.client import add_predict_arguments, predict_command

    serve = subcommands.add_parser(
        "serve",
        help="serve model directories over HTTP",
        description="Serve exported model directories over HTTP (see /docs on the running server).",
    )
    serve.add_argument(
        "model_dirs", nargs="+", metavar="MODEL_DIR", help="model directory, or NAME=MODEL_DIR"
    )
    serve.add_argument(
        "--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)"
    )
    serve.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    serve.add_argument("--backend", choices=BACKENDS, default=None, help="inference backend (default auto)")
    serve.add_argument(
        "--max-batch-size", type=int, default=None, help="images per inference call (default 16)"
    )
    serve.add_argument(
        "--max-batch-delay-ms",
        type=float,
        default=None,
        help="optional bound on waiting for a batch to fill (default 0: never wait; batches form while "
        "the previous one runs)",
    )
    serve.add_argument("--max-queue", type=int, default=None, help="queued images per model before 503 (256)")
    serve.add_argument(
        "--request-timeout-ms", type=float, default=None, help="request deadline (default 10000)"
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="connections + requests in progress before a fast 503 (default 1024; 0 = no cap)",
    )
    serve.add_argument(
        "--body-timeout-s", type=float, default=None, help="longest a request body may take (default 10)"
    )
    serve.add_argument("--default-model", default=None, help="model for /predict (default: the first)")
    serve.add_argument(
        "--api-key",
        default=None,
        help="require this key (prefer the EAD_API_KEY variable: arguments are visible in ps)",
    )
    serve.add_argument(
        "--log-format", choices=("json", "text"), default=None, help="log lines (default json)"
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="server processes, each with its own models (1)"
    )
    serve.set_defaults(handler=serve_command)

    predict = subcommands.add_parser(
        "predict", help="score images with a running server", description="Send images to a running server."
    )
    add_predict_arguments(predict)
    predict.set_defaults(handler=predict_command)

    calibrate = subcommands.add_parser(
        "calibrate",
        help="choose a model's threshold for a false-alarm rate on good images",
        description="Score every image under GOOD_DIR (and --defect-dir) with MODEL_DIR/model.onnx on "
        "the CPU, decoded as the server decodes them, and print the threshold for a false-alarm rate: "
        "the smallest good score t with at most that fraction of the good scores above t. Also the "
        "current threshold's false-alarm rate and, with defects, the miss rate and the image AUROC.",
    )
    add_calibrate_arguments(calibrate)
    calibrate.set_defaults(handler=calibrate_command)


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """The `calibrate` subcommand's arguments (the handler is calibrate_command)."""
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="exported model directory")
    parser.add_argument(
        "good_dir", type=Path, metavar="GOOD_DIR", help="folder of good images (searched recursively)"
    )
    parser.add_argument(
        "--defect-dir", type=Path, default=None, metavar="DIR", help="folder of defect images (recursive)"
    )
    parser.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.01,
        metavar="RATE",
        help="largest fraction of good images flagged as anomalies (default 0.01)",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="store the new threshold in MODEL_DIR/model.json (the old one goes to threshold_history; "
        "model.onnx and the model version stay the same)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="OUT",
        help="also write everything (scores per image, thresholds, rates, AUROC) to this JSON file",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference call (default 8)")
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime CPU threads (default 0: all usable cores)"
    )


def calibrate_command(args: argparse.Namespace) -> int:
    from server.calibrate import calibrate, summary_lines, write_calibration, write_report

    calibration = calibrate(
        args.model_dir,
        args.good_dir,
        defect_dir=args.defect_dir,
        false_alarm_rate=args.false_alarm_rate,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    written = write_calibration(calibration) if args.write else None
    if args.json is not None:
        write_report(calibration, args.json, written=written is not None)
    print("\n".join(summary_lines(calibration, written=written)))
    return 0


def _settings_from(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from server.config import Settings

    given = {
        "model_dirs": args.model_dirs,
        "host": args.host,
        "port": args.port,
        "backend": args.backend,
        "max_batch_size": args.max_batch_size,
        "max_batch_delay_ms": args.max_batch_delay_ms,
        "max_queue": args.max_queue,
        "request_timeout_ms": args.request_timeout_ms,
        "max_connections": args.max_connections,
        "body_timeout_s": args.body_timeout_s,
        "default_model": args.default_model,
        "api_key": args.api_key,
        "log_format": args.log_format,
    }
    try:
        return Settings(**{key: value for key, value in given.items() if value is not None})
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'settings'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise UserError(f"invalid server settings: {problems}") from None


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from efficientad.model_dir import read_model_dir
    from server.backends import check_backend_available
    from server.logs import configure_logging

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    settings = _settings_from(args)
    for name, path in settings.models():  # a wrong folder is a one-line error, before uvicorn starts
        read_model_dir(path, name=name, verify_hash=False)
    check_backend_available(settings.backend)
    configure_logging(settings.log_level, settings.log_format)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; with this handler in place that
    # re-raise is a no-op, so a drained shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,  # our own access line per request (server.logs)
        "log_config": None,
        "timeout_graceful_shutdown": math.ceil(settings.graceful_shutdown_s),
        "limit_concurrency": settings.max_connections or None,  # beyond it: a fast 503, per worker
    }
    if args.workers == 1:
        from server.app import create_app

        uvicorn.run(create_app(settings), **options)
    else:  # each worker process builds its app from the environment
        os.environ.update(settings.to_environment())
        uvicorn.run("server.app:create_app_from_environment", factory=True, workers=args.workers, **options)
    return 0
