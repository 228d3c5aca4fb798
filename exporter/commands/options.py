"""Arguments several commands share: the recipe or artifact folder a command acts on, --data, --ray, counts."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_recipe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, metavar="RECIPE", help="recipe YAML file")


def add_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, metavar="DIR", help="artifact folder (e.g. artifacts/smollm2-135m)")


def add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="evaluation data folder (default $EXPORT_SKIP_DATA or ../shared/data)")


def add_ray(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                        help="run on Ray (extra [ray]): a cluster address (host:port), `auto` (the default: the "
                             "cluster this machine runs, else a new local instance) or `local` (a new local instance)")


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)
