"""Graphs in the recipe's other precisions (`export.precisions`), exported from the model cast to each.

The model's own dtype is the main graph (`model.onnx`); every other precision is exported into
`<precision>/model.onnx`. The last one is cast in place (no copy of the weights: this is the last stage that
needs the model's weights); earlier ones from a cast copy. Their parity is checked with the main graph's in
the validate stage, against the recorded reference in the model's dtype, with `validate.half_atol`.
"""

from __future__ import annotations

from pathlib import Path

from exporter.dtypes import model_precision
from exporter.files import describe_file
from exporter.onnx.contract import ONNX_FILE, data_path
from exporter.onnx.export import export_onnx, model_in_precision
from exporter.recipe import Recipe
from exporter.model.surgery import apply_skip


def half_precisions(recipe: Recipe, own: str) -> list[str]:
    """The precisions exported besides the model's own, in the recipe's order."""
    return [p for p in recipe.precisions if p != own]


def precisions_stage(recipe: Recipe, model, mask, out_dir: Path, in_place: bool = False) -> dict:
    """{"artifacts": [...]} of the graphs in the other precisions. With `in_place`, the model itself is cast to
    the last precision (the caller must not use it in its own dtype afterwards)."""
    todo = half_precisions(recipe, model_precision(model))
    artifacts = []
    for i, precision in enumerate(todo):
        last = i == len(todo) - 1
        cast = model_in_precision(model, precision, in_place=last and in_place)
        path = export_onnx(apply_skip(cast, mask), out_dir / precision, opset=recipe.export.opset)
        del cast  # a copy of the weights (or the model itself, cast): nothing else holds it here
        artifacts += [describe_file(path, out_dir, "onnx", precision),
                      describe_file(data_path(path), out_dir, "onnx-external-data", precision)]
    return {"artifacts": artifacts}


def graph_paths(recipe: Recipe, own: str, out_dir: Path) -> dict[str, Path]:
    """{precision: graph} of every exported precision, the model's own first."""
    return {own: out_dir / ONNX_FILE, **{p: out_dir / p / ONNX_FILE for p in half_precisions(recipe, own)}}
