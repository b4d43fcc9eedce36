"""The presets of `efficientad train --recipe`, torch-free so that the CLI's help can read them.

`TrainSettings` (training.train) takes its defaults from the `PAPER_*` constants and applies a recipe's
settings on top; explicit flags win over both.
"""

from __future__ import annotations

from typing import Any

# The paper's recipe (Batzner et al. 2024): 70,000 steps at 256 px, batch 1, Adam lr 1e-4 with 0.1x after
# 95% of the steps, penalty on full-size natural images. These are TrainSettings' own defaults.
PAPER_STEPS = 70_000
PAPER_IMAGE_SIZE = 256
PAPER_LEARNING_RATE = 1e-4

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},  # TrainSettings' defaults
    # the CPU default: 12,000 steps at 128 px (45.0 min measured on 2 cores), penalty on half-size crops
    # (docs/training.md: 6,000 steps left elpv mono at 0.835, 12,000 reached 0.874)
    "fast": {"steps": 12000, "image_size": 128, "penalty_crop": 64, "checkpoint_dtype": "float16"},
}
DEFAULT_RECIPE = "fast"  # `efficientad train` without --recipe: the CPU default


def recipe_help() -> str:
    """The --recipe help line, read from RECIPES (so the help cannot drift from the presets)."""
    fast = RECIPES["fast"]
    paper_lr = f"{PAPER_LEARNING_RATE:.0e}".replace("e-0", "e-")  # 1e-4
    return (
        f"preset settings: fast (default; a CPU in under an hour: {fast['steps']} steps at "
        f"{fast['image_size']} px, penalty on {fast['penalty_crop']}-px crops) or paper ({PAPER_STEPS} "
        f"steps at {PAPER_IMAGE_SIZE} px, lr {paper_lr}); the flags below override it"
    )
