"""Physical removal of skipped sub-layers, and the masked reference it is checked against.

`apply_skip` builds a `SkippedModel` that holds only the kept modules of a Hugging Face decoder
(shared with it, no weight copies): a skipped attention loses its module, its input norm and its
KV cache; a skipped MLP loses its module and its norm. State-dict names stay those of the base
model, so kept layers keep their original index.

`masked` is the reference: the unchanged Hugging Face model, run by its own code, with the outputs
of the skipped sub-layers replaced by zeros (residual + 0). The two are implemented independently,
so parity between them checks the surgery and the export, not just the export.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from exporter.architectures import Layout, layout_for, sliding_window_for
from exporter.errors import UserError
from exporter.mask import SkipMask
from exporter.onnx.contract import kv_shape
from exporter.prompts import position_ids


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SkippedLayer(nn.Module):
    """One decoder layer holding only its kept sub-layers, under the base model's attribute names."""

    def __init__(self, base_layer: nn.Module, layout: Layout, index: int, config,
                 keep_attention: bool, keep_mlp: bool):
        super().__init__()
        self.layout = layout
        self.index = index
        self.has_attention = keep_attention
        self.has_mlp = keep_mlp
        if keep_attention:
            setattr(self, layout.attention_norm, getattr(base_layer, layout.attention_norm))
            setattr(self, layout.attention, getattr(base_layer, layout.attention))
            attn = getattr(base_layer, layout.attention)
            self.head_dim = attn.head_dim
            self.num_heads = config.num_attention_heads
            self.num_kv_heads = config.num_key_value_heads
            self.scaling = float(attn.scaling)
            self.sliding_window = sliding_window_for(config, index)
        if keep_mlp:
            setattr(self, layout.mlp_norm, getattr(base_layer, layout.mlp_norm))
            setattr(self, layout.mlp, getattr(base_layer, layout.mlp))

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
               past_k: torch.Tensor, past_v: torch.Tensor):
        attn = getattr(self, self.layout.attention)
        b, t, _ = x.shape
        # q: [B, T, H, D]; k, v: [B, T, H_kv, D]
        q = attn.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.layout.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # k, v: [B, H_kv, P+T, D] -- this is the layer's `present`
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        present = (k, v)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # GQA: each kv head serves `groups` query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        # scores: [B, H, T, P+T]; scaling, the fp32 bias and softmax in fp32: in fp16, finfo.min plus a
        # score below -16 rounds to -inf, and a fully masked (padding) row of -inf softmaxes to NaN
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scaling + bias
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return attn.o_proj(out), present

    def forward(self, h, cos, sin, biases, past):
        present = None
        if self.has_attention:
            norm = getattr(self, self.layout.attention_norm)
            bias = biases[self.sliding_window]
            out, present = self.attend(norm(h), cos, sin, bias, *past)
            h = h + out
        if self.has_mlp:
            norm = getattr(self, self.layout.mlp_norm)
            h = h + getattr(self, self.layout.mlp)(norm(h))
        return h, present


def attention_bias(attention_mask: torch.Tensor, seq_len: int, window: int | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, T, P+T]: causal, padding (attention_mask == 0) and sliding window.

    Positions are cache indices (what the mask counts), not position_ids (which left padding shifts).
    """
    total = attention_mask.shape[1]
    past = total - seq_len
    q_pos = torch.arange(seq_len, device=attention_mask.device) + past  # [T]
    k_pos = torch.arange(total, device=attention_mask.device)  # [P+T]
    allowed = k_pos[None, :] <= q_pos[:, None]  # [T, P+T]
    if window is not None:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg)


@dataclass
class LayerInputs:
    """What every layer of one forward needs besides the residual stream."""

    cos: torch.Tensor  # [B, T, D]
    sin: torch.Tensor
    biases: dict  # sliding window (None: full) -> additive fp32 mask [B, 1, T, P+T]


class SkippedModel(nn.Module):
    """The decode graph of a skipped model: flat per-layer KV tensors in, logits and presents out.

    forward(input_ids, attention_mask, position_ids, *past) where past is (key, value) for each kept
    attention layer in increasing layer order; returns (logits, *present) in the same order.
    """

    def __init__(self, base: nn.Module, mask: SkipMask):
        super().__init__()
        config = base.config
        layout = layout_for(config.model_type)
        self.config = config
        self.mask = mask
        inner = base.model
        self.model = nn.Module()
        self.model.embed_tokens = inner.embed_tokens
        self.model.layers = nn.ModuleList(
            SkippedLayer(layer, layout, i, config,
                         keep_attention=i not in mask.attention, keep_mlp=i not in mask.mlp)
            for i, layer in enumerate(inner.layers)
        )
        self.model.norm = inner.norm
        self.model.rotary_emb = inner.rotary_emb
        self.lm_head = base.lm_head
        self.kept_attention = mask.kept_attention(config.num_hidden_layers)
        self.windows = sorted({layer.sliding_window for layer in self.model.layers if layer.has_attention},
                              key=lambda w: (w is not None, w or 0))

    def forward(self, input_ids, attention_mask, position_ids, *past):
        h, ctx = self.embed(input_ids, attention_mask, position_ids)
        h, presents = self.run_layers(h, ctx, past)
        return (self.head(h), *presents)

    # The pieces of `forward`, also used on their own by quality / search / importance (no KV cache,
    # layers run from a shared residual stream).

    def embed(self, input_ids, attention_mask, positions=None) -> tuple[torch.Tensor, LayerInputs]:
        """The residual stream entering layer 0 [B, T, C] and what every layer needs; positions default to
        the left-padded layout's (first real token is 0)."""
        if positions is None:
            positions = position_ids(attention_mask)
        h = self.model.embed_tokens(input_ids)  # [B, T, C]
        cos, sin = self.model.rotary_emb(h, positions)  # [B, T, D]
        biases = {w: attention_bias(attention_mask, input_ids.shape[1], w, torch.float32) for w in self.windows}
        return h, LayerInputs(cos, sin, biases)

    def run_layers(self, h, ctx: LayerInputs, past=None, start: int = 0, end: int | None = None,
                   trace: list | None = None):
        """Layers start..end-1 -> (h, presents). `past`: flat (key, value) per kept attention layer from
        layer 0 on, or None for an empty cache; `trace` collects each layer's input (the residual stream)."""
        presents = []
        slot = sum(layer.has_attention for layer in self.model.layers[:start])
        empty = None
        for layer in self.model.layers[start:end]:
            if trace is not None:
                trace.append(h)
            layer_past = None
            if layer.has_attention:
                if past is None:
                    if empty is None:  # [B, H_kv, 0, D]
                        empty = h.new_zeros(kv_shape(self.config, h.shape[0], 0))
                    layer_past = (empty, empty)
                else:
                    layer_past = past[2 * slot: 2 * slot + 2]
                slot += 1
            h, present = layer(h, ctx.cos, ctx.sin, ctx.biases, layer_past)
            if present is not None:
                presents.extend(present)
        return h, presents

    def head(self, h, select=None) -> torch.Tensor:
        """fp32 logits [B, T, V] for every precision, or [N, V] at the (batch, position) index pair `select`."""
        if select is not None:
            h = h[select]
        return self.lm_head(self.model.norm(h)).float()


def apply_skip(model: nn.Module, mask: SkipMask) -> SkippedModel:
    """The skipped model: only kept modules, weights shared with `model` (no copies)."""
    num_layers = model.config.num_hidden_layers
    bad = [i for i in (*mask.attention, *mask.mlp) if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"skip mask names layer(s) {bad} but the model has {num_layers} layers (0-{num_layers - 1})")
    return SkippedModel(model, mask).eval()


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@contextlib.contextmanager
def masked(model: nn.Module, mask: SkipMask):
    """The Hugging Face model with the skipped sub-layers' outputs zeroed: the parity reference."""
    layout = layout_for(model.config.model_type)
    handles = []

    def zero_attention(_module, _inputs, output):
        return (torch.zeros_like(output[0]), *output[1:])

    def zero_mlp(_module, _inputs, output):
        return torch.zeros_like(output)

    layers = model.model.layers
    try:
        for i in mask.attention:
            handles.append(getattr(layers[i], layout.attention).register_forward_hook(zero_attention))
        for i in mask.mlp:
            handles.append(getattr(layers[i], layout.mlp).register_forward_hook(zero_mlp))
        yield model
    finally:
        for handle in handles:
            handle.remove()
