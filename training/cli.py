"""`efficientad distill`, `efficientad train` and `efficientad evaluate`.

Nothing heavy is imported here at import time (the server's install has no torch): each handler imports
what it needs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.recipes import DEFAULT_RECIPE, RECIPES, recipe_help

# Flags of `train` that map one-to-one onto TrainSettings fields (None = not given on the command line).
TRAIN_FLAGS = (
    "augment",
    "penalty_crop",
    "eval_every",
    "size",
    "steps",
    "image_size",
    "teacher",
    "penalty_dir",
    "device",
    "seed",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "validation_fraction",
    "precision",
    "checkpoint_dtype",
    "save_every",
)


def register(subcommands: argparse._SubParsersAction) -> None:
    distill = subcommands.add_parser(
        "distill",
        help="distill a PDN teacher from a pretrained backbone on a folder of images",
        description="Distill the teacher (PDN) from a pretrained backbone's features on any folder of images "
        "(the paper uses ImageNet). Writes one .safetensors file for `efficientad train --teacher`.",
    )
    distill.add_argument(
        "image_dir", type=Path, metavar="IMAGE_DIR", help="folder of images (e.g. ImageNet samples)"
    )
    distill.add_argument("--backbone", choices=["efficientnet-lite0", "wide-resnet101"], default=None)
    distill.add_argument(
        "--target",
        default=None,
        metavar="VARIANT",
        help="the backbone features to learn, as the teacher-check names them: <backbone>[-s8s16...]"
        "[-x<scale>], e.g. lite0-s8s16 (Lite0's stride-8 and -16 stages, as the paper's layer2 + layer3); "
        "names its own backbone, so --backbone is not needed (default: --backbone's default stages)",
    )
    distill.add_argument("--out", type=Path, required=True, metavar="TEACHER.safetensors")
    distill.add_argument("--size", choices=["small", "medium"], default=None, help="PDN size (default small)")
    distill.add_argument("--steps", type=int, default=None, help="optimizer steps (default 10000)")
    distill.add_argument("--batch-size", type=int, default=None, help="images or crops per step (default 8)")
    distill.add_argument("--image-size", type=int, default=None, help="PDN image size (default 256)")
    distill.add_argument(
        "--crop-size",
        type=int,
        default=None,
        metavar="PX",
        help="train the PDN on random crops of this size (multiple of 4, e.g. 128 of 256): the same "
        "descriptors at a fraction of the cost per image (default: whole images)",
    )
    distill.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="bf16 autocast where the hardware has it natively (CUDA, AVX512-BF16/AMX CPUs); auto picks",
    )
    distill.add_argument(
        "--cache-gb", type=float, default=None, help="memory for cached backbone targets (default 8)"
    )
    distill.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="Adam learning rate (default 1e-4); may change on --resume (recorded as a schedule)",
    )
    distill.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default auto)")
    distill.add_argument("--seed", type=int, default=None)
    distill.add_argument(
        "--save-every", type=int, default=None, help="steps between resumable states (default 500)"
    )
    distill.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="save a resumable state after STEP and stop",
    )
    distill.add_argument(
        "--resume", action="store_true", help="continue the unfinished distillation that writes --out"
    )
    distill.add_argument(
        "--backbone-weights",
        type=Path,
        default=None,
        metavar="PATH",
        help="local weights file for the backbone",
    )
    distill.set_defaults(handler=distill_command)

    train = subcommands.add_parser(
        "train",
        help="train student + autoencoder on good images (MVTec folder layout)",
        description="Train EfficientAD on DATA_DIR/train/good; DATA_DIR/test and DATA_DIR/ground_truth, when "
        "present, are used for evaluation only. Writes RUN_DIR/checkpoint.safetensors + checkpoint.json.",
    )
    train.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    train.add_argument("--out", type=Path, required=True, metavar="RUN_DIR")
    train.add_argument(
        "--size", choices=["small", "medium"], default=None, help="EfficientAD-S or -M (small)"
    )
    train.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help=recipe_help(),
    )
    train.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    train.add_argument(
        "--image-size", type=int, default=None, help="square input size (default: the recipe's)"
    )
    train.add_argument(
        "--penalty-crop",
        type=int,
        default=None,
        metavar="PX",
        help="side of the natural-image crops for the penalty term (default: the recipe's; paper: the "
        "image size)",
    )
    train.add_argument(
        "--teacher",
        default=None,
        metavar="PATH|random",
        help="teacher .safetensors from `efficientad distill` (default: the bundled one if installed); "
        "`random` for tests and timing only",
    )
    train.add_argument(
        "--penalty-dir",
        default=None,
        metavar="DIR",
        help="any natural images for the penalty term (e.g. ImageNet)",
    )
    train.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default auto)")
    train.add_argument(
        "--seed", type=int, default=None, help="seed for the split, init and sampling (default 0)"
    )
    train.add_argument(
        "--batch-size", type=int, default=None, help="images per step (default 1, as the paper)"
    )
    train.add_argument("--learning-rate", type=float, default=None, help="Adam learning rate (default 1e-4)")
    train.add_argument("--weight-decay", type=float, default=None, help="Adam weight decay (default 1e-5)")
    train.add_argument(
        "--validation-fraction", type=float, default=None, help="share of train/good held out (default 0.1)"
    )
    train.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="bf16 autocast where the hardware has it natively (CUDA, AVX512-BF16/AMX CPUs); auto picks",
    )
    train.add_argument(
        "--checkpoint-dtype",
        choices=["float32", "float16"],
        default=None,
        help="weights as stored in the checkpoint (float16: half the size; the statistics and threshold "
        "are computed on the rounded weights); default float32",
    )
    train.add_argument("--save-every", type=int, default=None, help="steps between resumable states (1000)")
    train.add_argument(
        "--eval-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="evaluate on DATA_DIR/test every STEPS steps: the learning curve (test metrics against steps "
        "and training seconds) in RUN_DIR/curve.json and the checkpoint; default 0 (at the end only)",
    )
    train.add_argument(
        "--augment",
        choices=["none", "geometric"],
        default=None,
        help="none (default, the paper): training images as they are; geometric: random flips and zoom "
        "(1-1.25x) of each training image, for objects with no up or down photographed from varying distance",
    )
    train.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="save a resumable state after STEP and stop (to split a run across time-limited jobs)",
    )
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the unfinished run in RUN_DIR")
    again.add_argument("--force", action="store_true", help="replace an existing run in RUN_DIR")
    train.set_defaults(handler=train_command)

    evaluate = subcommands.add_parser(
        "evaluate",
        help="image AUROC, pixel AUROC and AU-PRO of a trained run on DATA_DIR/test",
        description="Evaluate RUN_DIR's checkpoint on DATA_DIR/test (MVTec layout), per defect type and "
        "overall.",
    )
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    evaluate.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON"
    )
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    evaluate.set_defaults(handler=evaluate_command)

    check = subcommands.add_parser(
        "teacher-check",
        help="nearest-neighbour image AUROC of a teacher's features and of its distillation target",
        description="How well the teacher's features, and the backbone target it was distilled from, tell "
        "DATA_DIR/test's defects apart without training: a nearest-neighbour detector (memory: patches of "
        "DATA_DIR/train/good) on each, image AUROC side by side.",
    )
    check.add_argument("teacher", metavar="TEACHER", help="teacher .safetensors, or `random` (a random PDN)")
    check.add_argument(
        "data_dir", type=Path, metavar="DATA_DIR", help="MVTec layout: train/good, test/<defect>"
    )
    check.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON"
    )
    check.add_argument(
        "--image-size", type=int, default=None, help="PDN image size (default: the teacher's; 256 for random)"
    )
    check.add_argument("--memory-images", type=int, default=300, help="good images in the memory (300)")
    check.add_argument("--memory-patches", type=int, default=40_000, help="patch vectors kept (40000)")
    check.add_argument(
        "--target",
        nargs="+",
        default=None,
        metavar="NAME",
        help="targets to measure beside the teacher: <backbone>[-s8s16...][-x<scale>], e.g. lite0 "
        "lite0-s8s16 lite2 lite0-x1 (default: the backbone the teacher file names)",
    )
    check.add_argument("--seed", type=int, default=0, help="seed for the memory images and patches (0)")
    check.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    check.set_defaults(handler=teacher_check_command)


DISTILL_FLAGS = (
    "backbone",
    "target",
    "size",
    "steps",
    "batch_size",
    "image_size",
    "crop_size",
    "precision",
    "cache_gb",
    "learning_rate",
    "device",
    "seed",
    "save_every",
)


def distill_command(args: argparse.Namespace) -> int:
    from training.distill import distill_teacher

    given = {name: getattr(args, name) for name in DISTILL_FLAGS if getattr(args, name) is not None}
    out = distill_teacher(
        args.image_dir,
        args.out,
        resume=args.resume,
        backbone_weights=args.backbone_weights,
        stop_after_step=args.stop_after,
        **given,
    )
    if not out.is_file():
        print(f"stopped; continue with: efficientad distill {args.image_dir} --out {out} --resume")
        return 0
    print(f"teacher written to {out}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from training.checkpoint import METADATA_FILE, read_metadata
    from training.evaluate import format_table
    from training.train import TrainSettings, load_saved_state, train

    given = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    if not args.resume:
        given["recipe"] = args.recipe or DEFAULT_RECIPE
    elif args.recipe is not None:
        given["recipe"] = args.recipe  # must match the run's own (training.run_state.resumed_settings)
    run_dir = train(
        args.data_dir,
        args.out,
        resume=args.resume,
        force=args.force,
        stop_after_step=args.stop_after,
        **given,
    )
    if not (run_dir / METADATA_FILE).is_file():
        state = load_saved_state(run_dir)
        print(f"stopped after step {state.step} of {state.settings(TrainSettings).steps}; continue with:")
        print(f"  efficientad train {args.data_dir} --out {run_dir} --resume")
        return 0
    metadata = read_metadata(run_dir)
    print(f"checkpoint: {run_dir / METADATA_FILE}")
    print(f"threshold:  {metadata['threshold']:.6f} ({metadata['threshold_rule']})")
    if metadata["teacher"].get("random"):
        print(f"teacher:    RANDOM ({metadata['teacher']['note']})")
    if metadata.get("metrics"):
        print(format_table(metadata["metrics"]))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, format_table

    result = evaluate(args.run_dir, args.data_dir, device=args.device)
    print(format_table(result))
    if "threshold" in result:
        labels = result["overall"]
        print(
            f"threshold {result['threshold']:.6f}: "
            f"{result['threshold_accuracy']:.1%} of test images correct; "
            f"defects caught {result['defects_caught']} of {labels['anomalous_images']} "
            f"({result['threshold_detection_rate']:.1%}), good flagged {result['good_flagged']} of "
            f"{labels['images'] - labels['anomalous_images']} ({result['threshold_false_alarm_rate']:.1%})"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


def teacher_check_command(args: argparse.Namespace) -> int:
    from training.teacher_check import format_table, teacher_check

    result = teacher_check(
        args.teacher,
        args.data_dir,
        targets=args.target,
        image_size=args.image_size,
        memory_images=args.memory_images,
        memory_patches=args.memory_patches,
        seed=args.seed,
        device=args.device,
    )
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0
