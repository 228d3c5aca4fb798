"""What each cached stage's key hashes: everything the stage reads (recipe sections, the base model's
identity, the source of the modules it runs, tool versions, and the key of the stage whose files it reads).
A changed input changes the key of exactly the stages that read it (exporter/pipeline/cache.py)."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.pipeline.cache import code_fingerprint, stage_key
from exporter.files import optional_sha256
from exporter.machine import machine_key
from exporter.recipe import Recipe
from exporter.versions import tool_versions

# The modules each stage runs (dotted names under exporter/): editing one redoes the stages that list it.
EXPORT_CODE = ("model.source", "architectures", "model.surgery", "mask", "onnx.contract", "onnx.export")
REFERENCE_CODE = ("checks.parity", "checks.reference", "backends.base", "backends.pytorch", "model.prompts", "pipeline.reference")
CHECKS_CODE = ("checks.parity", "checks.reference", "backends.base", "backends.ort", "onnx.session",
               "pipeline.validate")
PRECISIONS_CODE = ("pipeline.precisions",)
REWRITE_CODE = ("onnx.optimize", "onnx.gemv", "onnx.decode", "onnx.graph")  # what model.opt.onnx depends on
OPTIMIZE_CODE = (*REWRITE_CODE, "pipeline.optimize", "timing.tune", "timing.kernels", "timing.interleaved", "timing.worker")
ENGINES_CODE = ("backends.trt", "pipeline.engines")
INT4_CODE = (*REWRITE_CODE, "onnx.int4", "pipeline.quantize")


@dataclass(frozen=True)
class StageKeys:
    reference: str
    export: str
    precisions: str
    validate: str
    optimize: str
    int4: str

    @classmethod
    def for_run(cls, recipe: Recipe, model_info: dict, mask) -> StageKeys:
        export = stage_key({"model": model_info, "dtype": recipe.model.dtype, "mask": [mask.attention, mask.mlp],
                            "export": recipe.export.model_dump(mode="json", exclude={"batch1_decode_path", "tune", "int4"}),
                            "code": code_fingerprint(*EXPORT_CODE), "versions": tool_versions()})
        checks = code_fingerprint(*CHECKS_CODE)
        checked_with = recipe.validation.model_dump(mode="json", exclude={"speed"})  # speed is timing, not a check
        # the reference reads the model and the mask (as the export does) and the validation settings
        reference = stage_key({"export": export, "validate": checked_with, "code": code_fingerprint(*REFERENCE_CODE)})
        precisions = stage_key({"export": export, "precisions": recipe.precisions,
                                "code": code_fingerprint(*PRECISIONS_CODE)})
        return cls(
            reference=reference, export=export, precisions=precisions,
            validate=stage_key({"reference": reference, "precisions": precisions, "validate": checked_with,
                                "code": checks}),
            optimize=stage_key({"export": export, "reference": reference,
                                "batch1_decode_path": recipe.export.batch1_decode_path,
                                # a tuned choice holds for the machine it was timed on
                                "tune": machine_key() if recipe.export.tune else False,
                                "code": [checks, code_fingerprint(*OPTIMIZE_CODE)]}),
            int4=stage_key({"export": export, "reference": reference, "int4": recipe.export.int4.model_dump(mode="json"),
                            "fit": checked_with, "code": [checks, code_fingerprint(*INT4_CODE)]}),
        )


def engines_key(recipe: Recipe, graphs: dict[str, str]) -> str:
    """Engines read the graph files, not the checks: keyed by those files' hashes, so changed prompts do not
    rebuild them, while a re-exported graph that differs by one byte does."""
    return stage_key({"graphs": graphs, "tensorrt": recipe.tensorrt.model_dump(mode="json"),
                      "timing_cache": optional_sha256(recipe.tensorrt.timing_cache),
                      "code": code_fingerprint(*ENGINES_CODE)})
