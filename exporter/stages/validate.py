"""Parity of the exported graph (and the skipped PyTorch model) against the masked reference, and greedy samples."""

from __future__ import annotations

from pathlib import Path

from exporter import prompts
from exporter.backends.ort import OrtRunner
from exporter.backends.pytorch import HFRunner, TorchRunner
from exporter.dtypes import model_precision
from exporter.parity import check_parity, greedy_tokens
from exporter.recipe import Recipe
from exporter.surgery import masked


def validate_stage(recipe: Recipe, model, skipped, tokenizer, mask, onnx_path: Path) -> dict:
    """Parity rows of the ONNX graph and of the skipped PyTorch model per validation batch, and the full and
    skipped models' greedy answers to the first prompt."""
    v = recipe.validation
    ort = OrtRunner(onnx_path)
    reference = HFRunner(model)
    parity, samples = [], []
    for texts, (ids, attn) in validation_batches(recipe, tokenizer):
        with masked(model, mask):
            for runner, name in ((ort, f"onnx:{model_precision(model)}"), (TorchRunner(skipped), "pytorch:skipped")):
                phases, trace = check_parity(reference, runner, ids, attn, v.decode_steps,
                                             v.atol.prefill, v.atol.decode, name)
                parity += [p.as_dict() for p in phases]
        if len(texts) == 1:
            full = greedy_tokens(HFRunner(model), ids, attn, v.decode_steps)
            samples.append({"prompt": texts[0], "full": prompts.decode(tokenizer, full[0]),
                            "skipped": prompts.decode(tokenizer, trace.tokens[0])})
    return {"parity": parity, "samples": samples}


def validation_batches(recipe: Recipe, tokenizer) -> list[tuple[list[str], tuple]]:
    """(texts, (input_ids, attention_mask)): the first prompt alone, then a left-padded batch of 2."""
    v = recipe.validation
    batches = [[v.prompts[0]]]
    if v.padded_batch:
        second = v.prompts[1] if len(v.prompts) > 1 else " ".join(v.prompts[0].split()[: max(1, len(v.prompts[0].split()) // 2)])
        batches.append([v.prompts[0], second])
    out = []
    for texts in batches:
        ids, attn = prompts.left_padded(tokenizer, texts, v.chat)
        if attn.all() and len(texts) > 1:  # equal lengths: drop a token from row 1 so padding is exercised
            ids, attn = ids.clone(), attn.clone()
            ids[1, 1:], attn[1, 0] = ids[1, :-1].clone(), 0
        out.append((texts, (ids, attn)))
    return out
