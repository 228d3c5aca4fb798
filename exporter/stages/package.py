"""What ships beside the ONNX: the resolved recipe, tokenizer files, genai_config.json, a serving checkpoint."""

from __future__ import annotations

from pathlib import Path

from exporter.backends.genai import genai_unsupported, save_tokenizer, write_genai_config
from exporter.checkpoint import write_checkpoint
from exporter.files import describe_file
from exporter.manifest import write_recipe_copy
from exporter.recipe import Recipe


def package_stage(recipe: Recipe, model, skipped, tokenizer, mask, out_dir: Path, onnx_file: str) -> dict:
    """What ships beside the ONNX: the resolved recipe, tokenizer files, genai_config.json (where
    onnxruntime-genai knows the family; else reported under not_run with the reason), a serving checkpoint."""
    files = [(write_recipe_copy(recipe, out_dir), "recipe")]
    files += [(p, "tokenizer") for p in save_tokenizer(tokenizer, out_dir)]
    not_run = []
    if recipe.export.genai:
        reason = genai_unsupported(model.config)
        if reason is None:
            files.append((write_genai_config(model, out_dir, onnx_file, recipe.export.max_context), "genai-config"))
        else:
            not_run.append({"check": "genai_config.json (onnxruntime-genai)", "reason": reason})
    if recipe.export.checkpoint:
        files += [(p, "checkpoint") for p in write_checkpoint(model, skipped, mask, out_dir / "checkpoint", tokenizer)]
    return {"artifacts": [describe_file(p, out_dir, kind) for p, kind in files], "not_run": not_run}
