"""The int4 graph (`export.precisions` lists int4): the optimized fp32 graph, without the batch-1 branch, with
weight-only MatMulNBits (exporter/onnx/int4.py), in `int4/model.onnx`; checked against the recorded fp32 masked
reference with quantization-fit thresholds (`validate.int4`), not bitwise parity: a failed threshold fails the run.
"""

from __future__ import annotations

from pathlib import Path

from exporter.backends.ort import OrtRunner
from exporter.files import describe_file
from exporter.onnx.contract import ONNX_FILE, data_path
from exporter.onnx.decode import add_decode_path_to
from exporter.onnx.int4 import quantize_int4, reference_sequences
from exporter.onnx.optimize import NotOptimizable, optimize_onnx
from exporter.checks.parity import fit_recorded
from exporter.pipeline.results import Quantized
from exporter.pipeline.settings import Int4Settings
from exporter.checks.reference import REFERENCE_FILE, load_reference

INT4_GRAPH = f"int4/{ONNX_FILE}"
SOURCE = "int4-source.onnx"  # the optimized graph it is quantized from (removed once quantized)


def int4_stage(settings: Int4Settings, config, plain_path: Path) -> Quantized:
    """Write int4/model.onnx beside the plain graph and check its fit to the recorded reference."""
    out_dir = plain_path.parent
    source, note = out_dir / SOURCE, None
    try:
        # flat (no dispatch): the quantizer rewrites top-level MatMuls; the decode path is added once quantized
        optimize_onnx(plain_path, config, out_path=source, batch1_path=False, decode_path=False)
    except NotOptimizable as exc:  # the plain graph's MatMuls quantize just the same
        source, note = plain_path, f"quantized from the plain graph: {exc}"
    q = settings.quantizer
    calibration = reference_sequences(load_reference(out_dir / REFERENCE_FILE)) if q.lm_head_fit == "weighted" else None
    try:
        info = quantize_int4(source, out_dir / INT4_GRAPH, q.block_size, q.accuracy_level, q.lm_head,
                             q.method, q.lm_head_fit, calibration, q.attention_output_offsets)
    finally:
        if source != plain_path:
            source.unlink(missing_ok=True)
            data_path(source).unlink(missing_ok=True)
    info["source"] = note or "optimized graph (no batch-1 branch)"
    info["decode_folded_attention"] = 0 if note else add_decode_path_to(out_dir / INT4_GRAPH, config)
    t = settings.fit
    fit = fit_recorded(load_reference(out_dir / REFERENCE_FILE), OrtRunner(out_dir / INT4_GRAPH, check=True),
                       settings.decode_steps, "onnx:int4")
    checks = [
        {"name": "int4: mean KL(fp32 reference || int4), next-token distributions", "value": round(fit["mean_kl"], 4),
         "limit": f"<= {t.max_mean_kl}", "passed": fit["mean_kl"] <= t.max_mean_kl},
        {"name": "int4: top-1 agreement with the fp32 reference (teacher-forced)", "value": round(fit["top1"], 4),
         "limit": f">= {t.min_top1}", "passed": fit["top1"] >= t.min_top1},
        {"name": "int4: greedy tokens reproduced, free-running", "value": round(fit["greedy"], 4),
         "limit": f">= {t.min_greedy}", "passed": fit["greedy"] >= t.min_greedy},
    ]
    artifacts = [describe_file(out_dir / INT4_GRAPH, out_dir, "onnx-int4", "int4"),
                 describe_file(data_path(out_dir / INT4_GRAPH), out_dir, "onnx-external-data", "int4")]
    return Quantized(artifacts=artifacts, checks=checks, int4={**info, "fit": fit})
