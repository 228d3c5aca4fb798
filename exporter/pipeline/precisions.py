"""Graphs in the recipe's other precisions (`export.precisions`), exported from the model cast to each.

The model's own dtype is the main graph (`model.onnx`); every other precision is exported into
`<precision>/model.onnx`. The last one is cast in place (no copy of the weights: this is the last stage that
needs the model's weights); earlier ones from a cast copy. Their parity is checked with the main graph's in
the validate stage, against the recorded reference in the model's dtype, with `validate.half_atol`.
"""

from __future__ import annotations

from pathlib import Path

from exporter.files import describe_file
from exporter.onnx.contract import ONNX_FILE, data_path
from exporter.onnx.export import export_onnx, model_in_precision
from exporter.pipeline.results import StageResult
from exporter.pipeline.settings import PrecisionsSettings
from exporter.model.surgery import apply_skip


def precisions_stage(settings: PrecisionsSettings, model, mask, out_dir: Path, in_place: bool = False) -> StageResult:
    """The graphs in the other precisions (`settings.halves`). With `in_place`, the model itself is cast to the
    last precision (the caller must not use it in its own dtype afterwards)."""
    todo = settings.halves
    artifacts = []
    for i, precision in enumerate(todo):
        last = i == len(todo) - 1
        cast = model_in_precision(model, precision, in_place=last and in_place)
        path = export_onnx(apply_skip(cast, mask), out_dir / precision, opset=settings.opset)
        del cast  # a copy of the weights (or the model itself, cast): nothing else holds it here
        artifacts += [describe_file(path, out_dir, "onnx", precision),
                      describe_file(data_path(path), out_dir, "onnx-external-data", precision)]
    return StageResult(artifacts=artifacts)


def graph_paths(halves: tuple[str, ...], own: str, out_dir: Path) -> dict[str, Path]:
    """{precision: graph} of every exported precision, the model's own first."""
    return {own: out_dir / ONNX_FILE, **{p: out_dir / p / ONNX_FILE for p in halves}}
