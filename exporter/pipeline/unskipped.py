"""The unskipped model's graphs (plain and optimized), exported once per base model into the export-skip
cache, so comparing masks of the same model pays the full export only once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from exporter.pipeline.cache import code_fingerprint, stage_key
from exporter.files import locked, publish_folder
from exporter.mask import SkipMask
from exporter.model.source import cache_dir, describe_source, load_config, load_model
from exporter.onnx.contract import ONNX_FILE, OPT_FILE
from exporter.onnx.export import export_onnx
from exporter.onnx.optimize import NotOptimizable, optimize_onnx
from exporter.model.surgery import apply_skip
from exporter.pipeline.keys import EXPORT_CODE, REWRITE_CODE
from exporter.pipeline.optimize import default_batch1_path
from exporter.versions import tool_versions


def full_graph(recipe, model=None, console=None, build: dict | None = None) -> Path:
    """The unskipped model's plain graph (and model.opt.onnx beside it), exported once into the cache.
    `build`: optimize_onnx's options for the variant the skipped artifact serves (stages.optimize.build_options),
    so both graphs are built alike; None: the recipe's default variant."""
    key = stage_key({"model": describe_source(recipe.model), "dtype": recipe.model.dtype, "opset": recipe.export.opset,
                     "code": code_fingerprint(*EXPORT_CODE), "versions": tool_versions()})
    folder = cache_dir() / "full-onnx" / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    with locked(folder.with_name(f".{key}.lock")):  # runs side by side export and refresh it once, never interleaved
        if not (folder / ONNX_FILE).is_file():
            if console is not None:
                console.print("exporting the unskipped model once for speed comparisons (cached for later runs)")
            if model is None:
                model, _ = load_model(recipe.model)
            tmp = folder.with_name(f".{key}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            export_onnx(apply_skip(model, SkipMask()), tmp, opset=recipe.export.opset)
            publish_folder(tmp, folder)
        config = load_config(recipe.model)
        if build is None:
            build = {"batch1_path": default_batch1_path(recipe.export.batch1_decode_path)}
        _refresh_optimized(folder / ONNX_FILE, config, build)
    return folder / ONNX_FILE


def _refresh_optimized(plain: Path, config, build: dict) -> None:
    """(Re)write model.opt.onnx beside a cached full graph when optimize.py changed since it was written, or
    the variant asked for differs (full and skipped graphs must be built alike)."""
    stamp = plain.with_name("optimize.stamp")
    layouts = build.get("one_row_layouts") or {}
    fingerprint = code_fingerprint(*REWRITE_CODE) + ("" if build["batch1_path"] else " no-batch1-path") \
        + "".join(f" {k}x{n}:{how}" for (k, n), how in sorted(layouts.items()))
    if plain.with_name(OPT_FILE).is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return
    try:
        optimize_onnx(plain, config, **build)
    except NotOptimizable:
        plain.with_name(OPT_FILE).unlink(missing_ok=True)  # the bench then compares plain graphs only
    stamp.write_text(fingerprint)


def graph_pairs(full_plain: Path, skipped_plain: Path) -> dict[str, tuple[Path, Path]]:
    """{'plain': (full, skipped), 'optimized': (full, skipped)} for the variants present on disk."""
    pairs = {"plain": (full_plain, skipped_plain)}
    full_opt, skipped_opt = full_plain.with_name(OPT_FILE), skipped_plain.with_name(OPT_FILE)
    if full_opt.is_file() and skipped_opt.is_file():
        pairs["optimized"] = (full_opt, skipped_opt)
    return pairs
