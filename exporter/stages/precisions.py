"""Half-precision graphs: export each extra precision and check it against the fp32 masked reference.

The model's own dtype is the main graph (`model.onnx`); every other precision in `export.precisions` is
exported from a cast copy into `<precision>/model.onnx`. Parity runs in ONNX Runtime on the CPU against
the masked reference in the model's dtype (teacher-forced, as for the main graph) with
`validate.half_atol`. Where ORT's CPU kernels cannot run a graph (bf16: no CPU kernels for most ops),
the check is recorded as not run, naming the op, and never counted as passed.
"""

from __future__ import annotations

from pathlib import Path

from exporter.backends.ort import OrtRunner, ort_unsupported_op
from exporter.backends.pytorch import HFRunner
from exporter.dtypes import model_precision
from exporter.files import describe_file
from exporter.onnx.contract import data_path
from exporter.onnx.export import export_onnx, model_in_precision
from exporter.parity import check_parity, greedy_tokens
from exporter.recipe import Recipe
from exporter.stages.validate import validation_batches
from exporter.surgery import apply_skip, masked


def precisions_stage(recipe: Recipe, model, mask, tokenizer, out_dir: Path) -> dict:
    """Graphs in the recipe's other precisions, and their parity against the reference in ORT (CPU)."""
    graphs = export_precisions(model, mask, out_dir, recipe.precisions, recipe.export.opset)
    batches = [pair for _, pair in validation_batches(recipe, tokenizer)]
    v = recipe.validation
    parity, not_run, greedy = check_half_parity(model, mask, graphs, batches, v.decode_steps, v.half_atol)
    artifacts = [a for g in graphs.values() for a in g["artifacts"]]
    return {"artifacts": artifacts, "parity": parity, "not_run": not_run, "greedy": greedy}


def export_precisions(model, mask, out_dir: Path, precisions: list[str], opset: int) -> dict[str, dict]:
    """{precision: {"onnx": path, "artifacts": [...]}} for each precision other than the model's dtype."""
    own = model_precision(model)
    out = {}
    for precision in precisions:
        if precision == own:
            continue
        cast = model_in_precision(model, precision)
        path = export_onnx(apply_skip(cast, mask), out_dir / precision, opset=opset)
        del cast  # a copy of the weights; free it before the next one
        out[precision] = {"onnx": path, "artifacts": [
            describe_file(path, out_dir, "onnx", precision),
            describe_file(data_path(path), out_dir, "onnx-external-data", precision)]}
    return out


def check_half_parity(model, mask, graphs: dict[str, dict], batches, steps: int, atol) -> tuple[list, list, dict]:
    """(parity rows, not-run records, free-running greedy agreement per precision) for the graphs.

    `batches` are (input_ids, attention_mask) pairs; the first is batch 1 (the default prompt).
    """
    parity, not_run, greedy = [], [], {}
    reference = HFRunner(model)
    for precision, graph in graphs.items():
        name = f"onnx:{precision}"
        try:
            runner = OrtRunner(graph["onnx"])
        except Exception as exc:  # noqa: BLE001 - only a missing kernel is "not run"; anything else is a bug
            op = ort_unsupported_op(exc)
            if op is None:
                raise
            not_run.append({"check": f"{name} parity in ONNX Runtime (CPU)",
                            "reason": f"ONNX Runtime's CPU provider has no kernel for {op}"})
            continue
        with masked(model, mask):
            for ids, attn in batches:
                phases, trace = check_parity(reference, runner, ids, attn, steps, atol.prefill, atol.decode, name)
                parity += [p.as_dict() for p in phases]
            ids, attn = batches[0]
            own = greedy_tokens(runner, ids, attn, steps)[0]
            ref = greedy_tokens(reference, ids, attn, steps)[0]
        first = next((i for i, (a, b) in enumerate(zip(own, ref)) if a != b), None)
        greedy[precision] = {"tokens": len(ref), "identical": first is None, "first_difference": first}
    return parity, not_run, greedy
