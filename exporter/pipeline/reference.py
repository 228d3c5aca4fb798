"""Run the masked PyTorch reference once on the validation batches and record it (reference.npz); check the
skipped PyTorch model against it; keep the full and skipped models' greedy answers for the report.

This is the last stage that needs the reference model's forward pass: every later check (the graphs in ONNX
Runtime, engines on a GPU, `export-skip verify --parity`) compares against the recording.
"""

from __future__ import annotations

from pathlib import Path

from exporter.model import prompts
from exporter.backends.pytorch import HFRunner, TorchRunner
from exporter.files import describe_file
from exporter.checks.parity import check_recorded, greedy_tokens
from exporter.checks.reference import REFERENCE_FILE, RecordedBatch, record_batch, save_reference
from exporter.pipeline.results import Referenced
from exporter.pipeline.settings import ReferenceSettings
from exporter.pipeline.validate import validation_batches
from exporter.model.surgery import masked


def record_reference(model, mask, batches, steps: int) -> list[RecordedBatch]:
    """The masked model (run by Hugging Face's own code, skipped sub-layers zeroed) on each (ids, mask) batch."""
    with masked(model, mask):
        return [record_batch(HFRunner(model), ids, attn, steps) for ids, attn in batches]


def reference_stage(settings: ReferenceSettings, model, skipped, tokenizer, mask, out_dir: Path) -> Referenced:
    v = settings
    batches = validation_batches(v, tokenizer)
    recorded = record_reference(model, mask, [pair for _, pair in batches], v.decode_steps)
    samples = []
    for (texts, (ids, attn)), batch in zip(batches, recorded):
        if len(texts) == 1:
            full = greedy_tokens(HFRunner(model), ids, attn, v.decode_steps)
            samples.append({"prompt": texts[0], "full": prompts.decode(tokenizer, full[0]),
                            "skipped": prompts.decode(tokenizer, batch.tokens[0].tolist())})
    path = save_reference(recorded, out_dir / REFERENCE_FILE)
    parity = check_recorded(recorded, TorchRunner(skipped), v.decode_steps, v.atol.prefill, v.atol.decode,
                            "pytorch:skipped")
    return Referenced(artifacts=[describe_file(path, out_dir, "reference")], parity=parity, samples=samples)
