"""`efficientad bench`: milliseconds per part and parts per second, per backend, side by side.

Imports nothing heavy at import time: the handler imports the benchmark code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from efficientad.errors import UserError

CPU_BATCH_SIZES = "1,2,4,8"
GPU_BATCH_SIZES = "1,2,4,8,16,32,64"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return sorted(set(values))


def _float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return values


def register(subcommands: argparse._SubParsersAction) -> None:
    bench = subcommands.add_parser(
        "bench",
        help="benchmark backends, pipeline stages, training steps and the HTTP server",
        description="Latency and throughput per backend and batch size, per pipeline stage, and over HTTP "
        "under load; seconds per distillation and training step; writes "
        "benchmarks/results/<device>-<date>.json + .md + .png. Without --model-dir or --run-dir a "
        "random-weight model is made for timing (said so in the report).",
    )
    model = bench.add_argument_group("model")
    model.add_argument("--model-dir", type=Path, help="exported model dir (model.onnx + model.json)")
    model.add_argument(
        "--run-dir", type=Path, help="training run dir (checkpoint): exported here, used by PyTorch rows"
    )
    model.add_argument(
        "--model-size", choices=["small", "medium"], default="small", help="random model: PDN size"
    )
    model.add_argument("--image-size", type=int, default=256, help="random model: input side in px (256)")
    model.add_argument(
        "--image", type=Path, help="photo every input is made from (default: a bundled cookie image)"
    )
    timing = bench.add_argument_group("backends")
    timing.add_argument(
        "--gpu", action="store_true", help="GPU sweep: TensorRT / ORT CUDA / PyTorch CUDA where present"
    )
    timing.add_argument(
        "--batch-sizes",
        type=_int_list,
        help=f"e.g. 1,2,4,...,64 (default {CPU_BATCH_SIZES}; --gpu {GPU_BATCH_SIZES})",
    )
    timing.add_argument(
        "--cpu-max-batch", type=int, help="largest batch for CPU backends (default: none; --gpu 8)"
    )
    timing.add_argument(
        "--repeats", type=int, default=None, help="runs per case; medians reported (3; --gpu 5)"
    )
    timing.add_argument("--iterations", type=int, default=None, help="timed calls per run (10; --gpu 100)")
    timing.add_argument("--warmup", type=int, default=None, help="untimed calls first (3; --gpu 20)")
    timing.add_argument(
        "--max-case-seconds", type=float, default=15.0, help="fewer iterations for slow cases"
    )
    timing.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch baseline rows")
    timing.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime CPU threads, bench and server (0 = all cores)",
    )
    stages = bench.add_argument_group("pipeline stages")
    stages.add_argument("--no-stages", action="store_true", help="skip the per-stage timings")
    stages.add_argument("--stage-sizes", type=_int_list, default=[256, 1024], help="JPEG sides (256,1024)")
    training = bench.add_argument_group("training speed (on the GPU with --gpu, else the CPU)")
    training.add_argument("--no-training", action="store_true", help="skip the distill / train step timings")
    training.add_argument(
        "--training-sizes",
        type=_int_list,
        default=[128, 256],
        help="train step image sides, multiples of 32 >= 64 (128,256); distill: 256 px with 128 px crops "
        "and 128 px whole, batch 8",
    )
    training.add_argument(
        "--training-steps", type=int, default=None, help="timed steps per training case (5; --gpu 50)"
    )
    http = bench.add_argument_group("HTTP")
    http.add_argument("--no-http", action="store_true", help="skip the HTTP server runs")
    http.add_argument(
        "--concurrency", type=_int_list, default=[1, 8, 32, 128], help="closed loop (1,8,32,128)"
    )
    http.add_argument(
        "--rates", type=_float_list, help="open loop frames/s (default: half the best closed loop)"
    )
    http.add_argument("--arrivals", choices=["fixed", "poisson"], default="fixed", help="open-loop arrivals")
    http.add_argument("--duration", type=float, default=10.0, help="seconds measured per HTTP run (10)")
    http.add_argument("--http-warmup", type=float, default=2.0, help="seconds of load before each window (2)")
    http.add_argument(
        "--http-max-seconds",
        type=float,
        default=60.0,
        help="closed loop: cap on warm-up + window, which grow until every request slot turned over (60)",
    )
    http.add_argument("--http-image-size", type=int, default=256, help="side of the JPEG sent (256)")
    http.add_argument("--http-query", default="", help="query for /predict, e.g. heatmap=none")
    http.add_argument(
        "--server-backend",
        choices=["auto", "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"],
        default=None,
        help="server backend (default onnxruntime-cpu; --gpu auto)",
    )
    http.add_argument("--server-max-batch-size", type=int, default=16)
    http.add_argument("--server-max-batch-delay-ms", type=float, default=2.0)
    http.add_argument(
        "--server-request-timeout-ms",
        type=float,
        default=60_000.0,
        help="server deadline per request (60000 here, so overload shows as latency, not 504s)",
    )
    overhead = bench.add_argument_group(
        "server overhead (a null model: the server's own cost, against the floor app's in the same run)"
    )
    overhead.add_argument("--no-server-overhead", action="store_true", help="skip the null-model runs")
    overhead.add_argument(
        "--overhead-duration", type=float, default=3.0, help="seconds measured per null-model run (3)"
    )
    overhead.add_argument(
        "--server-workers", type=int, default=1, help="efficientad serve --workers for those runs (1)"
    )
    out = bench.add_argument_group("output")
    out.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    out.add_argument("--work-dir", type=Path, help="keep the inputs and the server log here")
    out.add_argument(
        "--cache-dir",
        type=Path,
        help="random-weight models, reused by later runs (default ~/.cache/efficientad/bench)",
    )
    out.add_argument("--no-cache", action="store_true", help="make and export the random model afresh")
    bench.set_defaults(handler=bench_command)


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be > 0, got {value}")


def bench_command(args: argparse.Namespace) -> int:
    from benchmarks.model_setup import default_cache_dir
    from benchmarks.report import markdown_report
    from benchmarks.run import DEFAULT_OUT_DIR, BenchSettings, run_bench

    for name in (
        "repeats",
        "iterations",
        "duration",
        "image_size",
        "http_image_size",
        "server_max_batch_size",
        "server_request_timeout_ms",
        "overhead_duration",
        "server_workers",
    ):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    _positive("--training-steps", args.training_steps)
    bad_sizes = [size for size in args.training_sizes if size < 64 or size % 32]
    if bad_sizes:
        raise UserError(f"--training-sizes must be multiples of 32 and at least 64, got {bad_sizes}")
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.model_dir is not None and not args.model_dir.is_dir():
        raise UserError(f"--model-dir {args.model_dir} is not a directory")
    if args.run_dir is not None and not args.run_dir.is_dir():
        raise UserError(f"--run-dir {args.run_dir} is not a directory")
    gpu = bool(args.gpu)
    settings = BenchSettings(
        model_dir=args.model_dir,
        run_dir=args.run_dir,
        model_size=args.model_size,
        image_size=args.image_size,
        image=args.image,
        gpu=gpu,
        batch_sizes=args.batch_sizes or _int_list(GPU_BATCH_SIZES if gpu else CPU_BATCH_SIZES),
        cpu_max_batch=args.cpu_max_batch if args.cpu_max_batch is not None else (8 if gpu else None),
        warmup=args.warmup if args.warmup is not None else (20 if gpu else 3),
        iterations=args.iterations or (100 if gpu else 10),
        repeats=args.repeats or (5 if gpu else 3),
        max_case_s=args.max_case_seconds,
        pytorch=not args.no_pytorch,
        intra_op_threads=args.intra_op_threads,
        stages=not args.no_stages,
        stage_sides=args.stage_sizes,
        http=not args.no_http,
        concurrencies=args.concurrency,
        rates=args.rates,
        arrivals=args.arrivals,
        duration_s=args.duration,
        http_warmup_s=args.http_warmup,
        http_max_s=args.http_max_seconds,
        http_image_side=args.http_image_size,
        http_query=args.http_query,
        server_backend=args.server_backend or ("auto" if gpu else "onnxruntime-cpu"),
        server_max_batch_size=args.server_max_batch_size,
        server_max_batch_delay_ms=args.server_max_batch_delay_ms,
        server_request_timeout_ms=args.server_request_timeout_ms,
        server_overhead=not args.no_server_overhead,
        overhead_duration_s=args.overhead_duration,
        server_workers=args.server_workers,
        training=not args.no_training,
        training_sizes=args.training_sizes,
        training_steps=args.training_steps or (50 if gpu else 5),
        training_warmup=10 if gpu else 2,
        out_dir=args.out or DEFAULT_OUT_DIR,
        work_dir=args.work_dir,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
    )
    report, paths = run_bench(settings)
    print(markdown_report(report))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
