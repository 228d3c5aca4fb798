"""Stage cache keys hash exactly what each stage takes: changing a recipe key moves the keys of the stages that read
it (directly, or through the files of a stage they read) and keeps every other stage's cache entry."""

from __future__ import annotations

import copy

import pytest

from exporter.mask import SkipMask
from exporter.pipeline.keys import StageKeys, engines_key
from exporter.pipeline.settings import RunSettings
from exporter.recipe import Recipe, load_recipe
from helpers import TINY_RECIPE

MODEL = {"kind": "config", "config_sha256": "0" * 64, "seed": 0}
MASK = SkipMask(attention=(1, 3))
GRAPHS = {"model.onnx": "a" * 64}
DOWNSTREAM_OF_REFERENCE = {"reference", "validate", "optimize", "int4"}
EVERY = {"export", "reference", "precisions", "validate", "optimize", "int4", "engines"}


def base() -> dict:
    raw = load_recipe(TINY_RECIPE).model_dump(mode="json", by_alias=True)
    raw["export"]["precisions"] = ["fp32", "int4"]  # every stage keyed
    raw["tensorrt"] = {"backends": ["tensorrt-rtx"]}
    return raw


def keys_of(raw: dict) -> dict[str, str]:
    settings = RunSettings.of(Recipe.model_validate(raw))
    keys = vars(StageKeys.for_run(settings, MODEL, MASK)).copy()
    keys["engines"] = engines_key(settings.engines, GRAPHS)
    return keys


def changed(edit) -> set[str]:
    raw = base()
    before = keys_of(raw)
    edited = copy.deepcopy(raw)
    edit(edited)
    after = keys_of(edited)
    return {stage for stage in before if before[stage] != after[stage]}


def put(path: str, value):
    def edit(raw: dict) -> None:
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return edit


@pytest.mark.parametrize("path, value, moved", [
    # read by no cached stage: every entry kept
    ("validate.speed", False, set()),
    ("export.genai", False, set()),
    ("export.checkpoint", True, set()),
    ("export.max_batch", 3, {"engines"}),  # engines' default profile size; the graphs do not depend on it
    ("description", "another", set()),
    ("name", "another-name", set()),
    # read by one stage
    ("validate.half_atol.decode", 0.25, {"validate"}),
    ("validate.int4.max_mean_kl", 0.3, {"int4"}),
    ("export.int4.block_size", 64, {"int4"}),
    ("export.tune", False, {"optimize"}),
    ("export.batch1_decode_path", True, {"optimize"}),
    ("export.max_context", 1024, {"optimize", "engines"}),
    ("tensorrt.optimization_level", 2, {"engines"}),
    # the validation batches: the reference, and every check that reads its recording
    ("validate.prompts", ["Another prompt"], DOWNSTREAM_OF_REFERENCE),
    ("validate.chat", True, DOWNSTREAM_OF_REFERENCE),
    ("validate.padded_batch", False, DOWNSTREAM_OF_REFERENCE),
    ("validate.atol.decode", 2e-3, DOWNSTREAM_OF_REFERENCE),
    ("validate.decode_steps", 8, DOWNSTREAM_OF_REFERENCE),
    # the exported graphs: everything built from them
    ("export.opset", 19, EVERY - {"engines"}),  # engines are keyed by the graph files' hashes instead
    # an fp16 graph is exported, checked, and (tensorrt.precisions defaults to every exported one) built
    ("export.precisions", ["fp32", "fp16", "int4"], {"precisions", "validate", "engines"}),
])
def test_a_recipe_key_moves_exactly_the_stages_that_read_it(path, value, moved):
    assert changed(put(path, value)) == moved


def test_the_model_and_mask_move_every_stage_built_from_the_model():
    raw = base()
    settings = RunSettings.of(Recipe.model_validate(raw))
    before = vars(StageKeys.for_run(settings, MODEL, MASK))
    for model, mask in ((MODEL | {"seed": 1}, MASK), (MODEL, SkipMask(attention=(1,)))):
        after = vars(StageKeys.for_run(settings, model, mask))
        assert {k for k in before if before[k] != after[k]} == set(before)


def test_keys_hash_the_settings_each_stage_takes():
    """Every field of every cached stage's settings is part of its key (a settings field the key missed would
    let a changed input restore a stale entry)."""
    settings = RunSettings.of(Recipe.model_validate(base()))
    stages = {"export": settings.export, "reference": settings.reference, "precisions": settings.precisions,
              "validate": settings.validation, "optimize": settings.optimize, "int4": settings.int4}
    for stage, part in stages.items():
        for field, value in part.model_dump().items():
            other = {bool: lambda v: not v, int: lambda v: v + 1, tuple: lambda v: (*v, "x"),
                     str: lambda v: True if v == "auto" else v + "x"}.get(type(value))  # "auto": batch1_decode_path
            if other is None:  # a nested section (tolerances, the quantizer): changed through the recipe above
                continue
            moved = settings.model_copy(update={_field_of(settings, part): part.model_copy(update={field: other(value)})})
            assert getattr(StageKeys.for_run(moved, MODEL, MASK), stage) != getattr(
                StageKeys.for_run(settings, MODEL, MASK), stage), f"{stage}: {field} is not in its key"


def _field_of(settings: RunSettings, part) -> str:
    return next(name for name in type(settings).model_fields if getattr(settings, name) is part)
