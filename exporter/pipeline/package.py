"""What ships beside the ONNX: the serving checkpoint (written while the model is loaded), then the resolved
recipe, tokenizer files and genai_config.json."""

from __future__ import annotations

from pathlib import Path

from exporter.backends.genai import genai_unsupported, save_tokenizer, write_genai_config
from exporter.model.checkpoint import write_checkpoint
from exporter.files import describe_file
from exporter.checks.manifest import write_recipe_copy
from exporter.recipe import Recipe


def checkpoint_stage(model, skipped, tokenizer, mask, out_dir: Path) -> dict:
    """checkpoint/: the kept weights in the Nemotron-NAS / DeciLM format (`export.checkpoint: true`)."""
    files = write_checkpoint(model, skipped, mask, out_dir / "checkpoint", tokenizer)
    return {"artifacts": [describe_file(p, out_dir, "checkpoint") for p in files]}


def package_stage(recipe: Recipe, config, generation_config, tokenizer, out_dir: Path, onnx_file: str) -> dict:
    """The resolved recipe, the tokenizer's files and genai_config.json (naming `onnx_file`)."""
    files = [(write_recipe_copy(recipe, out_dir), "recipe")]
    files += [(p, "tokenizer") for p in save_tokenizer(tokenizer, out_dir)]
    not_run = []
    if recipe.export.genai:
        reason = genai_unsupported(config)
        if reason is None:
            files.append((write_genai_config(config, generation_config, out_dir, onnx_file, recipe.export.max_context),
                          "genai-config"))
        else:
            not_run.append({"check": "genai_config.json (onnxruntime-genai)", "reason": reason})
    return {"artifacts": [describe_file(p, out_dir, kind) for p, kind in files], "not_run": not_run}
