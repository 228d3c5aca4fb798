"""The cost model: what a skip mask should save, from the model's config alone (no weights, no export).

Decode is memory-bound: one step reads every kept weight once, one embedding row per sequence, the
LM head, and the KV cache of every kept attention layer up to the context length (capped by its
sliding window). Prefill is compute-bound: FLOPs per token are 2 x the kept matmul weights plus the
attention scores and weighted sum over the (causal, on average half the prompt) keys.

Public API (other modules call these):
    predicted_decode_speedup(config, mask, context, batch=1, precision="float32") -> full / skipped
    predicted_prefill_speedup(config, mask, tokens) -> full / skipped
    predicted_saving(speedup) -> 1 - 1 / speedup (the fraction of time the mask should save)
    decode_bytes(config, mask, context, batch, precision) -> dict of bytes per decode step
    prefill_flops_per_token(config, mask, tokens) -> dict of FLOPs
    kv_bytes_per_token(config, mask, precision) -> int
    predict(config, mask, ...) -> dict (the block shown in report.json and by `export-skip plan`)

`config` is a transformers config or any object with the same attribute names; `mask` is a
`surgery.SkipMask` (or anything with `.attention` and `.mlp` index tuples); None means the full model.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.architectures import ARCHITECTURES, Layout, head_dim, sliding_window_for
from exporter.dtypes import itemsize
from exporter.errors import UserError

DECODE_CONTEXTS = (128, 512, 2048)
PREFILL_TOKENS = (128, 512)


@dataclass(frozen=True)
class LayerSizes:
    """Parameter counts of one decoder layer's sub-layers and of the model's ends."""

    attention: int  # q/k/v/o projections (+ biases, + q/k norms)
    attention_norm: int  # its pre- and post-norms (none, one or two per family)
    mlp: int  # gate/up/down (+ biases)
    mlp_norm: int  # its pre- and post-norms
    embedding: int  # vocab x hidden
    lm_head: int  # vocab x hidden (the same matrix as the embedding when tied)
    final_norm: int
    tied: bool


def layer_sizes(config) -> LayerSizes:
    """Parameter counts from the config and the family's layout (architectures.py): which norms a branch has,
    q/k norms, attention biases. Unknown model types count as Llama."""
    c, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, kv, d = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
    layout = ARCHITECTURES.get(getattr(config, "model_type", "llama"), Layout())
    q_out, kv_out = h * d, kv * d
    attention = c * q_out + 2 * c * kv_out + q_out * c  # q/k/v (separate or fused) and o
    if layout.qkv_bias_always:  # Qwen2: q/k/v always carry biases, o_proj none
        attention += q_out + 2 * kv_out
    elif getattr(config, "attention_bias", False):  # q/k/v/o biases
        attention += q_out + 2 * kv_out + c
    if layout.qk_norm == "head":  # one RMSNorm weight per head width, for q and for k
        attention += 2 * d
    elif layout.qk_norm == "projection":  # over all heads (OLMo 2)
        attention += q_out + kv_out
    mlp = 3 * c * i + ((2 * i + c) if getattr(config, "mlp_bias", False) else 0)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    norms = {kind: c * (len(layout.branch(kind)) - 1) for kind in ("attention", "mlp")}  # pre- and post-norms
    return LayerSizes(attention=attention, attention_norm=norms["attention"], mlp=mlp, mlp_norm=norms["mlp"],
                      embedding=v * c, lm_head=v * c, final_norm=c, tied=tied)


def _mask_sets(config, mask) -> tuple[set[int], set[int]]:
    if mask is None:
        return set(), set()
    n = config.num_hidden_layers
    attention, mlp = set(mask.attention), set(mask.mlp)
    bad = sorted(i for i in attention | mlp if not 0 <= i < n)
    if bad:
        raise UserError(f"skip mask names layer(s) {bad} but the model has {n} layers (0-{n - 1})")
    return attention, mlp


def kept_attention_layers(config, mask) -> list[int]:
    attention, _ = _mask_sets(config, mask)
    return [i for i in range(config.num_hidden_layers) if i not in attention]


def kept_parameters(config, mask) -> int:
    """Distinct parameters of the skipped model (tied embedding counted once), as `count_parameters`."""
    s = layer_sizes(config)
    attention, mlp = _mask_sets(config, mask)
    n = config.num_hidden_layers
    total = s.embedding + s.final_norm + (0 if s.tied else s.lm_head)
    total += (n - len(attention)) * (s.attention + s.attention_norm)
    total += (n - len(mlp)) * (s.mlp + s.mlp_norm)
    return total


def _window(config, layer: int) -> int | None:
    try:
        return sliding_window_for(config, layer)
    except Exception:  # an unsupported model_type: no window information, assume full attention
        return None


def kv_bytes_per_token(config, mask, precision: str = "float32") -> int:
    """KV cache bytes per token per sequence: key and value of every kept attention layer."""
    per_layer = 2 * config.num_key_value_heads * head_dim(config) * itemsize(precision)
    return per_layer * len(kept_attention_layers(config, mask))


def decode_bytes(config, mask, context: int, batch: int = 1, precision: str = "float32") -> dict:
    """Bytes moved by one decode step of `batch` sequences with `context` tokens already cached."""
    s = layer_sizes(config)
    item = itemsize(precision)
    attention, mlp = _mask_sets(config, mask)
    n = config.num_hidden_layers
    layers = (n - len(attention)) * (s.attention + s.attention_norm) + (n - len(mlp)) * (s.mlp + s.mlp_norm)
    kv_row = 2 * config.num_key_value_heads * head_dim(config) * item  # one token, one layer, K and V
    kept = kept_attention_layers(config, mask)
    kv_read = batch * kv_row * sum(min(context, _window(config, i) or context) for i in kept)
    out = {
        "layer_weights": layers * item,
        "embedding_rows": batch * config.hidden_size * item,
        "lm_head": s.lm_head * item,  # read in full every step (the embedding matrix when tied)
        "final_norm": s.final_norm * item,
        "kv_read": kv_read,
        "kv_write": batch * kv_row * len(kept),
    }
    out["total"] = sum(out.values())
    return out


def prefill_flops_per_token(config, mask, tokens: int) -> dict:
    """FLOPs per prompt token for a prefill of `tokens` tokens (matmuls only; norms are noise)."""
    s = layer_sizes(config)
    attention, mlp = _mask_sets(config, mask)
    n = config.num_hidden_layers
    h, d = config.num_attention_heads, head_dim(config)
    projections = 2 * ((n - len(attention)) * s.attention + (n - len(mlp)) * s.mlp)
    keys = (tokens + 1) / 2  # causal: query t attends to t keys, on average (T + 1) / 2
    scores = sum(4 * h * d * min(keys, _window(config, i) or keys) for i in kept_attention_layers(config, mask))
    out = {"projections": projections, "attention_scores": int(scores), "lm_head": 2 * s.lm_head}
    out["total"] = sum(out.values())
    return out


def predicted_decode_speedup(config, mask, context: int, batch: int = 1, precision: str = "float32") -> float:
    """Full-model decode step time / skipped-model decode step time, if decode is memory-bound."""
    full = decode_bytes(config, None, context, batch, precision)["total"]
    return full / decode_bytes(config, mask, context, batch, precision)["total"]


def predicted_prefill_speedup(config, mask, tokens: int) -> float:
    """Full-model prefill time / skipped-model prefill time, if prefill is compute-bound."""
    full = prefill_flops_per_token(config, None, tokens)["total"]
    return full / prefill_flops_per_token(config, mask, tokens)["total"]


def predicted_saving(speedup: float) -> float:
    """The fraction of time saved: 1 - skipped / full."""
    return 1.0 - 1.0 / speedup


def predict(config, mask, contexts=DECODE_CONTEXTS, prefill_tokens=PREFILL_TOKENS, batches=(1,),
            precision: str = "float32") -> dict:
    """Everything the cost model says about a mask: the block in report.json and `export-skip plan`."""
    n = config.num_hidden_layers
    kept = kept_attention_layers(config, mask)
    kv_full, kv_skipped = kv_bytes_per_token(config, None, precision), kv_bytes_per_token(config, mask, precision)
    decode = []
    for batch in batches:
        for ctx in contexts:
            full = decode_bytes(config, None, ctx, batch, precision)
            skipped = decode_bytes(config, mask, ctx, batch, precision)
            speedup = full["total"] / skipped["total"]
            decode.append({"batch": batch, "context": ctx, "bytes_full": full["total"], "bytes_skipped": skipped["total"],
                           "kv_read_full": full["kv_read"], "kv_read_skipped": skipped["kv_read"],
                           "speedup": round(speedup, 4), "saving": round(predicted_saving(speedup), 4)})
    prefill = []
    for tokens in prefill_tokens:
        full = prefill_flops_per_token(config, None, tokens)["total"]
        skipped = prefill_flops_per_token(config, mask, tokens)["total"]
        prefill.append({"tokens": tokens, "flops_per_token_full": full, "flops_per_token_skipped": skipped,
                        "speedup": round(full / skipped, 4), "saving": round(1 - skipped / full, 4)})
    return {
        "model": "memory-bound decode (bytes per step), compute-bound prefill (FLOPs per token)",
        "precision": precision,
        "num_layers": n,
        "attention_layers_kept": len(kept),
        "parameters_full": kept_parameters(config, None),
        "parameters_skipped": kept_parameters(config, mask),
        "kv_bytes_per_token_full": kv_full,
        "kv_bytes_per_token_skipped": kv_skipped,
        "kv_reduction": round(1 - kv_skipped / kv_full, 4) if kv_full else 0.0,
        "decode": decode,
        "prefill": prefill,
    }


def _flops(n: float) -> str:
    return f"{n / 1e9:.3f} GFLOP" if n >= 1e8 else f"{n / 1e6:.3f} MFLOP"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.3f} MiB"


def render_prediction(pred: dict) -> list[str]:
    """Markdown lines for report.md and the `plan` command."""
    lines = [
        f"Cost model ({pred['model']}; {pred['precision']}): parameters {pred['parameters_full']:,} -> "
        f"{pred['parameters_skipped']:,}; attention layers kept {pred['attention_layers_kept']} of {pred['num_layers']}; "
        f"KV cache {pred['kv_bytes_per_token_full']:,} -> {pred['kv_bytes_per_token_skipped']:,} bytes/token "
        f"(-{pred['kv_reduction']:.1%}).",
        "",
        "| phase | batch | context / tokens | full | skipped | predicted speedup | predicted saving |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for d in pred["decode"]:
        lines.append(f"| decode | {d['batch']} | {d['context']} | {_bytes(d['bytes_full'])}/step | "
                     f"{_bytes(d['bytes_skipped'])}/step | {d['speedup']:.3f}x | {d['saving']:.1%} |")
    for p in pred["prefill"]:
        lines.append(f"| prefill | 1 | {p['tokens']} | {_flops(p['flops_per_token_full'])}/token | "
                     f"{_flops(p['flops_per_token_skipped'])}/token | {p['speedup']:.3f}x | {p['saving']:.1%} |")
    return lines

