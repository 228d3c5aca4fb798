"""The masked PyTorch reference, run once and recorded (`reference.npz`), so every later check compares against
the recording instead of holding the model: the PyTorch model can be released before any ONNX Runtime session
or engine opens, and `export-skip verify --parity DIR` checks a folder on another machine.

Per validation batch the recording holds the inputs, the reference's prefill logits [B, T, V], its logits at
each teacher-forced decode step [S, B, 1, V] (fp32) and its greedy tokens [B, S + 1]. `ReplayRunner` plays a
batch back through the runner interface, so `parity.check_parity` runs unchanged: the tokens it feeds both
sides are the recorded reference's argmaxes, exactly as with the live model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter.errors import UserError

REFERENCE_FILE = "reference.npz"


@dataclass
class RecordedBatch:
    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] int64
    prefill: np.ndarray  # [B, T, V] float32
    steps: np.ndarray  # [S, B, 1, V] float32

    @property
    def tokens(self) -> np.ndarray:
        """The reference's greedy tokens [B, S + 1]: what a teacher-forced check feeds both sides."""
        first = self.prefill[:, -1].argmax(-1)[:, None]
        rest = [s[:, -1].argmax(-1)[:, None] for s in self.steps]
        return np.concatenate([first, *rest], axis=1)


def record_batch(reference, input_ids, attention_mask, steps: int) -> RecordedBatch:
    """Run a live reference runner (prefill, then `steps` greedy steps) and keep every logit."""
    logits = reference.prefill(input_ids, attention_mask)
    prefill = logits.float().numpy()
    tokens = logits[:, -1].argmax(-1, keepdim=True)
    out = []
    for _ in range(steps):
        logits = reference.step(tokens)
        out.append(logits.float().numpy())
        tokens = logits[:, -1].argmax(-1, keepdim=True)
    width = prefill.shape[-1]
    stacked = np.stack(out) if out else np.zeros((0, prefill.shape[0], 1, width), np.float32)
    return RecordedBatch(input_ids.numpy(), attention_mask.numpy(), prefill, stacked)


class ReplayRunner:
    """A recorded batch behind the runner interface: prefill returns the recorded logits for the recorded
    inputs, each step the next recorded step (the fed tokens must be the recorded greedy ones)."""

    name = "recorded-reference"

    def __init__(self, batch: RecordedBatch):
        self.batch = batch
        self.position = 0

    def prefill(self, input_ids, attention_mask):
        import torch

        if not (np.array_equal(input_ids.numpy(), self.batch.input_ids)
                and np.array_equal(attention_mask.numpy(), self.batch.attention_mask)):
            raise ValueError("the recorded reference was made for other inputs")
        self.position = 0
        return torch.from_numpy(self.batch.prefill)

    def step(self, next_ids):
        import torch

        expected = self.batch.tokens[:, self.position]
        if not np.array_equal(next_ids.numpy()[:, 0], expected):
            raise ValueError("a replayed reference is fed its own greedy tokens only")
        if self.position >= len(self.batch.steps):
            raise ValueError(f"the recording holds {len(self.batch.steps)} decode steps")
        logits = self.batch.steps[self.position]
        self.position += 1
        return torch.from_numpy(logits)


def save_reference(batches: list[RecordedBatch], path: Path) -> Path:
    arrays = {}
    for i, b in enumerate(batches):
        arrays.update({f"b{i}.input_ids": b.input_ids, f"b{i}.attention_mask": b.attention_mask,
                       f"b{i}.prefill": b.prefill, f"b{i}.steps": b.steps})
    np.savez(path, **arrays)  # uncompressed: logits barely compress, and loading stays a plain read
    return path


def load_reference(path: Path) -> list[RecordedBatch]:
    if not path.is_file():
        raise UserError(f"{path}: no recorded reference here (folders made before export-skip recorded one "
                        "cannot be checked without the model: re-run the recipe)")
    with np.load(path) as data:
        count = len({k.split(".")[0] for k in data.files})
        return [RecordedBatch(data[f"b{i}.input_ids"], data[f"b{i}.attention_mask"], data[f"b{i}.prefill"],
                              data[f"b{i}.steps"]) for i in range(count)]
