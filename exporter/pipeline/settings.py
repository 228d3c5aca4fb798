"""What each stage reads from the recipe, typed: a stage takes its settings object (and the run's objects: model,
config, paths), never the whole `Recipe`, so its signature says what it reads, and its cache key
(pipeline/keys.py) hashes exactly that object.

Each class is frozen and built from a recipe by `of(recipe)`; the recipe's own sections (Atol, Int4, Int4Fit,
TensorRT) are reused where a stage reads a whole section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from exporter.dtypes import PRECISION_OF
from exporter.recipe import Atol, Int4, Int4Fit, ModelSource, Recipe, Skip, TensorRT


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def as_key(self) -> dict:
        """The JSON a cache key hashes (pipeline/keys.py)."""
        return self.model_dump(mode="json")

    @classmethod
    def _pick(cls, section, **computed):
        """The fields this class names, read from the recipe section `section`, except those given `computed`."""
        return cls(**{name: getattr(section, name) for name in cls.model_fields if name not in computed}, **computed)


class LoadSettings(_Settings):
    """The base model and the mask to resolve against its config (load stage; not cached: it loads weights)."""

    source: ModelSource
    skip: Skip
    checkpoint: bool  # a serving checkpoint is asked for: the family must be expressible in it
    where: str  # the recipe's path, for error messages

    @classmethod
    def of(cls, recipe: Recipe) -> LoadSettings:
        return cls(source=recipe.model, skip=recipe.skip, checkpoint=recipe.export.checkpoint,
                   where=str(recipe.source_path or "recipe"))


class ExportSettings(_Settings):
    opset: int

    @classmethod
    def of(cls, recipe: Recipe) -> ExportSettings:
        return cls(opset=recipe.export.opset)


class ReferenceSettings(_Settings):
    """The validation batches (prompts, chat template, the padded batch) and the PyTorch skipped model's check."""

    prompts: tuple[str, ...]
    chat: bool
    padded_batch: bool
    decode_steps: int
    atol: Atol

    @classmethod
    def of(cls, recipe: Recipe) -> ReferenceSettings:
        return cls._pick(recipe.validation, prompts=tuple(recipe.validation.prompts))


class PrecisionsSettings(_Settings):
    """The graphs exported besides the model's own precision, in the recipe's order."""

    halves: tuple[str, ...]
    opset: int

    @classmethod
    def of(cls, recipe: Recipe) -> PrecisionsSettings:
        own = PRECISION_OF[recipe.model.dtype]
        return cls(halves=tuple(p for p in recipe.precisions if p != own), opset=recipe.export.opset)


class ValidateSettings(_Settings):
    """Tolerances of the graphs' parity against the recording (the model's precision, and half precisions)."""

    decode_steps: int
    atol: Atol
    half_atol: Atol

    @classmethod
    def of(cls, recipe: Recipe) -> ValidateSettings:
        return cls._pick(recipe.validation)


class OptimizeSettings(_Settings):
    """model.opt.onnx: which variants the tuner may try, and its parity tolerances. `variant`: build exactly these
    optimize_onnx options instead of tuning (the unskipped model's graph, built alike to a skipped artifact's)."""

    decode_steps: int
    atol: Atol
    batch1_decode_path: bool | Literal["auto"]
    tune: bool
    max_context: int
    variant: dict | None = None

    @classmethod
    def of(cls, recipe: Recipe, variant: dict | None = None) -> OptimizeSettings:
        v = recipe.validation
        return cls(decode_steps=v.decode_steps, atol=v.atol, batch1_decode_path=recipe.export.batch1_decode_path,
                   tune=recipe.export.tune and variant is None, max_context=recipe.export.max_context, variant=variant)


class Int4Settings(_Settings):
    quantizer: Int4
    fit: Int4Fit
    decode_steps: int

    @classmethod
    def of(cls, recipe: Recipe) -> Int4Settings:
        return cls(quantizer=recipe.export.int4, fit=recipe.validation.int4, decode_steps=recipe.validation.decode_steps)


class EnginesSettings(_Settings):
    tensorrt: TensorRT
    precisions: tuple[str, ...]  # engine precisions (each an exported graph's)
    max_batch: int
    max_context: int

    @classmethod
    def of(cls, recipe: Recipe) -> EnginesSettings | None:
        t = recipe.tensorrt
        if t is None:
            return None
        return cls(tensorrt=t, precisions=tuple(recipe.engine_precisions), max_batch=t.max_batch or recipe.export.max_batch,
                   max_context=t.max_context or recipe.export.max_context)


class SpeedSettings(_Settings):
    measure: bool  # validate.speed: time full vs skipped where a few seconds resolve the saving
    dtype: str

    @classmethod
    def of(cls, recipe: Recipe) -> SpeedSettings:
        return cls(measure=recipe.validation.speed, dtype=recipe.model.dtype)


class PackageSettings(_Settings):
    genai: bool
    max_context: int

    @classmethod
    def of(cls, recipe: Recipe) -> PackageSettings:
        return cls(genai=recipe.export.genai, max_context=recipe.export.max_context)


class RunSettings(_Settings):
    """Every stage's settings for one run: the only place the pipeline reads the recipe (besides the copy of it
    and its resolved form that the report and the manifest keep)."""

    load: LoadSettings
    export: ExportSettings
    reference: ReferenceSettings
    precisions: PrecisionsSettings
    validation: ValidateSettings
    optimize: OptimizeSettings
    int4: Int4Settings | None  # None: the recipe asks for no int4 graph
    engines: EnginesSettings | None  # None: no tensorrt section
    speed: SpeedSettings
    package: PackageSettings

    @classmethod
    def of(cls, recipe: Recipe, variant: dict | None = None) -> RunSettings:
        return cls(load=LoadSettings.of(recipe), export=ExportSettings.of(recipe), reference=ReferenceSettings.of(recipe),
                   precisions=PrecisionsSettings.of(recipe), validation=ValidateSettings.of(recipe),
                   optimize=OptimizeSettings.of(recipe, variant), int4=Int4Settings.of(recipe) if recipe.int4 else None,
                   engines=EnginesSettings.of(recipe), speed=SpeedSettings.of(recipe), package=PackageSettings.of(recipe))

    @property
    def own(self) -> str:
        """The model's precision (its recorded reference's)."""
        return PRECISION_OF[self.load.source.dtype]
