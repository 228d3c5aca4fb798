"""One interface over every backend: `prefill(input_ids, attention_mask)` then `step(next_ids)`.

Runners keep the KV cache between calls (on the device, for GPU backends) and derive position_ids
from the attention mask, so left-padded batches work the same everywhere. Logits come back as fp32
torch tensors on the CPU.
"""

from __future__ import annotations

import torch

from exporter.onnx.contract import position_ids


class DecodeRunner:
    """Holds the attention mask and positions; subclasses run the model and hold the cache."""

    name = "runner"

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.reset(input_ids.shape[0])
        self.mask = attention_mask.long()
        positions = position_ids(self.mask)  # left padding: first real token is 0
        self.next_position = positions[:, -1:] + 1
        return self.forward(input_ids.long(), self.mask, positions)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B, 1]); returns logits [B, 1, V]."""
        self.mask = torch.cat([self.mask, torch.ones_like(next_ids)], dim=1)
        positions = self.next_position
        self.next_position = positions + 1
        return self.forward(next_ids.long(), self.mask, positions)

    def reset(self, batch: int) -> None:
        raise NotImplementedError

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        raise NotImplementedError
