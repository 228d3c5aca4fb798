"""model.opt.onnx (fused ONNX Runtime contrib ops) beside the plain graph, with the same parity checks."""

from __future__ import annotations

from pathlib import Path

from exporter.backends.ort import SECOND_LAYOUT_MAX_BYTES, OrtRunner
from exporter.files import describe_file
from exporter.onnx.optimize import NotOptimizable, optimize_onnx
from exporter.parity import check_recorded
from exporter.recipe import Recipe
from exporter.reference import REFERENCE_FILE, load_reference


# The batch-1 branch keeps a second layout of the weights resident (ONNX Runtime's one-row kernels read them
# unpacked): on SmolLM2 it made batch-1 decode 0.86x the builder's time for +0.5 GiB. On a 7B-class model that
# second layout is gigabytes at inference and pushed the run's own parity check past 1.7x the weights
# (docs/results/scale.md), so "auto" keeps it for small models only (SECOND_LAYOUT_MAX_BYTES).


def batch1_path(setting, weight_bytes: int) -> bool:
    """The recipe's `export.batch1_decode_path` for a model with `weight_bytes` of kept weights."""
    return weight_bytes <= SECOND_LAYOUT_MAX_BYTES if setting == "auto" else bool(setting)


def optimize_stage(recipe: Recipe, config, plain_path: Path, precision: str, weight_bytes: int) -> dict:
    """Write model.opt.onnx beside the plain graph and check its parity exactly as the plain graph's.

    A graph this rewrite does not handle is reported under not_run with the reason; the plain graph is then
    the only ONNX artifact.
    """
    out_dir = plain_path.parent
    try:
        fused = optimize_onnx(plain_path, config,
                              batch1_path=batch1_path(recipe.export.batch1_decode_path, weight_bytes))
    except NotOptimizable as exc:
        return {"artifacts": [], "parity": [], "fused": None,
                "not_run": [{"check": "optimized graph (ONNX Runtime contrib ops)", "reason": str(exc)}]}
    opt = out_dir / fused["path"]
    v = recipe.validation
    recorded = load_reference(out_dir / REFERENCE_FILE)
    parity = check_recorded(recorded, OrtRunner(opt, check=True), v.decode_steps, v.atol.prefill, v.atol.decode,
                            f"onnx:{precision}:optimized")
    artifact = describe_file(opt, out_dir, "onnx-optimized", precision)
    artifact["shares_external_data_with"] = plain_path.name
    artifacts = [artifact]
    if fused["data"]:  # the fused q/k/v weights (the other weights are read from the plain graph's file)
        artifacts.append(describe_file(out_dir / fused["data"], out_dir, "onnx-external-data", precision))
    return {"artifacts": artifacts, "parity": parity, "not_run": [], "fused": fused}
