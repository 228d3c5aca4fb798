"""Where each supported architecture keeps its attention, MLP and norms, and what each family adds.

Architecture differences live in this table, not in a class tree: every supported model_type is a stack of
residual blocks, each with an attention branch and an MLP branch. A branch is
`h + multiplier * post_norm(module(pre_norm(h)))`, where either norm may be absent (Llama: pre-norms only;
Gemma 2/3: both, "sandwich"; OLMo 2: post-norms only) and the multiplier is Granite's residual_multiplier
(else 1). Removing a sub-layer removes its whole branch: pre-norm, module, post-norm (and, for attention,
its KV cache). The rest of a family's twists are data here too: fused projections, q/k norms, soft-capping,
multipliers, per-layer sliding windows and rotary embeddings.

This module is light (no torch, no transformers): the cost model and `plan` read it from a config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import UserError


@dataclass(frozen=True)
class Layout:
    # modules of a decoder layer (attribute names); None: the family has no such norm
    attention: str = "self_attn"
    attention_norm: str | None = "input_layernorm"  # pre-norm feeding the attention
    attention_post_norm: str | None = None  # norm of the attention's output, before the residual add
    mlp: str = "mlp"
    mlp_norm: str | None = "post_attention_layernorm"  # pre-norm feeding the MLP
    mlp_post_norm: str | None = None  # norm of the MLP's output, before the residual add
    # projections inside the attention module: separate q_proj/k_proj/v_proj, or one fused module (Phi-3)
    qkv: str | None = None
    # q/k RMSNorm: "head" (per head, over head_dim: Qwen3, Gemma 3) or "projection" (over all heads: OLMo 2)
    qk_norm: str | None = None
    qkv_bias_always: bool = False  # q/k/v carry biases whatever config.attention_bias says (Qwen2)
    # How the sliding window is chosen: "all" layers use config.sliding_window when it is set (Mistral,
    # Phi-3), "layer_types" uses config.layer_types[i] == "sliding_attention" (Qwen2/3, Gemma, SmolLM3).
    sliding: str | None = None
    # Rotary embedding per layer: "shared" (one for all layers), "layer_type" (one per config.layer_types
    # entry, e.g. Gemma 3's local and global bases), "no_rope_layers" (config.no_rope_layers[i] == 0: that
    # layer has no rotary embedding at all, SmolLM3).
    rope: str = "shared"
    # config attributes holding the family's scalars (None: the family has none)
    attention_softcap: str | None = None  # scores = cap * tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: str | None = None  # logits = cap * tanh(logits / cap) (Gemma 2/3)
    embedding_multiplier: str | None = None  # h0 = embed(ids) * m (Granite; Gemma's sqrt(hidden) is in its module)
    residual_multiplier: str | None = None  # h + m * branch (Granite)
    logits_divisor: str | None = None  # logits / d (Granite's logits_scaling)
    # Why the Nemotron-NAS / DeciLM serving checkpoint cannot describe this family (None: it can, unless
    # the config turns on something it lacks; checkpoint.check_supported says which)
    checkpoint_refusal: str | None = None
    # The model type onnxruntime-genai 0.18 knows this family by (None: it does not know the family)
    genai_type: str | None = None

    def branch(self, kind: str) -> tuple[str, ...]:
        """The modules of one branch ("attention" or "mlp") in the order they run: what removing it removes."""
        names = (self.attention_norm, self.attention, self.attention_post_norm) if kind == "attention" else \
            (self.mlp_norm, self.mlp, self.mlp_post_norm)
        return tuple(n for n in names if n is not None)

    def outermost(self, kind: str) -> str:
        """The last module of a branch: its output is the branch's contribution to the residual stream (before
        Granite's multiplier), so zeroing it removes the branch (the masked reference hooks it)."""
        return self.branch(kind)[-1]


_SANDWICH = dict(attention_post_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                 mlp_post_norm="post_feedforward_layernorm")

ARCHITECTURES: dict[str, Layout] = {
    "llama": Layout(genai_type="llama"),
    "mistral": Layout(sliding="all", genai_type="mistral"),
    "qwen2": Layout(sliding="layer_types", qkv_bias_always=True, genai_type="qwen2",
                    checkpoint_refusal="its q/k/v projections have biases (TensorRT-LLM's DeciLM attention has none)"),
    "qwen3": Layout(qk_norm="head", sliding="layer_types", genai_type="qwen3",
                    checkpoint_refusal="its attention has per-head q/k norms (neither TensorRT-LLM's nor vLLM's "
                                       "DeciLM attention has q/k norms)"),
    "gemma2": Layout(**_SANDWICH, sliding="layer_types", attention_softcap="attn_logit_softcapping",
                     final_softcap="final_logit_softcapping", genai_type="gemma2",
                     checkpoint_refusal="its blocks have sandwich norms (post-attention and post-feedforward), "
                                        "(1 + weight) RMSNorms, attention and final logit soft-capping and a "
                                        "scaled embedding, none of which a DeciLM block has"),
    "gemma3_text": Layout(**_SANDWICH, qk_norm="head", sliding="layer_types", rope="layer_type",
                          final_softcap="final_logit_softcapping", genai_type="gemma3_text",
                          checkpoint_refusal="its blocks have sandwich norms, per-head q/k norms and separate "
                                             "rotary bases for local and global layers, none of which a DeciLM "
                                             "block has"),
    "phi3": Layout(qkv="qkv_proj", sliding="all", genai_type="phi3",
                   checkpoint_refusal="its q/k/v and gate/up projections are fused (qkv_proj, gate_up_proj) and "
                                      "export-skip does not split them into a DeciLM block's separate ones"),
    "granite": Layout(embedding_multiplier="embedding_multiplier", residual_multiplier="residual_multiplier",
                      logits_divisor="logits_scaling", genai_type="granite",
                      checkpoint_refusal="its embedding, residual, attention and logits multipliers have no "
                                         "DeciLM field"),
    "olmo2": Layout(attention_norm=None, attention_post_norm="post_attention_layernorm", mlp_norm=None,
                    mlp_post_norm="post_feedforward_layernorm", qk_norm="projection",
                    checkpoint_refusal="its norms follow the sub-layers (post-norms) and its q/k norms span "
                                       "all heads; a DeciLM block has pre-norms and no q/k norms"),
    "smollm3": Layout(sliding="layer_types", rope="no_rope_layers", genai_type="smollm3",
                      checkpoint_refusal="some of its layers have no rotary embedding (no_rope_layers), which a "
                                         "DeciLM config cannot say"),
}


def layout_for(model_type: str) -> Layout:
    if model_type not in ARCHITECTURES:
        hint = " (a Gemma 3 checkpoint with vision: use its text model, model_type gemma3_text)" \
            if model_type == "gemma3" else ""
        raise UserError(
            f"unsupported architecture {model_type!r}{hint}: supported model_type values are "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def check_config(config) -> None:
    """Refuse, with one line, settings of a supported family that the skipped model does not reproduce."""
    if getattr(config, "use_bidirectional_attention", False):
        raise UserError(f"{config.model_type} with use_bidirectional_attention: export-skip exports causal "
                        "decoders only")


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


def rope_kind_for(config, layer: int) -> str | None:
    """Which rotary embedding a layer's attention uses: "default" (the model's one), a layer type (Gemma 3's
    per-type bases), or None when the layer has none (SmolLM3's no-rope layers)."""
    layout = layout_for(config.model_type)
    if layout.rope == "layer_type":
        return config.layer_types[layer]
    if layout.rope == "no_rope_layers":
        flags = getattr(config, "no_rope_layers", None)
        return "default" if flags is None or flags[layer] else None
    return "default"


def scalar(config, attribute: str | None, default: float | None = None) -> float | None:
    """A family scalar named by the layout (a multiplier, a soft-cap), or `default` where there is none."""
    value = getattr(config, attribute, None) if attribute else None
    return default if value is None else float(value)


def head_dim(config) -> int:
    """Width of one attention head: config.head_dim where the config sets it (Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
