"""`export-skip plan RECIPE`: the cost model's predicted speedup for a recipe's mask, from the config alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exporter.commands.options import add_recipe
from exporter.cost import DECODE_CONTEXTS, predict, render_prediction
from exporter.mask import resolve_mask
from exporter.model.source import config_for_recipe
from exporter.recipe import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)
    parser.add_argument("--config", type=Path, metavar="JSON",
                        help="a config.json to plan from (default: the recipe's model)")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")


def plan(recipe, config_path: Path | None = None, contexts=DECODE_CONTEXTS, batches=(1, 4)) -> dict:
    """The cost model's prediction for a recipe's mask, from the config alone."""
    config, origin = config_for_recipe(recipe, config_path)
    mask = resolve_mask(recipe, config.num_hidden_layers)
    pred = predict(config, mask, contexts=contexts, batches=batches, precision=recipe.model.dtype)
    return {"config_from": origin, "architecture": config.model_type,
            "mask": {"attention": list(mask.attention), "mlp": list(mask.mlp)}, "prediction": pred}


def run(args: argparse.Namespace, console) -> int:
    result = plan(load_recipe(args.recipe), args.config)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    console.print(f"{args.recipe}: {result['architecture']}, config from {result['config_from']}; "
                  f"attention skipped {result['mask']['attention'] or 'none'}, MLP skipped {result['mask']['mlp'] or 'none'}")
    print("\n".join(render_prediction(result["prediction"])))
    return 0
