"""Where each supported architecture keeps its attention, MLP and norms.

Architecture differences live in this table, not in a class tree: every supported model_type has
the Llama module layout (pre-norm residual blocks, RoPE, GQA), optionally with q/k norms and
per-layer sliding windows.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import UserError


@dataclass(frozen=True)
class Layout:
    attention: str = "self_attn"  # attribute of the decoder layer
    attention_norm: str = "input_layernorm"  # norm feeding the attention sub-layer
    mlp: str = "mlp"
    mlp_norm: str = "post_attention_layernorm"  # norm feeding the MLP sub-layer
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    # How the sliding window is chosen: "all" layers use config.sliding_window (Mistral),
    # "layer_types" uses config.layer_types[i] == "sliding_attention" (Qwen2/3), None: never.
    sliding: str | None = None


ARCHITECTURES: dict[str, Layout] = {
    "llama": Layout(),
    "mistral": Layout(sliding="all"),
    "qwen2": Layout(sliding="layer_types"),
    "qwen3": Layout(qk_norm=True, sliding="layer_types"),
}


def layout_for(model_type: str) -> Layout:
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {model_type!r}: supported model_type values are "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def sliding_window_for(config, layer: int) -> int | None:
    """The sliding window of one layer's attention, or None for full attention."""
    layout = layout_for(config.model_type)
    window = getattr(config, "sliding_window", None)
    if layout.sliding == "all":
        return window
    if layout.sliding == "layer_types":
        types = getattr(config, "layer_types", None)
        if types is not None and types[layer] == "sliding_attention":
            return window
    return None


def head_dim(config) -> int:
    """Width of one attention head: config.head_dim where the config sets it (Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
