"""The versions of the tools that made an artifact: recorded in reports and in stage-cache keys."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("export-skip", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tensorrt-rtx",
            "tensorrt", "polygraphy", "onnxruntime-genai", "safetensors", "tokenizers")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
