"""ONNX Runtime: the runner that drives an exported graph (sessions: backends/session.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.backends.base import DecodeRunner
from exporter.dtypes import numpy_dtype
from exporter.onnx.session import open_session
from exporter.onnx.contract import is_past, is_present, past_for


class OrtRunner(DecodeRunner):
    """An exported ONNX graph in ONNX Runtime (CPU by default); presents are fed back as pasts."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, providers: list[str] | None = None, threads: int | None = None,
                 check: bool = False):
        self.session = open_session(onnx_path, threads, providers, check)
        self.past_inputs = [i for i in self.session.get_inputs() if is_past(i.name)]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def reset(self, batch: int) -> None:
        import numpy as np

        self.past = {}
        for inp in self.past_inputs:
            _, heads, _, dim = inp.shape
            # bfloat16 pasts have no numpy dtype; such graphs are run through OrtValue elsewhere
            self.past[inp.name] = np.zeros((batch, heads, 0, dim), dtype=numpy_dtype(inp.type) or np.float32)

    def forward(self, input_ids, attention_mask, position_ids):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                 "position_ids": position_ids.numpy(), **self.past}
        outputs = dict(zip(self.output_names, self.session.run(None, feeds)))
        self.past = {past_for(name): value for name, value in outputs.items() if is_present(name)}
        return torch.from_numpy(outputs["logits"]).float()
