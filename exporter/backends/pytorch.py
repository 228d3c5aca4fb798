"""PyTorch runners: the Hugging Face model run by its own code and cache (the reference, wrapped in
`surgery.masked`), and the physically skipped model with flat per-layer KV tensors."""

from __future__ import annotations

import torch

from exporter.backends.base import DecodeRunner
from exporter.onnx.contract import kv_shape


class HFRunner(DecodeRunner):
    """A Hugging Face model run by its own code and cache (the reference; wrap in `surgery.masked`)."""

    name = "torch-reference"

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    def reset(self, batch: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids):
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=position_ids.to(self.device), cache=self.cache, use_cache=True)
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits.float().cpu()


class TorchRunner(DecodeRunner):
    """The physically skipped model (`surgery.SkippedModel`) in PyTorch, with flat per-layer KV tensors."""

    name = "torch-skipped"

    def __init__(self, skipped_model):
        self.model = skipped_model
        self.param = next(skipped_model.parameters())

    def reset(self, batch: int) -> None:
        shape = kv_shape(self.model.config, batch, 0)
        self.past = [torch.zeros(shape, dtype=self.param.dtype, device=self.param.device)
                     for _ in range(2 * len(self.model.kept_attention))]

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids):
        dev = self.param.device
        logits, *self.past = self.model(input_ids.to(dev), attention_mask.to(dev), position_ids.to(dev), *self.past)
        return logits.float().cpu()
