"""Load the base model (hub / folder / GGUF / random config) and resolve the mask against its config."""

from __future__ import annotations

from contextlib import nullcontext

from exporter.model.checkpoint import check_supported, merge_removed
from exporter.mask import resolve_mask
from exporter.model.source import describe_source, gguf_parsed_once, load_config, load_model
from exporter.recipe import Recipe


def require_supported(recipe: Recipe) -> None:
    """What the recipe asks of this model that its family cannot have is refused before any work (one line, exit
    2): a serving checkpoint in a format that cannot describe the family (checkpoint.check_supported)."""
    if recipe.export.checkpoint:
        check_supported(load_config(recipe.model))


def load_stage(recipe: Recipe):
    # a GGUF source is parsed once for the config and the conversion
    with gguf_parsed_once() if recipe.model.kind == "gguf" else nullcontext():
        config = load_config(recipe.model)  # validate the mask against the model before loading weights
        mask = merge_removed(resolve_mask(recipe, config.num_hidden_layers), config)  # a serving checkpoint's no_ops
        model, tokenizer = load_model(recipe.model)
    info = describe_source(recipe.model)
    if getattr(tokenizer, "fallback", None):  # the folder had no usable tokenizer: the report says so
        info["tokenizer"] = {"kind": "byte", "vocab_size": tokenizer.vocab_size, "fallback": tokenizer.fallback}
    if info["kind"] == "hub":  # the commit the revision resolved to: a moved branch invalidates the cache
        info["commit"] = getattr(model.config, "_commit_hash", None)
    return info, config, mask, model, tokenizer
