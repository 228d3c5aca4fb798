"""Remove the skipped sub-layers physically, and check that exactly their parameters are gone."""

from __future__ import annotations

from exporter.architectures import layout_for
from exporter.dtypes import itemsize, model_precision
from exporter.onnx.contract import kv_shape
from exporter.pipeline.results import Removed
from exporter.model.surgery import apply_skip, count_parameters


def removed_parameters(model, mask) -> int:
    """Parameters of the modules a mask removes, counted on the base model."""
    layout = layout_for(model.config.model_type)
    layers = model.model.layers
    total = 0
    for kind, indices in (("attention", mask.attention), ("mlp", mask.mlp)):
        for i in indices:  # the whole branch: pre-norm, module, post-norm
            total += sum(count_parameters(getattr(layers[i], name)) for name in layout.branch(kind))
    return total


def remove_stage(model, mask) -> tuple[object, Removed]:
    """(the skipped model, its sizes and the check that exactly the masked modules' parameters are gone)."""
    skipped = apply_skip(model, mask)
    full, kept = count_parameters(model), count_parameters(skipped)
    expected = removed_parameters(model, mask)
    config = model.config
    _, heads, _, dim = kv_shape(config, 1, 1)
    per_layer = 2 * heads * dim * itemsize(model_precision(model))
    return skipped, Removed(
        parameters={"full": full, "skipped": kept, "removed": full - kept, "removed_modules": expected},
        kv_cache={"layers_full": config.num_hidden_layers, "layers_skipped": len(skipped.kept_attention),
                  "bytes_per_token_full": per_layer * config.num_hidden_layers,
                  "bytes_per_token_skipped": per_layer * len(skipped.kept_attention)},
        checks=[{"name": "parameters removed = removed modules' parameters", "value": full - kept,
                 "limit": f"== {expected}", "passed": full - kept == expected}])
