"""run(recipe, out_dir) -> Report: the stages in order, nothing else.

Each stage lives in exporter/stages/; finished stages are cached beside the artifacts (exporter/pipeline/cache.py,
keys in stages/keys.py): a rerun after a kill resumes, a changed input redoes the stages that read it,
`force` redoes everything. The folder is built aside and published only when every check passed
(exporter/pipeline/workdir.py).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from exporter.pipeline.cache import StageCache
from exporter.dtypes import itemsize, model_precision
from exporter.checks.manifest import write_manifest
from exporter.measure import StageLog
from exporter.onnx.contract import ONNX_FILE
from exporter.recipe import Recipe
from exporter.report import Findings, Report
from exporter.pipeline.engines import engines_stage, require_backends
from exporter.pipeline.export import estimate_run_bytes, export_stage
from exporter.pipeline.keys import StageKeys, engines_key
from exporter.pipeline.load import load_stage, require_supported
from exporter.pipeline.optimize import build_options, optimize_stage
from exporter.checks.reference import REFERENCE_FILE
from exporter.pipeline.package import checkpoint_stage, package_stage
from exporter.pipeline.precisions import graph_paths, half_precisions, precisions_stage
from exporter.pipeline.quantize import INT4_GRAPH, int4_stage
from exporter.pipeline.reference import reference_stage
from exporter.pipeline.remove import remove_stage
from exporter.pipeline.speed import speed_stage
from exporter.pipeline.validate import validate_stage
from exporter.versions import tool_versions
from exporter.pipeline.workdir import WorkDir, check_free_space


def run(recipe: Recipe, out_dir: Path, console=None, force: bool = False, wait: bool = True) -> Report:
    """Load, remove, record the reference, export (and half precisions, a checkpoint); release the PyTorch
    model; validate, (engines), optimize, speed, package; then the report and the manifest. `report.passed`
    says whether every check held; the folder is published only then."""
    require_backends(recipe)
    require_supported(recipe)
    started = time.perf_counter()
    log, found = StageLog(console), Findings()
    cache = StageCache(out_dir.parent / ".stages" / out_dir.name, enabled=not force)
    with WorkDir(out_dir, wait=wait, on_wait=log.say) as work:
        def cached(stage: str, key: str, rec, compute) -> dict:
            results, rec.cached = cache.restore_or_run(stage, key, work.path, compute)
            return found.add(results)

        loaded = _pytorch_stages(recipe, work.path, log, found, cached, cache.enabled)  # model released on return
        gc.collect()
        model_info, config, mask, tokenizer, size = loaded.model_info, loaded.config, loaded.mask, loaded.tokenizer, loaded.size
        keys, own, exported, reference = loaded.keys, loaded.own, loaded.exported, loaded.reference

        # --- ONNX Runtime (and TensorRT): every check against the recording
        plain = work.path / ONNX_FILE
        with log.stage("validate", "checking parity in ONNX Runtime") as rec:
            validated = cached("validate", keys.validate, rec,
                               lambda: validate_stage(recipe.validation, work.path,
                                                      graph_paths(recipe, own, work.path), own))
            rec.done(_parity_line(validated["parity"]) + "".join(f"; not run: {n['reason']}" for n in validated["not_run"]))
        engines = None
        if recipe.tensorrt is not None:
            graphs = {a["path"]: a["sha256"] for a in found.artifacts if a["kind"].startswith("onnx")}
            with log.stage("engines", "building TensorRT engines") as rec:
                engines = cached("engines", engines_key(recipe, graphs), rec, lambda: engines_stage(recipe, own, work.path))
                rec.done(", ".join(e["path"] for e in engines["artifacts"] if e["kind"] == "engine")
                         or "none built: " + "; ".join(n["reason"] for n in engines["not_built"]))
        with log.stage("optimize", "writing and checking the optimized ONNX Runtime graph") as rec:
            optimized = cached("optimize", keys.optimize, rec, lambda: optimize_stage(recipe, config, plain, own,
                                                                                      loaded.weight_bytes, recipe.export.tune))
            rec.done((", ".join(a["path"] for a in optimized["artifacts"])
                      or "not written: " + "; ".join(n["reason"] for n in optimized["not_run"]))
                     + (f"; tuned: {optimized['tuning']['chosen']} (scores {optimized['tuning']['scores']})"
                        if optimized.get("tuning") else ""))
        int4 = None
        if recipe.int4:
            with log.stage("int4", "quantizing the int4 graph (MatMulNBits) and checking its fit") as rec:
                int4 = cached("int4", keys.int4, rec, lambda: int4_stage(recipe, config, plain))
                fit = int4["int4"]["fit"]
                rec.done(f"{INT4_GRAPH}: mean KL {fit['mean_kl']:.3f}, top-1 {fit['top1']:.1%}, greedy "
                         f"{fit['greedy']:.1%} of the fp32 reference")
        with log.stage("speed", "measuring decode speed, full vs skipped (ONNX Runtime)") as rec:
            speed = speed_stage(recipe, config, mask, plain, loaded.weight_bytes, console,
                                build=build_options(optimized["fused"], optimized["tuning"]))
            rec.done(_speed_line(speed))
        with log.stage("package") as rec:
            # onnxruntime-genai runs the int4 graph where the recipe asked for one, else the optimized graph where
            # there is one (same contract, checked above, faster on CPU: docs/serving.md); TensorRT and other
            # runtimes keep model.onnx
            genai_graph = INT4_GRAPH if int4 else optimized["serve"]
            packaged = found.add(package_stage(recipe, config, loaded.generation_config, tokenizer, work.path,
                                               genai_graph))
            rec.done((", ".join(a["path"] for a in packaged["artifacts"]) or "nothing to add")
                     + "".join(f"; not written: {n['reason']}" for n in packaged["not_run"]))

        report = Report(
            name=out_dir.name, passed=found.passed, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            recipe={"path": str(recipe.source_path), "resolved": recipe.model_dump(mode="json", by_alias=True)},
            model=model_info, architecture=config.model_type, num_layers=config.num_hidden_layers,
            mask=mask.describe(), kept_attention_layers=mask.kept_attention(config.num_hidden_layers),
            parameters=size["parameters"], kv_cache=size["kv_cache"], artifacts=found.artifacts,
            onnx=exported["onnx"], parity=found.parity, samples=reference["samples"], checks=found.checks,
            not_run=found.not_run, half_precision_greedy=validated["greedy"], engines=engines,
            optimized_graph=optimized["fused"], tuning=optimized["tuning"], served_graph=genai_graph, speed=speed,
            int4=int4 and int4["int4"], stages=[s.as_dict() for s in log.records],
            wall_seconds=round(time.perf_counter() - started, 2), versions=tool_versions())
        report.write(work.path)
        write_manifest(work.path, recipe, report)  # last: it hashes every file in the folder
        report.published_to = str(work.publish() if report.passed else work.keep_failed())
    return report


@dataclass
class Loaded:
    """What the PyTorch stages leave for the rest of the run (no weights: the model is released)."""

    model_info: dict
    config: object
    mask: object
    tokenizer: object
    size: dict
    keys: StageKeys
    own: str  # the model's precision
    generation_config: object
    weight_bytes: int
    exported: dict
    reference: dict


def _pytorch_stages(recipe: Recipe, folder: Path, log: StageLog, found: Findings, cached, caching: bool) -> Loaded:
    """Load, remove, record the reference, export (a checkpoint, half precisions). Everything that runs the
    PyTorch model happens here; the model and its weights go out of scope when this returns, before any
    ONNX Runtime session opens."""
    with log.stage("load", "loading the base model") as rec:
        model_info, _, mask, model, tokenizer = load_stage(recipe)
        config = model.config
        rec.done((model_info.get("id") or model_info.get("path") or model_info["kind"])
                 + (f"; byte tokenizer: {model_info['tokenizer']['fallback']}" if "tokenizer" in model_info else ""))
    with log.stage("remove") as rec:
        skipped, size = remove_stage(model, mask)
        rec.done(f"{size['parameters']['full']:,} -> {size['parameters']['skipped']:,} parameters")
    found.add(size)
    keys = StageKeys.for_run(recipe, model_info, mask)
    own, generation_config = model_precision(model), getattr(model, "generation_config", None)
    weight_bytes = size["parameters"]["skipped"] * itemsize(own)

    # --- PyTorch: the reference is run and recorded, the graphs exported; then the model is released
    with log.stage("reference", "running and recording the masked PyTorch reference") as rec:
        reference = cached("reference", keys.reference, rec,
                           lambda: reference_stage(recipe, model, skipped, tokenizer, mask, folder))
        rec.done(f"{REFERENCE_FILE}; pytorch:skipped {_parity_line(reference['parity'])}")

    def export() -> dict:  # the cache keeps a second copy of the files: count it before writing anything
        check_free_space(folder, estimate_run_bytes(recipe, skipped) * (2 if caching else 1),
                         "the export (and its cached copy)")
        return export_stage(skipped, folder, recipe.export.opset, size)

    with log.stage("export", "exporting ONNX (torch.export, this takes a while)") as rec:
        exported = cached("export", keys.export, rec, export)
        rec.done(f"{ONNX_FILE} + external data, {exported['artifacts'][1]['bytes'] / 2**20:,.0f} MiB")
    if recipe.export.checkpoint:
        with log.stage("checkpoint", "writing the serving checkpoint") as rec:
            written = found.add(checkpoint_stage(model, skipped, tokenizer, mask, folder))
            rec.done(f"checkpoint/ ({len(written['artifacts'])} files)")
    if half_precisions(recipe, own):
        with log.stage("precisions", "exporting half-precision graphs") as rec:
            halves = cached("precisions", keys.precisions, rec,
                            lambda: precisions_stage(recipe, model, mask, folder, in_place=True))
            rec.done(", ".join(a["path"] for a in halves["artifacts"] if a["kind"] == "onnx"))
    return Loaded(model_info, config, mask, tokenizer, size, keys, own, generation_config, weight_bytes,
                  exported, reference)


def _parity_line(parity: list[dict]) -> str:
    if not parity:  # e.g. an fp16 model whose only graph's session would not fit here (then under not_run)
        return "no graph checked"
    worst = max(parity, key=lambda p: p["max_abs_diff"] / p["atol"])
    return (f"worst max|Δlogit| {worst['max_abs_diff']:.1e} (atol {worst['atol']:.0e}), "
            f"{sum(p['passed'] for p in parity)}/{len(parity)} phases pass")


def _speed_line(speed: dict) -> str:
    m = speed["measured"]
    if m is None:
        return f"cost model only ({speed['not_measured']})"
    return (f"decode ctx {m['context']}: predicted {m['plain']['predicted_speedup']:.3f}x, measured "
            + ", ".join(f"{v} {m[v]['measured_speedup']:.3f}x" + ("" if m[v].get("resolved", True) else " (within noise)")
                        for v in ("plain", "optimized") if v in m))
