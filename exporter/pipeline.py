"""run(recipe, out_dir) -> report: the stages in order, nothing else."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from exporter import manifest as manifests
from exporter import report as reports
from exporter.measure import StageStats, stage
from exporter.recipe import Recipe, resolve_mask


def _say(console, message: str) -> None:
    if console is not None:
        console.print(message)


def _done(console, record: StageStats, detail: str = "") -> None:
    cached = " (cached)" if record.cached else ""
    _say(console, f"[green]✓[/] {record.name + cached:<18} {record.seconds:6.1f} s  {record.peak_rss_mb:7,.0f} MiB  {detail}")


def run(recipe: Recipe, out_dir: Path, console=None, force: bool = False, wait: bool = True) -> dict:
    """Load, remove, export, validate, report. Returns the report; `report['passed']` says if it holds.

    Finished stages are cached beside the artifacts (exporter/cache.py): a rerun after a kill resumes,
    a changed input redoes the stages that read it, `force` redoes everything.
    """
    from exporter.cache import StageCache, code_fingerprint, stage_key
    from exporter.workdir import WorkDir, check_free_space

    _require_backends(recipe)
    stats: list[StageStats] = []
    started = time.perf_counter()
    cache = StageCache(out_dir.parent / ".stages" / out_dir.name, enabled=not force)
    with WorkDir(out_dir, wait=wait, on_wait=lambda m: _say(console, m)) as work:
        with stage("load", stats) as rec:
            with _status(console, "loading the base model"):
                model_info, config, mask, model, tokenizer = load_stage(recipe)
        _done(console, rec, f"{model_info.get('id') or model_info.get('path') or model_info['kind']}")

        with stage("remove", stats) as rec:
            skipped, size = remove_stage(model, mask)
        _done(console, rec, f"{size['parameters']['full']:,} -> {size['parameters']['skipped']:,} parameters")

        # Each cached stage's key: everything it reads (recipe sections, the model's identity, the code
        # that runs, tool versions, and the key of the stage whose files it reads).
        export_key = stage_key({"model": model_info, "dtype": recipe.model.dtype, "mask": [mask.attention, mask.mlp],
                                "export": recipe.export.model_dump(mode="json", exclude={"batch1_decode_path"}),
                                "code": code_fingerprint("models", "architectures", "surgery", "onnx_export"),
                                "versions": reports.tool_versions()})
        checks_code = code_fingerprint("parity", "runners", "prompts")
        checked_with = recipe.validation.model_dump(mode="json", exclude={"speed"})  # speed is timing, not a check
        validate_key = stage_key({"export": export_key, "validate": checked_with,
                                  "code": checks_code})

        def cached(name: str, key: str, rec: StageStats, compute) -> dict:
            """A finished stage's results (and files) from the cache, or computed now and stored."""
            results = cache.restore(name, key, work.path)
            if results is not None:
                rec.cached = True
                return results
            results = compute()
            cache.store(name, key, work.path, [a["path"] for a in results.get("artifacts", [])], results)
            return results

        def export() -> dict:
            # The cache keeps a second copy of the files: count it before writing anything.
            check_free_space(work.path, estimate_run_bytes(recipe, skipped) * (2 if cache.enabled else 1),
                             "the export (and its cached copy)")
            with _status(console, "exporting ONNX (torch.export, this takes a while)"):
                artifacts, onnx_info, onnx_checks = export_stage(skipped, work.path, recipe.export.opset, size)
            return {"artifacts": artifacts, "onnx": onnx_info, "checks": onnx_checks}

        with stage("export", stats) as rec:
            exported = cached("export", export_key, rec, export)
        artifacts, onnx_info, onnx_checks = exported["artifacts"], exported["onnx"], exported["checks"]
        _done(console, rec, f"{artifacts[0]['path']} + external data, {artifacts[1]['bytes'] / 2**20:,.0f} MiB")

        def validate() -> dict:
            with _status(console, "checking parity in ONNX Runtime"):
                parity, samples = validate_stage(recipe, model, skipped, tokenizer, mask,
                                                 work.path / artifacts[0]["path"])
            return {"parity": parity, "samples": samples}

        with stage("validate", stats) as rec:
            validated = cached("validate", validate_key, rec, validate)
        parity, samples = validated["parity"], validated["samples"]
        worst = max(parity, key=lambda p: p["max_abs_diff"] / p["atol"])
        _done(console, rec, f"worst max|Δlogit| {worst['max_abs_diff']:.1e} (atol {worst['atol']:.0e}), "
                            f"{sum(p['passed'] for p in parity)}/{len(parity)} phases pass")

        extra = {"artifacts": [], "parity": [], "checks": [], "not_run": [], "greedy": {}, "engines": None}
        precisions_key = stage_key({"export": export_key, "precisions": recipe.precisions,
                                    "validate": checked_with,
                                    "code": [checks_code, code_fingerprint("precision")]})
        if set(recipe.precisions) - {_own_precision(model)}:
            with stage("precisions", stats) as rec:
                with _status(console, "exporting and checking half-precision graphs"):
                    extra.update(cached("precisions", precisions_key, rec,
                                        lambda: precisions_stage(recipe, model, mask, tokenizer, work.path)))
            _done(console, rec, ", ".join(a["path"] for a in extra["artifacts"] if a["kind"] == "onnx")
                  + "".join(f"; not run: {n['reason']}" for n in extra["not_run"]))
        if recipe.tensorrt is not None:
            # engines read the graph files, not the checks: keyed by those files' hashes, so changed prompts
            # do not rebuild them, while a re-exported graph that differs by one byte does
            graphs = {a["path"]: a["sha256"] for a in artifacts + extra["artifacts"] if a["kind"].startswith("onnx")}
            engines_key = stage_key({"graphs": graphs, "tensorrt": recipe.tensorrt.model_dump(mode="json"),
                                     "timing_cache": _file_hash(recipe.tensorrt.timing_cache),
                                     "code": code_fingerprint("tensorrt")})
            with stage("engines", stats) as rec:
                with _status(console, "building TensorRT engines"):
                    engines = cached("engines", engines_key, rec, lambda: engines_stage(recipe, model, work.path))
            extra["engines"], extra["checks"] = engines, extra["checks"] + engines["checks"]
            extra["artifacts"] += engines["artifacts"]
            _done(console, rec, ", ".join(e["path"] for e in engines["artifacts"] if e["kind"] == "engine")
                  or "none built: " + "; ".join(n["reason"] for n in engines["not_built"]))
        artifacts, parity = artifacts + extra["artifacts"], parity + extra["parity"]

        optimize_key = stage_key({"export": export_key, "validate": checked_with,
                                  "batch1_decode_path": recipe.export.batch1_decode_path,
                                  "code": [checks_code, code_fingerprint("optimize", "gemv")]})
        with stage("optimize", stats) as rec:  # the faster ORT graph, checked like the plain one
            with _status(console, "writing and checking the optimized ONNX Runtime graph"):
                optimized = cached("optimize", optimize_key, rec,
                                   lambda: optimize_stage(recipe, model, mask, tokenizer, work.path / artifacts[0]["path"]))
        artifacts, parity = artifacts + optimized["artifacts"], parity + optimized["parity"]
        extra["not_run"] += optimized["not_run"]
        _done(console, rec, ", ".join(a["path"] for a in optimized["artifacts"])
              or "not written: " + "; ".join(n["reason"] for n in optimized["not_run"]))

        with stage("speed", stats) as rec:  # cost model + a few seconds of interleaved ORT timing
            if recipe.validation.speed:
                with _status(console, "measuring decode speed, full vs skipped (ONNX Runtime)"):
                    from exporter.bench import speed_stage

                    speed = speed_stage(recipe, model, mask, work.path / artifacts[0]["path"], console)
            else:
                from exporter.cost import predict

                speed = {"prediction": predict(config, mask, precision=recipe.model.dtype), "measured": None}
        m = speed["measured"]
        _done(console, rec, "cost model only (validate.speed: false)" if m is None else
              f"decode ctx {m['context']}: predicted {m['plain']['predicted_speedup']:.3f}x, measured "
              + ", ".join(f"{v} {m[v]['measured_speedup']:.3f}x" + ("" if m[v].get("resolved", True) else " (within noise)")
                          for v in ("plain", "optimized") if v in m))

        with stage("package", stats) as rec:
            # onnxruntime-genai runs the optimized graph where there is one: same contract, parity-checked above,
            # and it decodes faster on CPU (docs/serving.md); TensorRT and other runtimes keep model.onnx
            genai_graph = next((a["path"] for a in optimized["artifacts"] if a["kind"] == "onnx-optimized"),
                               artifacts[0]["path"])
            packaged = package_stage(recipe, model, skipped, tokenizer, mask, work.path, genai_graph)
        artifacts = artifacts + packaged
        _done(console, rec, ", ".join(a["path"] for a in packaged) or "nothing to add")

        checks = size["checks"] + onnx_checks + extra["checks"]
        passed = all(p["passed"] for p in parity) and all(c["passed"] for c in checks)
        report = {
            "name": out_dir.name,
            "passed": passed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": {"path": str(recipe.source_path), "resolved": recipe.model_dump(mode="json", by_alias=True)},
            "model": model_info,
            "architecture": config.model_type,
            "num_layers": config.num_hidden_layers,
            "mask": {"attention": list(mask.attention), "mlp": list(mask.mlp), "blocks": list(mask.blocks)},
            "kept_attention_layers": skipped.kept_attention,
            "parameters": size["parameters"],
            "kv_cache": size["kv_cache"],
            "artifacts": artifacts,
            "onnx": onnx_info,
            "parity": parity,
            "samples": samples,
            "checks": checks,
            "not_run": extra["not_run"],  # checks that could not run here, with the reason; never passed
            "half_precision_greedy": extra["greedy"],
            "engines": extra["engines"],
            "optimized_graph": optimized["fused"],
            "speed": speed,
            "stages": [vars(s) for s in stats],
            "wall_seconds": None,
            "versions": reports.tool_versions(),
        }
        report["wall_seconds"] = round(time.perf_counter() - started, 2)
        reports.write_json(report, work.path)
        reports.write_markdown(report, work.path)
        manifests.write_manifest(work.path, recipe, report)  # last: it hashes every file in the folder
        report["published_to"] = str(work.publish() if passed else work.keep_failed())
    return report


class _status:
    """A spinner with a message while a long stage runs (no-op without a console)."""

    def __init__(self, console, message: str):
        self.ctx = console.status(message) if console is not None else None

    def __enter__(self):
        if self.ctx:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx:
            self.ctx.__exit__(*exc)


def package_stage(recipe: Recipe, model, skipped, tokenizer, mask, out_dir: Path, onnx_file: str) -> list[dict]:
    """What ships beside the ONNX: the resolved recipe, tokenizer files, genai_config.json, a serving checkpoint."""
    from exporter.genai import save_tokenizer, write_genai_config

    files = [(manifests.write_recipe_copy(recipe, out_dir), "recipe")]
    files += [(p, "tokenizer") for p in save_tokenizer(tokenizer, out_dir)]
    if recipe.export.genai:
        files.append((write_genai_config(model, out_dir, onnx_file, recipe.export.max_context), "genai-config"))
    if recipe.export.checkpoint:
        from exporter.checkpoint import write_checkpoint

        files += [(p, "checkpoint") for p in write_checkpoint(model, skipped, mask, out_dir / "checkpoint", tokenizer)]
    return [reports.describe_file(p, out_dir, kind) for p, kind in files]


def estimate_run_bytes(recipe: Recipe, skipped) -> int:
    """Disk a run needs: the kept weights once per graph (the model's dtype, then each other precision) and
    once per engine, plus 10% and 64 MiB per file set for graphs, caches and sidecars."""
    params = sum(p.numel() for p in {id(p): p for p in skipped.parameters()}.values())
    own = next(skipped.parameters()).element_size()
    width = {"fp32": 4, "fp16": 2, "bf16": 2}
    sets = [own] + [width[p] for p in recipe.precisions if p != _own_precision(skipped)]
    if recipe.tensorrt is not None:
        sets += [width[p] for p in recipe.engine_precisions] * len(recipe.tensorrt.backends)
    return sum(int(params * w * 1.1) + (64 << 20) for w in sets)


def _file_hash(path: Path | None) -> str | None:
    """sha256 of an input file a stage reads (a TensorRT timing cache), None when absent."""
    import hashlib

    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_stage(recipe: Recipe):
    from exporter.models import describe_source, load_config, load_model

    from exporter.checkpoint import check_supported, merge_removed

    config = load_config(recipe.model)  # validate the mask against the model before loading weights
    mask = merge_removed(resolve_mask(recipe, config.num_hidden_layers), config)  # a serving checkpoint's no_ops
    if recipe.export.checkpoint:
        check_supported(config)  # before any work, not after the export
    model, tokenizer = load_model(recipe.model)
    info = describe_source(recipe.model)
    if info["kind"] == "hub":  # the commit the revision resolved to: a moved branch invalidates the cache
        info["commit"] = getattr(model.config, "_commit_hash", None)
    return info, config, mask, model, tokenizer


def removed_parameters(model, mask) -> int:
    """Parameters of the modules a mask removes, counted on the base model."""
    from exporter.architectures import layout_for
    from exporter.surgery import count_parameters

    layout = layout_for(model.config.model_type)
    layers = model.model.layers
    total = 0
    for i in mask.attention:
        total += count_parameters(getattr(layers[i], layout.attention)) + count_parameters(getattr(layers[i], layout.attention_norm))
    for i in mask.mlp:
        total += count_parameters(getattr(layers[i], layout.mlp)) + count_parameters(getattr(layers[i], layout.mlp_norm))
    return total


def remove_stage(model, mask):
    from exporter.onnx_export import kv_shape
    from exporter.surgery import apply_skip, count_parameters

    skipped = apply_skip(model, mask)
    full, kept = count_parameters(model), count_parameters(skipped)
    expected = removed_parameters(model, mask)
    config = model.config
    itemsize = next(model.parameters()).element_size()
    _, heads, _, dim = kv_shape(config, 1, 1)
    per_layer = 2 * heads * dim * itemsize
    size = {
        "parameters": {"full": full, "skipped": kept, "removed": full - kept, "removed_modules": expected},
        "kv_cache": {"layers_full": config.num_hidden_layers, "layers_skipped": len(skipped.kept_attention),
                     "bytes_per_token_full": per_layer * config.num_hidden_layers,
                     "bytes_per_token_skipped": per_layer * len(skipped.kept_attention)},
        "checks": [{"name": "parameters removed = removed modules' parameters", "value": full - kept,
                    "limit": f"== {expected}", "passed": full - kept == expected}],
    }
    return skipped, size


def export_stage(skipped, out_dir: Path, opset: int, size: dict):
    from exporter.onnx_export import export_onnx, onnx_signature, onnx_weight_elements

    path = export_onnx(skipped, out_dir, opset=opset)
    data = path.with_name(path.name + ".data")
    precision = _own_precision(skipped)
    artifacts = [reports.describe_file(path, out_dir, "onnx", precision),
                 reports.describe_file(data, out_dir, "onnx-external-data", precision)]
    elements = onnx_weight_elements(path)
    params = size["parameters"]
    # The graph may hold a few small constants beyond the kept weights, and the optimizer merges
    # identical initializers (e.g. all-ones norms), so only the upper bound is exact enough: any
    # removed sub-layer (far more than `slack` elements) left in the graph would break it.
    slack = 4096
    signature = onnx_signature(path)
    pasts = sorted(int(n.split(".")[1]) for n in signature["inputs"] if n.startswith("past_key_values.") and n.endswith(".key"))
    checks = [
        {"name": "ONNX weight elements <= skipped parameters + small constants", "value": elements,
         "limit": f"<= {params['skipped'] + slack}", "passed": elements <= params["skipped"] + slack},
        {"name": "ONNX past_key_values inputs = kept attention layers", "value": pasts,
         "limit": f"== {skipped.kept_attention}", "passed": pasts == skipped.kept_attention},
    ]
    return artifacts, signature, checks


def validate_stage(recipe: Recipe, model, skipped, tokenizer, mask, onnx_path: Path):
    from exporter import prompts as P
    from exporter.parity import check_parity, greedy_tokens
    from exporter.runners import HFRunner, OrtRunner, TorchRunner
    from exporter.surgery import masked

    v = recipe.validation
    ort = OrtRunner(onnx_path)
    reference = HFRunner(model)
    parity, samples = [], []
    for texts, (ids, attn) in validation_batches(recipe, tokenizer):
        with masked(model, mask):
            for runner, name in ((ort, f"onnx:{_own_precision(model)}"), (TorchRunner(skipped), "pytorch:skipped")):
                phases, trace = check_parity(reference, runner, ids, attn, v.decode_steps,
                                             v.atol.prefill, v.atol.decode, name)
                parity += [p.as_dict() for p in phases]
        if len(texts) == 1:
            full = greedy_tokens(HFRunner(model), ids, attn, v.decode_steps)
            samples.append({"prompt": texts[0], "full": P.decode(tokenizer, full[0]),
                            "skipped": P.decode(tokenizer, trace.tokens[0])})
    return parity, samples


def validation_batches(recipe: Recipe, tokenizer) -> list[tuple[list[str], tuple]]:
    """(texts, (input_ids, attention_mask)): the first prompt alone, then a left-padded batch of 2."""
    from exporter import prompts as P

    v = recipe.validation
    batches = [[v.prompts[0]]]
    if v.padded_batch:
        second = v.prompts[1] if len(v.prompts) > 1 else " ".join(v.prompts[0].split()[: max(1, len(v.prompts[0].split()) // 2)])
        batches.append([v.prompts[0], second])
    out = []
    for texts in batches:
        ids, attn = P.left_padded(tokenizer, texts, v.chat)
        if attn.all() and len(texts) > 1:  # equal lengths: drop a token from row 1 so padding is exercised
            ids, attn = ids.clone(), attn.clone()
            ids[1, 1:], attn[1, 0] = ids[1, :-1].clone(), 0
        out.append((texts, (ids, attn)))
    return out


def _own_precision(model) -> str:
    from exporter.onnx_export import precision_of

    return precision_of(next(model.parameters()).dtype)


def optimize_stage(recipe: Recipe, model, mask, tokenizer, plain_path: Path) -> dict:
    """model.opt.onnx (fused ORT contrib ops) beside the plain graph, with the same parity checks."""
    from exporter.optimize import optimize_stage as write_and_check

    batches = [pair for _, pair in validation_batches(recipe, tokenizer)]
    v = recipe.validation
    return write_and_check(model, mask, plain_path, batches, v.decode_steps, v.atol.prefill, v.atol.decode,
                           recipe.export.batch1_decode_path)


def precisions_stage(recipe: Recipe, model, mask, tokenizer, out_dir: Path) -> dict:
    """Graphs in the recipe's other precisions, and their parity against the reference in ORT (CPU)."""
    from exporter.precision import check_half_parity, export_precisions

    graphs = export_precisions(model, mask, out_dir, recipe.precisions, recipe.export.opset)
    batches = [pair for _, pair in validation_batches(recipe, tokenizer)]
    v = recipe.validation
    parity, not_run, greedy = check_half_parity(model, mask, graphs, batches, v.decode_steps, v.half_atol)
    artifacts = [a for g in graphs.values() for a in g["artifacts"]]
    return {"artifacts": artifacts, "parity": parity, "not_run": not_run, "greedy": greedy}


def _require_backends(recipe: Recipe) -> None:
    """With `tensorrt.required`, a missing backend stops the run before any work (one line, exit 2)."""
    from exporter.errors import UserError
    from exporter.tensorrt import missing_reason

    if recipe.tensorrt is not None and recipe.tensorrt.required:
        reasons = [r for b in recipe.tensorrt.backends if (r := missing_reason(b))]
        if reasons:
            raise UserError(f"{recipe.source_path or 'recipe'}: tensorrt.required: " + "; ".join(reasons))


def engines_stage(recipe: Recipe, model, out_dir: Path) -> dict:
    """One engine per backend and precision from the exported graphs; missing backends are reported, not fatal."""
    from exporter.tensorrt import BuildOptions, build_engine, check_sidecar, missing_reason, timing_cache_out

    t = recipe.tensorrt
    opts = BuildOptions(max_batch=t.max_batch or recipe.export.max_batch,
                        max_context=t.max_context or recipe.export.max_context,
                        optimization_level=t.optimization_level, compute_capabilities=tuple(t.compute_capabilities),
                        hardware_compatibility=t.hardware_compatibility, version_compatible=t.version_compatible,
                        timing_cache=t.timing_cache)
    own = _own_precision(model)
    built, not_built, artifacts, checks = [], [], [], []
    for backend in t.backends:
        reason = missing_reason(backend)
        for precision in recipe.engine_precisions:
            if reason:
                not_built.append({"backend": backend, "precision": precision, "reason": reason})
                continue
            onnx_path = out_dir / "model.onnx" if precision == own else out_dir / precision / "model.onnx"
            engine_path = out_dir / "engines" / f"{backend}.{precision}.engine"
            name = f"engine {backend} {precision}"
            try:
                sidecar = build_engine(onnx_path, engine_path, backend, precision, opts)
            except Exception as exc:  # noqa: BLE001 - a failed build fails the run, with its reason in the report
                checks.append({"name": f"{name} built", "value": f"{exc}"[:500], "limit": "builds", "passed": False})
                continue
            problems = check_sidecar(engine_path, onnx_path)
            checks.append({"name": f"{name}: sidecar matches engine and ONNX (bytes, sha256)",
                           "value": "; ".join(problems) or "ok", "limit": "ok", "passed": not problems})
            built.append(vars(sidecar) | {"path": str(engine_path.relative_to(out_dir))})
            artifacts += [reports.describe_file(engine_path, out_dir, "engine", precision),
                          reports.describe_file(engine_path.with_name(engine_path.name + ".json"), out_dir,
                                                "engine-sidecar", precision)]
            if timing_cache_out(engine_path).is_file():
                artifacts.append(reports.describe_file(timing_cache_out(engine_path), out_dir, "timing-cache"))
    return {"built": built, "not_built": not_built, "artifacts": artifacts, "checks": checks}
