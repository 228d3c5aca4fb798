"""Importance scores of every layer's attention and MLP, and of whole blocks, on calibration windows.

- LLM-Drop (He et al., 2024): cosine similarity between the residual stream before a sub-layer (X)
  and after it (X + f(norm(X))); the most similar sub-layers change the least and go first.
- ShortGPT (Men et al., 2024) Block Influence: BI_i = 1 - cos(X_i, X_{i+1}) for block i's input and output.
- Gromov et al. (2024) angular distance for a run of n blocks starting at l:
  arccos(cos(X_l, X_{l+n})) / pi; the run with the smallest distance is the one to drop.
Cosines are averaged over every token of the calibration windows (Gromov et al. use the last token
only; averaging over all tokens is a less noisy estimate on few windows).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from exporter.quality import data
from exporter.errors import UserError
from exporter.onnx.contract import kv_shape
from exporter.model.prompts import encode_plain
from exporter.quality.metrics import windows


def calibration_windows(tokenizer, folder, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` non-overlapping WikiText-2 windows of `length` tokens, drawn with `seed` (deterministic) from the
    second half of the test split's tokens: the first half is held out for reporting (`held_out_tokens`)."""
    ids = encode_plain(tokenizer, data.read_wikitext(folder))
    half = held_out_tokens(len(ids))
    pool = [w for w in windows(ids[half:], length) if len(w) == length]
    if count < 1 or length < 2 or count > len(pool):
        raise UserError(f"calibration: cannot draw {count} windows of {length} tokens from the second half of "
                        f"WikiText-2 ({len(pool)} available)")
    picks = sorted(random.Random(seed).sample(range(len(pool)), count))
    return [pool[i] for i in picks]


def held_out_tokens(total: int) -> int:
    """How many leading WikiText-2 test tokens no search calibrates on (the first half)."""
    return total // 2


@dataclass
class Importance:
    """Mean cosines per layer; the lower the importance, the safer the removal."""

    attention_cosine: list[float]  # LLM-Drop, attention sub-layer of layer i
    mlp_cosine: list[float]  # LLM-Drop, MLP sub-layer of layer i
    block_influence: list[float]  # ShortGPT, block i
    angular_distance: dict[int, list[float]]  # Gromov: n -> distance of the run starting at l, l = 0..L-n

    def importance(self, kind: str, layer: int) -> float:
        if kind == "attention":
            return 1.0 - self.attention_cosine[layer]
        if kind == "mlp":
            return 1.0 - self.mlp_cosine[layer]
        return self.block_influence[layer]

    def best_run(self, n: int) -> int:
        """Gromov et al.: the first layer of the run of n blocks with the smallest angular distance."""
        dist = self.angular_distance[n]
        return min(range(len(dist)), key=lambda l: (dist[l], l))

    def as_dict(self) -> dict:
        return {"attention_cosine": self.attention_cosine, "mlp_cosine": self.mlp_cosine,
                "block_influence": self.block_influence,
                "angular_distance": {str(n): d for n, d in self.angular_distance.items()}}


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # [B, T]


@torch.no_grad()
def measure_importance(full, chunks: list[list[int]]) -> Importance:
    """All scores from one pass of the unskipped model (`surgery.apply_skip(model, SkipMask())`)."""
    n = full.config.num_hidden_layers
    attn_sum, mlp_sum = [0.0] * n, [0.0] * n
    pair = torch.zeros(n + 1, n + 1, dtype=torch.float64)  # summed cos(X_a, X_b), and the same in angles
    angle = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    tokens = 0
    ids = torch.tensor(chunks, dtype=torch.long)  # [W, T], all windows in one batch
    attn = torch.ones_like(ids)
    h, ctx = full.embed(ids, attn)
    empty = h.new_zeros(kv_shape(full.config, ids.shape[0], 0))  # [W, H_kv, 0, D]: no cache
    stream = [h]  # X_0 .. X_n: the residual stream entering each block, then leaving the last
    for layer in full.model.layers:
        out, _ = layer.attention_branch(h, ctx, (empty, empty))
        mid = h + out
        attn_sum[layer.index] += float(_cos(h, mid).sum())
        h = mid + layer.mlp_branch(mid)
        mlp_sum[layer.index] += float(_cos(mid, h).sum())
        stream.append(h)
    tokens += ids.numel()
    for a in range(n + 1):
        for b in range(a + 1, n + 1):
            c = _cos(stream[a], stream[b]).clamp(-1, 1)
            pair[a, b] += c.sum()
            angle[a, b] += (torch.arccos(c) / math.pi).sum()
    pair, angle = pair / tokens, angle / tokens
    return Importance(
        attention_cosine=[s / tokens for s in attn_sum],
        mlp_cosine=[s / tokens for s in mlp_sum],
        block_influence=[1.0 - float(pair[i, i + 1]) for i in range(n)],
        angular_distance={k: [float(angle[l, l + k]) for l in range(n + 1 - k)] for k in range(1, n + 1)},
    )
