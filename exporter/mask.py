"""The skip mask: which attention and MLP sub-layers are dropped. Torch-free, so any use of a mask is cheap.

A recipe writes layers as indices or inclusive ranges ("21-30"), or as the paper's rule (the deepest
fraction of layers); `resolve_mask` turns that into a `SkipMask` for a model of a given depth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.errors import UserError

_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class SkipMask:
    """Sorted 0-based layer indices whose attention / MLP sub-layer is skipped."""

    attention: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()

    @property
    def blocks(self) -> tuple[int, ...]:
        """Layers whose attention and MLP are both skipped: the whole block is gone."""
        return tuple(sorted(set(self.attention) & set(self.mlp)))

    def kept_attention(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if i not in self.attention]

    def is_empty(self) -> bool:
        return not self.attention and not self.mlp

    def first_removed(self, num_layers: int) -> int:
        """The shallowest layer this mask touches (`num_layers` when it touches none)."""
        return min((*self.attention, *self.mlp), default=num_layers)

    def merged(self, attention=(), mlp=()) -> SkipMask:
        """This mask plus more removed sub-layers."""
        return SkipMask(attention=tuple(sorted(set(self.attention) | set(attention))),
                        mlp=tuple(sorted(set(self.mlp) | set(mlp))))

    def describe(self) -> dict:
        """The mask as reports and eval.json record it."""
        return {"attention": list(self.attention), "mlp": list(self.mlp), "blocks": list(self.blocks)}


def expand_layers(item: int | str) -> list[int]:
    """5 -> [5]; "21-30" -> [21, ..., 30]."""
    if isinstance(item, bool):
        raise ValueError("a layer is an integer index or a range string like '21-30'")
    if isinstance(item, int):
        if item < 0:
            raise ValueError(f"layer index {item} is negative; indices are 0-based")
        return [item]
    text = item.strip()
    if text.isdigit():
        return [int(text)]
    match = _RANGE.match(text)
    if not match:
        raise ValueError(f"{item!r} is neither a layer index nor an inclusive range like '21-30'")
    lo, hi = int(match[1]), int(match[2])
    if lo < 0:
        raise ValueError(f"range {item!r} starts below 0; indices are 0-based")
    if hi < lo:
        raise ValueError(f"range {item!r} is empty (end before start)")
    return list(range(lo, hi + 1))


def deepest_layers(num_layers: int, fraction: float, keep_final: bool) -> list[int]:
    """The paper's rule: the deepest round(fraction * layers) layers, shifted up by one to keep the last."""
    count = max(1, round(fraction * num_layers))
    end = num_layers - 1 if keep_final else num_layers
    return list(range(max(0, end - count), end))


def resolve_mask(recipe, num_layers: int) -> SkipMask:
    """The SkipMask of a recipe's `skip` section for a model with `num_layers` layers; out-of-range indices
    are user errors."""
    return skip_mask(recipe.skip, num_layers, str(recipe.source_path or "recipe"))


def skip_mask(skip, num_layers: int, where: str = "recipe") -> SkipMask:
    """The SkipMask of a `skip` section (recipe.Skip) for a model with `num_layers` layers; errors name `where`."""
    sets = {}
    for key in ("attention", "mlp"):
        layers: set[int] = set()
        for item in getattr(skip, key):
            for i in expand_layers(item):
                if i >= num_layers:
                    raise UserError(
                        f"{where}: skip.{key}: layer {i} is out of range: the model has {num_layers} layers (0-{num_layers - 1})"
                    )
                layers.add(i)
        sets[key] = layers
    if skip.attention_deepest_fraction is not None:
        sets["attention"] |= set(deepest_layers(num_layers, skip.attention_deepest_fraction, skip.keep_final_layer))
    return SkipMask(attention=tuple(sorted(sets["attention"])), mlp=tuple(sorted(sets["mlp"])))
