"""Export the skipped model to ONNX (the contract) and check the graph holds only the kept weights and caches."""

from __future__ import annotations

from pathlib import Path

from exporter.dtypes import itemsize, model_precision
from exporter.files import describe_file
from exporter.onnx.contract import data_path, kept_layers, onnx_signature
from exporter.onnx.export import export_onnx
from exporter.onnx.graph import onnx_weight_elements
from exporter.pipeline.results import Exported
from exporter.pipeline.settings import EnginesSettings, ExportSettings
from exporter.model.surgery import count_parameters


def estimate_run_bytes(skipped, halves: tuple[str, ...], engines: EnginesSettings | None) -> int:
    """Disk a run needs: the kept weights once per graph (the model's dtype, then each half precision) and
    once per engine, plus 10% and 64 MiB per file set for graphs, caches and sidecars."""
    params = count_parameters(skipped)
    own = model_precision(skipped)
    sets = [itemsize(own)] + [itemsize(p) for p in halves]
    if engines is not None:
        sets += [itemsize(p) for p in engines.precisions] * len(engines.tensorrt.backends)
    return sum(int(params * w * 1.1) + (64 << 20) for w in sets)


def export_stage(skipped, out_dir: Path, settings: ExportSettings, kept_parameters: int) -> Exported:
    """model.onnx + external data, its I/O signature, and checks that only the kept weights and caches are in it."""
    path = export_onnx(skipped, out_dir, opset=settings.opset)
    precision = model_precision(skipped)
    artifacts = [describe_file(path, out_dir, "onnx", precision),
                 describe_file(data_path(path), out_dir, "onnx-external-data", precision)]
    elements = onnx_weight_elements(path)
    # The graph may hold a few small constants beyond the kept weights, and the optimizer merges
    # identical initializers (e.g. all-ones norms), so only the upper bound is exact enough: any
    # removed sub-layer (far more than `slack` elements) left in the graph would break it.
    slack = 4096
    signature = onnx_signature(path)
    pasts = kept_layers(signature["inputs"])
    checks = [
        {"name": "ONNX weight elements <= skipped parameters + small constants", "value": elements,
         "limit": f"<= {kept_parameters + slack}", "passed": elements <= kept_parameters + slack},
        {"name": "ONNX past_key_values inputs = kept attention layers", "value": pasts,
         "limit": f"== {skipped.kept_attention}", "passed": pasts == skipped.kept_attention},
    ]
    return Exported(artifacts=artifacts, onnx=signature, checks=checks)
