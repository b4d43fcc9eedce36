"""`efficientad` console command: each stage registers its own subcommands from its own `cli.py`.

Stage CLI modules import nothing heavy at import time, so `efficientad serve` works without torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from efficientad import __version__
from efficientad.errors import UserError

STAGE_CLIS = ("training.cli", "export.cli", "server.cli", "benchmarks.cli")
EXIT_USER_ERROR = 2

logger = logging.getLogger("efficientad")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="efficientad", description="EfficientAD anomaly detection")
    parser.add_argument("--version", action="version", version=f"efficientad {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in STAGE_CLIS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name in (module_name, module_name.partition(".")[0]):  # stage not in this install
                continue
            raise
        module.register(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as error:
        print(
            f"error: {args.command} needs the Python package {error.name!r}, which is not installed "
            "(pip install 'efficientad[train]' or 'efficientad[export]')",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
