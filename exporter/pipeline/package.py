"""What ships beside the ONNX: the serving checkpoint (written while the model is loaded), then the resolved
recipe, tokenizer files and genai_config.json."""

from __future__ import annotations

from pathlib import Path

from exporter.backends.genai import genai_unsupported, save_tokenizer, write_genai_config
from exporter.model.checkpoint import write_checkpoint
from exporter.files import describe_file
from exporter.pipeline.results import StageResult
from exporter.pipeline.settings import PackageSettings


def checkpoint_stage(model, skipped, tokenizer, mask, out_dir: Path) -> StageResult:
    """checkpoint/: the kept weights in the Nemotron-NAS / DeciLM format (`export.checkpoint: true`)."""
    files = write_checkpoint(model, skipped, mask, out_dir / "checkpoint", tokenizer)
    return StageResult(artifacts=[describe_file(p, out_dir, "checkpoint") for p in files])


def package_stage(settings: PackageSettings, recipe_copy: Path, config, generation_config, tokenizer, out_dir: Path,
                  onnx_file: str) -> StageResult:
    """The resolved recipe (written by the caller: `recipe_copy`), the tokenizer's files and genai_config.json
    (naming `onnx_file`)."""
    files = [(recipe_copy, "recipe")]
    files += [(p, "tokenizer") for p in save_tokenizer(tokenizer, out_dir)]
    not_run = []
    if settings.genai:
        reason = genai_unsupported(config)
        if reason is None:
            files.append((write_genai_config(config, generation_config, out_dir, onnx_file, settings.max_context),
                          "genai-config"))
        else:
            not_run.append({"check": "genai_config.json (onnxruntime-genai)", "reason": reason})
    return StageResult(artifacts=[describe_file(p, out_dir, kind) for p, kind in files], not_run=not_run)
