"""run(recipe, out_dir) -> Report: the stages in order, nothing else.

Each stage lives in its own module here (pipeline/<stage>.py), takes its settings (pipeline/settings.py) and returns
its typed result (pipeline/results.py); finished stages are cached beside the artifacts (pipeline/cache.py, keys in
pipeline/keys.py): a rerun after a kill resumes, a changed input redoes the stages that read it, `force` redoes
everything. The folder is built aside and published only when every check passed (pipeline/workdir.py).

The unskipped model's graphs, which speed comparisons need, come from this same pipeline run with an empty mask
(`unskipped_graph`), cached like any run.
"""

from __future__ import annotations

import gc
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from exporter.checks.manifest import write_manifest, write_recipe_copy
from exporter.checks.reference import REFERENCE_FILE
from exporter.dtypes import itemsize, model_precision
from exporter.errors import CheckFailed
from exporter.measure import StageLog
from exporter.model.source import cache_dir, gguf_parsed_once, load_config
from exporter.onnx.contract import ONNX_FILE
from exporter.pipeline.cache import StageCache, stage_key
from exporter.pipeline.engines import engines_stage, require_backends
from exporter.pipeline.export import estimate_run_bytes, export_stage
from exporter.pipeline.keys import StageKeys, engines_key
from exporter.pipeline.load import load_stage, require_supported
from exporter.pipeline.optimize import build_options, optimize_stage
from exporter.pipeline.package import checkpoint_stage, package_stage
from exporter.pipeline.precisions import graph_paths, precisions_stage
from exporter.pipeline.quantize import INT4_GRAPH, int4_stage
from exporter.pipeline.reference import reference_stage
from exporter.pipeline.remove import remove_stage
from exporter.pipeline.results import (Engines, Exported, Findings, Optimized, Quantized, Referenced, Removed,
                                       StageResult, Validated)
from exporter.pipeline.settings import RunSettings
from exporter.pipeline.speed import speed_stage
from exporter.pipeline.validate import validate_stage
from exporter.pipeline.workdir import WorkDir, check_free_space
from exporter.recipe import Recipe, Skip
from exporter.report import Report
from exporter.versions import tool_versions


def run(recipe: Recipe, out_dir: Path, console=None, force: bool = False, wait: bool = True,
        variant: dict | None = None) -> Report:
    """Load, remove, record the reference, export (and half precisions, a checkpoint); release the PyTorch
    model; validate, (engines), optimize, speed, package; then the report and the manifest. `report.passed`
    says whether every check held; the folder is published only then. `variant`: build exactly this optimized
    graph (optimize.build_options' form) instead of tuning one."""
    settings = RunSettings.of(recipe, variant)
    with ExitStack() as parsing:  # a GGUF is parsed once for the config and the conversion; the load stage ends it
        if settings.load.source.kind == "gguf":
            parsing.enter_context(gguf_parsed_once())
        return _run(recipe, settings, out_dir, console, force, wait, parsing)


def _run(recipe: Recipe, settings: RunSettings, out_dir: Path, console, force: bool, wait: bool,
         parsing: ExitStack) -> Report:
    started = time.perf_counter()
    config = load_config(settings.load.source)  # once: every stage that reads the config gets this one
    require_backends(settings.engines, settings.load.where)
    require_supported(settings.load, config)
    log, found = StageLog(console), Findings()
    cache = StageCache(out_dir.parent / ".stages" / out_dir.name, enabled=not force)
    with WorkDir(out_dir, wait=wait, on_wait=log.say) as work:
        def cached(stage: str, key: str, rec, compute, result_type: type[StageResult]):
            result, rec.cached = cache.restore_or_run(stage, key, work.path, compute, result_type)
            return found.add(result)

        loaded = _pytorch_stages(settings, config, parsing, work.path, log, found, cached, cache.enabled)
        gc.collect()  # the model was released on return
        config, mask, keys, own = loaded.config, loaded.mask, loaded.keys, settings.own

        # --- ONNX Runtime (and TensorRT): every check against the recording
        plain = work.path / ONNX_FILE
        with log.stage("validate", "checking parity in ONNX Runtime") as rec:
            validated = cached("validate", keys.validate, rec,
                               lambda: validate_stage(settings.validation, work.path,
                                                      graph_paths(settings.precisions.halves, own, work.path), own),
                               Validated)
            rec.done(_parity_line(validated.parity) + "".join(f"; not run: {n['reason']}" for n in validated.not_run))
        engines = None
        if settings.engines is not None:
            graphs = {a["path"]: a["sha256"] for a in found.artifacts if a["kind"].startswith("onnx")}
            with log.stage("engines", "building TensorRT engines") as rec:
                engines = cached("engines", engines_key(settings.engines, graphs), rec,
                                 lambda: engines_stage(settings.engines, own, work.path), Engines)
                rec.done(", ".join(e["path"] for e in engines.artifacts if e["kind"] == "engine")
                         or "none built: " + "; ".join(n["reason"] for n in engines.not_built))
        with log.stage("optimize", "writing and checking the optimized ONNX Runtime graph") as rec:
            optimized = cached("optimize", keys.optimize, rec,
                               lambda: optimize_stage(settings.optimize, config, plain, own, loaded.weight_bytes),
                               Optimized)
            rec.done((", ".join(a["path"] for a in optimized.artifacts)
                      or "not written: " + "; ".join(n["reason"] for n in optimized.not_run))
                     + (f"; tuned: {optimized.tuning['chosen']} (scores {optimized.tuning['scores']})"
                        if optimized.tuning else ""))
        int4 = None
        if settings.int4 is not None:
            with log.stage("int4", "quantizing the int4 graph (MatMulNBits) and checking its fit") as rec:
                int4 = cached("int4", keys.int4, rec, lambda: int4_stage(settings.int4, config, plain), Quantized)
                fit = int4.int4["fit"]
                rec.done(f"{INT4_GRAPH}: mean KL {fit['mean_kl']:.3f}, top-1 {fit['top1']:.1%}, greedy "
                         f"{fit['greedy']:.1%} of the fp32 reference")
        with log.stage("speed", "measuring decode speed, full vs skipped (ONNX Runtime)") as rec:
            built_as = build_options(optimized.fused, optimized.tuning)
            speed = found.add(speed_stage(settings.speed, config, mask, plain, loaded.weight_bytes,
                                          lambda: unskipped_graph(recipe, built_as, console)))
            rec.done(_speed_line(speed.to_report()))
        with log.stage("package") as rec:
            # onnxruntime-genai runs the int4 graph where the recipe asked for one, else the optimized graph where
            # there is one (same contract, checked above, faster on CPU: docs/serving.md); TensorRT and other
            # runtimes keep model.onnx
            genai_graph = INT4_GRAPH if int4 else optimized.serve
            packaged = found.add(package_stage(settings.package, write_recipe_copy(recipe, work.path), config,
                                               loaded.generation_config, loaded.tokenizer, work.path, genai_graph))
            rec.done((", ".join(a["path"] for a in packaged.artifacts) or "nothing to add")
                     + "".join(f"; not written: {n['reason']}" for n in packaged.not_run))

        removed = loaded.removed
        report = Report(
            name=out_dir.name, passed=found.passed, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            recipe={"path": str(recipe.source_path), "resolved": recipe.model_dump(mode="json", by_alias=True)},
            model=loaded.model_info, architecture=config.model_type, num_layers=config.num_hidden_layers,
            mask=mask.describe(), kept_attention_layers=mask.kept_attention(config.num_hidden_layers),
            parameters=removed.parameters, kv_cache=removed.kv_cache, artifacts=found.artifacts,
            onnx=loaded.exported.onnx, parity=found.parity, samples=loaded.reference.samples, checks=found.checks,
            not_run=found.not_run, half_precision_greedy=validated.greedy,
            engines=engines and {"built": engines.built, "not_built": engines.not_built, "artifacts": engines.artifacts,
                                 "checks": engines.checks},
            optimized_graph=optimized.fused, tuning=optimized.tuning, served_graph=genai_graph,
            speed=speed.to_report(), int4=int4 and int4.int4, stages=[s.as_dict() for s in log.records],
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
    removed: Removed
    keys: StageKeys
    generation_config: object
    weight_bytes: int
    exported: Exported
    reference: Referenced


def _pytorch_stages(settings: RunSettings, config, parsing: ExitStack, folder: Path, log: StageLog, found: Findings,
                    cached, caching: bool) -> Loaded:
    """Load, remove, record the reference, export (a checkpoint, half precisions). Everything that runs the
    PyTorch model happens here; the model and its weights go out of scope when this returns, before any
    ONNX Runtime session opens."""
    with log.stage("load", "loading the base model") as rec:
        model_info, mask, model, tokenizer = load_stage(settings.load, config)
        parsing.close()  # the GGUF parse of the config was reused by the conversion: release it
        config = model.config  # the same config, as the model carries it (a GGUF's: its de-quantised folder's)
        rec.done((model_info.get("id") or model_info.get("path") or model_info["kind"])
                 + (f"; byte tokenizer: {model_info['tokenizer']['fallback']}" if "tokenizer" in model_info else ""))
    with log.stage("remove") as rec:
        skipped, removed = remove_stage(model, mask)
        rec.done(f"{removed.parameters['full']:,} -> {removed.parameters['skipped']:,} parameters")
    found.add(removed)
    keys = StageKeys.for_run(settings, model_info, mask)
    generation_config = getattr(model, "generation_config", None)
    weight_bytes = removed.parameters["skipped"] * itemsize(model_precision(model))

    # --- PyTorch: the reference is run and recorded, the graphs exported; then the model is released
    with log.stage("reference", "running and recording the masked PyTorch reference") as rec:
        reference = cached("reference", keys.reference, rec,
                           lambda: reference_stage(settings.reference, model, skipped, tokenizer, mask, folder),
                           Referenced)
        rec.done(f"{REFERENCE_FILE}; pytorch:skipped {_parity_line(reference.parity)}")

    def export() -> Exported:  # the cache keeps a second copy of the files: count it before writing anything
        check_free_space(folder, estimate_run_bytes(skipped, settings.precisions.halves, settings.engines)
                         * (2 if caching else 1), "the export (and its cached copy)")
        return export_stage(skipped, folder, settings.export, removed.parameters["skipped"])

    with log.stage("export", "exporting ONNX (torch.export, this takes a while)") as rec:
        exported = cached("export", keys.export, rec, export, Exported)
        rec.done(f"{ONNX_FILE} + external data, {exported.data_bytes / 2**20:,.0f} MiB")
    if settings.load.checkpoint:
        with log.stage("checkpoint", "writing the serving checkpoint") as rec:
            written = found.add(checkpoint_stage(model, skipped, tokenizer, mask, folder))
            rec.done(f"checkpoint/ ({len(written.artifacts)} files)")
    if settings.precisions.halves:
        with log.stage("precisions", "exporting half-precision graphs") as rec:
            halves = cached("precisions", keys.precisions, rec,
                            lambda: precisions_stage(settings.precisions, model, mask, folder, in_place=True),
                            StageResult)
            rec.done(", ".join(a["path"] for a in halves.artifacts if a["kind"] == "onnx"))
    return Loaded(model_info, config, mask, tokenizer, removed, keys, generation_config, weight_bytes, exported,
                  reference)


UNSKIPPED = "unskipped"  # under the export-skip cache: the unskipped model's runs, one folder per model and opset


def unskipped_recipe(recipe: Recipe) -> Recipe:
    """The recipe's model with nothing skipped, as the speed comparisons need it: the same model, dtype, opset,
    validation prompts and tolerances; no half precisions, int4, engines, checkpoint, genai config, tuning or
    speed stage of its own."""
    return recipe.model_copy(update={
        "name": None, "skip": Skip(), "tensorrt": None,
        "export": recipe.export.model_copy(update={"precisions": None, "genai": False, "checkpoint": False,
                                                   "tune": False}),
        "validate_": recipe.validation.model_copy(update={"speed": False})})


def unskipped_graph(recipe: Recipe, variant: dict | None = None, console=None) -> Path:
    """The unskipped model's plain graph (model.opt.onnx beside it, built as `variant`: the skipped artifact's, so
    both are built alike; None: the default variant), from this pipeline run with an empty mask into the
    export-skip cache: checked like any run, and cached like any run (a second call reruns only the load)."""
    full = unskipped_recipe(recipe)
    folder = cache_dir() / UNSKIPPED / stage_key({"model": recipe.model.model_dump(mode="json"),
                                                  "opset": recipe.export.opset})
    if console is not None:
        console.print(f"the unskipped model's graphs: this pipeline with an empty mask, into {folder} (cached)")
    report = run(full, folder, variant=variant)
    if not report.passed:
        raise CheckFailed(f"the unskipped model's run failed its checks: see {report.published_to}/report.md")
    return folder / ONNX_FILE


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
