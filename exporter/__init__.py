"""export-skip: remove skipped attention / MLP sub-layers from decoder LLMs and ship verified artifacts.

Importing this package is cheap: torch, transformers, onnx and tensorrt are imported lazily by the
modules that need them.
"""

__version__ = "0.1.0"
