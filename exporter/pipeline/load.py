"""Load the base model (hub / folder / GGUF / random config) and resolve the mask against its config."""

from __future__ import annotations

from exporter.mask import skip_mask
from exporter.model.checkpoint import check_supported, merge_removed
from exporter.model.source import describe_source, load_model
from exporter.pipeline.settings import LoadSettings


def require_supported(settings: LoadSettings, config) -> None:
    """What the recipe asks of this model that its family cannot have is refused before any work (one line, exit
    2): a serving checkpoint in a format that cannot describe the family (checkpoint.check_supported)."""
    if settings.checkpoint:
        check_supported(config)


def load_stage(settings: LoadSettings, config):
    """(model identity, mask, model, tokenizer): the mask is checked against `config` before weights load."""
    mask = merge_removed(skip_mask(settings.skip, config.num_hidden_layers, settings.where), config)
    # built from `config`, not read again; a GGUF's config describes its quantized file, the model loads from the
    # de-quantised folder (model/source.py), which has its own
    model, tokenizer = load_model(settings.source, None if settings.source.kind == "gguf" else config)
    info = describe_source(settings.source)
    if getattr(tokenizer, "fallback", None):  # the folder had no usable tokenizer: the report says so
        info["tokenizer"] = {"kind": "byte", "vocab_size": tokenizer.vocab_size, "fallback": tokenizer.fallback}
    if info["kind"] == "hub":  # the commit the revision resolved to: a moved branch invalidates the cache
        info["commit"] = getattr(model.config, "_commit_hash", None)
    return info, mask, model, tokenizer
