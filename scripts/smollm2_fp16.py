"""SmolLM2-135M in fp16: ORT CPU parity against the fp32 reference, and tensorrt-rtx engine sizes.

    .venv/bin/python scripts/smollm2_fp16.py [--out DIR] [--no-engines]

Exports the fp16 graph of the default recipe's skipped model and of the unskipped model, checks the
skipped one in ONNX Runtime (CPU) against the masked fp32 PyTorch reference on the recipe's first
prompt (teacher-forced logits and free-running greedy tokens, 16 steps), builds a tensorrt-rtx fp16
engine from each graph (CPU only), and prints one JSON summary: engine sizes, their difference and
the bytes of the removed weights in fp16, build seconds. `tests/test_tensorrt.py` (slow) runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--no-engines", action="store_true", help="only the ORT parity check")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="smollm2-fp16-"))

    from exporter.model.source import load_model
    from exporter.onnx.export import export_onnx, model_in_precision
    from exporter.pipeline.remove import removed_parameters
    from exporter.pipeline.settings import ReferenceSettings, ValidateSettings
    from exporter.pipeline.validate import validation_batches
    from exporter.checks.reference import REFERENCE_FILE, save_reference
    from exporter.pipeline.reference import record_reference
    from exporter.pipeline.validate import validate_stage
    from exporter.mask import resolve_mask
    from exporter.recipe import TensorRT, load_recipe
    from exporter.mask import SkipMask
    from exporter.model.surgery import apply_skip

    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m.yaml")
    model, tokenizer = load_model(recipe.model)
    mask = resolve_mask(recipe, model.config.num_hidden_layers)
    half = model_in_precision(model, "fp16")
    summary = {"mask": {"attention": list(mask.attention), "mlp": list(mask.mlp)}, "out": str(out)}

    graphs = {}
    for name, m in (("skipped", mask), ("full", SkipMask())):
        if name == "full" and args.no_engines:
            continue
        t = time.perf_counter()
        graphs[name] = export_onnx(apply_skip(half, m), out / name / "fp16", opset=recipe.export.opset)
        summary.setdefault("export_seconds", {})[name] = round(time.perf_counter() - t, 1)

    # ORT parity of the skipped fp16 graph, first prompt only (batch 1), as the pipeline does it
    v = recipe.validation
    batches = [validation_batches(ReferenceSettings.of(recipe), tokenizer)[0][1]]
    save_reference(record_reference(model, mask, batches, v.decode_steps), out / REFERENCE_FILE)
    summary["ort_fp16"] = validate_stage(ValidateSettings.of(recipe), out, {"fp16": graphs["skipped"]}, "fp32").to_json()

    if not args.no_engines:
        from exporter.backends.trt import BuildOptions, build_engine, missing_reason

        reason = missing_reason("tensorrt-rtx")
        if reason:
            summary["engines"] = {"not_built": reason}
        else:
            t = TensorRT()
            opts = BuildOptions(max_batch=recipe.export.max_batch, max_context=recipe.export.max_context,
                                compute_capabilities=tuple(t.compute_capabilities))
            engines = {}
            for name, path in graphs.items():
                sidecar = build_engine(path, out / name / "tensorrt-rtx.fp16.engine", "tensorrt-rtx", "fp16", opts)
                data = path.with_name(path.name + ".data").stat().st_size
                engines[name] = {"engine_bytes": sidecar.engine_bytes, "build_seconds": sidecar.build_seconds,
                                 "onnx_data_bytes": data, "compute_capabilities": sidecar.compute_capabilities}
            removed = removed_parameters(model, mask) * 2  # fp16: 2 bytes per weight
            diff = engines["full"]["engine_bytes"] - engines["skipped"]["engine_bytes"]
            summary["engines"] = {**engines, "engine_bytes_saved": diff, "removed_weight_bytes_fp16": removed,
                                  "saved_over_removed": round(diff / removed, 3)}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
