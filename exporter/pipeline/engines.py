"""TensorRT / TensorRT-RTX engines from the exported graphs: one per backend and precision."""

from __future__ import annotations

from pathlib import Path

from exporter.backends.trt import (BuildOptions, build_engine, check_sidecar, missing_reason, sidecar_path,
                                   timing_cache_out)
from exporter.errors import UserError
from exporter.files import describe_file
from exporter.onnx.contract import ONNX_FILE
from exporter.pipeline.results import Engines
from exporter.pipeline.settings import EnginesSettings


def require_backends(settings: EnginesSettings | None, where: str = "recipe") -> None:
    """With `tensorrt.required`, a missing backend stops the run before any work (one line, exit 2)."""
    if settings is not None and settings.tensorrt.required:
        reasons = [r for b in settings.tensorrt.backends if (r := missing_reason(b))]
        if reasons:
            raise UserError(f"{where}: tensorrt.required: " + "; ".join(reasons))


def engines_stage(settings: EnginesSettings, own: str, out_dir: Path) -> Engines:
    """One engine per backend and precision from the exported graphs; missing backends are reported, not fatal."""
    t = settings.tensorrt
    opts = BuildOptions(max_batch=settings.max_batch, max_context=settings.max_context,
                        optimization_level=t.optimization_level, compute_capabilities=tuple(t.compute_capabilities),
                        hardware_compatibility=t.hardware_compatibility, version_compatible=t.version_compatible,
                        timing_cache=t.timing_cache)
    built, not_built, artifacts, checks = [], [], [], []
    for backend in t.backends:
        reason = missing_reason(backend)
        for precision in settings.precisions:
            if reason:
                not_built.append({"backend": backend, "precision": precision, "reason": reason})
                continue
            onnx_path = out_dir / ONNX_FILE if precision == own else out_dir / precision / ONNX_FILE
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
            artifacts += [describe_file(engine_path, out_dir, "engine", precision),
                          describe_file(sidecar_path(engine_path), out_dir, "engine-sidecar", precision)]
            if timing_cache_out(engine_path).is_file():
                artifacts.append(describe_file(timing_cache_out(engine_path), out_dir, "timing-cache"))
    return Engines(built=built, not_built=not_built, artifacts=artifacts, checks=checks)
