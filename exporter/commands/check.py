"""`export-skip check RECIPE`: validate a recipe, and its mask against the model's config; nothing else."""

from __future__ import annotations

import argparse

from exporter.commands.options import add_recipe
from exporter.mask import resolve_mask
from exporter.model.source import load_config
from exporter.pipeline.load import require_supported
from exporter.pipeline.settings import LoadSettings
from exporter.recipe import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)


def run(args: argparse.Namespace, console) -> int:
    recipe = load_recipe(args.recipe)
    config = load_config(recipe.model)
    mask = resolve_mask(recipe, config.num_hidden_layers)
    require_supported(LoadSettings.of(recipe), config)
    console.print(f"{args.recipe}: ok ({config.model_type}, {config.num_hidden_layers} layers; "
                  f"attention skipped {list(mask.attention) or 'none'}, MLP skipped {list(mask.mlp) or 'none'})")
    return 0
