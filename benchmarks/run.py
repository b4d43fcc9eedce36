"""`efficientad bench` end to end: model -> backends x batch sizes -> stages -> training speed -> HTTP ->
report files."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks import environment, inputs
from benchmarks.backends import BenchBackend, available_backends
from benchmarks.model_setup import BenchModel, prepare_model
from benchmarks.report import build_report, write_report
from benchmarks.server_overhead import OverheadSettings, bench_server_overhead, targets
from benchmarks.server_process import ServerProcess, ServerStartError
from benchmarks.stages import time_stages
from benchmarks.timing import measure_within

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
SERVER_BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")


@dataclass
class BenchSettings:
    # model
    model_dir: Path | None = None
    run_dir: Path | None = None
    model_size: str = "small"
    image_size: int = 256
    image: Path | None = None  # source photo for every input (default: a bundled cookie image)
    # backends
    gpu: bool = False
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    cpu_max_batch: int | None = None  # cap for CPU backends (None: no cap)
    warmup: int = 3
    iterations: int = 10  # timed calls per run (fewer when one case would exceed max_case_s)
    repeats: int = 3  # runs per case; the report gives each statistic's median over runs
    max_case_s: float = 15.0
    pytorch: bool = True
    intra_op_threads: int = 0
    # stages
    stages: bool = True
    stage_sides: list[int] = field(default_factory=lambda: [256, 1024])
    # HTTP
    http: bool = True
    concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    rates: list[float] | None = None  # open-loop frames/s (None: half the best closed-loop throughput)
    arrivals: str = "fixed"
    duration_s: float = 10.0
    http_warmup_s: float = 2.0
    http_max_s: float = 60.0  # closed loop: cap on warm-up + window (slow servers need long rounds)
    http_image_side: int = 256
    http_query: str = ""
    server_backend: str = "onnxruntime-cpu"
    server_max_batch_size: int = 16
    server_max_batch_delay_ms: float = 2.0
    server_request_timeout_ms: float = 60_000.0  # past it the server answers 504 (its own default: 10 s)
    # server overhead (benchmarks.server_overhead): the server itself, on a null model
    server_overhead: bool = True
    overhead_duration_s: float = 3.0
    server_workers: int = 1
    # training speed (benchmarks.training_speed): on the GPU with `gpu`, else the CPU
    training: bool = True
    training_sizes: list[int] = field(default_factory=lambda: [128, 256])  # train step image sides
    training_batch: int = 1  # the paper's batch
    training_distill: list[tuple[int, int | None]] = field(
        default_factory=lambda: [(256, None), (256, 128), (128, 96)]
    )  # distill cases: (image side, crop side or None for whole images)
    training_distill_batch: int = 8
    training_backbone: bool = True  # also time the backbone's targets (what the distillation cache saves)
    training_backbone_batch: int = 1  # images per backbone call (the distillation computes one at a time)
    training_penalty: bool = True  # train steps with penalty crops (the paper's setting)
    training_warmup: int = 2  # untimed steps per case
    training_steps: int = 5  # timed steps per case (fewer, at least 2, past max_case_s)
    # files
    out_dir: Path = DEFAULT_OUT_DIR
    work_dir: Path | None = None  # inputs, server log (and the model without a cache; default: a temp dir)
    cache_dir: Path | None = None  # random-weight models, reused across runs (None: made afresh each run)

    def as_dict(self) -> dict[str, Any]:
        return {
            key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(self).items()
        }


def _child_env(*, intra_op_threads: int = 0) -> dict[str, str]:
    """The environment for subprocesses: this checkout importable even without `pip install -e .`;
    for the server, `EAD_INTRA_OP_THREADS` when a thread count is asked for."""
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else "")}
    if intra_op_threads > 0:
        env["EAD_INTRA_OP_THREADS"] = str(intra_op_threads)
    return env


# ---------------------------------------------------------------- backends


def _time_case(backend: BenchBackend, images: Any, settings: BenchSettings) -> dict[str, Any]:
    summary, runs = measure_within(
        backend.make_call(images),
        batch_size=len(images),
        timer=backend.timer,
        warmup=settings.warmup,
        iterations=settings.iterations,
        repeats=settings.repeats,
        budget_s=settings.max_case_s,
    )
    return {
        "name": backend.name,
        "precision": backend.precision,
        "device": backend.device,
        "batch_size": summary.batch_size,
        "p50_ms": summary.p50_ms,
        "p90_ms": summary.p90_ms,
        "p99_ms": summary.p99_ms,
        "mean_ms": summary.mean_ms,
        "images_per_s": summary.images_per_s,
        "includes_transfer": backend.includes_transfer,
        "timer": backend.timer.name,
        "iterations": runs[0].calls,
        "repeats": settings.repeats,
        "notes": backend.notes,
    }


def bench_backends(
    backends: list[BenchBackend], model: BenchModel, source: Path, settings: BenchSettings, notes: list[str]
) -> list[dict[str, Any]]:
    cases = []
    for backend in backends:
        sizes = settings.batch_sizes
        if backend.device == "cpu" and settings.cpu_max_batch is not None:
            sizes = [size for size in sizes if size <= settings.cpu_max_batch]
        cases += [(backend, size) for size in sizes]
    rows = []
    failed: set[str] = set()
    for backend, batch_size in tqdm(cases, desc="backends", unit="case"):
        if backend.label in failed:
            continue
        images = inputs.model_batch(source, batch_size, model.input_height, model.input_width)  # (N, 3, H, W)
        try:
            rows.append(_time_case(backend, images, settings))
        except Exception as error:  # e.g. out of GPU memory at a large batch: keep the rows measured so far
            logger.warning("%s at batch %d failed: %s", backend.label, batch_size, error)
            notes.append(
                f"{backend.label} stopped at batch {batch_size}: {type(error).__name__}: {error}"[:300]
            )
            failed.add(backend.label)
    return rows


def _retime_batch_1(backend: BenchBackend, model: BenchModel, source: Path, settings: BenchSettings) -> float:
    """The server's backend at batch 1 once more, right before the HTTP runs (the reference for the
    server's overhead: a machine whose speed drifts over minutes then compares like with like)."""
    images = inputs.model_batch(source, 1, model.input_height, model.input_width)  # (1, 3, H, W)
    summary, _ = measure_within(
        backend.make_call(images),
        batch_size=1,
        timer=backend.timer,
        warmup=settings.warmup,
        iterations=settings.iterations,
        repeats=1,
        budget_s=min(settings.max_case_s, 5.0),
    )
    return summary.p50_ms


def serving_backend(backends: list[BenchBackend]) -> BenchBackend | None:
    """The backend the server would run here (TensorRT, else ORT CUDA, else ORT CPU), copies included."""
    for name in SERVER_BACKENDS:
        for backend in backends:
            if backend.name == name and backend.includes_transfer is not False:
                return backend
    return None


# ---------------------------------------------------------------- training speed


def bench_training(settings: BenchSettings, device_kind: str, notes: list[str]) -> dict[str, Any] | None:
    """The training speed section (`TrainingSpeed.as_dict()`) on the device the bench runs on; None if
    it cannot run here (noted)."""
    try:
        from benchmarks.training_speed import time_training
    except ModuleNotFoundError as error:  # a serving-only install: no torch
        logger.warning("training speed skipped: %s", error)
        notes.append(f"training speed skipped: {error}")
        return None
    section = time_training(
        "cuda" if device_kind == "cuda" else "cpu",
        train_sizes=settings.training_sizes,
        train_batch=settings.training_batch,
        distill_cases=settings.training_distill,
        distill_batch=settings.training_distill_batch,
        backbone=settings.training_backbone,
        backbone_batch=settings.training_backbone_batch,
        penalty=settings.training_penalty,
        warmup=settings.training_warmup,
        steps=settings.training_steps,
        budget_s=settings.max_case_s,
    )
    return section.as_dict()


# ---------------------------------------------------------------- HTTP


def _run_client(url: str, image: Path, settings: BenchSettings, mode: str, value: float) -> dict[str, Any]:
    request_timeout_s = settings.server_request_timeout_ms / 1000.0
    command = [
        sys.executable, "-m", "benchmarks.http_load", "--url", url, "--image", str(image), "--mode", mode,
        "--duration", str(settings.duration_s), "--warmup", str(settings.http_warmup_s),
        "--arrivals", settings.arrivals, "--max-seconds", str(settings.http_max_s),
        "--timeout", str(request_timeout_s + 30.0),
    ]  # fmt: skip
    command += ["--concurrency", str(int(value))] if mode == "closed" else ["--rate", str(value)]
    if settings.http_query:
        command += ["--query", settings.http_query]
    timeout = (
        max(settings.http_max_s, settings.duration_s + settings.http_warmup_s) + request_timeout_s + 120.0
    )
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=_child_env(), check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"load client failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def _client_rows(
    url: str,
    image: Path,
    settings: BenchSettings,
    mode: str,
    value: float,
    context: dict[str, Any],
    notes: list[str],
) -> list[dict[str, Any]]:
    try:
        return [{**_run_client(url, image, settings, mode, value), **context}]
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as error:
        logger.error("HTTP %s run at %s failed: %s", mode, value, error)
        notes.append(f"HTTP {mode} run at {value} failed: {error}"[:400])
        return []


def bench_http(
    model: BenchModel, image: Path, settings: BenchSettings, log_path: Path, notes: list[str]
) -> list[dict[str, Any]]:
    """The real server in a subprocess; each load level from a separate client process (a level whose
    client fails is noted and skipped)."""
    rows: list[dict[str, Any]] = []
    with ServerProcess(
        model.model_dir,
        log_path=log_path,
        backend=settings.server_backend,
        max_batch_size=settings.server_max_batch_size,
        max_batch_delay_ms=settings.server_max_batch_delay_ms,
        request_timeout_ms=settings.server_request_timeout_ms,
        env=_child_env(intra_op_threads=settings.intra_op_threads),
    ) as server:
        info = server.model_info()
        context = {
            "server_backend": info.get("backend", settings.server_backend),
            "max_batch_size": info.get("max_batch_size", settings.server_max_batch_size),
            "max_batch_delay_ms": settings.server_max_batch_delay_ms,
            "request_timeout_ms": settings.server_request_timeout_ms,
            "server_intra_op_threads": settings.intra_op_threads or "auto (one per usable core)",
            "image": f"{settings.http_image_side}x{settings.http_image_side} JPEG ({image.stat().st_size} B)",
            "query": settings.http_query or "(server defaults: heatmap png)",
        }
        with tqdm(
            total=len(settings.concurrencies) + len(settings.rates or [None]), desc="http", unit="run"
        ) as bar:
            for concurrency in settings.concurrencies:
                bar.set_postfix_str(f"closed c={concurrency}")
                rows += _client_rows(server.url, image, settings, "closed", concurrency, context, notes)
                bar.update()
            rates = settings.rates
            if rates is None:  # a camera at half of what the server sustained
                best = max((row["throughput_rps"] for row in rows), default=0.0)
                rates = [max(1.0, round(best / 2, 1))] if best > 0 else []
            for rate in rates:
                bar.set_postfix_str(f"open {rate}/s")
                rows += _client_rows(server.url, image, settings, "open", rate, context, notes)
                bar.update()
    return rows


# ---------------------------------------------------------------- all of it


def run_bench(settings: BenchSettings) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run every part the settings ask for; write and return the report and its files."""
    work_dir = (
        Path(settings.work_dir) if settings.work_dir else Path(tempfile.mkdtemp(prefix="efficientad-bench-"))
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    keep_work_dir = settings.work_dir is not None
    notes: list[str] = []
    load_at_start, cores_at_start = environment.load_average(), environment.effective_cores()
    try:
        model = prepare_model(
            model_dir=settings.model_dir,
            run_dir=settings.run_dir,
            work_dir=work_dir,
            model_size=settings.model_size,
            image_size=settings.image_size,
            cache_dir=settings.cache_dir,
        )
        if model.random_weights:
            notes.append("random-init weights: timings are those of a trained model, scores are meaningless")
        if model.run_dir is None and settings.pytorch:
            notes.append("PyTorch rows skipped: no checkpoint (pass --run-dir)")
        source = inputs.source_image(settings.image)
        sides = sorted({*settings.stage_sides, settings.http_image_side})
        jpeg_paths = inputs.write_jpegs(source, sides, work_dir / "inputs")
        device = environment.describe_device(settings.gpu)
        if settings.gpu and device["kind"] != "cuda":
            notes.append("--gpu asked for, but torch sees no CUDA GPU: CPU backends only")

        backends = available_backends(
            model,
            use_gpu=settings.gpu,
            max_batch=max(settings.batch_sizes),
            include_pytorch=settings.pytorch,
            intra_op_threads=settings.intra_op_threads,
        )
        logger.info("backends: %s", ", ".join(backend.label for backend in backends))
        try:
            backend_rows = bench_backends(backends, model, source, settings, notes)
            stage_rows: list[dict[str, Any]] = []
            reference_b1: tuple[str, float] | None = None  # (backend name, p50 ms)
            primary = serving_backend(backends)
            if settings.stages and primary is not None:
                stage_jpegs = {side: jpeg_paths[side].read_bytes() for side in settings.stage_sides}
                stage_results = time_stages(
                    stage_jpegs,
                    primary,
                    height=model.input_height,
                    width=model.input_width,
                    threshold=model.threshold,
                    warmup=settings.warmup,
                    iterations=max(settings.iterations, 10),
                    repeats=settings.repeats,
                    budget_s=settings.max_case_s,
                )
                stage_rows = [row.as_dict() for row in stage_results]
            if settings.http and primary is not None and settings.server_backend in ("auto", primary.name):
                reference_b1 = (primary.name, _retime_batch_1(primary, model, source, settings))
        finally:
            for backend in backends:
                backend.close()

        training_speed = (
            bench_training(settings, device["kind"], notes)
            if settings.training
            else {"device": device["name"], "rows": [], "notes": ["not run (--no-training)"]}
        )
        http_rows: list[dict[str, Any]] = []
        if settings.http:
            try:
                http_rows = bench_http(
                    model, jpeg_paths[settings.http_image_side], settings, work_dir / "server.log", notes
                )
            except ServerStartError as error:  # keep the backend and stage figures measured so far
                logger.error("HTTP runs skipped: %s", error)
                notes.append(f"HTTP runs skipped: {str(error).strip().splitlines()[-1]}"[:400])
            if http_rows and (device["kind"] == "cpu" or settings.server_backend == "onnxruntime-cpu"):
                notes.append(
                    f"HTTP load client and server share this machine's {device['cpu_count']} CPU cores: the "
                    "client's own CPU time is taken from the server"
                )
        overhead = None
        if settings.server_overhead:
            try:
                overhead_settings = OverheadSettings(
                    duration_s=settings.overhead_duration_s, workers=settings.server_workers
                )
                overhead = bench_server_overhead(
                    overhead_settings,
                    work_dir=work_dir,
                    env=_child_env(),
                )
                overhead["targets"] = targets(overhead)
            except ServerStartError as error:
                logger.error("server-overhead runs skipped: %s", error)
                notes.append(f"server-overhead runs skipped: {str(error).strip().splitlines()[-1]}"[:400])
        host = environment.describe_host(load_at_start, cores_at_start)
        for moment in ("start", "end"):
            cores = host[f"effective_cores_{moment}"]
            if cores < 0.75 * host["cpu_count"]:
                notes.append(
                    f"at the {moment} this process got only {cores} effective cores of {host['cpu_count']} "
                    "(other load, or a throttled virtual machine): CPU figures taken at different times may "
                    "not be comparable"
                )
        server_backend = http_rows[0]["server_backend"] if http_rows else None
        reference_b1_ms = reference_b1[1] if reference_b1 and reference_b1[0] == server_backend else None
        report = build_report(
            device=device,
            host=host,
            versions=environment.library_versions(),
            model=model.describe(),
            settings=settings.as_dict(),
            backends=backend_rows,
            stages=stage_rows,
            http=http_rows,
            server_backend=server_backend,
            notes=notes,
            reference_b1_ms=reference_b1_ms,
            training_speed=training_speed,
            server_overhead=overhead,
        )
        paths = write_report(report, Path(settings.out_dir))
        return report, paths
    finally:
        if not keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
