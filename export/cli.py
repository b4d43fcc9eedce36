"""`efficientad export`, `efficientad engine`, `efficientad export-triton`.

Nothing heavy is imported here: torch, onnx and tensorrt are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subcommands: argparse._SubParsersAction) -> None:
    export = subcommands.add_parser(
        "export",
        help="fuse a trained checkpoint into one ONNX graph (model dir: model.onnx + model.json)",
        description="Fuse teacher, student, autoencoder and all normalisation into model.onnx, check parity "
        "(ONNX Runtime vs PyTorch vs the unfused training computation) on real images, write model.json.",
    )
    export.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="training run dir (checkpoint.safetensors + .json)"
    )
    export.add_argument(
        "--out", type=Path, required=True, metavar="MODEL_DIR", help="model directory to write"
    )
    export.add_argument("--force", action="store_true", help="replace MODEL_DIR if it exists")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18; default 18)")
    export.add_argument(
        "--parity-images",
        type=Path,
        nargs="+",
        metavar="PATH",
        help="image files or folders for the parity check (default: the bundled samples/cookie/test)",
    )
    export.add_argument(
        "--int8",
        action="store_true",
        help="also write model.int8.onnx (ONNX Runtime static INT8), kept only if it keeps the decisions "
        "on the parity images and is faster on this CPU",
    )
    export.add_argument(
        "--calibration-images",
        type=Path,
        nargs="+",
        metavar="PATH",
        help="good images for INT8 calibration (default: the bundled samples/cookie/train/good)",
    )
    export.set_defaults(handler=export_command)

    engine = subcommands.add_parser(
        "engine",
        help="build a TensorRT FP16 engine for this GPU into MODEL_DIR/engines/",
        description="Build MODEL_DIR/engines/<gpu>__trt<version>__b<max>.plan with TensorRT 10 and check it "
        "against ONNX Runtime on the model's parity images; a failing engine is not saved.",
    )
    engine.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    engine.add_argument(
        "--max-batch", type=int, default=32, help="largest batch the engine accepts (default 32)"
    )
    engine.add_argument(
        "--fp16", action=argparse.BooleanOptionalAction, default=True, help="FP16 kernels (default on)"
    )
    engine.add_argument(
        "--workspace-gb", type=float, default=4.0, help="builder workspace limit in GiB (default 4)"
    )
    engine.add_argument("--force", action="store_true", help="rebuild even if a cached engine exists")
    engine.set_defaults(handler=engine_command)

    triton = subcommands.add_parser(
        "export-triton",
        help="write a Triton Inference Server model repository from a model dir",
    )
    triton.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    triton.add_argument("--out", type=Path, required=True, metavar="REPO", help="model repository to write")
    triton.add_argument("--max-batch", type=int, default=32)
    triton.add_argument("--max-queue-delay-us", type=int, default=2000)
    triton.add_argument("--force", action="store_true", help="replace REPO if it exists")
    triton.set_defaults(handler=export_triton_command)


def export_command(args: argparse.Namespace) -> int:
    from export.exporter import export_model

    info = export_model(
        args.run_dir,
        args.out,
        force=args.force,
        parity_images=args.parity_images,
        opset=args.opset,
        int8=args.int8,
        calibration_images=args.calibration_images,
    )
    parity = info.metadata.get("parity", {})
    print(
        f"wrote {info.path} (version {info.version}, {info.model_size}, "
        f"{info.input_height}x{info.input_width})"
    )
    print(
        "parity: ONNX Runtime vs the PyTorch module, max |map diff| {}".format(
            json.dumps(
                {k: float(f"{v:.3g}") for k, v in parity.get("onnxruntime_vs_pytorch_map", {}).items()}
            )
        )
    )
    int8 = info.metadata.get("int8")
    if int8:
        verdict = "kept" if int8.get("kept") else f"not kept ({int8.get('reason')})"
        print(f"int8: {verdict}; latency ms at batch 1: {int8.get('latency_ms_batch1')}")
    for warning in info.metadata.get("warnings", []):
        print(f"warning: {warning}")
    return 0


def engine_command(args: argparse.Namespace) -> int:
    from efficientad.model_dir import read_model_dir
    from export.tensorrt_engine import build_engine

    read_model_dir(args.model_dir)  # a clear error for a missing or incomplete model dir first
    if args.max_batch < 1:
        from efficientad.errors import UserError

        raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
    plan = build_engine(
        args.model_dir,
        max_batch=args.max_batch,
        fp16=args.fp16,
        workspace_gb=args.workspace_gb,
        force=args.force,
    )
    print(f"engine: {plan}")
    return 0


def export_triton_command(args: argparse.Namespace) -> int:
    from export.triton import write_triton_repository

    repository = write_triton_repository(
        args.model_dir,
        args.out,
        max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
        force=args.force,
    )
    print(f"wrote Triton model repository {repository}")
    return 0
