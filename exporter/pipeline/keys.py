"""What each cached stage's key hashes: exactly the settings object the stage takes (pipeline/settings.py), the
base model's identity and mask where it reads the model, the keys of the stages whose files it reads, the source
of the modules it runs and tool versions. A changed input changes the key of exactly the stages that read it
(pipeline/cache.py); tests/test_keys.py changes every recipe key one at a time and checks which keys move.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.files import optional_sha256
from exporter.machine import machine_key
from exporter.mask import SkipMask
from exporter.pipeline.cache import code_fingerprint, stage_key
from exporter.pipeline.settings import EnginesSettings, RunSettings
from exporter.versions import tool_versions

# The modules each stage runs (dotted names under exporter/): editing one redoes the stages that list it.
# pipeline.results: the cache stores each stage's result in its form.
EXPORT_CODE = ("model.source", "architectures", "model.surgery", "mask", "onnx.contract", "onnx.export",
               "pipeline.export", "pipeline.results")
REFERENCE_CODE = ("checks.parity", "checks.reference", "backends.base", "backends.pytorch", "model.prompts",
                  "pipeline.reference", "pipeline.results")
CHECKS_CODE = ("checks.parity", "checks.reference", "backends.base", "backends.ort", "onnx.session",
               "pipeline.validate", "pipeline.results")
PRECISIONS_CODE = ("pipeline.precisions", "pipeline.results")
REWRITE_CODE = ("onnx.optimize", "onnx.gemv", "onnx.decode", "onnx.graph")  # what model.opt.onnx depends on
OPTIMIZE_CODE = (*REWRITE_CODE, "pipeline.optimize", "timing.tune", "timing.kernels", "timing.interleaved",
                 "timing.worker")
ENGINES_CODE = ("backends.trt", "pipeline.engines", "pipeline.results")
INT4_CODE = (*REWRITE_CODE, "onnx.int4", "pipeline.quantize", "pipeline.results")


@dataclass(frozen=True)
class StageKeys:
    reference: str
    export: str
    precisions: str
    validate: str
    optimize: str
    int4: str | None

    @classmethod
    def for_run(cls, settings: RunSettings, model_info: dict, mask: SkipMask) -> StageKeys:
        s = settings
        export = stage_key({"model": model_info, "dtype": s.load.source.dtype, "mask": [mask.attention, mask.mlp],
                            "export": s.export.as_key(), "code": code_fingerprint(*EXPORT_CODE),
                            "versions": tool_versions()})
        checks = code_fingerprint(*CHECKS_CODE)
        # the reference reads the model and the mask (as the export does: its key) and the validation batches
        reference = stage_key({"export": export, "reference": s.reference.as_key(),
                               "code": code_fingerprint(*REFERENCE_CODE)})
        precisions = stage_key({"export": export, "precisions": s.precisions.as_key(),
                                "code": code_fingerprint(*PRECISIONS_CODE)})
        return cls(
            reference=reference, export=export, precisions=precisions,
            validate=stage_key({"reference": reference, "precisions": precisions, "validate": s.validation.as_key(),
                                "code": checks}),
            optimize=stage_key({"export": export, "reference": reference, "optimize": s.optimize.as_key(),
                                # a tuned choice holds for the machine it was timed on
                                "machine": machine_key() if s.optimize.tune else None,
                                "code": [checks, code_fingerprint(*OPTIMIZE_CODE)]}),
            int4=None if s.int4 is None else stage_key({
                "export": export, "reference": reference, "int4": s.int4.as_key(),
                "code": [checks, code_fingerprint(*INT4_CODE)]}),
        )


def engines_key(settings: EnginesSettings, graphs: dict[str, str]) -> str:
    """Engines read the graph files, not the checks: keyed by those files' hashes, so changed prompts do not
    rebuild them, while a re-exported graph that differs by one byte does."""
    return stage_key({"graphs": graphs, "engines": settings.as_key(),
                      "timing_cache": optional_sha256(settings.tensorrt.timing_cache),
                      "code": code_fingerprint(*ENGINES_CODE)})
