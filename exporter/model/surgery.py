"""Physical removal of skipped sub-layers, and the masked reference it is checked against.

`apply_skip` builds a `SkippedModel` that holds only the kept modules of a Hugging Face decoder
(shared with it, no weight copies): a skipped sub-layer loses its whole residual branch (its pre-norm,
the module, its post-norm where the family has one) and a skipped attention its KV cache too. State-dict
names stay those of the base model, so kept layers keep their original index. What differs between
families (architectures.Layout) is read as data: norms, fused projections, q/k norms, soft-capping,
multipliers, sliding windows and per-layer rotary embeddings.

`masked` is the reference: the unchanged Hugging Face model, run by its own code, with each skipped
branch's contribution to the residual stream replaced by zeros (residual + 0). The two are implemented
independently, so parity between them checks the surgery and the export, not just the export.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from exporter.architectures import Layout, check_config, layout_for, rope_kind_for, scalar, sliding_window_for
from exporter.errors import UserError
from exporter.mask import SkipMask
from exporter.onnx.contract import kv_shape, position_ids


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, rope) -> torch.Tensor:
    """x [B, H, T, D] rotated by (cos, sin) [B, T, D_rot], in x's dtype; with partial rotary (D_rot < D, Phi-3)
    the last D - D_rot dims pass through unrotated. cos/sin may be fp32 for a half x (OLMo 2's rotary keeps
    them fp32): the product is then fp32, cast back as Hugging Face does."""
    cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)  # [B, 1, T, D_rot]
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return (x * cos + rotate_half(x) * sin).to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat(((x_rot * cos + rotate_half(x_rot) * sin).to(x.dtype), x_pass), dim=-1)


class SkippedLayer(nn.Module):
    """One decoder layer holding only its kept branches, under the base model's attribute names.

    A branch is `h + multiplier * post_norm(module(pre_norm(h)))` (architectures.Layout): a skipped branch loses
    all of its modules, and a skipped attention its KV cache.
    """

    def __init__(self, base_layer: nn.Module, layout: Layout, index: int, config,
                 keep_attention: bool, keep_mlp: bool):
        super().__init__()
        self.layout = layout
        self.index = index
        self.has_attention = keep_attention
        self.has_mlp = keep_mlp
        self.residual_multiplier = scalar(config, layout.residual_multiplier)
        for kind, keep in (("attention", keep_attention), ("mlp", keep_mlp)):
            if keep:
                for name in layout.branch(kind):
                    setattr(self, name, getattr(base_layer, name))
        if keep_attention:
            attn = getattr(base_layer, layout.attention)
            self.head_dim = attn.head_dim
            self.num_heads = config.num_attention_heads
            self.num_kv_heads = config.num_key_value_heads
            self.scaling = float(attn.scaling)
            self.softcap = scalar(config, layout.attention_softcap)
            self.sliding_window = sliding_window_for(config, index)
            self.rope = rope_kind_for(config, index)

    def _norm(self, name: str | None, x: torch.Tensor) -> torch.Tensor:
        return x if name is None else getattr(self, name)(x)

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.residual_multiplier is None else out * self.residual_multiplier

    def _project_qkv(self, attn, x: torch.Tensor):
        """q [B, T, H*D], k and v [B, T, H_kv*D]: three projections, or one fused projection split."""
        if self.layout.qkv is None:
            return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return getattr(attn, self.layout.qkv)(x).split((q_size, kv_size, kv_size), dim=-1)

    def attend(self, x: torch.Tensor, rope, bias: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        """The attention module on its (normed) input: (output [B, T, C], present (k, v)). `rope`: (cos, sin)
        [B, T, D_rot] or None for a layer without rotary embedding."""
        attn = getattr(self, self.layout.attention)
        b, t, _ = x.shape
        q, k, v = self._project_qkv(attn, x)
        if self.layout.qk_norm == "projection":  # over all heads at once (OLMo 2)
            q, k = attn.q_norm(q), attn.k_norm(k)
        # q: [B, T, H, D]; k, v: [B, T, H_kv, D]
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.layout.qk_norm == "head":  # per head, over head_dim (Qwen3, Gemma 3)
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
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
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scaling
        if self.softcap is not None:  # Gemma 2: soft-capped before the mask
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = torch.softmax(scores + bias, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return attn.o_proj(out), present

    def attention_branch(self, h: torch.Tensor, ctx: LayerInputs, past):
        """What the attention branch adds to the residual stream h [B, T, C], and its present (k, v)."""
        x = self._norm(self.layout.attention_norm, h)
        out, present = self.attend(x, ctx.rope[self.rope], ctx.biases[self.sliding_window], *past)
        return self._scaled(self._norm(self.layout.attention_post_norm, out)), present

    def mlp_branch(self, h: torch.Tensor) -> torch.Tensor:
        """What the MLP branch adds to the residual stream h [B, T, C]."""
        out = getattr(self, self.layout.mlp)(self._norm(self.layout.mlp_norm, h))
        return self._scaled(self._norm(self.layout.mlp_post_norm, out))

    def forward(self, h, ctx: LayerInputs, past):
        present = None
        if self.has_attention:
            out, present = self.attention_branch(h, ctx, past)
            h = h + out
        if self.has_mlp:
            h = h + self.mlp_branch(h)
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

    rope: dict  # rotary kind (architectures.rope_kind_for; None: no rotary) -> (cos, sin) [B, T, D_rot] or None
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
        check_config(config)
        self.config = config
        self.layout = layout
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
        attending = [layer for layer in self.model.layers if layer.has_attention]
        self.windows = sorted({layer.sliding_window for layer in attending}, key=lambda w: (w is not None, w or 0))
        self.rope_kinds = sorted({layer.rope for layer in attending}, key=lambda k: (k is not None, k or ""))
        self.embedding_multiplier = scalar(config, layout.embedding_multiplier)
        self.logits_divisor = scalar(config, layout.logits_divisor)
        self.final_softcap = scalar(config, layout.final_softcap)

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
        h = self.model.embed_tokens(input_ids)  # [B, T, C] (Gemma's sqrt(hidden) scale is inside the module)
        if self.embedding_multiplier is not None:  # Granite
            h = h * self.embedding_multiplier
        rope = {kind: self._rotary(h, positions, kind) for kind in self.rope_kinds}
        biases = {w: attention_bias(attention_mask, input_ids.shape[1], w, torch.float32) for w in self.windows}
        return h, LayerInputs(rope, biases)

    def _rotary(self, h, positions, kind):
        """(cos, sin) [B, T, D_rot] of one rotary kind, computed by the model's own rotary module."""
        if kind is None:
            return None
        if self.layout.rope == "layer_type":
            return self.model.rotary_emb(h, positions, kind)
        return self.model.rotary_emb(h, positions)

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
            h, present = layer(h, ctx, layer_past)
            if present is not None:
                presents.extend(present)
        return h, presents

    def head(self, h, select=None) -> torch.Tensor:
        """fp32 logits [B, T, V] for every precision, or [N, V] at the (batch, position) index pair `select`."""
        if select is not None:
            h = h[select]
        logits = self.lm_head(self.model.norm(h)).float()
        if self.logits_divisor is not None:  # Granite's logits_scaling
            logits = logits / self.logits_divisor
        if self.final_softcap is not None:  # Gemma
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


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
    """The Hugging Face model with each skipped branch's contribution zeroed: the parity reference.

    The hook sits on the branch's last module (`Layout.outermost`): the attention or MLP module itself, or
    its post-norm where the family has one (Gemma's sandwich norms, OLMo 2). Zeroing only the module's
    output would leave post_norm(0) in the residual stream, which is not zero for a norm with a bias.
    """
    layout = layout_for(model.config.model_type)
    handles = []

    def zero(_module, _inputs, output):
        if isinstance(output, tuple):  # attention modules return (output, weights)
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    layers = model.model.layers
    try:
        for kind, indices in (("attention", mask.attention), ("mlp", mask.mlp)):
            for i in indices:
                handles.append(getattr(layers[i], layout.outermost(kind)).register_forward_hook(zero))
        yield model
    finally:
        for handle in handles:
            handle.remove()
